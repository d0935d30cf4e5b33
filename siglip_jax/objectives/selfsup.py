"""Shared parts of the image tower's self-supervised objectives (SigLIP 2 §2.3, after SILC and
TIPS): the DINO-style projection head, teacher targets (sharpened, optionally Sinkhorn-Knopp
centred), the cross-entropy between teacher and student, the switch-on step (their options:
objectives/options.py).

Both objectives use the EMA teacher: they expose `teacher_parts`, `ema`, `start` and
`init_params(rng)`, which `step.py` reads through objectives/base.py (`objective_params`,
`teacher_spec`, `ema_update`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from siglip_jax.records import ConfigError

# Top-level params the objectives add next to the model's (not part of an exported model).
HEAD_PARTS = ("distill_head", "masked_head", "mask_token")


def image_views(options: Mapping[str, object]) -> tuple[str, ...]:
    """The objective's `global_key` unless it is the sigmoid loss's "image"."""
    key = str(options["global_key"])
    return () if key == "image" else (key,)


def batch_view(batch: Mapping[str, object], key: str, name: str) -> jax.Array:
    """batch[key], or ConfigError saying how to produce it."""
    if key not in batch:
        raise ConfigError(f"config.loss.{name}.global_key={key!r}: the batch has no {key!r} "
                          f"(it has {sorted(batch)}); add the pp op `global_view` to "
                          "input.pp (and keep its key), or set global_key='image' to use the "
                          "sigmoid loss's image")
    return batch[key]


def check_vit_tower(kind: str, name: str) -> None:
    """ConfigError unless the image tower's `kind` is the fixed-resolution ViT, which the
    objective `name` needs (its patch grid is fixed)."""
    if kind == "naflex":
        raise ConfigError(f"config.loss.{name}: needs the fixed-resolution ViT image tower "
                          "(model.image.kind='vit'), got 'naflex'")


def start_step(total_steps: int, options: Mapping[str, object]) -> int:
    """The first step at which the objective's loss counts: round(start_frac · total_steps)."""
    return int(round(options["start_frac"] * total_steps))


# ----------------------------------------------------------------------------- head and loss


class ProjectionHead(nn.Module):
    """DINO-style head: MLP (`layers` Dense, GELU between) to a `bottleneck`, L2-normalised,
    then cosine scores against `prototypes` L2-normalised prototype vectors → [..., K]."""

    hidden: int = 2048
    bottleneck: int = 256
    prototypes: int = 65536
    layers: int = 3

    @nn.compact
    def __call__(self, x_bxw: jax.Array) -> jax.Array:
        """Prototype scores in [-1, 1] (float32) of features [..., W]."""
        x = jnp.asarray(x_bxw, jnp.float32)
        for i in range(self.layers - 1):
            x = nn.gelu(nn.Dense(self.hidden, name=f"mlp_{i}")(x), approximate=True)
        x = nn.Dense(self.bottleneck, name=f"mlp_{self.layers - 1}")(x)
        x = x / (jnp.linalg.norm(x, axis=-1, keepdims=True) + 1e-6)
        protos = self.param("prototypes", nn.initializers.normal(stddev=0.02),
                            (self.bottleneck, self.prototypes), jnp.float32)
        protos = protos / (jnp.linalg.norm(protos, axis=0, keepdims=True) + 1e-6)
        return x @ protos


def sinkhorn_knopp(scores_nxk: jax.Array, temp: float, iters: int = 3) -> jax.Array:
    """Teacher targets [n, K] by Sinkhorn-Knopp on exp(scores / temp), as DINOv2's
    `sinkhorn_knopp_teacher` (dinov2/loss/dino_clstoken_loss.py, ibot_patch_loss.py of
    dinov2==0.0.1.dev2): scaled to total mass 1, then `iters` times every prototype (column)
    to mass 1/K and every row to mass 1/n; times n, so each row is a distribution.

    The n rows are the whole global batch: under `jit` with the rows sharded over devices the
    sums over rows are all-reduced by XLA, where DINOv2 calls `dist.all_reduce`. One
    deliberate difference: the scores' maximum is subtracted before `exp` (a constant factor
    the first normalisation removes exactly), so a small `temp` cannot overflow float32."""
    n, k = scores_nxk.shape
    scores = jnp.asarray(scores_nxk, jnp.float32)
    q = jnp.exp((scores - jnp.max(scores)) / temp)
    q = q / jnp.sum(q)
    for _ in range(iters):
        q = q / jnp.sum(q, axis=0, keepdims=True) / k  # Columns (prototypes) equal mass.
        q = q / jnp.sum(q, axis=1, keepdims=True) / n  # Rows (samples) equal mass.
    return q * n


def teacher_targets(scores_nxk: jax.Array, temp: float, centering: str) -> jax.Array:
    """Teacher probabilities [n, K]: Sinkhorn-Knopp centred ("sinkhorn") or only sharpened
    ("softmax")."""
    if centering == "sinkhorn":
        return sinkhorn_knopp(scores_nxk, temp)
    return jax.nn.softmax(jnp.asarray(scores_nxk, jnp.float32) / temp, axis=-1)


def cross_entropy(targets: jax.Array, student: jax.Array, temp: float) -> jax.Array:
    """Mean over all rows of -Σ_k p_teacher · log softmax(student / temp) (scores [..., K];
    `targets` broadcasts to the shape of `student`)."""
    logp = jax.nn.log_softmax(student / temp, axis=-1)
    return jnp.mean(-jnp.sum(targets * logp, axis=-1))


def distillation_loss(teacher_bxk: jax.Array, student_bxnxk: jax.Array, *, teacher_temp: float,
                      student_temp: float, centering: str) -> jax.Array:
    """Local-to-global DINO loss of one teacher view [B, K] and n student views [B, n, K]:
    targets over the (global) batch of teacher views, then the cross-entropy averaged over
    images and views. Equals DINOv2's `DINOLoss.forward(n student chunks [B, K], [targets])`
    divided by its n·1 loss terms, as its `ssl_meta_arch` divides the local-crops loss."""
    targets = teacher_targets(teacher_bxk, teacher_temp, centering)
    return cross_entropy(targets[:, None, :], student_bxnxk, student_temp)


def masked_patch_loss(teacher_bxmxk: jax.Array, student_bxmxk: jax.Array, *,
                      teacher_temp: float, student_temp: float, centering: str) -> jax.Array:
    """iBOT masked-patch loss over the m masked patches of each of B images [B, m, K]: targets
    over all B·m masked patches jointly, cross-entropy averaged over each image's patches,
    then over images. Equals DINOv2's `iBOTPatchLoss.forward_masked` (weights 1/m per patch,
    divided by B) after `sinkhorn_knopp_teacher` with `n_masked_patches_tensor` = B·m."""
    b, m, k = teacher_bxmxk.shape
    targets = teacher_targets(jnp.reshape(teacher_bxmxk, (b * m, k)), teacher_temp, centering)
    return cross_entropy(jnp.reshape(targets, (b, m, k)), student_bxmxk, student_temp)


def switched(step: jax.Array, start: int, loss_fn: Callable[[], jax.Array]) -> jax.Array:
    """`loss_fn()` from step `start` on, exactly 0 (and no gradient) before. A `lax.cond`:
    before the switch-on step the extra forward passes are not run at all (only compiled)."""
    if start <= 0:
        return loss_fn()
    return jax.lax.cond(step >= start, lambda: loss_fn().astype(jnp.float32),
                        lambda: jnp.zeros((), jnp.float32))
