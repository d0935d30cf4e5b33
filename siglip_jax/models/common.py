"""Transformer building blocks shared by both towers: MLP, encoder block, encoder, MAP head.

Module and parameter names follow big_vision (`models/vit.py`) exactly, so released `.npz`
checkpoints load without renaming: `MlpBlock_0/Dense_{0,1}`, `LayerNorm_{0,1}`,
`MultiHeadDotProductAttention_0/{query,key,value,out}`, `encoderblock_{i}` (or `encoderblock`
with a leading depth axis when scanned), `encoder_norm`, `MAPHead_0/probe`.

Numerics follow big_vision and Hugging Face SigLIP: pre-LN blocks, LayerNorm eps 1e-6, GELU
(tanh approximation), attention scaled by 1/sqrt(head_dim). No attention mask by default; the
NaFlex image tower passes an optional key mask [B, L] (True = real token) to the encoder and
the MAP head so padded tokens are never attended to (big_vision naflex_vit, HF Siglip2).

Activations: the towers mark their batch dimension with the logical axis `ACT_BATCH`
(`constrain_batch`); inside `batch_sharded_activations(mesh, batch_axes)` that becomes a
sharding constraint over the batch axes, elsewhere it is a no-op. Without it, when parameters
are sharded over `fsdp`, the partitioner follows the parameters' sharding into the
activations: it keeps the whole batch on every chip and splits the features instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence

import flax.linen as nn
import flax.typing
import jax
import jax.numpy as jnp
from flax.typing import PrecisionLike
from jax.sharding import Mesh

Dtype = flax.typing.Dtype  # A jnp dtype, or its name.
ImageBatch = jax.Array | Mapping[str, jax.Array]  # Images [B, H, W, 3] or a NaFlex dict.

LN_EPS = 1e-6
REMAT_NONE = "none"
ACT_BATCH = "act_batch"  # Logical name of the activations' batch dimension.


def remat_policy_names() -> list[str]:
    """Valid values of the `remat_policy` config key ("none" = no rematerialisation)."""
    names = [n for n in dir(jax.checkpoint_policies) if not n.startswith("_")]
    return [REMAT_NONE] + sorted(n for n in names if n.endswith("saveable"))


def checkpoint_policy(name: str) -> Callable[..., bool]:
    """Map a `remat_policy` name to a jax.checkpoint policy (error on unknown names)."""
    if name not in remat_policy_names():
        raise ValueError(f"unknown remat_policy {name!r}; valid: {remat_policy_names()}")
    return getattr(jax.checkpoint_policies, name)


def constrain_batch(x_bx: jax.Array) -> jax.Array:
    """Marks dim 0 as the batch: sharded over the batch axes inside
    `batch_sharded_activations`, a no-op elsewhere (single device, evaluation)."""
    return nn.with_logical_constraint(x_bx, (ACT_BATCH,) + (None,) * (x_bx.ndim - 1))


@contextlib.contextmanager
def batch_sharded_activations(mesh: Mesh | None, batch_axes: Sequence[str]) -> Iterator[None]:
    """While tracing a model inside, its activations' batch dimension is split over batch_axes.

    A no-op without a mesh or on a batch split only one way. Works inside `jax.jit` (it sets
    the abstract mesh and flax's logical axis rules for the duration of the block only).
    """
    if mesh is None or not batch_axes or math.prod(mesh.shape[a] for a in batch_axes) == 1:
        yield
        return
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), \
            nn.logical_axis_rules([(ACT_BATCH, tuple(batch_axes))]):
        yield


def chunked_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                      bias: jax.Array | None = None, mask: jax.Array | None = None,
                      dtype: Dtype | None = None, precision: PrecisionLike = None, *,
                      chunk: int) -> jax.Array:
    """Multi-head dot-product attention over `chunk` query rows at a time: the [B, H, L, L]
    weights never exist whole.

    The same result as flax's `nn.dot_product_attention` (each query row's softmax runs over
    all keys either way), but the queries are walked in blocks of `chunk` rows (`lax.map`) and
    each block's weights are rematerialised in the backward pass. A training step's peak
    memory is usually the attention weights of one block's backward pass (for B/16 at 224 px
    and 1 024 images per chip, bf16 [1024, 12, 196, 196] buffers of 1.17 GiB each with TPU tile
    padding, several at once); they shrink by L / chunk, for one more computation of a block's
    attention weights in the backward pass (docs/tpu.md has the trade measured).

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


class MlpBlock(nn.Module):
    """Transformer feed-forward block: Dense(mlp_dim) -> GELU(tanh) -> Dense(d)."""

    mlp_dim: int | None = None  # Defaults to 4x the input width.
    dropout: float = 0.0
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_bxlxd: jax.Array, deterministic: bool = True) -> jax.Array:
        """Applies the MLP to the last axis."""
        d = x_bxlxd.shape[-1]
        inits = dict(
            kernel_init=nn.initializers.xavier_uniform(),
            bias_init=nn.initializers.normal(stddev=1e-6),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        x = nn.Dense(self.mlp_dim or 4 * d, **inits)(x_bxlxd)
        x = nn.gelu(x, approximate=True)
        x = nn.Dropout(rate=self.dropout)(x, deterministic)
        return nn.Dense(d, **inits)(x)


class Encoder1DBlock(nn.Module):
    """Pre-LN transformer block: x + MHA(LN(x)), then x + MLP(LN(x)). Returns (x, None).

    `dtype` is the matmul compute dtype; LayerNorms keep float32 params, so the residual
    stream is float32 (as in big_vision with dtype_mm).
    """

    mlp_dim: int | None = None
    num_heads: int = 12
    dropout: float = 0.0
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    attention_chunk: int = 0  # Query rows per attention block (chunked_attention); 0 = all.

    @nn.compact
    def __call__(
        self, x_bxlxd: jax.Array, deterministic: bool = True, mask_bxl: jax.Array | None = None
    ) -> tuple[jax.Array, None]:
        """One block; the (carry, None) signature lets nn.scan stack it over depth.

        `mask_bxl` (True = real token), if given, hides padded tokens as attention keys.
        """
        x_bxlxd = constrain_batch(x_bxlxd)
        y = nn.LayerNorm(epsilon=LN_EPS, param_dtype=self.param_dtype)(x_bxlxd)
        y = nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads,
            kernel_init=nn.initializers.xavier_uniform(),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            deterministic=True,
            attention_fn=(functools.partial(chunked_attention, chunk=self.attention_chunk)
                          if self.attention_chunk > 0 else nn.dot_product_attention),
        )(y, y, mask=key_mask(mask_bxl))
        y = nn.Dropout(rate=self.dropout)(y, deterministic)
        x_bxlxd = constrain_batch(x_bxlxd + y)

        y = nn.LayerNorm(epsilon=LN_EPS, param_dtype=self.param_dtype)(x_bxlxd)
        y = MlpBlock(
            mlp_dim=self.mlp_dim,
            dropout=self.dropout,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )(y, deterministic)
        y = nn.Dropout(rate=self.dropout)(y, deterministic)
        return constrain_batch(x_bxlxd + y), None


class BlockSettings(nn.Module):
    """How a stack of encoder blocks is built: depth, MLP width, heads, dropout, scan, remat,
    dtypes (the width is the input's)."""

    depth: int = 12
    mlp_dim: int | None = None
    num_heads: int = 12
    dropout: float = 0.0
    scan: bool = False
    remat_policy: str = REMAT_NONE
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    attention_chunk: int = 0  # Query rows per attention block (chunked_attention); 0 = all.


class Encoder(BlockSettings):
    """Stack of `depth` encoder blocks plus the final LayerNorm `encoder_norm`.

    `scan=True` runs the blocks with nn.scan and stores their params stacked (leading axis =
    depth) under `encoderblock`; otherwise each block is `encoderblock_{i}`. `remat_policy`
    ("none" or a jax.checkpoint_policies name) wraps each block in nn.remat, in either layout.
    """

    @nn.compact
    def __call__(
        self, x_bxlxd: jax.Array, deterministic: bool = True, mask_bxl: jax.Array | None = None
    ) -> jax.Array:
        """Runs the blocks and the final norm (`mask_bxl`: optional key mask, True = real)."""
        block_cls = Encoder1DBlock
        if self.remat_policy != REMAT_NONE:
            block_cls = nn.remat(
                Encoder1DBlock,
                prevent_cse=not self.scan,
                static_argnums=(2,),  # 0 = self, 1 = x, 2 = deterministic.
                policy=checkpoint_policy(self.remat_policy),
            )
        block_kw = dict(
            mlp_dim=self.mlp_dim,
            num_heads=self.num_heads,
            dropout=self.dropout,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            attention_chunk=self.attention_chunk,
        )
        if self.scan:
            scanned = nn.scan(
                block_cls,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=nn.broadcast,
                length=self.depth,
            )
            x_bxlxd, _ = scanned(name="encoderblock", **block_kw)(
                x_bxlxd, deterministic, mask_bxl
            )
        else:
            for i in range(self.depth):
                x_bxlxd, _ = block_cls(name=f"encoderblock_{i}", **block_kw)(
                    x_bxlxd, deterministic, mask_bxl
                )
        return nn.LayerNorm(epsilon=LN_EPS, param_dtype=self.param_dtype, name="encoder_norm")(
            x_bxlxd
        )


def key_mask(mask_bxl: jax.Array | None) -> jax.Array | None:
    """Key-padding mask [B, L] (True = real token) -> flax attention mask [B, 1, 1, L]."""
    if mask_bxl is None:
        return None
    return jnp.asarray(mask_bxl, bool)[:, None, None, :]


class EncoderSettings(BlockSettings):
    """The transformer settings both towers share: the one record a new encoder setting is
    added to (here, or in BlockSettings if the Encoder needs it). `ViT`, `NaFlexViT` and
    `TextTransformer` inherit these fields (a tower may re-declare one to change its default);
    their config keys (models/config.py) and the Encoder a tower builds (`tower_encoder`)
    derive from them."""

    width: int = 768


class ViTSettings(EncoderSettings):
    """The FixRes image tower's settings (`vit.ViT`); `num_classes` (the two-towers out dim)
    adds a Dense `head`, None means no head."""

    num_classes: int | None = None
    patch_size: int | Sequence[int] = 16
    posemb: str = "learn"
    pool_type: str = "gap"
    head_zeroinit: bool = False


class NaFlexSettings(EncoderSettings):
    """The NaFlex image tower's settings (`naflex.NaFlexViT`): `patch_size` is only checked
    against the patch length (p·p·3); `posemb_grid` is the learned grid's side G."""

    num_classes: int | None = None
    patch_size: int | Sequence[int] | None = 16
    posemb_grid: int = 16
    pool_type: str = "map"
    head_zeroinit: bool = False


class TextSettings(EncoderSettings):
    """The text tower's settings (`text.TextTransformer`)."""

    width: int = 512  # Text-tower defaults of three EncoderSettings fields.
    mlp_dim: int | None = 2048
    num_heads: int = 8
    num_classes: int | None = None
    vocab_size: int = 32_000
    pool_type: str = "last"


def setting_names(module_cls: type) -> tuple[str, ...]:
    """The configurable fields of a flax module class (its dataclass fields, minus flax's)."""
    return tuple(f.name for f in dataclasses.fields(module_cls)
                 if f.name not in ("parent", "name") and f.init)


def tower_encoder(tower: EncoderSettings, name: str) -> Encoder:
    """The Encoder configured by a tower's own encoder settings."""
    return Encoder(**{f: getattr(tower, f) for f in setting_names(BlockSettings)}, name=name)


class MAPHead(nn.Module):
    """Multihead attention pooling: a learned probe attends over the tokens, then x + MLP(LN(x)).

    No LayerNorm before the attention and no residual around it (as big_vision and HF SigLIP).
    """

    mlp_dim: int | None = None
    num_heads: int = 12
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_bxlxd: jax.Array, mask_bxl: jax.Array | None = None) -> jax.Array:
        """Pools [B, L, D] tokens to [B, D]; `mask_bxl` (True = real) hides padded tokens."""
        n, _, d = x_bxlxd.shape
        probe_1x1xd = self.param(
            "probe", nn.initializers.xavier_uniform(), (1, 1, d), self.param_dtype
        )
        # Both attention inputs batch-split: otherwise the probe's (FSDP-sharded) features
        # lead the partitioner to run the head on the whole global batch on every chip.
        x_bxlxd = constrain_batch(x_bxlxd)
        probe_bx1xd = constrain_batch(jnp.tile(probe_1x1xd, [n, 1, 1]).astype(x_bxlxd.dtype))
        x = nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads,
            kernel_init=nn.initializers.xavier_uniform(),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            deterministic=True,
        )(probe_bx1xd, x_bxlxd, mask=key_mask(mask_bxl))
        y = nn.LayerNorm(epsilon=LN_EPS, param_dtype=self.param_dtype)(x)
        x = x + MlpBlock(mlp_dim=self.mlp_dim, dtype=self.dtype, param_dtype=self.param_dtype)(y)
        return x[:, 0]


def l2_normalize(z_bxd: jax.Array) -> jax.Array:
    """z / (||z||_2 + 1e-8) along the last axis, computed in float32 (as big_vision)."""
    z_bxd = z_bxd.astype(jnp.float32)
    return z_bxd / (jnp.linalg.norm(z_bxd, axis=-1, keepdims=True) + 1e-8)
