"""Optimizer from the parsed config: optax chain, learning-rate schedules, regex param groups.

Reads a `schema.OptimConfig` (keys optim, lr, wd, grad_clip_norm, schedule; defaults and
checks live in schema.py):
  optimizer        "adam" (scale_by_adam; AdamW with `wd`), "sgd" (momentum) or "adafactor".
  lr               peak learning rate.
  wd               decoupled weight decay, applied to `*/kernel` params and multiplied by
                   the schedule (not by lr), as in big_vision: p -= s(t)·(lr·u + wd·p).
  grad_clip_norm   clip gradients by global norm (0: off).
  groups           (regex, ScheduleConfig | None) matched in order against `/`-joined param
                   paths; None freezes the group (no update, no optimizer state).
A schedule: linear warmup then decay_type ("cosine" | "linear" | "rsqrt" | "constant").
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from siglip_jax.config import ConfigError
from siglip_jax.schema import OptimConfig, ScheduleConfig
from siglip_jax.sharding import path_str, tree_paths

Schedule = Callable[[jax.Array], jax.Array]
FROZEN = "frozen"


def make_schedule(spec: ScheduleConfig | Mapping[str, Any], total_steps: int) -> Schedule:
    """A multiplier in [0, 1] per step: linear warmup then the chosen decay."""
    if not isinstance(spec, ScheduleConfig):
        spec = ScheduleConfig.parse(spec)
    decay_type = spec.decay_type
    warmup = spec.warmup(total_steps)
    timescale = float(spec.timescale if spec.timescale is not None else max(warmup, 1))

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = jnp.minimum(1.0, (step + 1.0) / max(warmup, 1)) if warmup else 1.0
        progress = jnp.clip((step - warmup) / max(total_steps - warmup, 1), 0.0, 1.0)
        if decay_type == "cosine":
            decay = 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        elif decay_type == "linear":
            decay = 1.0 - progress
        elif decay_type == "rsqrt":
            decay = jax.lax.rsqrt(jnp.maximum(step - warmup, 0.0) / timescale + 1.0)
        else:
            decay = jnp.ones_like(step)
        return warm * decay

    return schedule


def _base_optimizer(optim: OptimConfig) -> optax.GradientTransformation:
    h = optim.hparams
    if optim.name == "adam":
        return optax.scale_by_adam(b1=h["b1"], b2=h["b2"], eps=h["eps"])
    if optim.name == "sgd":
        return optax.trace(decay=h["momentum"], nesterov=h["nesterov"]) \
            if h["momentum"] else optax.identity()
    return optax.scale_by_factored_rms(decay_rate=h["decay_rate"],
                                       min_dim_size_to_factor=h["min_dim_size_to_factor"])


def param_labels(params: Any, groups: Sequence[tuple[str, Any]]) -> Any:
    """Labels each parameter with its group name (`g0`, `g1`, … or `frozen`)."""
    compiled = [re.compile(p) for p, _ in groups]
    used = [False] * len(groups)

    def label(path, _):
        name = path_str(path)
        for i, pattern in enumerate(compiled):
            if pattern.fullmatch(name):
                used[i] = True
                return FROZEN if groups[i][1] is None else f"g{i}"
        raise ConfigError(f"parameter {name!r} matches no schedule group regex "
                          f"({[p for p, _ in groups]}); add a catch-all '.*' group")

    labels = jax.tree_util.tree_map_with_path(label, params)
    for i, was_used in enumerate(used):
        if not was_used:
            raise ConfigError(f"schedule group regex {groups[i][0]!r} matches no parameter; "
                              f"parameters look like {tree_paths(params)[:3]}")
    return labels


def group_labels(optim: OptimConfig, params: Any) -> Any:
    """Each parameter's group label (`frozen` for schedule None)."""
    return param_labels(params, optim.groups)


def make_optimizer(optim: OptimConfig, params: Any, total_steps: int
                   ) -> tuple[optax.GradientTransformation, Schedule]:
    """Builds the optax chain for `params` (abstract is fine) and the first group's lr(step)."""
    labels = param_labels(params, optim.groups)
    lr, wd = optim.lr, optim.wd
    transforms: dict[str, optax.GradientTransformation] = {FROZEN: optax.set_to_zero()}
    first_lr: Schedule | None = None
    for i, (_, spec) in enumerate(optim.groups):
        if spec is None:
            continue
        schedule = make_schedule(spec, total_steps)
        if first_lr is None:
            first_lr = lambda step, s=schedule: lr * s(step)
        decay_mask = lambda p: jax.tree_util.tree_map_with_path(
            lambda path, _: path_str(path).endswith("kernel"), p)
        transforms[f"g{i}"] = optax.chain(
            _base_optimizer(optim),
            optax.scale(lr),
            optax.add_decayed_weights(wd, mask=decay_mask) if wd else optax.identity(),
            optax.scale_by_schedule(lambda step, s=schedule: -s(step)),
        )
    chain = [optax.multi_transform(transforms, labels)]
    if optim.grad_clip_norm:
        chain.insert(0, optax.clip_by_global_norm(optim.grad_clip_norm))
    return optax.chain(*chain), first_lr


def frozen_group_problems(optim: OptimConfig, params: Any,
                          model_init: Mapping[str, str]) -> list[str]:
    """Frozen (None) groups that would not freeze what they name, or would freeze a random init.

    A frozen group's parameters may be claimed first by an earlier, trained group (first match
    wins in `param_labels`); a tower frozen entirely while `model_init` loads neither it nor the
    full model would stay at its random initialisation.
    """
    labels = dict(zip(tree_paths(params), jax.tree_util.tree_leaves(
        param_labels(params, optim.groups)), strict=True))
    problems = []
    for i, (regex, spec) in enumerate(optim.groups):
        if spec is not None:
            continue
        pattern = re.compile(regex)
        stolen = [(path, label) for path, label in labels.items()
                  if pattern.fullmatch(path) and label not in (FROZEN, f"g{i}")]
        if stolen:
            earlier = optim.groups[int(stolen[0][1][1:])][0]
            problems.append(f"schedule: group {regex!r} is frozen (None) but {len(stolen)} of "
                            f"its parameters (e.g. {stolen[0][0]!r}) get the schedule of the "
                            f"earlier group {earlier!r}; list the frozen group first")
    for tower in ("img", "txt"):
        tower_labels = [label for path, label in labels.items() if path.startswith(tower + "/")]
        if tower_labels and all(label == FROZEN for label in tower_labels) and not (
                model_init.get(tower) or model_init.get("full")):
            problems.append(f"schedule freezes the whole {tower} tower but model_init.{tower} "
                            "(and model_init.full) is empty: it would stay at its random init")
    return problems
