"""General pp ops: image decoding, resizing, cropping, flips, value ranges; text tokenizing,
lower-casing and choosing; dict keep/copy. Each registers itself in this module's op table
(`OPS`, see registry.py); pp.py merges the tables of all op modules.

Random ops (`random_crop`, `inception_crop`, `flip_lr`, `choice`) draw from
`registry.example_seed`: the example's seed folded with the op's position in the pipe.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from siglip_jax.data.registry import (
    Example,
    OpContext,
    OpTable,
    PPError,
    PPFn,
    example_seed,
    get,
    map_key,
    pair,
    resize,
)
from siglip_jax.data.tokenizer_rules import CONVENTIONS

_OPS = OpTable()

# ------------------------------------------------------------------------------------------
# image ops


@_OPS.register("decode")
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

    return map_key(key, "decode", fn)


@_OPS.register("resize")
def get_resize(
    ctx: OpContext,
    size: int | Sequence[int],
    method: str = "bilinear",
    antialias: bool = False,
    key: str = "image",
) -> PPFn:
    """Resize to size (int -> square, or (h, w)); keeps dtype (uint8 in -> uint8 out)."""
    del ctx
    hw = pair(size, "resize")
    return map_key(key, "resize", lambda x, _: resize(x, hw, method, antialias))


@_OPS.register("resize_small")
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
        return resize(x, tf.stack([nh, nw]), method, antialias)

    return map_key(key, "resize_small", fn)


@_OPS.register("central_crop")
def get_central_crop(ctx: OpContext, size: int | Sequence[int], key: str = "image") -> PPFn:
    """Crop (h, w) at the centre; offset = (H - h) // 2, (W - w) // 2."""
    del ctx
    ch, cw = pair(size, "central_crop")

    def fn(x: tf.Tensor, _: Example) -> tf.Tensor:
        dy = (tf.shape(x)[0] - ch) // 2
        dx = (tf.shape(x)[1] - cw) // 2
        return tf.image.crop_to_bounding_box(x, dy, dx, ch, cw)

    return map_key(key, "central_crop", fn)


@_OPS.register("random_crop")
def get_random_crop(ctx: OpContext, size: int | Sequence[int], key: str = "image") -> PPFn:
    """Crop (h, w) at a uniformly random position (stateless, seeded)."""
    ch, cw = pair(size, "random_crop")

    def fn(x: tf.Tensor, data: Example) -> tf.Tensor:
        crop = tf.image.stateless_random_crop(
            x, tf.stack([ch, cw, tf.shape(x)[2]]), seed=example_seed(data, ctx)
        )
        crop.set_shape([ch, cw, x.shape[2]])
        return crop

    return map_key(key, "random_crop", fn)


@_OPS.register("inception_crop")
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
    hw = pair(size, "inception_crop") if size is not None else None
    if not 0 < area_min <= area_max <= 100:
        raise PPError(f"inception_crop: need 0 < area_min <= area_max <= 100, got "
                      f"{area_min}, {area_max}")

    def fn(x: tf.Tensor, data: Example) -> tf.Tensor:
        begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
            tf.shape(x),
            tf.zeros([0, 0, 4], tf.float32),
            seed=example_seed(data, ctx),
            min_object_covered=0.0,
            aspect_ratio_range=(ratio_min, ratio_max),
            area_range=(area_min / 100, area_max / 100),
            max_attempts=100,
            use_image_if_no_bounding_boxes=True,
        )
        crop = tf.slice(x, begin, crop_size)
        crop.set_shape([None, None, x.shape[2]])
        if hw is not None:
            crop = resize(crop, hw, method, antialias)
        return crop

    return map_key(key, "inception_crop", fn)


@_OPS.register("flip_lr")
def get_flip_lr(ctx: OpContext, key: str = "image") -> PPFn:
    """Flip left-right with probability 1/2 (stateless, seeded)."""

    def fn(x: tf.Tensor, data: Example) -> tf.Tensor:
        return tf.image.stateless_random_flip_left_right(x, seed=example_seed(data, ctx))

    return map_key(key, "flip_lr", fn)


@_OPS.register("value_range")
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

    return map_key(key, "value_range", fn)


@_OPS.register("normalize")
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

    return map_key(key, "normalize", lambda x, _: (tf.cast(x, tf.float32) - mean_c) / std_c)



# ------------------------------------------------------------------------------------------
# text ops


@_OPS.register("tokenize")
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
        tok = ctx.open_tokenizer(model)
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
            get(data, inkey, "tokenize"), max_len, eos,
            pad_value=pad_value, lower=lower, canonicalize=canonicalize,
        )
        return data

    return apply


@_OPS.register("lower")
def get_lower(ctx: OpContext, key: str = "texts") -> PPFn:
    """Lower-case a string tensor (UTF-8 aware)."""
    del ctx
    return map_key(key, "lower", lambda x, _: tf.strings.lower(x, encoding="utf-8"))


@_OPS.register("choice")
def get_choice(ctx: OpContext, key: str | Sequence[str] = "texts") -> PPFn:
    """Pick one entry (uniformly, seeded) of a [N, ...] tensor; several keys share the index.

    An empty list gives an empty/zero value (sources drop examples without captions).
    """
    keys = [key] if isinstance(key, str) else list(key)

    def apply(data: Example) -> Example:
        data = dict(data)
        vals = [tf.convert_to_tensor(get(data, k, "choice")) for k in keys]
        n = tf.shape(vals[0])[0]
        idx = tf.random.stateless_uniform(
            [], seed=example_seed(data, ctx), minval=0, maxval=tf.maximum(n, 1), dtype=tf.int32
        )
        for k, v in zip(keys, vals, strict=True):
            data[k] = tf.cond(
                n > 0, lambda v=v: tf.gather(v, idx), lambda v=v: tf.zeros(tf.shape(v)[1:], v.dtype)
            )
        return data

    return apply


# ------------------------------------------------------------------------------------------
# dict ops


@_OPS.register("keep")
def get_keep(ctx: OpContext, *keys: str) -> PPFn:
    """Keep only the given keys (all must exist)."""
    del ctx
    if not keys:
        raise PPError("keep: give at least one key, e.g. keep('image', 'labels')")

    def apply(data: Example) -> Example:
        return {k: get(data, k, "keep") for k in keys}

    return apply


@_OPS.register("copy")
def get_copy(ctx: OpContext, inkey: str, outkey: str) -> PPFn:
    """data[outkey] = data[inkey]."""
    del ctx

    def apply(data: Example) -> Example:
        data = dict(data)
        data[outkey] = get(data, inkey, "copy")
        return data

    return apply


OPS = _OPS.freeze()
del _OPS
