"""The config schema: a loaded config parsed once into typed, frozen per-section records.

`parse(config)` turns the ConfigDict of a config file (after overrides) into a `RunConfig`.
Every key has exactly one default and one check, here; library code receives these records
and never reads a ConfigDict with `.get(key, default)`. Unknown keys, wrong values and
inconsistent combinations are `ConfigError`s with a one-line message naming the key.

Sections (top-level keys in brackets):
  RunConfig       seed, total_steps, log_every, time_budget_s, cpu_devices, grad_accum_steps,
                  on_nonfinite, peak_flops, tensorboard
  MeshConfig      [mesh, batch_axes, sharding_rules]: the named mesh axes, the axes the batch
                  is split over and the (regex, rule) parameter sharding rules, as one value
  InputConfig     [input] (data/config.py): data (a data-source record), pp, global_batch,
                  shuffle_buffer, cache
  TokenizerConfig [tokenizer] (data/config.py): model (sentencepiece path; "" = the
                  checkpoint's or the data source's), max_len, eos ("sticky" | "yes" |
                  "none"), convention ("" | "siglip" | "siglip2": a model family's text rules)
  ModelConfig     [model]: image, text (tower dicts, see models/config.py), out_dim,
                  temperature_init, bias_init, decoder (the LocCa caption decoder dict,
                  resolved in models/config.py; None = no decoder)
  ModelInitConfig [model_init]: img, txt, full (checkpoint paths; "" = random init), resume
                  (another run's train state to continue, resized: checkpoints/resume.py)
  LossConfig      [loss]: impl (losses.LOSS_IMPLS) and the impl's options
  OptimConfig     [optim, lr, wd, grad_clip_norm, schedule]: optimizer name and
                  hyper-parameters, peak lr, decoupled weight decay, global-norm clipping, and
                  the schedule groups [(regex, ScheduleConfig | None = frozen), ...]
  EvalConfig      [evals.<name>]: type, data, pp, every_n_steps, batch_size (+ per type keys)
  CheckpointConfig [checkpoint]: every_n_steps, keep, keep_every_n_steps,
    min_replica_slice_bytes
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from siglip_jax import losses
from siglip_jax.checkpoints.orbax_io import MIN_REPLICA_SLICE_BYTES
from siglip_jax.data.config import InputConfig, TokenizerConfig
from siglip_jax.evaluators.config import EvalConfig
from siglip_jax.models.config import ModelConfig
from siglip_jax.objectives import options as objective_options
from siglip_jax.optim import OptimConfig
from siglip_jax.records import (
    ConfigError,
    build_record,
    check_choice,
    check_float,
    check_int,
    check_keys,
    freeze,
    set_fields,
    thaw,
    to_plain,
)
from siglip_jax.sharding import MeshConfig

# ----------------------------------------------------------------------------- sections


@dataclasses.dataclass(frozen=True)
class ModelInitConfig:
    """Checkpoints that replace the random init: a tower each, or the whole model; or
    `resume`: another run's train state (params, optimizer state, step, teacher) continued in
    this run, its patch kernel and position embedding resized (checkpoints/resume.py)."""

    img: str = ""
    txt: str = ""
    full: str = ""
    resume: str = ""

    def __post_init__(self) -> None:
        set_fields(self, img=str(self.img or ""), txt=str(self.txt or ""),
                   full=str(self.full or ""), resume=str(self.resume or ""))
        if self.resume and (self.img or self.txt or self.full):
            raise ConfigError("model_init.resume continues a whole train state: leave "
                              "model_init.img, txt and full empty")

    def parts(self) -> dict[str, str]:
        """{"img" | "txt" | "full": path} of the parts that are set."""
        return {k: v for k, v in (("img", self.img), ("txt", self.txt), ("full", self.full))
                if v}


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The contrastive loss implementation and its options, plus the extra objectives
    (siglip_jax.objectives: decoder, self-distillation, masked prediction) by name."""

    impl: str = "ring"
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    objectives: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)

    @classmethod
    def parse(cls, raw: Mapping[str, Any] | None) -> LossConfig:
        """`dict(impl=..., **options, <objective>=dict(...))`; the impl's options are checked
        by losses.check_options, each objective's by objectives/options.check_options."""
        raw = dict(to_plain(raw) or {})
        impl = raw.pop("impl", "ring")
        chosen = {}
        for name in objective_options.DEFAULTS:
            if name in raw:
                value = raw.pop(name)
                if value is None:
                    continue
                if not isinstance(value, Mapping):
                    raise ConfigError(f"config.loss.{name}: expected a dict of options (or "
                                      f"None to switch it off), got {value!r}")
                try:
                    chosen[name] = freeze(objective_options.check_options(name, value))
                except ValueError as e:
                    raise ConfigError(f"config.loss.{name}: {e}") from None
        try:
            losses.check_options(impl, raw)
        except ValueError as e:
            raise ConfigError(f"config.loss: {e}") from None
        return cls(impl, freeze(raw), freeze(chosen))


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Save every N steps (0: only at the end), keep the newest `keep`, and every M-th; split a
    replicated array between its replicas for saving only into parts of at least
    `min_replica_slice_bytes` (checkpoints/orbax_io.py)."""

    every_n_steps: int = 1000
    keep: int = 2
    keep_every_n_steps: int | None = None
    min_replica_slice_bytes: int = MIN_REPLICA_SLICE_BYTES

    def __post_init__(self) -> None:
        set_fields(self,
                   every_n_steps=check_int(self.every_n_steps, "checkpoint.every_n_steps", 0),
                   keep=check_int(self.keep, "checkpoint.keep", 1),
                   keep_every_n_steps=check_int(self.keep_every_n_steps or 0,
                                                "checkpoint.keep_every_n_steps", 0) or None,
                   min_replica_slice_bytes=check_int(self.min_replica_slice_bytes,
                                                     "checkpoint.min_replica_slice_bytes", 0))


ON_NONFINITE = ("stop", "skip")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The whole experiment, parsed: run-level settings plus one record per section."""

    total_steps: int
    log_every: int
    mesh: MeshConfig
    input: InputConfig
    tokenizer: TokenizerConfig
    model: ModelConfig
    optim: OptimConfig
    seed: int = 0
    time_budget_s: float = 0.0
    cpu_devices: int = 8
    grad_accum_steps: int = 1
    on_nonfinite: str = "stop"
    peak_flops: float | None = None
    tensorboard: bool = True
    model_init: ModelInitConfig = ModelInitConfig()
    loss: LossConfig = LossConfig()
    evals: tuple[EvalConfig, ...] = ()
    checkpoint: CheckpointConfig = CheckpointConfig()
    # XLA options of the train step's compile on TPU (ignored elsewhere), e.g. the recipes'
    # FSDP layouts switch off collective matmuls (docs/tpu.md).
    tpu_compiler_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    source: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        set_fields(
            self, total_steps=check_int(self.total_steps, "total_steps", 1),
            log_every=check_int(self.log_every, "log_every", 1),
            seed=check_int(self.seed, "seed"),
            time_budget_s=check_float(self.time_budget_s or 0.0, "time_budget_s", 0.0),
            cpu_devices=check_int(self.cpu_devices, "cpu_devices", 1),
            grad_accum_steps=check_int(self.grad_accum_steps or 1, "grad_accum_steps", 1),
            on_nonfinite=check_choice(self.on_nonfinite, "on_nonfinite", ON_NONFINITE),
            peak_flops=(None if not self.peak_flops
                        else check_float(self.peak_flops, "peak_flops", 0)),
            tensorboard=bool(self.tensorboard),
            tpu_compiler_options=freeze(_compiler_options(self.tpu_compiler_options)))
        if "decoder" in self.loss.objectives and self.model.decoder is None:
            raise ConfigError("config.loss.decoder needs config.model.decoder (the decoder's "
                              "shape, e.g. dict(max_len=64))")

    def to_dict(self) -> dict[str, Any]:
        """The config as given (plain dicts), for config.json."""
        return thaw(self.source)


def _compiler_options(raw: object) -> dict[str, bool | int | float | str]:
    """The `tpu_compiler_options` dict: XLA option names to plain values."""
    raw = to_plain(raw) or {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"config key tpu_compiler_options expects a dict of XLA options, "
                          f"got {raw!r}")
    for name, value in raw.items():
        if not isinstance(name, str) or not isinstance(value, (bool, int, float, str)):
            raise ConfigError(f"config key tpu_compiler_options.{name}: expected an option "
                              f"name with a bool, number or string value, got {value!r}")
    return dict(raw)


TOP_LEVEL = ("seed", "total_steps", "log_every", "time_budget_s", "cpu_devices", "mesh",
             "batch_axes", "sharding_rules", "input", "tokenizer", "model", "model_init", "loss",
             "optim", "lr", "wd", "grad_clip_norm", "schedule", "grad_accum_steps",
             "on_nonfinite", "peak_flops", "evals", "checkpoint", "tensorboard",
             "tpu_compiler_options")
_RUN_KEYS = ("seed", "total_steps", "log_every", "time_budget_s", "cpu_devices",
             "grad_accum_steps", "on_nonfinite", "peak_flops", "tensorboard",
             "tpu_compiler_options")


def parse(config: Any) -> RunConfig:
    """Parses a loaded config (ConfigDict or mapping) into a RunConfig; ConfigError if bad."""
    if isinstance(config, RunConfig):
        return config
    raw = dict(to_plain(config))
    check_keys(raw, TOP_LEVEL, "config")
    for key in ("total_steps", "log_every", "input", "tokenizer", "model", "optim", "lr"):
        if key not in raw:
            raise ConfigError(f"config key {key} is required")
    mesh = MeshConfig(**{k: raw[c] for k, c in (("axes", "mesh"), ("batch_axes", "batch_axes"),
                                                 ("rules", "sharding_rules")) if c in raw})
    evals = tuple(EvalConfig.parse(name, section)
                  for name, section in (raw.get("evals") or {}).items())
    return RunConfig(
        mesh=mesh,
        input=build_record(InputConfig, raw["input"], "input"),
        tokenizer=build_record(TokenizerConfig, raw["tokenizer"], "tokenizer"),
        model=ModelConfig.parse(raw["model"]),
        optim=OptimConfig.from_config(raw),
        model_init=build_record(ModelInitConfig, raw.get("model_init"), "model_init"),
        loss=LossConfig.parse(raw.get("loss")),
        evals=evals,
        checkpoint=build_record(CheckpointConfig, raw.get("checkpoint"), "checkpoint"),
        source=freeze(raw),
        **{k: raw[k] for k in _RUN_KEYS if k in raw})
