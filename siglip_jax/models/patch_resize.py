"""Pseudo-inverse (PI) resize of a patch-embedding kernel to another patch size (FlexiViT).

FlexiViT (Beyer et al. 2023, arXiv:2212.08013; big_vision `models/proj/flexi/vit.py`
`resample_patchemb`) changes a ViT's patch size p -> p' without changing what its tokens mean.
A patch x (p·p values per channel) resized bilinearly to p' is `B x`, with B the
[p'·p', p·p] matrix of the resize. One embedding channel is ⟨x, w⟩; the new kernel ŵ should
give ⟨B x, ŵ⟩ = ⟨x, w⟩ for every x, i.e. Bᵀ ŵ = w. The solution of least squares,

    ŵ = pinv(Bᵀ) w,

is exact when p' >= p (B has full column rank: upsampling loses nothing) and, when p' < p,
the ŵ that minimises E‖⟨x, w⟩ − ⟨B x, ŵ⟩‖² over white-noise patches x (FlexiViT §3.4).

B here is the matrix of `tf.image.resize(method="bilinear", antialias=False)` (half-pixel
centres, edges clamped), the resize of our fixed-resolution pp (`resize`), built in numpy
from the separable 1-D weights; big_vision builds the same matrix by resizing basis vectors.
SigLIP 2 (arXiv:2502.14786 §2.4) uses this to turn its /16 runs into /14 variants.

Also `posemb_to_grid`: a learned position embedding ([1, N, D] FixRes or [G, G, D] NaFlex) as
another grid of either layout (bilinear, via `resample_posemb`, which also adapts a loaded
checkpoint's grid: checkpoints/big_vision.py).
"""

from __future__ import annotations

import numpy as np
import scipy.ndimage


def resample_posemb(old_1xnxd: np.ndarray, new_len: int) -> np.ndarray:
    """Bilinearly resize a square grid of learned position embeddings to `new_len` positions.

    Same as big_vision `vit.resample_posemb` (scipy.ndimage.zoom, order=1): used when a
    checkpoint trained at one resolution is loaded at another.
    """
    old_1xnxd = np.asarray(old_1xnxd)
    if old_1xnxd.shape[1] == new_len:
        return old_1xnxd
    gs_old, gs_new = int(round(np.sqrt(old_1xnxd.shape[1]))), int(round(np.sqrt(new_len)))
    if gs_old**2 != old_1xnxd.shape[1] or gs_new**2 != new_len:
        raise ValueError(
            f"can only resample square posemb grids, got {old_1xnxd.shape[1]} -> {new_len}"
        )
    grid = old_1xnxd.reshape(gs_old, gs_old, -1)
    zoom = (gs_new / gs_old, gs_new / gs_old, 1)
    grid = scipy.ndimage.zoom(grid, zoom, order=1)
    return grid.reshape(1, gs_new * gs_new, -1).astype(old_1xnxd.dtype)


def bilinear_matrix_1d(old: int, new: int) -> np.ndarray:
    """[new, old] weights of a 1-D bilinear resize, half-pixel centres, no antialiasing
    (tf.image.resize "bilinear" with antialias=False; jax.image.resize when upsampling)."""
    if old < 1 or new < 1:
        raise ValueError(f"sizes must be >= 1, got {old} -> {new}")
    centres = (np.arange(new) + 0.5) * (old / new) - 0.5
    centres = np.clip(centres, 0.0, old - 1)
    lo = np.floor(centres).astype(int)
    hi = np.minimum(lo + 1, old - 1)
    frac = centres - lo
    mat = np.zeros((new, old), np.float64)
    mat[np.arange(new), lo] += 1.0 - frac
    mat[np.arange(new), hi] += frac
    return mat


def resize_matrix(old_hw: tuple[int, int], new_hw: tuple[int, int]) -> np.ndarray:
    """B [h'·w', h·w]: a row-major h×w patch (one channel) to its bilinear resize at h'×w'."""
    rows = bilinear_matrix_1d(int(old_hw[0]), int(new_hw[0]))
    cols = bilinear_matrix_1d(int(old_hw[1]), int(new_hw[1]))
    return np.kron(rows, cols)


def pi_resize_kernel(kernel_hxwxcxd: np.ndarray, new_hw: tuple[int, int]) -> np.ndarray:
    """The patch-embedding conv kernel [h, w, C, D] for patches of `new_hw`: pinv(Bᵀ) applied
    to every (input channel, output channel) slice; unchanged if the size is the same."""
    kernel = np.asarray(kernel_hxwxcxd)
    if kernel.ndim != 4:
        raise ValueError(f"expected a conv kernel [h, w, C, D], got shape {kernel.shape}")
    h, w, c, d = kernel.shape
    new_hw = (int(new_hw[0]), int(new_hw[1]))
    if (h, w) == new_hw:
        return kernel
    pinv_t = np.linalg.pinv(resize_matrix((h, w), new_hw).T)  # [h'w', hw]
    flat = kernel.astype(np.float64).reshape(h * w, c * d)
    return (pinv_t @ flat).reshape(*new_hw, c, d).astype(kernel.dtype)


def pi_resize_flat_kernel(kernel_pxd: np.ndarray, old_patch: int, new_patch: int,
                          channels: int = 3) -> np.ndarray:
    """As `pi_resize_kernel` for a NaFlex Dense kernel [p·p·C, D] (patches flattened
    row-major as (row, col, channel), data/naflex.patchify_array)."""
    kernel = np.asarray(kernel_pxd)
    d = kernel.shape[-1]
    conv = kernel.reshape(old_patch, old_patch, channels, d)
    out = pi_resize_kernel(conv, (new_patch, new_patch))
    return out.reshape(new_patch * new_patch * channels, d)


def posemb_to_grid(posemb: np.ndarray, target_shape: tuple[int, ...]) -> np.ndarray:
    """A learned position embedding resized (bilinear) to `target_shape`: [1, N, D] (FixRes,
    square grid) or [G, G, D] (NaFlex), from either layout."""
    posemb = np.asarray(posemb)
    target_shape = tuple(int(s) for s in target_shape)
    if posemb.shape == target_shape:
        return posemb
    flat = posemb.reshape(1, -1, posemb.shape[-1])  # [G, G, D] is row-major like [1, G·G, D].
    if len(target_shape) == 3 and target_shape[0] == 1:
        return resample_posemb(flat, target_shape[1])
    if len(target_shape) == 3 and target_shape[0] == target_shape[1]:
        grid = target_shape[0]
        return resample_posemb(flat, grid * grid).reshape(grid, grid, -1)
    raise ValueError(f"cannot resize a position embedding {posemb.shape} to {target_shape}: "
                     "expected [1, N, D] or [G, G, D]")
