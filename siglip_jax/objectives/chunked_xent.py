"""Cross-entropy over a large vocabulary, computed in vocabulary chunks with a custom gradient.

`chunked_cross_entropy(hidden_nxd, kernel_dxv, bias_v, targets_n, chunk=C, dtype=dt)` returns
(CE [N] float32, argmax [N] int32) of the logits `hidden @ kernel + bias` (the decoder's
output layer, a flax Dense computing in `dt`, its result cast to float32) without ever
holding the [N, V] logits: a `lax.scan` over ⌈V / C⌉ column blocks of the kernel keeps an
online log-sum-exp (running max and rescaled sum), the target's logit and the running argmax,
so the forward pass holds [N, C] at a time. The backward pass (`jax.custom_vjp`) recomputes
each block's logits from the saved hidden states and log-sum-exp and turns them into
`dz = g · (softmax − onehot)`, accumulating dhidden [N, D] in float32 and writing dkernel
[D, C] / dbias [C] block by block: again [N, C] at a time. Residuals: hidden, kernel, bias,
targets and the log-sum-exp [N].

The dtype semantics follow the unchunked `Dense(dtype=dt)` then `.astype(float32)`: inputs,
kernel and bias cast to `dt`, the matmul in `dt`, the softmax in float32, and the gradients
of the logits cast to `dt` before the backward matmuls (exact in float32; in bfloat16 the
chunked sum of dhidden is accumulated in float32, the unchunked one in the matmul's own
accumulator).

Why vocabulary chunks rather than sequence chunks: every chip keeps all of its own
(batch-sharded) rows in every block, so the batch sharding of the activations is untouched
and nothing is reshaped across the sharded axis; each block's weight gradient is complete
when written (a dynamic-update-slice into the [D, V] gradient carried through the loop, done
in place), never a sum over blocks; and the per-block memory N·C is set by one knob whatever
the rows' layout. A ragged last block (V not
a multiple of C) runs once after the loop at its own static size: no padding copy of the
kernel and no masked columns. argmax ties resolve to the first index, as `jnp.argmax`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

DTypeLike = str | np.dtype | type | None


def _block_logits(hidden_nxd: jax.Array, kernel_dxc: jax.Array, bias_c: jax.Array | None,
                  dtype: jnp.dtype) -> jax.Array:
    """float32 logits [N, C] of one block, computed as flax's Dense(dtype=dtype) would."""
    z = jnp.dot(hidden_nxd.astype(dtype), kernel_dxc.astype(dtype))
    if bias_c is not None:
        z = z + jnp.reshape(bias_c.astype(dtype), (1,) * (z.ndim - 1) + (-1,))
    return z.astype(jnp.float32)


def _compute_dtype(hidden: jax.Array, kernel: jax.Array, bias: jax.Array | None,
                   dtype: DTypeLike) -> jnp.dtype:
    if dtype is not None:
        return jnp.dtype(dtype)
    args = (hidden, kernel) if bias is None else (hidden, kernel, bias)
    return jnp.result_type(*args)


def _blocks(vocab: int, chunk: int) -> tuple[int, int]:
    """(K = V // C full blocks, R = V % C tail columns)."""
    return vocab // chunk, vocab % chunk


def _block(kernel_dxv: jax.Array, bias_v: jax.Array | None, start: jax.Array | int, cols: int
           ) -> tuple[jax.Array, jax.Array | None]:
    """Columns [start, start + cols) of the kernel and bias (a view: dynamic slices)."""
    w = lax.dynamic_slice_in_dim(kernel_dxv, start, cols, axis=1)
    b = None if bias_v is None else lax.dynamic_slice_in_dim(bias_v, start, cols)
    return w, b


def _forward(hidden, kernel, bias, targets, chunk, dtype):
    """(ce [N], argmax [N], lse [N]) by an online log-sum-exp over vocabulary blocks."""
    dt = _compute_dtype(hidden, kernel, bias, dtype)
    n = hidden.shape[0]
    k, tail = _blocks(kernel.shape[1], chunk)

    def step(carry, start, cols=chunk):
        m, s, tgt, best, idx = carry
        w, b = _block(kernel, bias, start, cols)
        z = _block_logits(hidden, w, b, dt)
        block_max = jnp.max(z, axis=-1)
        new_m = jnp.maximum(m, block_max)
        s = s * jnp.exp(m - new_m) + jnp.sum(jnp.exp(z - new_m[:, None]), axis=-1)
        local = targets - start
        inside = (local >= 0) & (local < cols)
        picked = jnp.take_along_axis(z, jnp.clip(local, 0, cols - 1)[:, None], axis=-1)[:, 0]
        tgt = tgt + jnp.where(inside, picked, 0.0)
        better = block_max > best  # Strict: ties keep the earlier (lower) index.
        idx = jnp.where(better, jnp.argmax(z, axis=-1).astype(jnp.int32) + start, idx)
        best = jnp.where(better, block_max, best)
        return (new_m, s, tgt, best, idx), None

    neg = jnp.full((n,), -jnp.inf, jnp.float32)
    carry = (neg, jnp.zeros((n,), jnp.float32), jnp.zeros((n,), jnp.float32), neg,
             jnp.zeros((n,), jnp.int32))
    if k:
        carry, _ = lax.scan(step, carry, jnp.arange(k, dtype=jnp.int32) * chunk)
    if tail:
        carry, _ = step(carry, jnp.int32(k * chunk), tail)
    m, s, tgt, _, idx = carry
    lse = m + jnp.log(s)
    return lse - tgt, idx, lse


def _backward(hidden, kernel, bias, targets, lse, g_n, chunk, dtype):
    """(dhidden, dkernel, dbias) of Σ g·CE, recomputing each block's logits; dkernel and
    dbias are written block by block into their [D, V] / [V] buffers."""
    dt = _compute_dtype(hidden, kernel, bias, dtype)
    k, tail = _blocks(kernel.shape[1], chunk)
    g_n = g_n.astype(jnp.float32)
    hidden_dt = hidden.astype(dt)

    def step(carry, start, cols=chunk):
        dh, dk, db = carry
        w, b = _block(kernel, bias, start, cols)
        z = _block_logits(hidden, w, b, dt)
        p = jnp.exp(z - lse[:, None])
        onehot = (targets[:, None] - start) == jnp.arange(cols, dtype=jnp.int32)[None, :]
        dz = (g_n[:, None] * (p - onehot.astype(jnp.float32))).astype(dt)
        dh = dh + jnp.dot(dz, w.astype(dt).T, preferred_element_type=jnp.float32)
        dw = jnp.dot(hidden_dt.T, dz).astype(dk.dtype)
        dk = lax.dynamic_update_slice_in_dim(dk, dw, start, axis=1)
        if db is not None:
            db = lax.dynamic_update_slice_in_dim(db, jnp.sum(dz, axis=0).astype(db.dtype),
                                                 start, axis=0)
        return (dh, dk, db), None

    carry = (jnp.zeros(hidden.shape, jnp.float32), jnp.zeros_like(kernel),
             None if bias is None else jnp.zeros_like(bias))
    if k:
        carry, _ = lax.scan(step, carry, jnp.arange(k, dtype=jnp.int32) * chunk)
    if tail:
        carry, _ = step(carry, jnp.int32(k * chunk), tail)
    dh, dk, db = carry
    return dh.astype(hidden.dtype), dk, db


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _xent(hidden, kernel, bias, targets, chunk, dtype):
    ce, idx, _ = _forward(hidden, kernel, bias, targets, chunk, dtype)
    return ce, idx


def _xent_fwd(hidden, kernel, bias, targets, chunk, dtype):
    ce, idx, lse = _forward(hidden, kernel, bias, targets, chunk, dtype)
    return (ce, idx), (hidden, kernel, bias, targets, lse)


def _xent_bwd(chunk, dtype, residuals, cotangents):
    hidden, kernel, bias, targets, lse = residuals
    g_ce, _ = cotangents  # The argmax is an integer output: no gradient.
    dh, dk, db = _backward(hidden, kernel, bias, targets, lse, g_ce, chunk, dtype)
    return dh, dk, db, np.zeros(targets.shape, jax.dtypes.float0)


_xent.defvjp(_xent_fwd, _xent_bwd)


def chunked_cross_entropy(hidden_nxd: jax.Array, kernel_dxv: jax.Array,
                          bias_v: jax.Array | None, targets_n: jax.Array, *, chunk: int,
                          dtype: DTypeLike = None) -> tuple[jax.Array, jax.Array]:
    """(CE [N] float32, argmax [N] int32) of logits `hidden @ kernel + bias` computed in `dtype`
    (None: the inputs' result type), taken over vocabulary blocks of `chunk` columns (see the
    module docstring); `hidden` may have leading dims [..., D] (targets [...])."""
    if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise ValueError(f"chunk must be an int >= 1, got {chunk!r}")
    lead = hidden_nxd.shape[:-1]
    if tuple(targets_n.shape) != tuple(lead):
        raise ValueError(f"targets {targets_n.shape} do not match hidden {hidden_nxd.shape}")
    hidden = hidden_nxd.reshape(-1, hidden_nxd.shape[-1])
    targets = jnp.asarray(targets_n, jnp.int32).reshape(-1)
    dt = None if dtype is None else jnp.dtype(dtype)
    ce, idx = _xent(hidden, kernel_dxv, bias_v, targets, int(min(chunk, kernel_dxv.shape[1])),
                    dt)
    return ce.reshape(lead), idx.reshape(lead)


def dense_cross_entropy(hidden_nxd: jax.Array, kernel_dxv: jax.Array, bias_v: jax.Array | None,
                        targets_n: jax.Array, *, dtype: DTypeLike = None
                        ) -> tuple[jax.Array, jax.Array]:
    """The unchunked reference: the same (CE, argmax) from the full [..., V] float32 logits."""
    dt = _compute_dtype(hidden_nxd, kernel_dxv, bias_v, dtype)
    logits = _block_logits(hidden_nxd, kernel_dxv, bias_v, dt)
    logp = jax.nn.log_softmax(logits, axis=-1)
    ce = -jnp.take_along_axis(logp, jnp.asarray(targets_n, jnp.int32)[..., None], axis=-1)[..., 0]
    return ce, jnp.argmax(logits, axis=-1).astype(jnp.int32)
