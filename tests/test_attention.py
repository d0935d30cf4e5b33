"""Attention over blocks of queries (`models.common.chunked_attention`) against flax's dense
attention: same outputs and gradients, with a key mask, uneven blocks and a per-query mask;
and a tower with `attention_chunk` keeps its parameter names and computes the same embeddings.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from siglip_jax.models.common import chunked_attention
from siglip_jax.models.vit import ViT


def _qkv(length=13, batch=2, heads=3, dim=8):
    keys = jax.random.split(jax.random.key(0), 3)
    return [jax.random.normal(k, (batch, length, heads, dim)) for k in keys]


@pytest.mark.parametrize("chunk", [4, 5, 12])
def test_blocks_of_queries_give_flaxs_attention_and_its_gradients(chunk):
    q, k, v = _qkv()
    key_mask = (jnp.arange(13)[None, :] < jnp.array([[13], [9]]))[:, None, None, :]  # [B,1,1,L]
    causal = jnp.tril(jnp.ones((13, 13), bool))[None, None]  # A per-query mask [1, 1, L, L].
    for mask in (None, key_mask, causal & key_mask):
        def dense(q, k, v, mask=mask):
            return nn.dot_product_attention(q, k, v, mask=mask, deterministic=True)

        def blocks(q, k, v, mask=mask):
            return chunked_attention(q, k, v, mask=mask, chunk=chunk)

        np.testing.assert_allclose(jax.jit(blocks)(q, k, v), dense(q, k, v), rtol=1e-6,
                                   atol=1e-6)
        want = jax.jit(jax.grad(lambda *x: jnp.sum(dense(*x) ** 2), argnums=(0, 1, 2)))(q, k, v)
        got = jax.jit(jax.grad(lambda *x: jnp.sum(blocks(*x) ** 2), argnums=(0, 1, 2)))(q, k, v)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_a_tower_with_attention_chunks_has_the_same_params_and_embeddings():
    image = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3), minval=-1, maxval=1)
    towers = {c: ViT(width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=(8, 8),
                     scan=True, remat_policy="nothing_saveable", attention_chunk=c)
              for c in (0, 6)}  # 16 tokens: blocks of 6, 6 and 4 (padded) query rows.
    params = jax.jit(towers[0].init)(jax.random.key(2), image)
    assert (jax.tree_util.tree_structure(jax.eval_shape(towers[6].init, jax.random.key(2), image))
            == jax.tree_util.tree_structure(params))

    def loss(p, tower):
        return jnp.sum(tower.apply(p, image)[0] ** 2)

    np.testing.assert_allclose(jax.jit(towers[6].apply)(params, image)[0],
                               jax.jit(towers[0].apply)(params, image)[0], rtol=1e-5, atol=1e-5)
    got, want = (jax.jit(jax.grad(loss), static_argnums=1)(params, towers[c]) for c in (6, 0))
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5), got, want)
