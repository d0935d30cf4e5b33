"""NaFlex (SigLIP 2) pp ops: `resize_to_patches` (aspect-preserving resize to a patch budget)
and `patchify` (image -> padded patches, mask, spatial shapes), registered in this module's op
table (`OPS`, see registry.py). The maths is in naflex.py:

    resize_to_patches(16, 256)|value_range(-1, 1)|patchify(16, 256)

turns `image` into {"patches", "mask", "spatial_shapes"} of fixed shapes.
"""

from __future__ import annotations

import tensorflow as tf

from siglip_jax.data import naflex
from siglip_jax.data.registry import (
    RESIZE_METHODS,
    Example,
    OpContext,
    OpTable,
    PPError,
    PPFn,
    map_key,
)

_OPS = OpTable()


@_OPS.register("resize_to_patches")
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
    if method not in RESIZE_METHODS:
        raise PPError(f"resize_to_patches: method must be one of {RESIZE_METHODS}, got "
                      f"{method!r}")
    naflex.target_size(1, 1, patch_size, max_num_patches)  # validates the budget now

    def fn(x: tf.Tensor, _: Example) -> tf.Tensor:
        return naflex.tf_resize_to_patches(x, patch_size, max_num_patches, method, antialias)

    return map_key(key, "resize_to_patches", fn)


@_OPS.register("patchify")
def get_patchify(
    ctx: OpContext, patch_size: int, max_num_patches: int, key: str = "image"
) -> PPFn:
    """NaFlex: image -> {"patches" [N, p*p*C], "mask" [N], "spatial_shapes" (h, w)}, padded."""
    del ctx
    naflex.target_size(1, 1, patch_size, max_num_patches)  # validates the budget now

    return map_key(key, "patchify",
                   lambda x, _: naflex.tf_patchify(x, patch_size, max_num_patches))


OPS = _OPS.freeze()
del _OPS
