"""Preprocessing pipes, big_vision style: the pp-string parser and the builder.

``get_preprocess_fn("decode|resize(224)|value_range(-1, 1)|tokenize(max_len=64)",
tokenizer=tok)`` returns a function mapping one example (a dict of tf.Tensors) to a new dict;
it works eagerly and inside ``tf.data.Dataset.map``.

Grammar: ops are separated by ``|``; an op is ``name`` or ``name(args)`` where args are
Python literals (numbers, strings, tuples/lists, True/False/None), positional or keyword.
Arguments are parsed with ``ast.literal_eval`` (never ``eval``). A ``|`` inside quotes or
brackets does not split.

Ops: this module imports the op modules (ops_general, ops_naflex, ops_locca, ops_views) only
to merge the op tables they registered themselves in (registry.py) into ``OPS`` (read-only);
the builder resolves op names through that registry alone (``get_preprocess_fn(ops=...)``
takes another). Each factory's docstring documents its op. NaFlex (SigLIP 2) images:
``resize_to_patches(16, 256)|value_range(-1, 1)|patchify(16, 256)`` turns ``image`` into
``{"patches", "mask", "spatial_shapes"}`` of fixed shapes (ops_naflex.py).

Randomness: ``random_crop``, ``inception_crop``, ``flip_lr``, ``choice``, ``locca_task``,
``global_view`` and ``local_crops`` use stateless TF random ops. Their seed is the
example's ``"_seed"`` entry (int64 [2], e.g. added by ``registry.add_example_seeds``)
folded with the op's position in the pipe, so a given example and seed always get the same
crop/flip/caption, eagerly and in tf.data, whatever the parallelism. Without ``"_seed"`` a
seed is drawn from TF's stateful RNG (reproducible only via ``tf.random.set_seed`` and a
deterministic pipeline). ``"_seed"`` is removed from the output.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
from collections.abc import Mapping

import tensorflow as tf

from siglip_jax.data import ops_general, ops_locca, ops_naflex, ops_views
from siglip_jax.data.locca import DecoderVocab
from siglip_jax.data.registry import (
    SEED_KEY,
    Example,
    OpContext,
    OpFactory,
    PPError,
    PPFn,
    merge,
)
from siglip_jax.data.tokenizer import Tokenizer

# The registry: the op tables the op modules filled and froze when imported.
OPS: Mapping[str, OpFactory] = merge(ops_general.OPS, ops_naflex.OPS, ops_locca.OPS,
                                     ops_views.OPS)


# ------------------------------------------------------------------------------------------
# parser


@dataclasses.dataclass(frozen=True)
class OpCall:
    """One parsed op: name, literal args and kwargs, position in the pipe and string."""

    name: str
    args: tuple[object, ...]
    kwargs: dict[str, object]
    index: int
    offset: int
    text: str


def _split_pipe(s: str) -> list[tuple[int, str]]:
    """Split on '|' outside quotes/brackets; returns (char offset, op text) pairs."""
    parts, depth, quote, start, i = [], 0, None, 0, 0
    while i < len(s):
        c = s[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = None
        elif c in "'\"":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c == "|" and depth == 0:
            parts.append((start, s[start:i]))
            start = i + 1
        i += 1
    parts.append((start, s[start:]))
    return parts


def parse(pp_string: str) -> list[OpCall]:
    """Parse a pp string into OpCalls (syntax only; names are checked by get_preprocess_fn)."""
    if not isinstance(pp_string, str):
        raise PPError(f"pp string must be a str, got {type(pp_string).__name__}")
    calls = []
    for index, (offset, raw) in enumerate(_split_pipe(pp_string)):
        text = raw.strip()
        where = f"pp op #{index + 1} {text!r} (char {offset})"
        if not text:
            raise PPError(f"{where}: empty op in {pp_string!r}")
        try:
            node = ast.parse(text, mode="eval").body
        except SyntaxError as e:
            raise PPError(f"{where}: syntax error: {e.msg}") from None
        if isinstance(node, ast.Name):
            calls.append(OpCall(node.id, (), {}, index, offset, text))
            continue
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
            raise PPError(f"{where}: expected `name` or `name(args)`")
        try:
            args = tuple(ast.literal_eval(a) for a in node.args)
            kwargs = {}
            for kw in node.keywords:
                if kw.arg is None:
                    raise PPError(f"{where}: **kwargs are not allowed")
                kwargs[kw.arg] = ast.literal_eval(kw.value)
        except (ValueError, TypeError, SyntaxError):
            raise PPError(f"{where}: arguments must be Python literals") from None
        calls.append(OpCall(node.func.id, args, kwargs, index, offset, text))
    return calls


def get_preprocess_fn(pp_string: str, *, tokenizer: Tokenizer | None = None,
                      decoder_vocab: DecoderVocab | None = None,
                      ops: Mapping[str, OpFactory] = OPS) -> PPFn:
    """Build the example -> example function described by pp_string (`decoder_vocab`: the
    model decoder's vocabulary, which `locca_task` follows). Op names are looked up in `ops`
    (default: the registry `OPS`) and nowhere else."""
    fns: list[PPFn] = []
    for call in parse(pp_string):
        where = f"pp op #{call.index + 1} {call.text!r} (char {call.offset})"
        if call.name not in ops:
            raise PPError(f"{where}: unknown op {call.name!r}; registered ops: {sorted(ops)}")
        factory = ops[call.name]
        ctx = OpContext(index=call.index, tokenizer=tokenizer, open_tokenizer=Tokenizer,
                        decoder_vocab=decoder_vocab)
        sig = inspect.signature(factory)
        try:
            sig.bind(ctx, *call.args, **call.kwargs)
        except TypeError as e:
            params = [p.replace(annotation=p.empty) for p in list(sig.parameters.values())[1:]]
            user_sig = ", ".join(str(p) for p in params)
            raise PPError(f"{where}: {e}; signature: {call.name}({user_sig})") from None
        try:
            fns.append(factory(ctx, *call.args, **call.kwargs))
        except PPError as e:
            raise PPError(f"{where}: {e}") from None
        except (ValueError, TypeError) as e:
            raise PPError(f"{where}: bad arguments: {e}") from None

    # Traced as written, without autograph: ops branch on tensors with tf.cond / tf.where
    # (docs/data.md), and the views' graphs build about twice as fast.
    @tf.autograph.experimental.do_not_convert
    def preprocess(data: Mapping[str, object]) -> Example:
        out = {k: v if tf.is_tensor(v) or isinstance(v, Mapping) else tf.convert_to_tensor(v)
               for k, v in data.items()}
        for fn in fns:
            out = fn(out)
        out.pop(SEED_KEY, None)
        return out

    return preprocess
