"""The pp op registry and the helpers every op module shares.

An op is a factory `get_<name>(ctx: OpContext, *args, **kwargs) -> PPFn` (a function from one
example, a dict of tf.Tensors, to a new dict). Each `ops_*.py` module registers its own ops
while it is imported and then freezes its table:

    _OPS = OpTable()

    @_OPS.register("decode")
    def get_decode(ctx: OpContext, channels: int = 3, key: str = "image") -> PPFn: ...

    OPS = _OPS.freeze()   # read-only {name: factory}; registering after this raises

`merge(*tables)` joins the frozen tables into the one registry the builder (pp.py) reads;
a name registered twice raises. Nothing here changes after the op modules are imported.

Helpers for ops: `get` (a key of an example, "/" walks nested features), `example_seed`
(the stateless seed of an op: the example's `SEED_KEY` folded with the op's position; the
input pipeline sets `SEED_KEY` with `add_example_seeds`),
`pair`, `resize`, `RESIZE_METHODS`, `map_key` (apply a function to one key), and the errors
`PPError` / `PPKeyError`.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import tensorflow as tf

from siglip_jax.data.locca import DecoderVocab

SEED_KEY = "_seed"
Example = dict[str, object]
PPFn = Callable[[Example], Example]
OpFactory = Callable[..., PPFn]
RESIZE_METHODS = ("pil", "bilinear", "nearest", "bicubic", "area", "lanczos3", "lanczos5",
                  "gaussian", "mitchellcubic")


class PPError(ValueError):
    """A pp string does not parse, names an unknown op, or gives an op bad arguments."""


class PPKeyError(KeyError):
    """An op needs a key the example does not have."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class TextTokenizer(Protocol):
    """What the text ops use of a tokenizer (`data.tokenizer.Tokenizer` is the one they get);
    a protocol, so that neither the registry nor the ops load the tokenizer module."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    def convention_pad(self, convention: str) -> int: ...

    def encode(self, texts: Sequence[str] | str, max_len: int, eos: str = "sticky", *,
               pad_value: int | None = None, lower: bool = True,
               canonicalize: bool = False) -> object: ...

    def tf_encode(self, texts: tf.Tensor, max_len: int, eos: str = "sticky", *,
                  pad_value: int | None = None, lower: bool = True,
                  canonicalize: bool = False) -> tf.Tensor: ...


@dataclasses.dataclass(frozen=True)
class OpContext:
    """What an op factory gets besides its pp-string arguments."""

    index: int  # position of the op in the pipe (0-based); folds into random seeds
    # Opens a sentencepiece model file (the `tokenize` op's `model=`); pp.py passes the
    # `data.tokenizer.Tokenizer` class.
    open_tokenizer: Callable[[str], TextTokenizer]
    tokenizer: TextTokenizer | None = None
    decoder_vocab: DecoderVocab | None = None  # the model decoder's vocabulary (locca_task)


class OpTable:
    """The ops of one module: filled by `@register(name)` while the module is imported, then
    `freeze()` returns the read-only table and refuses further registrations."""

    def __init__(self) -> None:
        self._ops: dict[str, OpFactory] = {}
        self._frozen = False

    def register(self, name: str) -> Callable[[OpFactory], OpFactory]:
        """Decorator registering a factory under `name`."""

        def deco(factory: OpFactory) -> OpFactory:
            if self._frozen:
                raise RuntimeError(f"pp op {name!r} registered after its table was frozen")
            if name in self._ops:
                raise RuntimeError(f"pp op {name!r} registered twice")
            self._ops[name] = factory
            return factory

        return deco

    def freeze(self) -> Mapping[str, OpFactory]:
        """The registered ops as a read-only mapping; no op can be added afterwards."""
        self._frozen = True
        return types.MappingProxyType(dict(self._ops))


def merge(*tables: Mapping[str, OpFactory]) -> Mapping[str, OpFactory]:
    """One read-only registry from the op modules' frozen tables; a name in two raises."""
    ops: dict[str, OpFactory] = {}
    for table in tables:
        for name, factory in table.items():
            if name in ops:
                raise RuntimeError(f"pp op {name!r} registered by two op modules")
            ops[name] = factory
    return types.MappingProxyType(ops)


# ------------------------------------------------------------------------------------------
# helpers for ops


def pair(size: int | Sequence[int], what: str) -> tuple[int, int]:
    """(h, w) from an int (square) or a pair; PPError naming the op `what` otherwise."""
    if isinstance(size, int):
        return size, size
    if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(s, int) for s in size):
        return int(size[0]), int(size[1])
    raise PPError(f"{what}: size must be an int or (height, width), got {size!r}")


def get(data: Example, key: str, op: str) -> tf.Tensor:
    """data[key]; a key with "/" walks nested features (TFDS "captions/text")."""
    if key in data:
        return data[key]
    node: object = data
    for part in key.split("/"):
        if not isinstance(node, dict) or part not in node:
            raise PPKeyError(f"pp op {op!r} needs key {key!r}; example has {keys(data)}")
        node = node[part]
    return node


def keys(data: Mapping[str, object], prefix: str = "") -> list[str]:
    """All keys, nested ones written as `outer/inner`."""
    out = []
    for key, value in data.items():
        if isinstance(value, dict):
            out += keys(value, f"{prefix}{key}/")
        else:
            out.append(f"{prefix}{key}")
    return sorted(out)


def example_seed(data: Example, ctx: OpContext, salt: int = 0) -> tf.Tensor:
    """Stateless seed (int64 [2]) for the op at ctx.index: example seed folded with position.

    Without `SEED_KEY` in the example a seed is drawn from TF's stateful RNG."""
    if SEED_KEY in data:
        base = tf.cast(tf.reshape(data[SEED_KEY], [2]), tf.int64)
    else:
        base = tf.random.uniform([2], minval=0, maxval=2**62, dtype=tf.int64)
    seed = tf.random.experimental.stateless_fold_in(base, ctx.index)
    if salt:
        seed = tf.random.experimental.stateless_fold_in(seed, salt)
    return seed


def add_example_seeds(ds: tf.data.Dataset, seed: int) -> tf.data.Dataset:
    """Add "_seed" = [seed, position in ds] (int64) to each example dict of ds.

    Apply it after shuffle/repeat, with `seed` already folded with the process index, so every
    example occurrence gets its own, reproducible randomness.
    """
    seed_t = tf.constant(seed, tf.int64)
    return ds.enumerate().map(
        lambda i, ex: {**ex, SEED_KEY: tf.stack([seed_t, tf.cast(i, tf.int64)])},
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )


def resize(image: tf.Tensor, hw: tf.Tensor | Sequence[int], method: str,
           antialias: bool) -> tf.Tensor:
    """tf.image.resize keeping the input dtype (clip + cast, as big_vision)."""
    dtype = image.dtype
    out = tf.image.resize(image, hw, method=method, antialias=antialias)
    if dtype.is_integer:
        out = tf.cast(tf.clip_by_value(out, dtype.min, dtype.max), dtype)
    else:
        out = tf.cast(out, dtype)
    return out


def map_key(key: str, op: str, fn: Callable[[tf.Tensor, Example], tf.Tensor]) -> PPFn:
    """The PPFn replacing data[key] by fn(data[key], data)."""

    def apply(data: Example) -> Example:
        data = dict(data)
        data[key] = fn(get(data, key, op), data)
        return data

    return apply
