"""Text tower: transformer encoder over token ids with big_vision parameter names.

Token embedding `Embed_0`, learned position embedding `pos_embedding` [1, L, D] (L = the text
length), pre-LN encoder `Encoder_0` with NO attention mask (no causal, no padding mask: texts
are right-padded with the EOS id 1, "sticky EOS"), pooling `last` (x[:, -1]) | `first` |
`map` (MAPHead_0) | `gap`, then a Dense `head` with bias when an output dim is given.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np

from siglip_jax.models.common import MAPHead, TextSettings, constrain_batch, tower_encoder

POOL_TYPES = ("last", "first", "map", "gap")


class TextTransformer(TextSettings):
    """Text encoder; returns (features, out) with out["encoded"], out["pre_logits"]."""

    @nn.compact
    def __call__(self, text_bxl: jax.Array, *, train: bool = False):
        """Encodes int token ids [B, L]."""
        out = {}
        if self.pool_type not in POOL_TYPES:
            raise ValueError(f"unknown text pool_type {self.pool_type!r}; valid: {POOL_TYPES}")
        x = nn.Embed(
            num_embeddings=self.vocab_size,
            features=self.width,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="Embed_0",
        )(text_bxl)
        x = constrain_batch(x)
        _, seq_len, d = x.shape
        pe = self.param(
            "pos_embedding",
            nn.initializers.normal(stddev=1 / np.sqrt(d)),
            (1, seq_len, d),
            self.param_dtype,
        )
        x = x + pe.astype(x.dtype)
        x = nn.Dropout(rate=self.dropout)(x, not train)
        x = tower_encoder(self, "Encoder_0")(x, deterministic=not train)
        out["encoded"] = x

        if self.pool_type == "last":  # Sticky EOS: the last position is always EOS.
            x = x[:, -1, :]
        elif self.pool_type == "first":
            x = x[:, 0, :]
        elif self.pool_type == "gap":
            x = x.mean(axis=1)
        else:
            x = MAPHead(
                num_heads=self.num_heads,
                mlp_dim=self.mlp_dim,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
            )(x)
        x = constrain_batch(x)
        out["pre_logits"] = x

        if self.num_classes:
            x = nn.Dense(
                self.num_classes, name="head", dtype=self.dtype, param_dtype=self.param_dtype
            )(x)
            out["logits"] = x
        return x, out
