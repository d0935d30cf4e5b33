"""NaFlex preprocessing (SigLIP 2): resize to a patch budget keeping the aspect ratio, patchify,
pad to a fixed number of patches with a mask.

An image of H×W pixels is resized to H'×W', both multiples of the patch size p, with the
largest scale whose patch grid h×w = (H'/p)×(W'/p) still fits ``max_num_patches`` (found by
bisection over the scale, exactly the rule of transformers' ``Siglip2ImageProcessor`` and
big_vision's ``resize_to_sequence``; each side is at least one patch). The image is then cut
into h·w patches, each flattened in (row, column, channel) order to p·p·3 values, row-major
over the grid, and padded with zero patches to ``max_num_patches``:

    {"patches": float32 [N, p·p·3], "mask": bool [N] (True = real patch),
     "spatial_shapes": int32 [2] = (h, w)}

Two implementations:

- ``naflex_preprocess`` (NumPy + PIL, eager): bit-for-bit the Hugging Face processor
  (``Siglip2ImageProcessor``'s PIL backend: PIL resize of the uint8 image, ``x · 1/255`` in
  float64 cast to float32, then ``(x − mean) / std`` in float32). ``predict`` uses it.
- TF functions for the pp ops ``resize_to_patches`` and ``patchify`` (tf.data, fixed output
  shapes so one batch can mix aspect ratios). ``resize_to_patches(method="pil")`` runs PIL
  inside tf.data: ``decode|resize_to_patches(16, 256, method="pil")|value_range(0, 1)|
  normalize(0.5, 0.5)|patchify(16, 256)`` is bit-equal to the HF processor (measured on the
  test images; x/255 in float32 happens to equal HF's float64 x·(1/255) cast to float32 for
  every uint8 x). The default TF kernel (``bilinear`` with
  antialiasing, big_vision's choice) differs from PIL by at most one grey level (PIL resizes
  in two passes with an 8-bit intermediate), i.e. ≤ 2/255 after scaling to [−1, 1].
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import tensorflow as tf
from PIL import Image

SCALE_MIN_FACTOR = 0.1  # the bisection's lower bound is eps · 0.1
SCALE_MAX = 100.0       # and its upper bound 100 (an image can grow at most 100×)
PIL_RESAMPLE = {0: "NEAREST", 1: "LANCZOS", 2: "BILINEAR", 3: "BICUBIC", 4: "BOX", 5: "HAMMING"}


class NaFlexError(ValueError):
    """A NaFlex argument or image that the preprocessing cannot use."""


def _check_budget(patch_size: int, max_num_patches: int) -> None:
    for name, value in (("patch_size", patch_size), ("max_num_patches", max_num_patches)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise NaFlexError(f"{name} must be a positive int, got {value!r}")


def _side(length: float, scale: float, patch_size: int) -> int:
    """One side after scaling: rounded up to a multiple of the patch size, at least one patch."""
    return max(patch_size, math.ceil(length * scale / patch_size) * patch_size)


def target_size(height: int, width: int, patch_size: int, max_num_patches: int,
                eps: float = 1e-5) -> tuple[int, int]:
    """(H', W') in pixels, multiples of patch_size, whose patch grid fits max_num_patches."""
    _check_budget(patch_size, max_num_patches)
    if min(height, width) < 1:
        raise NaFlexError(f"image size must be positive, got {height}x{width}")
    lo, hi = eps * SCALE_MIN_FACTOR, SCALE_MAX
    while hi - lo >= eps:
        mid = (lo + hi) / 2
        rows = _side(height, mid, patch_size) // patch_size
        cols = _side(width, mid, patch_size) // patch_size
        if rows * cols <= max_num_patches:
            lo = mid
        else:
            hi = mid
    return _side(height, lo, patch_size), _side(width, lo, patch_size)


def tf_target_size(hw: tf.Tensor, patch_size: int, max_num_patches: int,
                   eps: float = 1e-5) -> tf.Tensor:
    """``target_size`` as TF ops on int [..., 2] (height, width) tensors → int32 [..., 2].

    Float64 throughout, so it takes the same bisection steps as the Python version; each
    element stops on its own when its interval is narrower than eps.
    """
    _check_budget(patch_size, max_num_patches)
    hw = tf.cast(hw, tf.float64)
    p = tf.constant(patch_size, tf.float64)

    def sides(scale: tf.Tensor) -> tf.Tensor:
        return tf.maximum(p, tf.math.ceil(hw * scale[..., None] / p) * p)

    def body(lo: tf.Tensor, hi: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        active = hi - lo >= eps
        mid = (lo + hi) / 2
        grid = sides(mid) / p
        fits = grid[..., 0] * grid[..., 1] <= max_num_patches
        return (tf.where(active & fits, mid, lo), tf.where(active & ~fits, mid, hi))

    lo0 = tf.fill(tf.shape(hw)[:-1], tf.constant(eps * SCALE_MIN_FACTOR, tf.float64))
    hi0 = tf.fill(tf.shape(hw)[:-1], tf.constant(SCALE_MAX, tf.float64))
    lo, _ = tf.while_loop(lambda lo, hi: tf.reduce_any(hi - lo >= eps), body, (lo0, hi0))
    return tf.cast(sides(lo), tf.int32)


# ------------------------------------------------------------------------------------------
# NumPy + PIL (exact HF processor)


def _pil_resample(resample: int | str) -> Image.Resampling:
    name = PIL_RESAMPLE.get(resample) if not isinstance(resample, str) else resample.upper()
    if name not in PIL_RESAMPLE.values():
        raise NaFlexError(f"resample must be one of {PIL_RESAMPLE} (or their names), got "
                          f"{resample!r}")
    return getattr(Image.Resampling, name)


def pil_resize(image: np.ndarray, size: Sequence[int], resample: int | str = 2) -> np.ndarray:
    """uint8 [H, W, C] → uint8 [h, w, C] with PIL (bilinear = PIL's antialiased triangle)."""
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] not in (1, 3):
        raise NaFlexError(f"PIL resize needs a uint8 [H, W, 1|3] image, got {array.dtype} "
                          f"{array.shape}")
    pil = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    out = np.asarray(pil.resize((int(size[1]), int(size[0])), resample=_pil_resample(resample)))
    return out.reshape(int(size[0]), int(size[1]), array.shape[-1])


def patchify_array(image: np.ndarray, patch_size: int) -> np.ndarray:
    """[H, W, C] → [H/p · W/p, p·p·C]: patches row-major over the grid, each (row, col, chan)."""
    h, w, c = image.shape
    if h % patch_size or w % patch_size:
        raise NaFlexError(f"image {h}x{w} is not a multiple of patch_size {patch_size}")
    grid = image.reshape(h // patch_size, patch_size, w // patch_size, patch_size, c)
    return grid.transpose(0, 2, 1, 3, 4).reshape(-1, patch_size * patch_size * c)


def _to_uint8_rgb(image: Image.Image | np.ndarray) -> np.ndarray:
    """A uint8 [H, W, 3] array from a PIL image (converted to RGB) or a uint8 array."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
        raise NaFlexError(f"an image must be a PIL image or uint8 [H, W, 3], got {array.dtype} "
                          f"{array.shape}")
    return array


def naflex_preprocess(
    images: Sequence[Image.Image | np.ndarray],
    max_num_patches: int = 256,
    patch_size: int = 16,
    *,
    resample: int | str = 2,
    rescale_factor: float = 1 / 255,
    mean: float | Sequence[float] = 0.5,
    std: float | Sequence[float] = 0.5,
) -> dict[str, np.ndarray]:
    """HF ``Siglip2ImageProcessor`` outputs as NumPy: patches [B, N, p·p·3] float32, mask
    bool [B, N], spatial_shapes int32 [B, 2] (defaults = the released NaFlex processors')."""
    _check_budget(patch_size, max_num_patches)
    mean32 = np.broadcast_to(np.asarray(mean, np.float32), (3,))
    std32 = np.broadcast_to(np.asarray(std, np.float32), (3,))
    if np.any(std32 == 0):
        raise NaFlexError(f"std must be non-zero, got {std!r}")
    n, dim = int(max_num_patches), patch_size * patch_size * 3
    patches = np.zeros((len(images), n, dim), np.float32)
    mask = np.zeros((len(images), n), bool)
    shapes = np.zeros((len(images), 2), np.int32)
    for i, image in enumerate(images):
        array = _to_uint8_rgb(image)
        size = target_size(array.shape[0], array.shape[1], patch_size, n)
        array = pil_resize(array, size, resample)
        x = (array.astype(np.float64) * rescale_factor).astype(np.float32)
        x = (x - mean32) / std32
        rows = patchify_array(x, patch_size)
        patches[i, : len(rows)] = rows
        mask[i, : len(rows)] = True
        shapes[i] = (size[0] // patch_size, size[1] // patch_size)
    return {"patches": patches, "mask": mask, "spatial_shapes": shapes}


# ------------------------------------------------------------------------------------------
# TF (pp ops)


def tf_resize_to_patches(image: tf.Tensor, patch_size: int, max_num_patches: int,
                         method: str = "bilinear", antialias: bool = True,
                         eps: float = 1e-5) -> tf.Tensor:
    """[H, W, C] → [H', W', C] with ``tf_target_size``; keeps the dtype (integers rounded).

    ``method="pil"`` resizes a uint8 image with PIL bilinear inside the graph
    (tf.numpy_function): equal to the HF processor. Other methods are tf.image.resize's.
    """
    size = tf_target_size(tf.shape(image)[:2], patch_size, max_num_patches, eps)
    channels = image.shape[-1]
    if method == "pil":
        if image.dtype != tf.uint8:
            raise NaFlexError(f"method='pil' needs a uint8 image, got {image.dtype.name}")
        out = tf.numpy_function(lambda x, s: pil_resize(x, s, 2), [image, size], tf.uint8,
                                stateful=False)
        out.set_shape([None, None, channels])
        return out
    out = tf.image.resize(image, size, method=method, antialias=antialias)
    if image.dtype.is_integer:
        out = tf.clip_by_value(tf.round(out), image.dtype.min, image.dtype.max)
    return tf.cast(out, image.dtype)


def tf_patchify(image: tf.Tensor, patch_size: int, max_num_patches: int) -> dict[str, tf.Tensor]:
    """[H, W, C] (H, W multiples of p, grid ≤ N patches) → {"patches" float32 [N, p·p·C],
    "mask" bool [N], "spatial_shapes" int32 [2]}; padding patches are zeros."""
    _check_budget(patch_size, max_num_patches)
    channels = image.shape[-1]
    if channels is None:
        raise NaFlexError("patchify needs the image's channel count to be known statically")
    shape = tf.shape(image)
    rows, cols = shape[0] // patch_size, shape[1] // patch_size
    checks = [
        tf.debugging.assert_equal(
            shape[:2] % patch_size, 0,
            message=f"patchify: image height and width must be multiples of {patch_size}"),
        tf.debugging.assert_less_equal(
            rows * cols, max_num_patches,
            message=f"patchify: the patch grid exceeds max_num_patches={max_num_patches}"),
    ]
    with tf.control_dependencies(checks):
        x = tf.cast(image, tf.float32)
    grid = tf.reshape(x, [rows, patch_size, cols, patch_size, channels])
    dim = patch_size * patch_size * channels
    flat = tf.reshape(tf.transpose(grid, [0, 2, 1, 3, 4]), [rows * cols, dim])
    patches = tf.pad(flat, [[0, max_num_patches - rows * cols], [0, 0]])
    patches.set_shape([max_num_patches, dim])
    return {
        "patches": patches,
        "mask": tf.range(max_num_patches) < rows * cols,
        "spatial_shapes": tf.stack([rows, cols]),
    }
