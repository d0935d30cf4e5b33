"""Image tower: Vision Transformer with big_vision parameter names.

Conv patch embedding `embedding` (row-major patches, no class token unless pool_type="tok"),
position embedding `pos_embedding` (learned) or fixed 2-D sin-cos, pre-LN encoder
`Transformer`, pooling `map` (MAPHead_0) | `gap` | `tok` (param `cls`) | `none`, optional
projection `head`. Also position-embedding resampling for a new resolution.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from siglip_jax.models.common import Dtype, MAPHead, ViTSettings, constrain_batch, tower_encoder

POOL_TYPES = ("map", "gap", "tok", "none")
POSEMB_TYPES = ("learn", "sincos2d")


def posemb_sincos_2d(
    h: int, w: int, width: int, temperature: float = 10_000.0, dtype: Dtype = jnp.float32
) -> jax.Array:
    """Fixed 2-D sin-cos position embedding [1, h*w, width] (MoCo v3 / big_vision layout)."""
    if width % 4:
        raise ValueError(f"sincos2d posemb needs width divisible by 4, got {width}")
    y, x = jnp.mgrid[:h, :w]
    omega = jnp.arange(width // 4) / (width // 4 - 1)
    omega = 1.0 / (temperature**omega)
    y = jnp.einsum("m,d->md", y.flatten(), omega)
    x = jnp.einsum("m,d->md", x.flatten(), omega)
    pe = jnp.concatenate([jnp.sin(x), jnp.cos(x), jnp.sin(y), jnp.cos(y)], axis=1)
    return jnp.asarray(pe, dtype)[None, :, :]


def resize_posemb_grid(posemb_1xnxd: jax.Array, grid: tuple[int, int]) -> jax.Array:
    """Bilinearly resizes a square learned position grid [1, g·g, D] to `grid` (h, w)
    in-graph (jax.image.resize), e.g. to run the tower on smaller local crops."""
    n, d = posemb_1xnxd.shape[1], posemb_1xnxd.shape[2]
    g = int(round(np.sqrt(n)))
    if g * g != n:
        raise ValueError(f"can only resize a square pos_embedding grid, got {n} positions")
    square = jnp.reshape(posemb_1xnxd, (g, g, d))
    resized = jax.image.resize(square, (grid[0], grid[1], d), method="bilinear")
    return jnp.reshape(resized, (1, grid[0] * grid[1], d)).astype(posemb_1xnxd.dtype)


def _pair(patch_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(patch_size, int):
        return (patch_size, patch_size)
    ph, pw = patch_size
    return (int(ph), int(pw))


class ViT(ViTSettings):
    """ViT image encoder; returns (features, out) with out["encoded"], out["pre_logits"].

    Its settings (width, depth, ..., patch_size, pool_type) are `common.ViTSettings`'s.
    """

    @nn.compact
    def __call__(self, image_bxhxwx3: jax.Array, *, train: bool = False,
                 patch_mask: jax.Array | None = None, mask_token: jax.Array | None = None):
        """Encodes images [B, H, W, C] (values in [-1, 1]).

        `patch_mask` [B, N] (True = masked) replaces those patch embeddings by `mask_token`
        [W] before the position embedding is added (masked prediction). Images whose patch
        grid differs from the learned position grid get that grid resized bilinearly.
        """
        out = {}
        if self.pool_type not in POOL_TYPES:
            raise ValueError(f"unknown image pool_type {self.pool_type!r}; valid: {POOL_TYPES}")
        if self.posemb not in POSEMB_TYPES:
            raise ValueError(f"unknown image posemb {self.posemb!r}; valid: {POSEMB_TYPES}")
        image = jnp.asarray(image_bxhxwx3, self.dtype or jnp.float32)
        patch = _pair(self.patch_size)
        x = nn.Conv(
            self.width,
            patch,
            strides=patch,
            padding="VALID",
            name="embedding",
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )(image)
        n, h, w, c = x.shape
        x = constrain_batch(jnp.reshape(x, [n, h * w, c]))  # Row-major patch order.
        if patch_mask is not None:
            if mask_token is None:
                raise ValueError("ViT: patch_mask needs a mask_token")
            token = jnp.reshape(jnp.asarray(mask_token, x.dtype), (1, 1, c))
            x = jnp.where(patch_mask[..., None], token, x)

        if self.posemb == "learn" and self.has_variable("params", "pos_embedding") and (
                self.get_variable("params", "pos_embedding").shape[1] != h * w):
            pe = resize_posemb_grid(self.get_variable("params", "pos_embedding"), (h, w))
        elif self.posemb == "learn":
            pe = self.param(
                "pos_embedding",
                nn.initializers.normal(stddev=1 / np.sqrt(c)),
                (1, h * w, c),
                self.param_dtype,
            )
        else:
            pe = posemb_sincos_2d(h, w, c)
        x = x + pe.astype(x.dtype)

        if self.pool_type == "tok":
            cls = self.param("cls", nn.initializers.zeros, (1, 1, c), self.param_dtype)
            x = jnp.concatenate([jnp.tile(cls.astype(x.dtype), [n, 1, 1]), x], axis=1)

        x = nn.Dropout(rate=self.dropout)(x, not train)
        x = tower_encoder(self, "Transformer")(x, deterministic=not train)
        out["encoded"] = x

        if self.pool_type == "map":
            x = MAPHead(
                num_heads=self.num_heads,
                mlp_dim=self.mlp_dim,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
            )(x)
        elif self.pool_type == "gap":
            x = jnp.mean(x, axis=1)
        elif self.pool_type == "tok":
            x = x[:, 0]
        x = constrain_batch(x)
        out["pre_logits"] = x

        if self.num_classes:
            kw = {"kernel_init": nn.initializers.zeros} if self.head_zeroinit else {}
            x = nn.Dense(
                self.num_classes,
                name="head",
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                **kw,
            )(x)
            out["logits"] = x
        return x, out
