"""Image-text contrastive losses: the SigLIP sigmoid loss (dense, all-gather, ring,
bidirectional ring, chunked ring) and the CLIP softmax loss as a baseline.

Per pair (i, j): ``l_ij = -log σ(z_ij · (exp(t')·x_i·y_j + b))`` with ``z_ij = 1`` if i == j
else -1; the loss is ``Σ_ij l_ij / B`` (sum over texts, mean over images), as in the paper.

The distributed variants run inside ``jax.shard_map`` over the mesh axes that shard the batch
(``batch_axes``; several axes are flattened into one ring, row-major in the given order).
Device k holds images X_k and texts Y_k (b = B / N rows each).

The ring variants are a ``jax.custom_vjp`` whose forward pass walks the ring once and computes
the loss *and* its gradients block by block: the image gradient accumulates locally, the
text-gradient accumulator travels with its text block and one final ``ppermute`` brings it
home. The backward pass only scales those saved gradients by the incoming cotangent. Peak
memory per device is therefore O(b·b + b·d) whatever the number of devices N; plain autodiff
through the ring would save every hop's residuals and grow with N again.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

Array = jax.Array
Metrics = dict[str, Array]
LossFn = Callable[[Array, Array, Array, Array | None], tuple[Array, Metrics]]

# impl name -> option names it accepts (with defaults).
_OPTIONS: dict[str, dict[str, Any]] = {
    "dense": {},
    "all_gather": {},
    "ring": {"unroll": False},
    "bidirectional": {"unroll": False},
    "chunked": {"chunk_size": 128, "unroll": False},
    "softmax": {},
}
LOSS_IMPLS: tuple[str, ...] = tuple(_OPTIONS)


# ------------------------------------------------------------------------------------------
# Shared pieces.


def _scalar(x: Array | float | None) -> Array:
    """A float32 scalar from a scalar or a shape-(1,) parameter (None -> 0, no bias)."""
    if x is None:
        return jnp.zeros((), jnp.float32)
    x = jnp.asarray(x)
    if x.size != 1:
        raise ValueError(f"expected a scalar (or shape (1,)) temperature/bias, got shape {x.shape}")
    return jnp.reshape(x, ()).astype(jnp.float32)


def _check_embeddings(zimg_bxd: Array, ztxt_bxd: Array) -> None:
    """Raise ValueError unless the two embedding arrays are [B, D] with equal shapes."""
    if zimg_bxd.ndim != 2 or zimg_bxd.shape != ztxt_bxd.shape:
        raise ValueError(
            f"expected image and text embeddings of equal shape [B, D], got "
            f"{zimg_bxd.shape} and {ztxt_bxd.shape}"
        )


def _metrics(loss: Array, t: Array, bias: Array, pos_sum: Array, neg_sum: Array,
             batch: int) -> Metrics:
    """The metrics dict shared by every loss (all gradients stopped)."""
    n_neg = float(max(batch * batch - batch, 1))  # A Python int would overflow int32.
    m = {
        "loss": loss,
        "t": t,
        "b": bias,
        "pos_logit_mean": pos_sum / batch,
        "neg_logit_mean": neg_sum / n_neg,
    }
    return {k: jax.lax.stop_gradient(v) for k, v in m.items()}


def _sharded_metrics(loss: Array, x_bxd: Array, y_bxd: Array, t: Array, bias: Array,
                     axes: tuple[str, ...], batch: int) -> Metrics:
    """Mean positive/negative logits from O(d) sums: Σ_ij x_i·y_j = (Σ_i x_i)·(Σ_j y_j)."""
    x_bxd, y_bxd = jax.lax.stop_gradient((x_bxd, y_bxd))
    sx_d = jax.lax.psum(jnp.sum(x_bxd, axis=0), axes)
    sy_d = jax.lax.psum(jnp.sum(y_bxd, axis=0), axes)
    diag = jax.lax.psum(jnp.sum(x_bxd * y_bxd), axes)
    pos_sum = t * diag + bias * batch
    # float: B² - B overflows int32 from B = 46341 (e.g. a 64k batch).
    neg_sum = t * (jnp.dot(sx_d, sy_d) - diag) + bias * float(batch * batch - batch)
    return _metrics(loss, t, bias, pos_sum, neg_sum, batch)


def _shift(n: int, k: int) -> list[tuple[int, int]]:
    """ppermute pairs sending every device's block k hops forward round a ring of n."""
    return [(i, (i + k) % n) for i in range(n)]


# ------------------------------------------------------------------------------------------
# Dense reference.


def sigmoid_loss_dense(zimg_bxd: Array, ztxt_bxd: Array, t_prime: Array,
                       b: Array | None) -> tuple[Array, Metrics]:
    """Sigmoid loss on one device with the full B×B logits: (loss, metrics)."""
    _check_embeddings(zimg_bxd, ztxt_bxd)
    batch = zimg_bxd.shape[0]
    t, bias = jnp.exp(_scalar(t_prime)), _scalar(b)
    x_bxd, y_bxd = zimg_bxd.astype(jnp.float32), ztxt_bxd.astype(jnp.float32)
    logits_bxb = t * jnp.dot(x_bxd, y_bxd.T) + bias
    eye_bxb = jnp.eye(batch, dtype=jnp.float32)
    z_bxb = 2.0 * eye_bxb - 1.0
    loss = jnp.sum(jax.nn.softplus(-z_bxb * logits_bxb)) / batch  # -log σ(u) = softplus(-u)
    pos_sum = jnp.sum(logits_bxb * eye_bxb)
    neg_sum = jnp.sum(logits_bxb * (1.0 - eye_bxb))
    return loss, _metrics(loss, t, bias, pos_sum, neg_sum, batch)


# ------------------------------------------------------------------------------------------
# One block of the ring: loss (and gradients) of local images against one text block.


def _block(x_cxd: Array, y_bxd: Array, t: Array, bias: Array, pos_offset: Array | int | None,
           grads: bool) -> tuple[Array, ...]:
    """Loss sum of logits t·x·yᵀ + b; positives at (i, i + pos_offset), none if None.

    With grads, also returns d/dx, d/dy, d/dt and d/db of that sum. The c×b work treats every
    pair as a negative (no label matrix); the c positive pairs are then corrected in O(c·d).
    """
    logits_cxb = t * jnp.dot(x_cxd, y_bxd.T) + bias
    loss = jnp.sum(jax.nn.softplus(logits_cxb))  # -log σ(-l) = softplus(l)
    if pos_offset is not None:
        c = x_cxd.shape[0]
        ypos_cxd = jax.lax.dynamic_slice_in_dim(y_bxd, pos_offset, c, axis=0)
        lpos_c = t * jnp.sum(x_cxd * ypos_cxd, axis=1) + bias
        loss = loss + jnp.sum(jax.nn.softplus(-lpos_c) - jax.nn.softplus(lpos_c))
    if not grads:
        return (loss,)
    g_cxb = jax.nn.sigmoid(logits_cxb)  # d loss / d logits of a negative pair
    gy_cxd = jnp.dot(g_cxb, y_bxd)
    gx_bxd = jnp.dot(g_cxb.T, x_cxd)
    db = jnp.sum(g_cxb)
    if pos_offset is not None:  # a positive pair's slope is -σ(-l), not σ(l)
        gcorr_c = -jax.nn.sigmoid(-lpos_c) - jax.nn.sigmoid(lpos_c)
        gy_cxd = gy_cxd + gcorr_c[:, None] * ypos_cxd
        gxpos_cxd = jax.lax.dynamic_slice_in_dim(gx_bxd, pos_offset, c, axis=0)
        gx_bxd = jax.lax.dynamic_update_slice_in_dim(
            gx_bxd, gxpos_cxd + gcorr_c[:, None] * x_cxd, pos_offset, axis=0)
        db = db + jnp.sum(gcorr_c)
    dt = jnp.sum(x_cxd * gy_cxd)  # Σ_ij g_ij x_i·y_j
    return loss, t * gy_cxd, t * gx_bxd, dt, db


def _loop(count: int, body: Callable[[Any, Any], Any], carry: Any, unroll: bool) -> Any:
    """body(i, carry) for i in 0..count-1: one fori_loop, or (unroll) a Python loop with no
    while loop in the program (for the compiler's cost analysis, which counts a loop body
    once)."""
    if not unroll:
        return jax.lax.fori_loop(0, count, body, carry)
    for i in range(count):
        carry = body(i, carry)
    return carry


def _add_block(acc: tuple[Array, ...], dy_bxd: Array | None, x_bxd: Array, y_bxd: Array, *,
               t: Array, bias: Array, positives: bool, grads: bool,
               chunk: int | None, unroll: bool = False
               ) -> tuple[tuple[Array, ...], Array | None]:
    """Add one text block's loss (and grads) into the accumulators, in place.

    acc = (loss, dx, dt, db) with grads, else (loss,); dy_bxd is the block's travelling
    text-grad accumulator (None without grads). With `chunk`, the local images are processed
    `chunk` rows at a time so only chunk×b logits are live.
    """
    b = x_bxd.shape[0]
    chunk = b if chunk is None else min(chunk, b)

    def one(i, carry):
        acc, dy_bxd = carry
        start = i * chunk
        x_cxd = jax.lax.dynamic_slice_in_dim(x_bxd, start, chunk, axis=0)
        out = _block(x_cxd, y_bxd, t, bias, start if positives else None, grads)
        if not grads:
            return (acc[0] + out[0],), None
        loss, dx_bxd, dt, db = acc
        dx_cxd = jax.lax.dynamic_slice_in_dim(dx_bxd, start, chunk, axis=0) + out[1]
        dx_bxd = jax.lax.dynamic_update_slice_in_dim(dx_bxd, dx_cxd, start, axis=0)
        return (loss + out[0], dx_bxd, dt + out[3], db + out[4]), dy_bxd + out[2]

    if chunk == b:
        return one(0, (acc, dy_bxd))
    return _loop(b // chunk, one, (acc, dy_bxd), unroll)


# ------------------------------------------------------------------------------------------
# Ring walks (run per device inside shard_map). Each returns the global loss and, with grads,
# the gradients of the global loss w.r.t. (x, y, t', b) for this device's shard.


def _zero_acc(x_bxd: Array, y_bxd: Array, grads: bool) -> tuple[tuple[Array, ...], Array | None]:
    """Zero accumulators (zeros_like keeps the shard_map device-varying type)."""
    zero = jnp.zeros_like(x_bxd, shape=())
    if not grads:
        return (zero,), None
    return (zero, jnp.zeros_like(x_bxd), zero, zero), jnp.zeros_like(y_bxd)


def _finish(acc: tuple[Array, ...], dy_bxd: Array | None, t: Array, axes: tuple[str, ...],
            batch: int) -> Array | tuple[Array, tuple[Array, ...]]:
    """psum the per-device sums, normalise by B, turn d/dt into d/dt'."""
    loss = jax.lax.psum(acc[0], axes) / batch
    if dy_bxd is None:
        return loss
    _, dx, dt, db = acc
    dt_prime = jax.lax.psum(dt, axes) * t / batch
    return loss, (dx / batch, dy_bxd / batch, dt_prime, jax.lax.psum(db, axes) / batch)


def _hop_step(add: Callable[..., Any], y_bxd: Array, dy_bxd: Array | None, acc: tuple[Array, ...],
              *, axes: tuple[str, ...], perm: list[tuple[int, int]], send_on: bool):
    """One ring step on the block y_bxd that has just arrived here.

    Sends y_bxd on (if send_on) and receives the finished grad
    accumulator of this same block from the device that used it before; both hops are
    independent of this step's matmuls, so XLA can overlap them with it.
    """
    y_next = jax.lax.ppermute(y_bxd, axes, perm) if send_on else None
    acc, dy_bxd = add(acc, jax.lax.ppermute(dy_bxd, axes, perm), y_bxd=y_bxd, positives=False)
    return y_next, dy_bxd, acc


def _ring_walk(x_bxd: Array, y_bxd: Array, t_prime: Array, bias: Array, *, grads: bool,
               axes: tuple[str, ...], n: int, chunk: int | None, unroll: bool = False):
    """One-way ring: N-1 hops, the text-grad accumulator travels with its block."""
    t = jnp.exp(t_prime)
    right = _shift(n, 1)
    add = functools.partial(_add_block, x_bxd=x_bxd, t=t, bias=bias, grads=grads, chunk=chunk,
                            unroll=unroll)
    acc, dy = add(*_zero_acc(x_bxd, y_bxd, grads), y_bxd=y_bxd, positives=True)
    if n == 1:
        return _finish(acc, dy, t, axes, x_bxd.shape[0])

    # Device k works on the block from device k-i at step i; its grad accumulator follows it.
    # The last step also sends its block on (unused): one spare hop, overlapped with compute,
    # keeps the loop the whole walk, which keeps peak memory flat (an unrolled last step
    # raised it on XLA:CPU).
    step = functools.partial(_hop_step, add, axes=axes, perm=right, send_on=True)
    y = jax.lax.ppermute(y_bxd, axes, right)
    _, dy, acc = _loop(n - 1, lambda _, c: step(*c), (y, dy, acc), unroll)
    if grads:  # the accumulator of block k+1 sits one hop short of home
        dy = jax.lax.ppermute(dy, axes, right)
    return _finish(acc, dy, t, axes, n * x_bxd.shape[0])


def _bidirectional_walk(x_bxd: Array, y_bxd: Array, t_prime: Array, bias: Array, *,
                        grads: bool, axes: tuple[str, ...], n: int, chunk: int | None,
                        unroll: bool = False):
    """Two streams (one each way): ⌊(N-1)/2⌋ two-way rounds, plus one one-way if N is even."""
    t = jnp.exp(t_prime)
    full, extra = (n - 1) // 2, (n - 1) % 2
    right, left = _shift(n, 1), _shift(n, -1)
    add = functools.partial(_add_block, x_bxd=x_bxd, t=t, bias=bias, grads=grads, chunk=chunk,
                            unroll=unroll)
    acc, dyr = add(*_zero_acc(x_bxd, y_bxd, grads), y_bxd=y_bxd, positives=True)
    dyl = jnp.zeros_like(y_bxd) if grads else None  # (its first hop carries zeros)

    def two_way(yr, dyr, yl, dyl, acc):  # spare final hops as in _ring_walk
        yr, dyr, acc = _hop_step(add, yr, dyr, acc, axes=axes, perm=right, send_on=True)
        yl, dyl, acc = _hop_step(add, yl, dyl, acc, axes=axes, perm=left, send_on=True)
        return yr, dyr, yl, dyl, acc

    yr = jax.lax.ppermute(y_bxd, axes, right) if n > 1 else None
    if full:
        carry = (yr, dyr, jax.lax.ppermute(y_bxd, axes, left), dyl, acc)
        yr, dyr, _, dyl, acc = _loop(full, lambda _, c: two_way(*c), carry, unroll)
    if extra:  # N even: the block N/2 hops away is reached one way only
        _, dyr, acc = _hop_step(add, yr, dyr, acc, axes=axes, perm=right, send_on=False)
    if grads:  # send each accumulator back to the device its text block came from
        dy = jax.lax.ppermute(dyr, axes, _shift(n, -(full + extra))) if full + extra else dyr
        if full:
            dy = dy + jax.lax.ppermute(dyl, axes, _shift(n, full))
        dyr = dy
    return _finish(acc, dyr, t, axes, n * x_bxd.shape[0])


def _custom_vjp_loss(walk: Callable[..., Any]) -> Callable[[Array, Array, Array, Array], Array]:
    """Wrap a walk as a custom_vjp: forward computes loss and grads, backward scales them."""

    @jax.custom_vjp
    def loss_fn(x_bxd, y_bxd, t_prime, bias):
        return walk(x_bxd.astype(jnp.float32), y_bxd.astype(jnp.float32), t_prime, bias,
                    grads=False)

    def fwd(x_bxd, y_bxd, t_prime, bias):
        loss, (dx, dy, dt_prime, db) = walk(
            x_bxd.astype(jnp.float32), y_bxd.astype(jnp.float32), t_prime, bias, grads=True)
        return loss, (dx.astype(x_bxd.dtype), dy.astype(y_bxd.dtype), dt_prime, db)

    def bwd(res, g):
        return tuple((g * r).astype(r.dtype) for r in res)

    loss_fn.defvjp(fwd, bwd)
    return loss_fn


# ------------------------------------------------------------------------------------------
# Gather-based variants (plain autodiff).


def _all_gather_local(x_bxd: Array, y_bxd: Array, t_prime: Array, bias: Array, *,
                      axes: tuple[str, ...], n: int) -> Array:
    """Sigmoid loss with all texts gathered on every device (O(b·B) memory)."""
    b = x_bxd.shape[0]
    t = jnp.exp(t_prime)
    y_Bxd = jax.lax.all_gather(y_bxd.astype(jnp.float32), axes, tiled=True)
    logits_bxB = t * jnp.dot(x_bxd.astype(jnp.float32), y_Bxd.T) + bias
    rows_bx1 = jnp.arange(b)[:, None] + jax.lax.axis_index(axes) * b
    z_bxB = jnp.where(rows_bx1 == jnp.arange(n * b)[None, :], 1.0, -1.0)
    return jax.lax.psum(jnp.sum(jax.nn.softplus(-z_bxB * logits_bxB)), axes) / (n * b)


def _softmax_local(x_bxd: Array, y_bxd: Array, t_prime: Array, bias: Array, *,
                   axes: tuple[str, ...], n: int) -> Array:
    """CLIP loss: mean of image->text and text->image cross-entropies, via all-gather."""
    b = x_bxd.shape[0]
    t = jnp.exp(t_prime)
    x_bxd, y_bxd = x_bxd.astype(jnp.float32), y_bxd.astype(jnp.float32)
    x_Bxd = jax.lax.all_gather(x_bxd, axes, tiled=True)
    y_Bxd = jax.lax.all_gather(y_bxd, axes, tiled=True)
    labels_b = jnp.arange(b) + jax.lax.axis_index(axes) * b

    def xent(q_bxd, keys_Bxd):
        logp_bxB = jax.nn.log_softmax(t * jnp.dot(q_bxd, keys_Bxd.T) + bias, axis=-1)
        return -jnp.sum(jnp.take_along_axis(logp_bxB, labels_b[:, None], axis=-1))

    total = xent(x_bxd, y_Bxd) + xent(y_bxd, x_Bxd)
    return jax.lax.psum(total, axes) / (2 * n * b)


# ------------------------------------------------------------------------------------------
# Public factory.


def check_options(impl: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """The impl's options with defaults filled in; ValueError for an unknown impl or option."""
    if impl not in _OPTIONS:
        raise ValueError(f"unknown loss impl {impl!r}; choose one of {', '.join(LOSS_IMPLS)}")
    unknown = sorted(set(options) - set(_OPTIONS[impl]))
    if unknown:
        raise ValueError(f"loss impl {impl!r} got unknown option(s) {unknown}; "
                         f"accepted: {sorted(_OPTIONS[impl]) or 'none'}")
    return {**_OPTIONS[impl], **options}


def make_loss(impl: str, mesh: Mesh, batch_axes: Sequence[str] | str = ("data",),
              **options: Any) -> LossFn:
    """Loss fn (zimg_bxd, ztxt_bxd, t_prime, b) -> (loss, metrics) for global sharded arrays.

    impl: one of LOSS_IMPLS. The batch dim must be sharded over `batch_axes` (flattened into
    one ring, row-major); other mesh axes see replicated copies. Options: chunked takes
    `chunk_size` (rows of the local image block per logits chunk); the ring walks (ring,
    bidirectional, chunked) take `unroll` (default False: the hops are one fori_loop; True:
    a Python loop, a longer program with no while loop, used to check the compiler's cost
    analysis). `b` may be None (no bias).
    """
    opts = check_options(impl, options)
    if impl == "dense":
        return sigmoid_loss_dense

    axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
    missing = [a for a in axes if a not in mesh.axis_names]
    if not axes or missing:
        raise ValueError(f"batch_axes {axes} must be non-empty names of mesh axes "
                         f"{mesh.axis_names}")
    n = math.prod(mesh.shape[a] for a in axes)
    chunk = opts.get("chunk_size")
    unroll = opts.get("unroll", False)
    if not isinstance(unroll, bool):
        raise ValueError(f"unroll must be True or False, got {unroll!r}")
    if chunk is not None and (not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"chunk_size must be a positive int, got {chunk!r}")

    def loss_fn(zimg_bxd: Array, ztxt_bxd: Array, t_prime: Array,
                b: Array | None) -> tuple[Array, Metrics]:
        _check_embeddings(zimg_bxd, ztxt_bxd)
        batch = zimg_bxd.shape[0]
        if batch % n:
            raise ValueError(f"global batch {batch} is not divisible by the {n} devices of "
                             f"batch_axes {axes}")
        local_b = batch // n
        local_chunk = None
        if impl == "chunked":
            local_chunk = min(chunk, local_b)
            if local_b % local_chunk:
                raise ValueError(f"chunk_size {chunk} does not divide the local batch {local_b}")
        if impl == "ring" or impl == "chunked":
            inner = _custom_vjp_loss(functools.partial(_ring_walk, axes=axes, n=n,
                                                       chunk=local_chunk, unroll=unroll))
        elif impl == "bidirectional":
            inner = _custom_vjp_loss(functools.partial(_bidirectional_walk, axes=axes, n=n,
                                                       chunk=None, unroll=unroll))
        elif impl == "all_gather":
            inner = functools.partial(_all_gather_local, axes=axes, n=n)
        else:
            inner = functools.partial(_softmax_local, axes=axes, n=n)

        def local(x_bxd, y_bxd, t_prime, bias):
            loss = inner(x_bxd, y_bxd, t_prime, bias)
            return loss, _sharded_metrics(loss, x_bxd.astype(jnp.float32),
                                          y_bxd.astype(jnp.float32), jnp.exp(t_prime), bias,
                                          axes, batch)

        spec = P(axes)
        sharded = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, P(), P()),
                                out_specs=(P(), P()))
        return sharded(zimg_bxd, ztxt_bxd, _scalar(t_prime), _scalar(b))

    return loss_fn

