"""The pseudo-inverse patch-embedding resize (models/patch_resize.py) against FlexiViT's
construction: the resize matrix is checked against tf.image.resize of basis patches (what
big_vision `resample_patchemb` builds), and the resized kernel against the token values it
must reproduce (exact when upsampling, least squares when downsampling)."""

import jax
import numpy as np
import pytest
import tensorflow as tf

from siglip_jax.models import patch_resize


def _tf_resize(patches_nxhxwxc: np.ndarray, new_hw: tuple[int, int]) -> np.ndarray:
    return tf.image.resize(patches_nxhxwxc, new_hw, method="bilinear",
                           antialias=False).numpy().astype(np.float64)


@pytest.mark.parametrize("old,new", [(16, 14), (14, 16), (8, 16), (16, 8), (5, 7)])
def test_resize_matrix_is_tf_bilinear(old, new):
    basis = np.eye(old * old).reshape(old * old, old, old, 1)
    want = _tf_resize(basis, (new, new)).reshape(old * old, new * new).T  # big_vision's B.
    np.testing.assert_allclose(patch_resize.resize_matrix((old, old), (new, new)), want,
                               atol=1e-5)  # tf computes in float32.


def _tokens(patches_nxhxwxc, kernel_hxwxcxd):
    return np.einsum("nhwc,hwcd->nd", patches_nxhxwxc, kernel_hxwxcxd.astype(np.float64))


def test_upsampling_reproduces_the_tokens_exactly():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(14, 14, 3, 5))
    x = rng.normal(size=(6, 14, 14, 3))
    w_new = patch_resize.pi_resize_kernel(w, (16, 16))
    assert w_new.shape == (16, 16, 3, 5)
    np.testing.assert_allclose(_tokens(_tf_resize(x, (16, 16)), w_new), _tokens(x, w),
                               rtol=1e-6, atol=1e-5)  # tf resizes in float32.


def test_downsampling_16_to_14_is_the_least_squares_kernel():
    """16 -> 14 (SigLIP 2's /14 variants) cannot be exact (196 unknowns, 256 equations):
    ŵ minimises E(⟨x, w⟩ − ⟨Bx, ŵ⟩)² over white-noise x, i.e. ‖Bᵀŵ − w‖ (FlexiViT)."""
    rng = np.random.default_rng(1)
    w = rng.normal(size=(16, 16, 3, 4))
    w_new = patch_resize.pi_resize_kernel(w, (14, 14))
    b = patch_resize.resize_matrix((16, 16), (14, 14))
    for c in range(3):
        for d in range(4):
            residual = b.T @ w_new[:, :, c, d].reshape(-1) - w[:, :, c, d].reshape(-1)
            np.testing.assert_allclose(b @ residual, 0.0, atol=1e-9)  # Normal equations.
    # On many random patches the token error is the least-squares one, and smaller than the
    # naive choice (the kernel itself resized bilinearly, rescaled by the area ratio).
    x = rng.normal(size=(4000, 16, 16, 3))
    err_pi = np.mean((_tokens(_tf_resize(x, (14, 14)), w_new) - _tokens(x, w)) ** 2)
    naive = _tf_resize(np.moveaxis(w, (2, 3), (0, 1)).reshape(12, 16, 16, 1), (14, 14))
    naive = np.moveaxis(naive.reshape(3, 4, 14, 14), (0, 1), (2, 3)) * (256 / 196)
    err_naive = np.mean((_tokens(_tf_resize(x, (14, 14)), naive) - _tokens(x, w)) ** 2)
    assert err_pi < 0.8 * err_naive
    # On patches that are upsampled 14 -> 16 images (smooth), the tokens survive closely.
    z = rng.normal(size=(50, 14, 14, 3))
    smooth = _tf_resize(z, (16, 16))
    rel = (np.linalg.norm(_tokens(_tf_resize(smooth, (14, 14)), w_new) - _tokens(smooth, w))
           / np.linalg.norm(_tokens(smooth, w)))
    assert rel < 0.5


def test_conv_embedding_with_the_resized_kernel():
    """The ViT's patch embedding is a strided conv with an HWIO kernel (flax nn.Conv): with the
    PI-resized kernel, 16-px patches that are 14-px patches upsampled give the same tokens.
    FlexiViT resizes each patch on its own (a whole-image resize mixes neighbouring patches at
    their borders), so the images are made of independently upsampled patches."""
    rng = np.random.default_rng(2)
    kernel = rng.normal(size=(14, 14, 3, 8)).astype(np.float32) / 24
    bias = rng.normal(size=(8,)).astype(np.float32)
    patches = rng.normal(size=(8, 14, 14, 3)).astype(np.float32)
    up = _tf_resize(patches, (16, 16)).astype(np.float32)
    image_small = patches.reshape(2, 2, 2, 14, 14, 3).transpose(0, 1, 3, 2, 4, 5)
    image_big = up.reshape(2, 2, 2, 16, 16, 3).transpose(0, 1, 3, 2, 4, 5)

    def embed(x, k, patch):
        out = jax.lax.conv_general_dilated(x, k, (patch, patch), "VALID",
                                           dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return np.asarray(out) + bias

    small = embed(image_small.reshape(2, 28, 28, 3), kernel, 14)
    big = embed(image_big.reshape(2, 32, 32, 3),
                patch_resize.pi_resize_kernel(kernel, (16, 16)), 16)
    np.testing.assert_allclose(big, small, rtol=1e-4, atol=1e-4)


def test_flat_naflex_kernel_and_posemb_layouts():
    rng = np.random.default_rng(3)
    conv = rng.normal(size=(16, 16, 3, 4))
    flat = patch_resize.pi_resize_flat_kernel(conv.reshape(16 * 16 * 3, 4), 16, 14)
    np.testing.assert_allclose(flat, patch_resize.pi_resize_kernel(conv, (14, 14)).reshape(-1, 4))
    pe = rng.normal(size=(1, 16, 4)).astype(np.float32)
    grid = patch_resize.posemb_to_grid(pe, (4, 4, 4))
    np.testing.assert_array_equal(grid, pe.reshape(4, 4, 4))  # Same grid: a reshape.
    up = patch_resize.posemb_to_grid(pe, (8, 8, 4))  # FixRes 4x4 -> NaFlex 8x8 (bilinear).
    # big_vision's resample_posemb (scipy zoom, order 1) aligns the corner positions: output i
    # samples input i·3/7; separable linear interpolation with np.interp as the reference.
    src, at = np.arange(4), np.arange(8) * 3 / 7
    grid4 = pe.reshape(4, 4, 4)
    rows = np.stack([[np.interp(at, src, grid4[:, j, k]) for j in range(4)]
                     for k in range(4)], -1)  # [4(cols), 8(rows), 4] -> interpolate cols next.
    want = np.stack([[np.interp(at, src, rows[:, i, k]) for i in range(8)]
                     for k in range(4)], -1)  # [8(rows), 8(cols), 4]
    np.testing.assert_allclose(up, want, atol=1e-5)
    with pytest.raises(ValueError, match="cannot resize"):
        patch_resize.posemb_to_grid(pe, (2, 8, 4))
