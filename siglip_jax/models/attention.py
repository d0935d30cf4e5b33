"""Attention computed a block of queries at a time, so the [B, H, L, L] weights never exist whole.

`chunked_attention(q, k, v, chunk=c)` gives the same result as flax's
`nn.dot_product_attention` (each query row's softmax runs over all keys either way), but it
walks the queries in blocks of `c` rows (`lax.map`) and rematerialises each block's weights in
the backward pass. A training step's peak memory is usually the attention weights of one
block's backward pass: for ViT-B/16 at 224 px and 1 024 images per chip, several bf16
[1024, 12, 196, 196] buffers (1.17 GiB each with TPU tile padding). With `chunk=c` they shrink
by L / c, at the price of computing one block's attention weights once more in the backward
pass (for B/16 at 224 px about 1 % more FLOPs per step). Numbers: docs/tpu.md.

The encoder blocks use it when their `attention_chunk` setting is positive (config key
`model.image.attention_chunk` / `model.text.attention_chunk`, query rows per block; 0 = whole).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype, PrecisionLike


def chunked_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                      bias: jax.Array | None = None, mask: jax.Array | None = None,
                      dtype: Dtype | None = None, precision: PrecisionLike = None, *,
                      chunk: int) -> jax.Array:
    """Multi-head dot-product attention over `chunk` query rows at a time.

    Shapes as flax's `dot_product_attention`: query [B, Lq, H, D], key and value [B, Lk, H, D],
    `bias` / `mask` broadcastable to [B, H, Lq, Lk]; returns [B, Lq, H, D]. No dropout (the
    towers' attention is deterministic). `chunk <= 0` or `chunk >= Lq` is the plain call.
    """
    length = query.shape[-3]
    if chunk <= 0 or chunk >= length:
        return nn.dot_product_attention(query, key, value, bias=bias, mask=mask, dtype=dtype,
                                        precision=precision, deterministic=True)
    blocks = -(-length // chunk)
    pad = blocks * chunk - length

    def by_block(x: jax.Array | None, fill: object) -> jax.Array | None:
        """[B, ..., Lq, X] with a per-query axis at -2 -> [blocks, B, ..., chunk, X]."""
        if x is None or x.shape[-2] == 1:
            return None  # No per-query axis: every block uses it whole.
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, pad), (0, 0)], constant_values=fill)
        x = x.reshape(*x.shape[:-2], blocks, chunk, x.shape[-1])
        return jnp.moveaxis(x, -3, 0)

    q = jnp.pad(query, [(0, 0)] * (query.ndim - 3) + [(0, pad), (0, 0), (0, 0)])
    q = jnp.moveaxis(q.reshape(*q.shape[:-3], blocks, chunk, *q.shape[-2:]), -4, 0)
    bias_blocks, mask_blocks = by_block(bias, 0), by_block(mask, True)

    @jax.checkpoint
    def attend(q_block: jax.Array, bias_block: jax.Array | None,
               mask_block: jax.Array | None) -> jax.Array:
        return nn.dot_product_attention(
            q_block, key, value,
            bias=bias if bias_block is None else bias_block,
            mask=mask if mask_block is None else mask_block,
            dtype=dtype, precision=precision, deterministic=True)

    out = jax.lax.map(lambda xs: attend(*xs), (q, bias_blocks, mask_blocks))
    out = jnp.moveaxis(out, 0, -4)
    out = out.reshape(*out.shape[:-4], blocks * chunk, *out.shape[-2:])
    return out[..., :length, :, :]
