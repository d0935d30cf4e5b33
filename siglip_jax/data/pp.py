"""Preprocessing ops composed by a pipe string, big_vision style.

``get_preprocess_fn("decode|resize(224)|value_range(-1, 1)|tokenize(max_len=64)",
tokenizer=tok)`` returns a function mapping one example (a dict of tf.Tensors) to a new dict;
it works eagerly and inside ``tf.data.Dataset.map``.

Grammar: ops are separated by ``|``; an op is ``name`` or ``name(args)`` where args are
Python literals (numbers, strings, tuples/lists, True/False/None), positional or keyword.
Arguments are parsed with ``ast.literal_eval`` (never ``eval``). A ``|`` inside quotes or
brackets does not split.

Randomness: ``random_crop``, ``inception_crop``, ``flip_lr`` and ``choice`` use stateless TF
random ops. Their seed is the example's ``"_seed"`` entry (int64 [2], e.g. added by
``add_example_seeds``) folded with the op's position in the pipe, so a given example and seed
always get the same crop/flip/caption, eagerly and in tf.data, whatever the parallelism. Without
``"_seed"`` a seed is drawn from TF's stateful RNG (reproducible only via ``tf.random.set_seed``
and a deterministic pipeline). ``"_seed"`` is removed from the output.

Registered ops (``OPS``, read-only): see ``OPS.keys()``; each factory's docstring documents it.
NaFlex (SigLIP 2) images: ``resize_to_patches(16, 256)|value_range(-1, 1)|patchify(16, 256)``
turns ``image`` into ``{"patches", "mask", "spatial_shapes"}`` of fixed shapes (naflex.py).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from siglip_jax.data import naflex, pp_locca, pp_views
from siglip_jax.data.tokenizer import CONVENTIONS, Tokenizer

SEED_KEY = "_seed"
Example = dict[str, Any]
PPFn = Callable[[Example], Example]


class PPError(ValueError):
    """A pp string does not parse, names an unknown op, or gives an op bad arguments."""


class PPKeyError(KeyError):
    """An op needs a key the example does not have."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


@dataclasses.dataclass(frozen=True)
class OpContext:
    """What an op factory gets besides its pp-string arguments."""

    index: int  # position of the op in the pipe (0-based); folds into random seeds
    tokenizer: Tokenizer | None = None
    decoder_vocab: Any = None  # data.locca.DecoderVocab of the model's decoder (locca_task)


def _registry_builder() -> tuple[dict[str, Callable[..., PPFn]], Callable[[str], Any]]:
    """A dict and the decorator filling it; used only while this module is imported."""
    ops: dict[str, Callable[..., PPFn]] = {}

    def register(name: str) -> Callable[[Callable[..., PPFn]], Callable[..., PPFn]]:
        def deco(factory: Callable[..., PPFn]) -> Callable[..., PPFn]:
            if name in ops:
                raise RuntimeError(f"pp op {name!r} registered twice")
            ops[name] = factory
            return factory

        return deco

    return ops, register


_BUILDING, _register = _registry_builder()


# ------------------------------------------------------------------------------------------
# helpers


def _pair(size: int | Sequence[int], what: str) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(s, int) for s in size):
        return int(size[0]), int(size[1])
    raise PPError(f"{what}: size must be an int or (height, width), got {size!r}")


def _get(data: Example, key: str, op: str) -> tf.Tensor:
    """data[key]; a key with "/" walks nested features (TFDS "captions/text")."""
    if key in data:
        return data[key]
    node: Any = data
    for part in key.split("/"):
        if not isinstance(node, dict) or part not in node:
            raise PPKeyError(f"pp op {op!r} needs key {key!r}; example has {_keys(data)}")
        node = node[part]
    return node


def _keys(data: Example, prefix: str = "") -> list[str]:
    """All keys, nested ones written as `outer/inner`."""
    keys = []
    for key, value in data.items():
        if isinstance(value, dict):
            keys += _keys(value, f"{prefix}{key}/")
        else:
            keys.append(f"{prefix}{key}")
    return sorted(keys)


def _seed(data: Example, ctx: OpContext, salt: int = 0) -> tf.Tensor:
    """Stateless seed (int64 [2]) for the op at ctx.index: example seed folded with position."""
    if SEED_KEY in data:
        base = tf.cast(tf.reshape(data[SEED_KEY], [2]), tf.int64)
    else:
        base = tf.random.uniform([2], minval=0, maxval=2**62, dtype=tf.int64)
    seed = tf.random.experimental.stateless_fold_in(base, ctx.index)
    if salt:
        seed = tf.random.experimental.stateless_fold_in(seed, salt)
    return seed


def _resize(image: tf.Tensor, hw: Any, method: str, antialias: bool) -> tf.Tensor:
    """tf.image.resize keeping the input dtype (clip + cast, as big_vision)."""
    dtype = image.dtype
    out = tf.image.resize(image, hw, method=method, antialias=antialias)
    if dtype.is_integer:
        out = tf.cast(tf.clip_by_value(out, dtype.min, dtype.max), dtype)
    else:
        out = tf.cast(out, dtype)
    return out


_RESIZE_METHODS = ("pil", "bilinear", "nearest", "bicubic", "area", "lanczos3", "lanczos5",
                   "gaussian", "mitchellcubic")


def _image_op(key: str, op: str, fn: Callable[[tf.Tensor, Example], tf.Tensor]) -> PPFn:
    def apply(data: Example) -> Example:
        data = dict(data)
        data[key] = fn(_get(data, key, op), data)
        return data

    return apply


# ------------------------------------------------------------------------------------------
# image ops


@_register("decode")
def get_decode(ctx: OpContext, channels: int = 3, key: str = "image") -> PPFn:
    """Encoded image bytes (jpeg/png/gif/bmp) -> uint8 [H, W, channels].

    An already decoded image (any non-string tensor) passes through unchanged.
    """
    del ctx

    def fn(x: tf.Tensor, _: Example) -> tf.Tensor:
        if x.dtype != tf.string:
            return x
        img = tf.io.decode_image(x, channels=channels, expand_animations=False)
        img.set_shape([None, None, channels])
        return img

    return _image_op(key, "decode", fn)


@_register("resize")
def get_resize(
    ctx: OpContext,
    size: int | Sequence[int],
    method: str = "bilinear",
    antialias: bool = False,
    key: str = "image",
) -> PPFn:
    """Resize to size (int -> square, or (h, w)); keeps dtype (uint8 in -> uint8 out)."""
    del ctx
    hw = _pair(size, "resize")
    return _image_op(key, "resize", lambda x, _: _resize(x, hw, method, antialias))


@_register("resize_small")
def get_resize_small(
    ctx: OpContext,
    size: int,
    method: str = "area",
    antialias: bool = False,
    key: str = "image",
) -> PPFn:
    """Resize so the smaller side is `size`, keeping aspect (other side rounded)."""
    del ctx

    def fn(x: tf.Tensor, _: Example) -> tf.Tensor:
        h, w = tf.shape(x)[0], tf.shape(x)[1]
        factor = tf.cast(size, tf.float32) / tf.cast(tf.minimum(h, w), tf.float32)
        nh = tf.cast(tf.round(tf.cast(h, tf.float32) * factor), tf.int32)
        nw = tf.cast(tf.round(tf.cast(w, tf.float32) * factor), tf.int32)
        return _resize(x, tf.stack([nh, nw]), method, antialias)

    return _image_op(key, "resize_small", fn)


@_register("central_crop")
def get_central_crop(ctx: OpContext, size: int | Sequence[int], key: str = "image") -> PPFn:
    """Crop (h, w) at the centre; offset = (H - h) // 2, (W - w) // 2."""
    del ctx
    ch, cw = _pair(size, "central_crop")

    def fn(x: tf.Tensor, _: Example) -> tf.Tensor:
        dy = (tf.shape(x)[0] - ch) // 2
        dx = (tf.shape(x)[1] - cw) // 2
        return tf.image.crop_to_bounding_box(x, dy, dx, ch, cw)

    return _image_op(key, "central_crop", fn)


@_register("random_crop")
def get_random_crop(ctx: OpContext, size: int | Sequence[int], key: str = "image") -> PPFn:
    """Crop (h, w) at a uniformly random position (stateless, seeded)."""
    ch, cw = _pair(size, "random_crop")

    def fn(x: tf.Tensor, data: Example) -> tf.Tensor:
        crop = tf.image.stateless_random_crop(
            x, tf.stack([ch, cw, tf.shape(x)[2]]), seed=_seed(data, ctx)
        )
        crop.set_shape([ch, cw, x.shape[2]])
        return crop

    return _image_op(key, "random_crop", fn)


@_register("inception_crop")
def get_inception_crop(
    ctx: OpContext,
    size: int | Sequence[int] | None = None,
    area_min: float = 5,
    area_max: float = 100,
    ratio_min: float = 3 / 4,
    ratio_max: float = 4 / 3,
    method: str = "bilinear",
    antialias: bool = False,
    key: str = "image",
) -> PPFn:
    """Random crop of area_min..area_max % of the image and aspect ratio_min..max, then resize."""
    hw = _pair(size, "inception_crop") if size is not None else None
    if not 0 < area_min <= area_max <= 100:
        raise PPError(f"inception_crop: need 0 < area_min <= area_max <= 100, got "
                      f"{area_min}, {area_max}")

    def fn(x: tf.Tensor, data: Example) -> tf.Tensor:
        begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
            tf.shape(x),
            tf.zeros([0, 0, 4], tf.float32),
            seed=_seed(data, ctx),
            min_object_covered=0.0,
            aspect_ratio_range=(ratio_min, ratio_max),
            area_range=(area_min / 100, area_max / 100),
            max_attempts=100,
            use_image_if_no_bounding_boxes=True,
        )
        crop = tf.slice(x, begin, crop_size)
        crop.set_shape([None, None, x.shape[2]])
        if hw is not None:
            crop = _resize(crop, hw, method, antialias)
        return crop

    return _image_op(key, "inception_crop", fn)


@_register("flip_lr")
def get_flip_lr(ctx: OpContext, key: str = "image") -> PPFn:
    """Flip left-right with probability 1/2 (stateless, seeded)."""

    def fn(x: tf.Tensor, data: Example) -> tf.Tensor:
        return tf.image.stateless_random_flip_left_right(x, seed=_seed(data, ctx))

    return _image_op(key, "flip_lr", fn)


@_register("value_range")
def get_value_range(
    ctx: OpContext,
    vmin: float = -1.0,
    vmax: float = 1.0,
    in_min: float = 0.0,
    in_max: float = 255.0,
    clip_values: bool = False,
    key: str = "image",
) -> PPFn:
    """Map [in_min, in_max] linearly to [vmin, vmax] as float32 (optionally clipped)."""
    del ctx
    if in_max == in_min:
        raise PPError(f"value_range: in_min == in_max == {in_min}")

    def fn(x: tf.Tensor, _: Example) -> tf.Tensor:
        x = tf.cast(x, tf.float32)
        x = (x - in_min) / (in_max - in_min) * (vmax - vmin) + vmin
        if clip_values:
            x = tf.clip_by_value(x, min(vmin, vmax), max(vmin, vmax))
        return x

    return _image_op(key, "value_range", fn)


@_register("normalize")
def get_normalize(
    ctx: OpContext,
    mean: float | Sequence[float],
    std: float | Sequence[float],
    key: str = "image",
) -> PPFn:
    """(x - mean) / std per channel, float32 (values in the image's current scale)."""
    del ctx
    if np.any(np.asarray(std, np.float64) == 0):
        raise PPError(f"normalize: std must be non-zero, got {std!r}")
    mean_c = tf.constant(mean, tf.float32)
    std_c = tf.constant(std, tf.float32)

    return _image_op(key, "normalize", lambda x, _: (tf.cast(x, tf.float32) - mean_c) / std_c)


@_register("resize_to_patches")
def get_resize_to_patches(
    ctx: OpContext,
    patch_size: int,
    max_num_patches: int,
    method: str = "bilinear",
    antialias: bool = True,
    key: str = "image",
) -> PPFn:
    """NaFlex: keep the aspect ratio, sides multiples of patch_size, grid <= max_num_patches.

    The size rule is HF Siglip2ImageProcessor's exactly. method="pil" (uint8 in) runs PIL
    bilinear in the graph and equals the HF processor; TF methods differ by <= 1 grey level.
    """
    del ctx
    if method not in _RESIZE_METHODS:
        raise PPError(f"resize_to_patches: method must be one of {_RESIZE_METHODS}, got "
                      f"{method!r}")
    naflex.target_size(1, 1, patch_size, max_num_patches)  # validates the budget now

    def fn(x: tf.Tensor, _: Example) -> tf.Tensor:
        return naflex.tf_resize_to_patches(x, patch_size, max_num_patches, method, antialias)

    return _image_op(key, "resize_to_patches", fn)


@_register("patchify")
def get_patchify(
    ctx: OpContext, patch_size: int, max_num_patches: int, key: str = "image"
) -> PPFn:
    """NaFlex: image -> {"patches" [N, p*p*C], "mask" [N], "spatial_shapes" (h, w)}, padded."""
    del ctx
    naflex.target_size(1, 1, patch_size, max_num_patches)  # validates the budget now

    return _image_op(key, "patchify",
                     lambda x, _: naflex.tf_patchify(x, patch_size, max_num_patches))


# ------------------------------------------------------------------------------------------
# text ops


@_register("tokenize")
def get_tokenize(
    ctx: OpContext,
    max_len: int | None = None,
    model: str | None = None,
    eos: str | None = None,
    inkey: str = "texts",
    outkey: str = "labels",
    lower: bool | None = None,
    canonicalize: bool | None = None,
    pad_value: int | None = None,
    convention: str | None = None,
) -> PPFn:
    """Sentencepiece ids int32 [max_len] (or [N, max_len] for N texts); see tokenizer.py.

    convention="siglip2" (or "siglip") supplies max_len, eos, pad_value, lower and
    canonicalize; arguments given explicitly override it. Without one: eos="sticky",
    lower=True, canonicalize=False, max_len required.
    """
    if model is not None:
        tok = Tokenizer(model)
    elif ctx.tokenizer is not None:
        tok = ctx.tokenizer
    else:
        raise PPError("tokenize: pass model='path.model' or get_preprocess_fn(tokenizer=...)")
    if convention is not None:
        if convention not in CONVENTIONS:
            raise PPError(f"tokenize: unknown convention {convention!r}; known: "
                          f"{sorted(CONVENTIONS)}")
        conv = CONVENTIONS[convention]
        max_len = conv.max_len if max_len is None else max_len
        eos = conv.eos if eos is None else eos
        lower = conv.lower if lower is None else lower
        canonicalize = conv.canonicalize if canonicalize is None else canonicalize
        pad_value = tok.convention_pad(conv) if pad_value is None else pad_value
    if max_len is None:
        raise PPError("tokenize: give max_len (or a convention, e.g. convention='siglip2')")
    eos = "sticky" if eos is None else eos
    lower = True if lower is None else lower
    canonicalize = False if canonicalize is None else canonicalize
    tok.encode([], max_len, eos, pad_value=pad_value)  # validates max_len/eos now

    def apply(data: Example) -> Example:
        data = dict(data)
        data[outkey] = tok.tf_encode(
            _get(data, inkey, "tokenize"), max_len, eos,
            pad_value=pad_value, lower=lower, canonicalize=canonicalize,
        )
        return data

    return apply


@_register("lower")
def get_lower(ctx: OpContext, key: str = "texts") -> PPFn:
    """Lower-case a string tensor (UTF-8 aware)."""
    del ctx
    return _image_op(key, "lower", lambda x, _: tf.strings.lower(x, encoding="utf-8"))


@_register("choice")
def get_choice(ctx: OpContext, key: str | Sequence[str] = "texts") -> PPFn:
    """Pick one entry (uniformly, seeded) of a [N, ...] tensor; several keys share the index.

    An empty list gives an empty/zero value (sources drop examples without captions).
    """
    keys = [key] if isinstance(key, str) else list(key)

    def apply(data: Example) -> Example:
        data = dict(data)
        vals = [tf.convert_to_tensor(_get(data, k, "choice")) for k in keys]
        n = tf.shape(vals[0])[0]
        idx = tf.random.stateless_uniform(
            [], seed=_seed(data, ctx), minval=0, maxval=tf.maximum(n, 1), dtype=tf.int32
        )
        for k, v in zip(keys, vals, strict=True):
            data[k] = tf.cond(
                n > 0, lambda v=v: tf.gather(v, idx), lambda v=v: tf.zeros(tf.shape(v)[1:], v.dtype)
            )
        return data

    return apply


# ------------------------------------------------------------------------------------------
# dict ops


@_register("keep")
def get_keep(ctx: OpContext, *keys: str) -> PPFn:
    """Keep only the given keys (all must exist)."""
    del ctx
    if not keys:
        raise PPError("keep: give at least one key, e.g. keep('image', 'labels')")

    def apply(data: Example) -> Example:
        return {k: _get(data, k, "keep") for k in keys}

    return apply


@_register("copy")
def get_copy(ctx: OpContext, inkey: str, outkey: str) -> PPFn:
    """data[outkey] = data[inkey]."""
    del ctx

    def apply(data: Example) -> Example:
        data = dict(data)
        data[outkey] = _get(data, inkey, "copy")
        return data

    return apply


_register("locca_task")(pp_locca.get_locca_task)  # LocCa decoder sequences (pp_locca.py)

for _name, _factory in pp_views.OPS.items():  # Multi-view ops (self-distillation).
    _register(_name)(_factory)

# The registry is frozen here: a read-only copy; the builder and its decorator are deleted.
OPS: Mapping[str, Callable[..., PPFn]] = types.MappingProxyType(dict(_BUILDING))
del _BUILDING, _register, _registry_builder, _name, _factory


# ------------------------------------------------------------------------------------------
# parser


@dataclasses.dataclass(frozen=True)
class OpCall:
    """One parsed op: name, literal args and kwargs, position in the pipe and string."""

    name: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
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
                      decoder_vocab: Any = None) -> PPFn:
    """Build the example -> example function described by pp_string (`decoder_vocab`: the
    model decoder's data.locca.DecoderVocab, which `locca_task` follows)."""
    fns: list[PPFn] = []
    for call in parse(pp_string):
        where = f"pp op #{call.index + 1} {call.text!r} (char {call.offset})"
        if call.name not in OPS:
            raise PPError(f"{where}: unknown op {call.name!r}; registered ops: {sorted(OPS)}")
        factory = OPS[call.name]
        ctx = OpContext(index=call.index, tokenizer=tokenizer, decoder_vocab=decoder_vocab)
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

    def preprocess(data: Mapping[str, Any]) -> Example:
        out = {k: v if tf.is_tensor(v) or isinstance(v, Mapping) else tf.convert_to_tensor(v)
               for k, v in data.items()}
        for fn in fns:
            out = fn(out)
        out.pop(SEED_KEY, None)
        return out

    return preprocess


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
