"""NaFlex image tower (SigLIP 2): patch sequences of any aspect ratio, padded to a budget.

Input: a dict (the two-towers `image` argument when `image.kind == "naflex"`)
  "patches"         float [B, N, p·p·3]  flattened patches, already normalised to [-1, 1];
                    each patch is flattened row-major as (py, px, channel) — the order of
                    HF `Siglip2ImageProcessor.convert_image_to_patches` and of big_vision's
                    `patchify` (`tf.image.extract_patches`); patches are listed row-major over
                    the (h, w) patch grid of the image, then padding.
  "mask"            bool/int [B, N]      True (1) = a real patch, False (0) = padding.
  "spatial_shapes"  int [B, 2]           (h, w) patch grid of each image; h·w real patches.

Parameters (big_vision `proj/image_text/naflex_vit.py` names and shapes):
  `embedding/{kernel [p·p·3, D], bias [D]}` a Dense over the flattened patch. A FixRes ViT
  conv kernel [p, p, 3, D] (flax HWIO) holds the same numbers: `kernel.reshape(p·p·3, D)`
  (row-major over (py, px, c)) — see `conv_to_dense_kernel` / `dense_to_conv_kernel`.
  `pos_embedding [G, G, D]` a learned square grid (G = 16 in the released checkpoints; HF
  stores it as `position_embedding.weight [G·G, D]`, row-major). For each image it is resized
  to (h, w) with bilinear, antialiased interpolation (`F.interpolate(mode="bilinear",
  align_corners=False, antialias=True)`, as transformers' `Siglip2VisionEmbeddings`;
  `resize_posemb`); padding tokens get the embedding of position (0, 0) (HF) — harmless,
  they are never attended to.
  `Transformer/...` the shared encoder (models/common.py) run with a key mask: padded patches
  are never attended to; `MAPHead_0` pools with the same mask ("gap" is a masked mean).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.typing import VariableDict

from siglip_jax.models.common import MAPHead, NaFlexSettings, constrain_batch, tower_encoder

POOL_TYPES = ("map", "gap", "none")
INPUT_KEYS = ("patches", "mask", "spatial_shapes")


def _axis_weights(index_bxn: jax.Array, size_bx1: jax.Array, grid: int) -> jax.Array:
    """Antialiased bilinear weights [B, N, grid] along one axis (triangle filter, normalised).

    Output position i of an axis resized from `grid` to `size` samples the source at
    center = (i + 0.5)·grid/size − 0.5 with a triangle of half-width max(grid/size, 1).
    """
    scale_bx1 = grid / size_bx1
    support_bx1 = jnp.maximum(scale_bx1, 1.0)
    center_bxn = (index_bxn + 0.5) * scale_bx1 - 0.5
    source_g = jnp.arange(grid, dtype=jnp.float32)
    dist_bxnxg = jnp.abs(source_g[None, None, :] - center_bxn[..., None])
    w_bxnxg = jnp.maximum(1.0 - dist_bxnxg / support_bx1[..., None], 0.0)
    return w_bxnxg / jnp.sum(w_bxnxg, axis=-1, keepdims=True)


def resize_posemb(
    posemb_gxgxd: jax.Array, spatial_shapes_bx2: jax.Array, num_tokens: int
) -> jax.Array:
    """The [G, G, D] grid resized to each image's (h, w), flattened row-major, padded: [B, N, D].

    Token n < h·w of an image gets grid position (n // w, n % w); padding tokens get (0, 0).
    Resizing is linear, so each output is the grid weighted by a row and a column weight
    vector (the same weights `F.interpolate(bilinear, antialias=True)` uses).
    """
    grid = posemb_gxgxd.shape[0]
    if posemb_gxgxd.shape[1] != grid:
        raise ValueError(f"NaFlex pos_embedding must be a square grid, got {posemb_gxgxd.shape}")
    sizes_bx2 = jnp.asarray(spatial_shapes_bx2).astype(jnp.float32)
    h_bx1, w_bx1 = sizes_bx2[:, :1], sizes_bx2[:, 1:]
    pos_n = jnp.arange(num_tokens, dtype=jnp.float32)[None, :]
    rows_bxn = jnp.floor(pos_n / w_bx1)
    cols_bxn = pos_n - rows_bxn * w_bx1
    real_bxn = pos_n < h_bx1 * w_bx1
    rows_bxn = jnp.where(real_bxn, rows_bxn, 0.0)
    cols_bxn = jnp.where(real_bxn, cols_bxn, 0.0)
    wy_bxnxg = _axis_weights(rows_bxn, h_bx1, grid)
    wx_bxnxg = _axis_weights(cols_bxn, w_bx1, grid)
    pe = posemb_gxgxd.astype(jnp.float32)
    out_bxnxd = jnp.einsum("bni,bnj,ijd->bnd", wy_bxnxg, wx_bxnxg, pe,
                           precision=jax.lax.Precision.HIGHEST)
    return out_bxnxd.astype(posemb_gxgxd.dtype)


def conv_to_dense_kernel(kernel_pxpx3xd: np.ndarray) -> np.ndarray:
    """FixRes conv patch kernel [p, p, C, D] -> NaFlex Dense kernel [p·p·C, D] (row-major)."""
    k = np.asarray(kernel_pxpx3xd)
    if k.ndim != 4:
        raise ValueError(f"conv patch kernel must be [p, p, C, D], got shape {k.shape}")
    return k.reshape(-1, k.shape[-1])


def dense_to_conv_kernel(kernel: np.ndarray, patch_size: int | Sequence[int],
                         channels: int = 3) -> np.ndarray:
    """NaFlex Dense kernel [p·p·C, D] -> FixRes conv kernel [p, p, C, D] (inverse reshape)."""
    ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else patch_size
    k = np.asarray(kernel)
    if k.ndim != 2 or k.shape[0] != ph * pw * channels:
        raise ValueError(f"dense patch kernel must be [{ph}*{pw}*{channels}, D], got {k.shape}")
    return k.reshape(ph, pw, channels, k.shape[-1])


def image_params_from_fixres(img: VariableDict) -> dict[str, object]:
    """A FixRes ViT `img` params tree -> the NaFlex one (exact re-layout, no resampling).

    `embedding/kernel` [p, p, 3, D] -> [p·p·3, D]; `pos_embedding` [1, g·g, D] -> [g, g, D]
    (a square grid; the NaFlex tower then resizes it per image). Everything else is shared.
    On a g×g-patch image the two towers compute the same function (tested).
    """
    out = dict(img)
    emb = dict(img["embedding"])
    emb["kernel"] = conv_to_dense_kernel(emb["kernel"])
    out["embedding"] = emb
    pe = np.asarray(img["pos_embedding"])
    g = int(round(np.sqrt(pe.shape[1])))
    if pe.ndim != 3 or pe.shape[0] != 1 or g * g != pe.shape[1]:
        raise ValueError(f"FixRes pos_embedding must be [1, g*g, D], got {pe.shape}")
    out["pos_embedding"] = pe.reshape(g, g, pe.shape[-1])
    return out


def example_input(batch: int, num_patches: int, patch_size: int | Sequence[int],
                  channels: int = 3) -> dict[str, jax.ShapeDtypeStruct]:
    """ShapeDtypeStructs of a NaFlex image batch (for jax.eval_shape / model.init specs)."""
    ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else patch_size
    return {
        "patches": jax.ShapeDtypeStruct((batch, num_patches, ph * pw * channels), jnp.float32),
        "mask": jax.ShapeDtypeStruct((batch, num_patches), jnp.bool_),
        "spatial_shapes": jax.ShapeDtypeStruct((batch, 2), jnp.int32),
    }


def check_input(image: object) -> None:
    """Raises a one-line ValueError unless `image` is a NaFlex input dict of matching shapes."""
    if not isinstance(image, Mapping) or set(INPUT_KEYS) - set(image):
        got = sorted(image) if isinstance(image, Mapping) else type(image).__name__
        raise ValueError(f"NaFlex image tower needs a dict with keys {list(INPUT_KEYS)}, "
                         f"got {got}")
    b, n = image["patches"].shape[:2]
    if image["patches"].ndim != 3 or tuple(image["mask"].shape) != (b, n) or tuple(
            image["spatial_shapes"].shape) != (b, 2):
        raise ValueError(
            "NaFlex image: expected patches [B, N, P], mask [B, N], spatial_shapes [B, 2]; got "
            f"{tuple(image['patches'].shape)}, {tuple(image['mask'].shape)}, "
            f"{tuple(image['spatial_shapes'].shape)}")


class NaFlexViT(NaFlexSettings):
    """NaFlex ViT image encoder; returns (features, out) like `vit.ViT`.

    Its settings (width, depth, ..., patch_size, posemb_grid) are `common.NaFlexSettings`'s.
    """

    @nn.compact
    def __call__(self, image: Mapping[str, jax.Array], *, train: bool = False):
        """Encodes a NaFlex batch {"patches" [B,N,p·p·3], "mask" [B,N], "spatial_shapes" [B,2]}."""
        if self.pool_type not in POOL_TYPES:
            raise ValueError(f"unknown NaFlex pool_type {self.pool_type!r}; valid: {POOL_TYPES}")
        check_input(image)
        patches = jnp.asarray(image["patches"], self.dtype or jnp.float32)
        if self.patch_size is not None:
            ph, pw = ((self.patch_size, self.patch_size) if isinstance(self.patch_size, int)
                      else tuple(self.patch_size))
            if patches.shape[-1] != ph * pw * 3:
                raise ValueError(f"NaFlex patches have length {patches.shape[-1]}, expected "
                                 f"{ph}*{pw}*3 = {ph * pw * 3} for patch_size {self.patch_size}")
        mask_bxn = jnp.asarray(image["mask"]).astype(bool)
        out = {}
        x = nn.Dense(self.width, name="embedding", dtype=self.dtype,
                     param_dtype=self.param_dtype)(patches)
        n_tokens = x.shape[1]
        pe = self.param(
            "pos_embedding",
            nn.initializers.normal(stddev=1 / np.sqrt(self.width)),
            (self.posemb_grid, self.posemb_grid, self.width),
            self.param_dtype,
        )
        x = x + resize_posemb(pe, image["spatial_shapes"], n_tokens).astype(x.dtype)
        x = constrain_batch(x)
        x = nn.Dropout(rate=self.dropout)(x, not train)
        x = tower_encoder(self, "Transformer")(x, deterministic=not train, mask_bxl=mask_bxn)
        out["encoded"] = x

        if self.pool_type == "map":
            x = MAPHead(num_heads=self.num_heads, mlp_dim=self.mlp_dim, dtype=self.dtype,
                        param_dtype=self.param_dtype)(x, mask_bxn)
        elif self.pool_type == "gap":
            m = mask_bxn[..., None].astype(x.dtype)
            x = jnp.sum(x * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
        x = constrain_batch(x)
        out["pre_logits"] = x

        if self.num_classes:
            kw = {"kernel_init": nn.initializers.zeros} if self.head_zeroinit else {}
            x = nn.Dense(self.num_classes, name="head", dtype=self.dtype,
                         param_dtype=self.param_dtype, **kw)(x)
            out["logits"] = x
        return x, out
