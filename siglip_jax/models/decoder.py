"""The LocCa caption decoder (SigLIP 2): big_vision CapPa's transformer decoder over the
un-pooled image tokens.

`Decoder(...)(inputs_bxl, image_bxnxw, parallel=..., image_mask=None, train=False)` returns
float32 logits [B, L, vocab_size] over the decoder's output vocabulary (`data/locca.
DecoderVocab`: text ids, location bins, task tokens); the embedding has one more row, the
mask token of parallel prediction, id `vocab_size` (= DecoderVocab.mask_id). Layout (params
under the two-towers `dec/`; `checkpoints/cappa.py` maps it to big_vision CapPa's names):

  `embed`          token embedding [vocab_size + 1, D]
  `pos_embedding`  learned position embedding [1, max_len, D] (sliced to L)
  `img_proj`       Dense image width -> D, only when the image tower's width differs from D
  `decoderblock_{i}` (or `decoderblock` stacked over depth when scanned), pre-LN:
                   x + SelfAttn(LN(x)); x + CrossAttn(LN(x), image); x + MLP(LN(x)),
                   attention without biases
  `decoder_norm`   final LayerNorm
  `head`           Dense D -> vocab_size (zero-initialised kernel, with bias)

The module embeds the ids it is given: the callers build CapPa's inputs (`training_inputs`,
models/decoding.py): autoregressive rows are fed the sequence shifted right by one with id 0
first (`shift_right`), so position i predicts token i; parallel rows are fed the mask id at
the positions to predict. Self-attention is causal for autoregressive rows and full for
parallel ones; `parallel` is a python bool or a bool array [B] (mixed batches).
Cross-attention keys are the image tokens, with an optional key mask [B, N] (True = real
patch; NaFlex padding). The `model.decoder` config section is resolved in models/config.py
(`decoder_kwargs`) and the module built by `two_towers.make_decoder`.
"""

from __future__ import annotations

from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from siglip_jax.data.locca import DEFAULT_MAX_LEN
from siglip_jax.models.common import (
    LN_EPS,
    REMAT_NONE,
    Dtype,
    MlpBlock,
    checkpoint_policy,
    constrain_batch,
    key_mask,
)


class DecoderBlock(nn.Module):
    """Pre-LN decoder block (big_vision CapPa's EncoderDecoderBlock): self-attention,
    cross-attention to the image, MLP; attention without biases. -> (x, None)."""

    mlp_dim: int | None = None
    num_heads: int = 8
    dropout: float = 0.0
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_bxlxd: jax.Array, image_bxnxd: jax.Array,
                 self_mask: jax.Array | None, image_mask_bxn: jax.Array | None,
                 deterministic: bool = True) -> tuple[jax.Array, None]:
        """One block; `self_mask` [B|1, 1, L, L] (True = may attend), image key mask [B, N]."""
        attn = dict(num_heads=self.num_heads, use_bias=False, dropout_rate=self.dropout,
                    broadcast_dropout=False, dtype=self.dtype, param_dtype=self.param_dtype)
        x_bxlxd = constrain_batch(x_bxlxd)
        y = nn.LayerNorm(epsilon=LN_EPS, param_dtype=self.param_dtype, name="ln_self")(x_bxlxd)
        y = nn.MultiHeadDotProductAttention(**attn, name="self_attn")(
            y, y, mask=self_mask, deterministic=deterministic)
        y = nn.Dropout(rate=self.dropout)(y, deterministic)
        x_bxlxd = constrain_batch(x_bxlxd + y)

        y = nn.LayerNorm(epsilon=LN_EPS, param_dtype=self.param_dtype, name="ln_cross")(x_bxlxd)
        y = nn.MultiHeadDotProductAttention(**attn, name="cross_attn")(
            y, image_bxnxd, mask=key_mask(image_mask_bxn), deterministic=deterministic)
        y = nn.Dropout(rate=self.dropout)(y, deterministic)
        x_bxlxd = constrain_batch(x_bxlxd + y)

        y = nn.LayerNorm(epsilon=LN_EPS, param_dtype=self.param_dtype, name="ln_mlp")(x_bxlxd)
        y = MlpBlock(mlp_dim=self.mlp_dim, dropout=self.dropout, dtype=self.dtype,
                     param_dtype=self.param_dtype, name="mlp")(y, deterministic)
        return constrain_batch(x_bxlxd + y), None


def self_attention_mask(length: int, parallel: bool | jax.Array) -> jax.Array | None:
    """[B|1, 1, L, L] bool (True = may attend): causal, or full where `parallel` is True."""
    if isinstance(parallel, (bool, np.bool_)):
        return None if parallel else nn.make_causal_mask(jnp.zeros((1, length))).astype(bool)
    causal_lxl = jnp.tril(jnp.ones((length, length), bool))
    parallel_b = jnp.asarray(parallel, bool).reshape(-1)
    return causal_lxl[None, None] | parallel_b[:, None, None, None]


class Decoder(nn.Module):
    """Transformer decoder with cross-attention to image tokens (see the module docstring).

    `vocab_size` is the output vocabulary (big_vision CapPa's `output_vocab_size`); the
    embedding has `vocab_size + 1` rows, the last one the mask token (`mask_id`).
    """

    vocab_size: int
    width: int = 512
    depth: int = 6
    mlp_dim: int | None = None
    num_heads: int = 8
    max_len: int = DEFAULT_MAX_LEN  # data/locca.py: SigLIP 2's text length.
    dropout: float = 0.0
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    scan: bool = False
    remat_policy: str = REMAT_NONE

    @property
    def mask_id(self) -> int:
        """The id of the mask token fed at the positions predicted in parallel."""
        return self.vocab_size

    @nn.compact
    def __call__(self, tokens_bxl: jax.Array, image_bxnxw: jax.Array, *,
                 parallel: bool | jax.Array, image_mask: jax.Array | None = None,
                 train: bool = False, return_hidden: bool = False) -> jax.Array:
        """Logits [B, L, vocab_size] (float32) of decoder input ids [B, L] (in
        [0, vocab_size]) given image tokens; `return_hidden`: the final hidden states
        [B, L, D] instead (the output layer's input, for a loss that applies `output_layer`
        itself, objectives/chunked_xent.py)."""
        _, length = tokens_bxl.shape
        if length > self.max_len:
            raise ValueError(f"decoder input has length {length} > model.decoder.max_len "
                             f"{self.max_len}")
        x = nn.Embed(self.vocab_size + 1, self.width, dtype=self.dtype,
                     param_dtype=self.param_dtype,
                     embedding_init=nn.initializers.normal(stddev=1.0), name="embed")(
                         jnp.asarray(tokens_bxl, jnp.int32))
        pe = self.param("pos_embedding", nn.initializers.normal(stddev=1 / np.sqrt(self.width)),
                        (1, self.max_len, self.width), self.param_dtype)
        x = constrain_batch(x + pe[:, :length].astype(x.dtype))  # No input dropout (CapPa).

        image = jnp.asarray(image_bxnxw, self.dtype or jnp.float32)
        if image.shape[-1] != self.width:
            image = nn.Dense(self.width, dtype=self.dtype, param_dtype=self.param_dtype,
                             name="img_proj")(image)
        image = constrain_batch(image)
        self_mask = self_attention_mask(length, parallel)

        block_cls = DecoderBlock
        if self.remat_policy != REMAT_NONE:
            block_cls = nn.remat(DecoderBlock, prevent_cse=not self.scan, static_argnums=(5,),
                                 policy=checkpoint_policy(self.remat_policy))
        block_kw = dict(mlp_dim=self.mlp_dim, num_heads=self.num_heads, dropout=self.dropout,
                        dtype=self.dtype, param_dtype=self.param_dtype)
        if self.scan:
            scanned = nn.scan(block_cls, variable_axes={"params": 0},
                              split_rngs={"params": True, "dropout": True},
                              in_axes=nn.broadcast, length=self.depth)
            x, _ = scanned(name="decoderblock", **block_kw)(x, image, self_mask, image_mask,
                                                            not train)
        else:
            for i in range(self.depth):
                x, _ = block_cls(name=f"decoderblock_{i}", **block_kw)(
                    x, image, self_mask, image_mask, not train)
        x = nn.LayerNorm(epsilon=LN_EPS, param_dtype=self.param_dtype, name="decoder_norm")(x)
        if return_hidden:
            return constrain_batch(x)
        logits = nn.Dense(self.vocab_size, kernel_init=nn.initializers.zeros, dtype=self.dtype,
                          param_dtype=self.param_dtype, name="head")(x)
        return constrain_batch(logits.astype(jnp.float32))


def output_layer(dec_params: Mapping[str, object]) -> tuple[jax.Array, jax.Array | None]:
    """(kernel [D, V], bias [V] or None) of the output layer in the decoder's params (`dec/`):
    logits = hidden @ kernel + bias, computed in the decoder's `dtype`."""
    head = dec_params["head"]
    return head["kernel"], head.get("bias")


def shift_right(tokens_bxl: jax.Array) -> jax.Array:
    """The autoregressive decoder input of a sequence: id 0 first, then tokens[:, :-1]
    (big_vision CapPa's `shift_right`), so the logits at position i predict tokens[:, i]."""
    tokens_bxl = jnp.asarray(tokens_bxl, jnp.int32)
    return jnp.pad(tokens_bxl, ((0, 0), (1, 0)))[:, :-1]


def training_inputs(tokens_bxl: jax.Array, target_mask_bxl: jax.Array, parallel_b: jax.Array,
                    mask_id: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(inputs [B, L], targets [B, L], weights [B, L]) of one decoder forward pass of length L,
    as big_vision CapPa feeds its decoder: target at i = tokens[i], weight target_mask[i],
    in both modes.

    Autoregressive rows: input = `shift_right(tokens)` (id 0, then tokens[:-1]; causal
    self-attention, so position i sees tokens < i). Parallel rows: input = tokens with the
    target positions and the padding after them (id 0) replaced by `mask_id` (so the input
    does not reveal the target length); the prompt `[task, prefix...]` stays visible.
    """
    tokens_bxl = jnp.asarray(tokens_bxl, jnp.int32)
    mask_bxl = jnp.asarray(target_mask_bxl, jnp.float32)
    par_bx1 = jnp.asarray(parallel_b, bool).reshape(-1, 1)
    hidden_bxl = (mask_bxl > 0) | (tokens_bxl == 0)
    masked_bxl = jnp.where(hidden_bxl, jnp.int32(mask_id), tokens_bxl)
    inputs = jnp.where(par_bx1, masked_bxl, shift_right(tokens_bxl))
    return inputs, tokens_bxl, mask_bxl
