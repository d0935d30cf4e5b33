"""Optimizer from the parsed config: optax chain, learning-rate schedules, regex param groups.

`OptimConfig` is the parsed record of the config keys optim, lr, wd, grad_clip_norm and
schedule (its defaults and checks live here):
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

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax

from siglip_jax.records import (
    ConfigError,
    build_record,
    check_choice,
    check_float,
    check_int,
    check_keys,
    freeze,
    set_fields,
    to_plain,
)
from siglip_jax.sharding import path_str, tree_paths

Schedule = Callable[[jax.Array], jax.Array]
DECAY_TYPES = ("cosine", "linear", "rsqrt", "constant")


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """Linear warmup (steps or a fraction of the run) then a decay; rsqrt has a timescale.
    `stretch_from` > 0 with `stretch` s: from that step on the schedule runs s times slower
    (SigLIP 2 §2.4, NaFlex: the last 10 % stretched 3.75x); the run's total_steps is then the
    stretched length, the unstretched one being stretch_from + (total - stretch_from) / s."""

    decay_type: str = "cosine"
    warmup_steps: int | None = None
    warmup_frac: float | None = None
    timescale: float | None = None
    stretch_from: int = 0
    stretch: float = 1.0

    def __post_init__(self) -> None:
        check_choice(self.decay_type, "schedule.decay_type", DECAY_TYPES)
        if self.warmup_steps is not None and self.warmup_frac is not None:
            raise ConfigError("schedule: give warmup_steps or warmup_frac, not both")
        if self.warmup_steps is not None:
            set_fields(self, warmup_steps=check_int(self.warmup_steps, "schedule.warmup_steps", 0))
        if self.warmup_frac is not None:
            set_fields(self, warmup_frac=check_float(self.warmup_frac, "schedule.warmup_frac", 0.0))
        set_fields(self, stretch_from=check_int(self.stretch_from or 0, "schedule.stretch_from", 0),
                   stretch=check_float(self.stretch, "schedule.stretch", 0.0))
        if self.stretch <= 0:
            raise ConfigError(f"schedule.stretch={self.stretch} must be > 0")

    def warmup(self, total_steps: int) -> int:
        """Warmup length in steps for a run of `total_steps`."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        return int(round((self.warmup_frac or 0.0) * total_steps))

    @classmethod
    def parse(cls, raw: Mapping[str, object], where: str = "schedule") -> ScheduleConfig:
        """From a schedule dict; unknown keys raise."""
        return build_record(cls, raw, where)


OPTIMIZERS = {  # name -> its hyper-parameters with their defaults.
    "adam": {"b1": 0.9, "b2": 0.999, "eps": 1e-8},
    "sgd": {"momentum": 0.9, "nesterov": False},
    "adafactor": {"decay_rate": 0.8, "min_dim_size_to_factor": 128},
}


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimizer, peak lr, weight decay, clipping and the schedule groups (None = frozen)."""

    name: str
    hparams: Mapping[str, object]
    lr: float
    wd: float = 0.0
    grad_clip_norm: float = 0.0
    groups: tuple[tuple[str, ScheduleConfig | None], ...] = ((".*", ScheduleConfig()),)

    @classmethod
    def parse(cls, optim: Mapping[str, object] | None, lr: object, wd: object = 0.0,
              grad_clip_norm: object = 0.0, schedule: object = None) -> OptimConfig:
        """From the top-level keys optim, lr, wd, grad_clip_norm, schedule."""
        optim = dict(to_plain(optim) or {})
        name = optim.pop("name", "adam")
        if name not in OPTIMIZERS:
            raise ConfigError(f"optim.name {name!r} is not one of {tuple(OPTIMIZERS)}")
        check_keys(optim, tuple(OPTIMIZERS[name]), "optim")
        hparams = {**OPTIMIZERS[name], **optim}
        groups = cls._groups(to_plain(schedule) if schedule is not None else {})
        if all(spec is None for _, spec in groups):
            raise ConfigError("every schedule group is frozen (None): nothing would be trained")
        seen: dict[str, bool] = {}
        for regex, spec in groups:
            if regex in seen and seen[regex] != (spec is None):
                raise ConfigError(f"schedule: group {regex!r} is listed both as frozen (None) "
                                  "and with a schedule")
            seen[regex] = spec is None
        return cls(name, freeze(hparams), check_float(lr, "lr"), check_float(wd or 0.0, "wd", 0.0),
                   check_float(grad_clip_norm or 0.0, "grad_clip_norm", 0.0), groups)

    @classmethod
    def from_config(cls, config: Mapping[str, object]) -> OptimConfig:
        """From a config (or any mapping) holding the keys optim, lr, wd, grad_clip_norm and
        schedule."""
        raw = dict(to_plain(config))
        if "lr" not in raw:
            raise ConfigError("config key lr is required")
        return cls.parse(raw.get("optim"), raw["lr"], raw.get("wd", 0.0),
                         raw.get("grad_clip_norm", 0.0), raw.get("schedule"))

    @staticmethod
    def _groups(spec: object) -> tuple[tuple[str, ScheduleConfig | None], ...]:
        if isinstance(spec, Mapping):
            return ((".*", ScheduleConfig.parse(spec)),)
        if isinstance(spec, Sequence) and not isinstance(spec, str):
            groups = []
            for entry in spec:
                if not (isinstance(entry, Sequence) and len(entry) == 2):
                    raise ConfigError(f"schedule entry {entry!r} is not a (regex, schedule) pair")
                regex, group = entry
                groups.append((str(regex), None if group is None else ScheduleConfig.parse(
                    group, f"schedule[{regex!r}]")))
            return tuple(groups)
        raise ConfigError(f"schedule must be a dict or a list of (regex, dict|None), got {spec!r}")


FROZEN = "frozen"


def make_schedule(spec: ScheduleConfig | Mapping[str, object], total_steps: int) -> Schedule:
    """A multiplier in [0, 1] per step: linear warmup then the chosen decay."""
    if not isinstance(spec, ScheduleConfig):
        spec = ScheduleConfig.parse(spec)
    decay_type = spec.decay_type
    start, stretch = spec.stretch_from, spec.stretch
    if start and stretch != 1.0:
        if start >= total_steps:
            raise ConfigError(f"schedule.stretch_from={start} must be below total_steps="
                              f"{total_steps}")
        total_steps = start + (total_steps - start) / stretch  # The unstretched horizon.
    warmup = spec.warmup(int(round(total_steps)))
    timescale = float(spec.timescale if spec.timescale is not None else max(warmup, 1))

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        if start and stretch != 1.0:
            step = jnp.where(step < start, step, start + (step - start) / stretch)
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


def param_labels(params: optax.Params, groups: Sequence[tuple[str, ScheduleConfig | None]]
                 ) -> optax.Params:
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


def group_labels(optim: OptimConfig, params: optax.Params) -> optax.Params:
    """Each parameter's group label (`frozen` for schedule None)."""
    return param_labels(params, optim.groups)


def make_optimizer(optim: OptimConfig, params: optax.Params, total_steps: int
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


def frozen_group_problems(optim: OptimConfig, params: optax.Params,
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
