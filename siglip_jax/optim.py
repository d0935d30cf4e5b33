"""Optimizer from config: optax chain, learning-rate schedules and regex parameter groups.

Config keys read here (all under the top-level config):
  optim.name           "adam" (scale_by_adam; AdamW with `wd`), "sgd" (momentum) or "adafactor".
  optim.b1, optim.b2, optim.eps, optim.momentum   the optimizer's hyper-parameters.
  lr                   peak learning rate.
  wd                   decoupled weight decay, applied to `*/kernel` params and multiplied by
                       the schedule (not by lr), as in big_vision: p -= s(t)·(lr·u + wd·p).
  grad_clip_norm       clip gradients by global norm (0 or None: off).
  schedule             one schedule dict for all params, or a list of (regex, dict | None)
                       groups matched in order against `/`-joined param paths; None freezes
                       the group (no update, no optimizer state).
A schedule dict: decay_type ("cosine" | "linear" | "rsqrt" | "constant"), warmup_steps (int)
or warmup_frac (fraction of total steps), and for rsqrt `timescale`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from siglip_jax.config import ConfigError, check_keys, to_plain
from siglip_jax.sharding import path_str, tree_paths

Schedule = Callable[[jax.Array], jax.Array]
FROZEN = "frozen"
OPTIMIZERS = ("adam", "sgd", "adafactor")
DECAY_TYPES = ("cosine", "linear", "rsqrt", "constant")


def make_schedule(spec: Mapping[str, Any], total_steps: int) -> Schedule:
    """A multiplier in [0, 1] per step: linear warmup then the chosen decay."""
    spec = dict(spec)
    check_keys(spec, ("decay_type", "warmup_steps", "warmup_frac", "timescale"), "schedule")
    decay_type = spec.get("decay_type", "cosine")
    if decay_type not in DECAY_TYPES:
        raise ConfigError(f"schedule.decay_type {decay_type!r} is not one of {DECAY_TYPES}")
    if "warmup_steps" in spec and "warmup_frac" in spec:
        raise ConfigError("schedule: give warmup_steps or warmup_frac, not both")
    warmup = int(spec["warmup_steps"]) if "warmup_steps" in spec else int(
        round(float(spec.get("warmup_frac", 0.0)) * total_steps))
    timescale = float(spec.get("timescale", max(warmup, 1)))

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


def _base_optimizer(optim: Mapping[str, Any]) -> optax.GradientTransformation:
    optim = dict(optim)
    name = optim.pop("name", "adam")
    if name == "adam":
        check_keys(optim, ("b1", "b2", "eps"), "optim")
        return optax.scale_by_adam(b1=optim.get("b1", 0.9), b2=optim.get("b2", 0.999),
                                   eps=optim.get("eps", 1e-8))
    if name == "sgd":
        check_keys(optim, ("momentum", "nesterov"), "optim")
        momentum = optim.get("momentum", 0.9)
        return optax.trace(decay=momentum, nesterov=optim.get("nesterov", False)) \
            if momentum else optax.identity()
    if name == "adafactor":
        check_keys(optim, ("decay_rate", "min_dim_size_to_factor"), "optim")
        return optax.scale_by_factored_rms(
            decay_rate=optim.get("decay_rate", 0.8),
            min_dim_size_to_factor=optim.get("min_dim_size_to_factor", 128))
    raise ConfigError(f"optim.name {name!r} is not one of {OPTIMIZERS}")


def _groups(schedule_config: Any) -> list[tuple[str, Any]]:
    spec = to_plain(schedule_config)
    if isinstance(spec, Mapping):
        return [(".*", spec)]
    if isinstance(spec, Sequence) and not isinstance(spec, str):
        groups = []
        for entry in spec:
            if not (isinstance(entry, Sequence) and len(entry) == 2):
                raise ConfigError(f"schedule entry {entry!r} is not a (regex, schedule) pair")
            groups.append((str(entry[0]), entry[1]))
        return groups
    raise ConfigError(f"schedule must be a dict or a list of (regex, dict|None), got {spec!r}")


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


def group_labels(config: Any, params: Any) -> Any:
    """Each parameter's group label from config.schedule (`frozen` for schedule None)."""
    return param_labels(params, _groups(config.schedule))


def make_optimizer(config: Any, params: Any, total_steps: int
                   ) -> tuple[optax.GradientTransformation, Schedule]:
    """Builds the optax chain for `params` (abstract is fine) and the first group's lr(step)."""
    groups = _groups(config.schedule)
    labels = param_labels(params, groups)
    if all(spec is None for _, spec in groups):
        raise ConfigError("every schedule group is frozen (None): nothing would be trained")
    lr, wd = float(config.lr), float(config.get("wd", 0.0) or 0.0)
    transforms: dict[str, optax.GradientTransformation] = {FROZEN: optax.set_to_zero()}
    first_lr: Schedule | None = None
    for i, (_, spec) in enumerate(groups):
        if spec is None:
            continue
        schedule = make_schedule(spec, total_steps)
        if first_lr is None:
            first_lr = lambda step, s=schedule: lr * s(step)
        decay_mask = lambda p: jax.tree_util.tree_map_with_path(
            lambda path, _: path_str(path).endswith("kernel"), p)
        transforms[f"g{i}"] = optax.chain(
            _base_optimizer(config.optim),
            optax.scale(lr),
            optax.add_decayed_weights(wd, mask=decay_mask) if wd else optax.identity(),
            optax.scale_by_schedule(lambda step, s=schedule: -s(step)),
        )
    chain = [optax.multi_transform(transforms, labels)]
    clip = config.get("grad_clip_norm", None)
    if clip:
        chain.insert(0, optax.clip_by_global_norm(float(clip)))
    return optax.chain(*chain), first_lr
