"""Multi-view pp ops for the self-distillation objective (this module's op table `OPS`, see
registry.py).

``local_crops(n=8, size=96, scale=(0.05, 0.4))`` adds ``local_views`` [n, size, size, C]: n
random crops of ``image`` covering ``scale`` of its area (aspect ratio 3/4..4/3, DINO / SILC
multi-crop), each resized to ``size`` and flipped left-right with probability 1/2. The crops
are seeded from the example's ``_seed`` (folded with the op's position and the crop index), so
an example and seed always get the same crops, eagerly and inside tf.data. The dtype is the
input's: put the op after ``value_range`` (or add ``value_range(-1, 1, key="local_views")``)
so the views are float32 in the model's range, e.g.

    decode|resize(256)|value_range(-1, 1)|local_crops(8, 96)|tokenize(max_len=64)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import tensorflow as tf

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


@_OPS.register("local_crops")
def get_local_crops(ctx: OpContext, n: int = 8, size: int | Sequence[int] = 96,
                    scale: Sequence[float] = (0.05, 0.4), ratio: Sequence[float] = (3 / 4, 4 / 3),
                    flip: bool = True, method: str = "bilinear", antialias: bool = True,
                    key: str = "image", outkey: str = "local_views"
                    ) -> PPFn:
    """`outkey` = n random crops of `key` (area fraction in `scale`, aspect ratio in `ratio`),
    resized to `size`, optionally flipped: [n, h, w, C] of the input's dtype."""
    hw = pair(size, "local_crops")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise PPError(f"local_crops: n must be a positive int, got {n!r}")
    lo, hi = (float(s) for s in scale)
    if not 0 < lo <= hi <= 1:
        raise PPError(f"local_crops: need 0 < scale[0] <= scale[1] <= 1, got {scale!r}")
    if method not in RESIZE_METHODS or method == "pil":
        raise PPError(f"local_crops: unknown resize method {method!r}")
    rlo, rhi = (float(r) for r in ratio)
    if not 0 < rlo <= rhi:
        raise PPError(f"local_crops: need 0 < ratio[0] <= ratio[1], got {ratio!r}")

    def crop(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
            tf.shape(image), tf.zeros([0, 0, 4], tf.float32), seed=seed,
            min_object_covered=0.0, aspect_ratio_range=(rlo, rhi), area_range=(lo, hi),
            max_attempts=100, use_image_if_no_bounding_boxes=True)
        out = tf.slice(image, begin, crop_size)
        out.set_shape([None, None, image.shape[2]])
        out = resize(out, hw, method, antialias)
        if flip:
            flip_seed = tf.random.experimental.stateless_fold_in(seed, 1)
            out = tf.image.stateless_random_flip_left_right(out, seed=flip_seed)
        return out

    def apply(data: Mapping[str, object]) -> Example:
        data = dict(data)
        image = get(data, key, "local_crops")
        base = example_seed(data, ctx)
        views = [crop(image, tf.random.experimental.stateless_fold_in(base, 2 + 2 * i))
                 for i in range(n)]
        data[outkey] = tf.ensure_shape(tf.stack(views), [n, hw[0], hw[1], image.shape[2]])
        return data

    return apply


OPS = _OPS.freeze()
del _OPS
