"""Augmented views for the self-supervised objectives (SigLIP 2 §2.3; this module's op table
`OPS`, see registry.py). docs/siglip2_training.md "Augmented views" gives every parameter's
source.

``global_view(size=None, scale=(0.4, 1.0))`` adds ``global_view`` [h, w, C]: one random
resized crop of ``image`` (area fraction in ``scale``, aspect ratio 3/4..4/3) at ``size``
(default: the image's own size), flipped left-right with probability 1/2, then DINO's colour
pipeline (ops_color.py) as one of DINO's two global views, picked with probability 1/2 per
example: "global 1" (blur always) or "global 2" (blur 0.1, solarize 0.2). The EMA teacher
and the masked-prediction student see it; the sigmoid and decoder losses keep ``image``.

``local_crops(n=8, size=96, scale=(0.05, 0.4))`` adds ``local_views`` [n, size, size, C]: n
such crops, each resized to ``size``, flipped, and with ``color=True`` (the default) DINO's
local colour pipeline (blur 0.5, no solarisation). The self-distillation student sees them.

Both are seeded from the example's ``_seed`` (folded with the op's position and the view's
index), so an example and seed always get the same views, eagerly and inside tf.data. The
output dtype and value range are the input's: the colour ops work in [0, 1] after mapping
from ``value_range`` (default: 0..255 for integer images, -1..1 for float ones, i.e. put the
ops after ``value_range(-1, 1)``), e.g.

    decode|resize(256)|value_range(-1, 1)|global_view|local_crops(8, 96)|tokenize(max_len=64)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import tensorflow as tf

from siglip_jax.data import ops_color
from siglip_jax.data.registry import (
    RESIZE_METHODS,
    Example,
    OpContext,
    OpTable,
    PPError,
    PPFn,
    example_seed,
    get,
    pair,
    resize,
)

_OPS = OpTable()
# DINO's probabilities (dino main_dino.py DataAugmentationDINO; SigLIP 2 / SILC do not give
# them): (global 1, global 2) and local.
GLOBAL_BLUR = (1.0, 0.1)
GLOBAL_SOLARIZE = (0.0, 0.2)
LOCAL_BLUR = 0.5
COLOR_SALT = 10  # Folded into a view's seed for its colour ops (crop and flip use 0 and 1).


def _check(op: str, scale: Sequence[float], ratio: Sequence[float], method: str,
           value_range: Sequence[float] | None) -> tuple[tuple[float, float], tuple[float, float]]:
    lo, hi = (float(s) for s in scale)
    if not 0 < lo <= hi <= 1:
        raise PPError(f"{op}: need 0 < scale[0] <= scale[1] <= 1, got {scale!r}")
    rlo, rhi = (float(r) for r in ratio)
    if not 0 < rlo <= rhi:
        raise PPError(f"{op}: need 0 < ratio[0] <= ratio[1], got {ratio!r}")
    if method not in RESIZE_METHODS or method == "pil":
        raise PPError(f"{op}: unknown resize method {method!r}")
    if value_range is not None and (len(value_range) != 2 or value_range[0] == value_range[1]):
        raise PPError(f"{op}: value_range must be (lo, hi) with lo != hi, got {value_range!r}")
    return (lo, hi), (rlo, rhi)


def crop_view(image: tf.Tensor, seed: tf.Tensor, hw: tf.Tensor | Sequence[int],
              scale: Sequence[float], ratio: Sequence[float], flip: bool, method: str,
              antialias: bool) -> tf.Tensor:
    """Random resized crop of `image` (area fraction in `scale`, aspect in `ratio`) at `hw`,
    flipped left-right with probability 1/2 if `flip`."""
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image), tf.zeros([0, 0, 4], tf.float32), seed=seed,
        min_object_covered=0.0, aspect_ratio_range=tuple(ratio), area_range=tuple(scale),
        max_attempts=100, use_image_if_no_bounding_boxes=True)
    out = tf.slice(image, begin, crop_size)
    out.set_shape([None, None, image.shape[2]])
    out = resize(out, hw, method, antialias)
    if flip:
        flip_seed = tf.random.experimental.stateless_fold_in(seed, 1)
        out = tf.image.stateless_random_flip_left_right(out, seed=flip_seed)
    return out


def _colored(view: tf.Tensor, seed: tf.Tensor, value_range: Sequence[float] | None,
             blur_p: float | tf.Tensor, solarize_p: float | tf.Tensor) -> tf.Tensor:
    """DINO's colour pipeline on `view`, in [0, 1] after mapping from its value range."""
    vr = value_range or ((0.0, 255.0) if view.dtype.is_integer else (-1.0, 1.0))
    x = ops_color.to_unit(view, vr)
    x = ops_color.dino_photometric(x, tf.random.experimental.stateless_fold_in(seed, COLOR_SALT),
                                   blur_p, solarize_p)
    return ops_color.from_unit(x, vr, view.dtype)


@_OPS.register("global_view")
def get_global_view(ctx: OpContext, size: int | Sequence[int] | None = None,
                    scale: Sequence[float] = (0.4, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3),
                    flip: bool = True, color: bool = True, method: str = "bilinear",
                    antialias: bool = True, value_range: Sequence[float] | None = None,
                    key: str = "image", outkey: str = "global_view") -> PPFn:
    """`outkey` = one random resized crop of `key` at `size` (default: the image's size),
    flipped, with one of DINO's two global colour pipelines (picked per example)."""
    hw = pair(size, "global_view") if size is not None else None
    area, aspect = _check("global_view", scale, ratio, method, value_range)

    def apply(data: Mapping[str, object]) -> Example:
        data = dict(data)
        image = get(data, key, "global_view")
        seed = tf.random.experimental.stateless_fold_in(example_seed(data, ctx), 2)
        out_hw = hw if hw is not None else tf.shape(image)[:2]
        view = crop_view(image, seed, out_hw, area, aspect, flip, method, antialias)
        if color:
            which = tf.random.stateless_uniform(
                [], seed=tf.random.experimental.stateless_fold_in(seed, 2), maxval=2,
                dtype=tf.int32)
            pick = lambda pair_: tf.gather(tf.constant(pair_, tf.float32), which)
            view = _colored(view, seed, value_range, pick(GLOBAL_BLUR), pick(GLOBAL_SOLARIZE))
        static = hw if hw is not None else image.shape[:2]
        data[outkey] = tf.ensure_shape(view, [static[0], static[1], image.shape[2]])
        return data

    return apply


@_OPS.register("local_crops")
def get_local_crops(ctx: OpContext, n: int = 8, size: int | Sequence[int] = 96,
                    scale: Sequence[float] = (0.05, 0.4), ratio: Sequence[float] = (3 / 4, 4 / 3),
                    flip: bool = True, color: bool = True, method: str = "bilinear",
                    antialias: bool = True, value_range: Sequence[float] | None = None,
                    key: str = "image", outkey: str = "local_views") -> PPFn:
    """`outkey` = n random crops of `key` (area fraction in `scale`, aspect ratio in `ratio`),
    resized to `size`, optionally flipped and colour-augmented (DINO's local pipeline):
    [n, h, w, C] of the input's dtype."""
    hw = pair(size, "local_crops")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise PPError(f"local_crops: n must be a positive int, got {n!r}")
    area, aspect = _check("local_crops", scale, ratio, method, value_range)

    def one(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        view = crop_view(image, seed, hw, area, aspect, flip, method, antialias)
        return _colored(view, seed, value_range, LOCAL_BLUR, 0.0) if color else view

    def apply(data: Mapping[str, object]) -> Example:
        data = dict(data)
        image = get(data, key, "local_crops")
        base = example_seed(data, ctx)
        views = [one(image, tf.random.experimental.stateless_fold_in(base, 2 + 2 * i))
                 for i in range(n)]
        data[outkey] = tf.ensure_shape(tf.stack(views), [n, hw[0], hw[1], image.shape[2]])
        return data

    return apply


OPS = _OPS.freeze()
del _OPS
