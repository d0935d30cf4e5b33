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
  InputConfig     [input]: data (a data-source section, see data/builder.py), pp, global_batch,
                  shuffle_buffer, cache
  TokenizerConfig [tokenizer]: model (sentencepiece path; "" = the checkpoint's or the data
                  source's), max_len, eos ("sticky" | "yes" | "no"), convention ("" |
                  "siglip" | "siglip2": a model family's text rules for prompts)
  ModelConfig     [model]: image, text (tower dicts, see models/variants.py), out_dim,
                  temperature_init, bias_init, decoder (the LocCa caption decoder dict,
                  models/decoder.py; None = no decoder)
  ModelInitConfig [model_init]: img, txt, full (checkpoint paths; "" = random init)
  LossConfig      [loss]: impl (losses.LOSS_IMPLS) and the impl's options
  OptimConfig     [optim, lr, wd, grad_clip_norm, schedule]: optimizer name and
                  hyper-parameters, peak lr, decoupled weight decay, global-norm clipping, and
                  the schedule groups [(regex, ScheduleConfig | None = frozen), ...]
  EvalConfig      [evals.<name>]: type, data, pp, every_n_steps, batch_size (+ per type keys)
  CheckpointConfig [checkpoint]: every_n_steps, keep, keep_every_n_steps
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

from siglip_jax.config import ConfigError, check_keys, to_plain
from siglip_jax.models.config import ModelConfig
from siglip_jax.records import build_record as _record
from siglip_jax.records import check_choice as _choice
from siglip_jax.records import check_float as _float
from siglip_jax.records import check_int as _int
from siglip_jax.records import freeze as _frozen
from siglip_jax.records import set_fields as _set
from siglip_jax.records import thaw

# ----------------------------------------------------------------------------- sections


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Named mesh axes (one size may be -1: the rest), batch axes and sharding rules."""

    axes: tuple[tuple[str, int], ...] = (("data", -1),)
    batch_axes: tuple[str, ...] = ("data",)
    rules: tuple[tuple[str, Any], ...] = ((".*", "replicate"),)

    def __post_init__(self) -> None:
        try:
            axes = tuple((str(name), int(size)) for name, size in self.axes)
            rules = tuple((str(regex), _frozen(rule)) for regex, rule in self.rules)
        except (TypeError, ValueError):
            raise ConfigError(f"config keys mesh / sharding_rules must be lists of pairs, got "
                              f"{self.axes!r} / {self.rules!r}") from None
        batch_axes = (self.batch_axes,) if isinstance(self.batch_axes, str) else tuple(
            str(a) for a in self.batch_axes)
        names = [name for name, _ in axes]
        missing = [a for a in batch_axes if a not in names]
        if missing:
            raise ConfigError(f"config key batch_axes names {missing[0]!r}, which is not a mesh "
                              f"axis ({', '.join(names)})")
        if not batch_axes:
            raise ConfigError("config key batch_axes is empty: name the mesh axes the batch is "
                              "split over")
        _set(self, axes=axes, batch_axes=batch_axes, rules=rules)

    def sizes(self, num_devices: int) -> dict[str, int]:
        """Axis sizes on `num_devices` devices; ConfigError if the mesh does not fit them."""
        from siglip_jax.sharding import mesh_shape

        try:
            return mesh_shape(self.axes, num_devices)
        except ValueError as e:
            raise ConfigError(f"config key mesh: {e}") from None

    def batch_shards(self, num_devices: int) -> int:
        """How many ways the batch is split on `num_devices` devices."""
        sizes = self.sizes(num_devices)
        return math.prod(sizes[a] for a in self.batch_axes)

    def make(self, devices: Sequence[Any] | None = None) -> Any:
        """The jax Mesh over `devices` (default: all devices)."""
        import jax

        from siglip_jax.sharding import make_mesh

        devices = list(jax.devices() if devices is None else devices)
        self.sizes(len(devices))  # One-line error if it does not fit.
        return make_mesh(self.axes, devices)


@dataclasses.dataclass(frozen=True)
class InputConfig:
    """The training input: data source section, pp string, batch, shuffling, caching."""

    data: Mapping[str, Any]
    pp: str
    global_batch: int
    shuffle_buffer: int = 10_000
    cache: bool = False

    def __post_init__(self) -> None:
        from siglip_jax.data.builder import check_source_config

        data = _frozen(self.data)
        check_source_config(data, "input.data")
        _set(self, data=data, pp=str(self.pp),
             global_batch=_int(self.global_batch, "input.global_batch", 1),
             shuffle_buffer=_int(self.shuffle_buffer, "input.shuffle_buffer", 0),
             cache=bool(self.cache))


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
    """The sentencepiece model ("" = the checkpoint's or the data source's) and text length."""

    max_len: int
    model: str = ""
    eos: str = "sticky"
    convention: str = ""  # "" | "siglip" | "siglip2": how prompts are tokenized (tokenizer.py)

    def __post_init__(self) -> None:
        from siglip_jax.data.tokenizer import CONVENTIONS

        _set(self, max_len=_int(self.max_len, "tokenizer.max_len", 1), model=str(self.model or ""),
             eos=_choice(self.eos, "tokenizer.eos", ("sticky", "yes", "no")),
             convention=_choice(self.convention, "tokenizer.convention", ("", *CONVENTIONS)))

    def encode(self, tokenizer: Any, texts: Sequence[str], canonicalize: bool = True) -> Any:
        """Token ids [N, max_len] of prompts: the convention's rules if one is set, else
        sticky/yes/no EOS with big_vision's canonicalisation (lower-case, no punctuation)."""
        if self.convention:
            return tokenizer.encode_as(list(texts), self.convention, self.max_len)
        return tokenizer.encode(list(texts), self.max_len, self.eos, canonicalize=canonicalize)


@dataclasses.dataclass(frozen=True)
class ModelInitConfig:
    """Checkpoints that replace the random init: a tower each, or the whole model."""

    img: str = ""
    txt: str = ""
    full: str = ""

    def __post_init__(self) -> None:
        _set(self, img=str(self.img or ""), txt=str(self.txt or ""), full=str(self.full or ""))

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
        by losses.check_options, each objective's by its module's check_options."""
        from siglip_jax import losses, objectives

        raw = dict(to_plain(raw) or {})
        impl = raw.pop("impl", "ring")
        chosen = {}
        for name in objectives.MODULES:
            if name in raw:
                value = raw.pop(name)
                if value is None:
                    continue
                if not isinstance(value, Mapping):
                    raise ConfigError(f"config.loss.{name}: expected a dict of options (or "
                                      f"None to switch it off), got {value!r}")
                try:
                    chosen[name] = _frozen(objectives.check_options(name, value))
                except ValueError as e:
                    raise ConfigError(f"config.loss.{name}: {e}") from None
        try:
            losses.check_options(impl, raw)
        except ValueError as e:
            raise ConfigError(f"config.loss: {e}") from None
        return cls(impl, _frozen(raw), _frozen(chosen))


DECAY_TYPES = ("cosine", "linear", "rsqrt", "constant")


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """Linear warmup (steps or a fraction of the run) then a decay; rsqrt has a timescale."""

    decay_type: str = "cosine"
    warmup_steps: int | None = None
    warmup_frac: float | None = None
    timescale: float | None = None

    def __post_init__(self) -> None:
        _choice(self.decay_type, "schedule.decay_type", DECAY_TYPES)
        if self.warmup_steps is not None and self.warmup_frac is not None:
            raise ConfigError("schedule: give warmup_steps or warmup_frac, not both")
        if self.warmup_steps is not None:
            _set(self, warmup_steps=_int(self.warmup_steps, "schedule.warmup_steps", 0))
        if self.warmup_frac is not None:
            _set(self, warmup_frac=_float(self.warmup_frac, "schedule.warmup_frac", 0.0))

    def warmup(self, total_steps: int) -> int:
        """Warmup length in steps for a run of `total_steps`."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        return int(round((self.warmup_frac or 0.0) * total_steps))

    @classmethod
    def parse(cls, raw: Mapping[str, Any], where: str = "schedule") -> ScheduleConfig:
        """From a schedule dict; unknown keys raise."""
        return _record(cls, raw, where)


OPTIMIZERS = {  # name -> its hyper-parameters with their defaults.
    "adam": {"b1": 0.9, "b2": 0.999, "eps": 1e-8},
    "sgd": {"momentum": 0.9, "nesterov": False},
    "adafactor": {"decay_rate": 0.8, "min_dim_size_to_factor": 128},
}


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimizer, peak lr, weight decay, clipping and the schedule groups (None = frozen)."""

    name: str
    hparams: Mapping[str, Any]
    lr: float
    wd: float = 0.0
    grad_clip_norm: float = 0.0
    groups: tuple[tuple[str, ScheduleConfig | None], ...] = ((".*", ScheduleConfig()),)

    @classmethod
    def parse(cls, optim: Mapping[str, Any] | None, lr: Any, wd: Any = 0.0,
              grad_clip_norm: Any = 0.0, schedule: Any = None) -> OptimConfig:
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
        return cls(name, _frozen(hparams), _float(lr, "lr"), _float(wd or 0.0, "wd", 0.0),
                   _float(grad_clip_norm or 0.0, "grad_clip_norm", 0.0), groups)

    @classmethod
    def from_config(cls, config: Any) -> OptimConfig:
        """From a config (or any mapping) holding the keys optim, lr, wd, grad_clip_norm and
        schedule."""
        raw = dict(to_plain(config))
        if "lr" not in raw:
            raise ConfigError("config key lr is required")
        return cls.parse(raw.get("optim"), raw["lr"], raw.get("wd", 0.0),
                         raw.get("grad_clip_norm", 0.0), raw.get("schedule"))

    @staticmethod
    def _groups(spec: Any) -> tuple[tuple[str, ScheduleConfig | None], ...]:
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


EVAL_TYPE_KEYS = {  # type -> its own keys with their defaults.
    "zeroshot": {"class_names": None, "templates": None, "canonicalize": True},
    "retrieval": {"max_captions": 0},
    "dense_probe": {"label_set": "class", "num_classes": 0, "ignore_label": None,
                    "segmentation_key": "segmentation", "train_fraction": 0.5,
                    "train_data": None, "ridge": 1e-3},  # evaluators/dense_probe.OPTIONS
    # LocCa decoder tasks (evaluators/decoder_tasks.py).
    "captioning": {"parallel": False},
    "referring": {"parallel": False, "constrain_boxes": True},
    "grounded_captioning": {"parallel": False},
}


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """One evaluator: type, data section, pp, cadence, batch size and its type's own keys."""

    name: str
    type: str
    data: Mapping[str, Any]
    pp: str
    every_n_steps: int = 0
    batch_size: int = 256
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def parse(cls, name: str, raw: Mapping[str, Any]) -> EvalConfig:
        """From one `evals.<name>` section."""
        from siglip_jax.data.builder import check_source_config

        where = f"evals.{name}"
        raw = dict(to_plain(raw) or {})
        kind = raw.get("type")
        if kind not in EVAL_TYPE_KEYS:
            raise ConfigError(f"{where}.type {kind!r} is not one of {tuple(EVAL_TYPE_KEYS)}")
        own = EVAL_TYPE_KEYS[kind]
        check_keys(raw, ("type", "data", "pp", "every_n_steps", "batch_size", *own), where)
        for key in ("data", "pp"):
            if key not in raw:
                raise ConfigError(f"config key {where}.{key} is required")
        data = _frozen(raw["data"])
        check_source_config(data, f"{where}.data")
        options = {k: raw.get(k, default) for k, default in own.items()}
        if kind == "retrieval":
            options["max_captions"] = _int(options["max_captions"], f"{where}.max_captions", 0)
        if kind == "dense_probe":
            from siglip_jax.evaluators.dense_probe import check_options

            options = check_options(options, where)
        for key in ("parallel", "constrain_boxes"):
            if key in options and not isinstance(options[key], bool):
                raise ConfigError(f"config key {where}.{key} expects true or false, got "
                                  f"{options[key]!r}")
        return cls(name, kind, data, str(raw["pp"]),
                   _int(raw.get("every_n_steps", 0), f"{where}.every_n_steps", 0),
                   _int(raw.get("batch_size", 256), f"{where}.batch_size", 1), _frozen(options))


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Save every N steps (0: only at the end), keep the newest `keep`, and every M-th."""

    every_n_steps: int = 1000
    keep: int = 2
    keep_every_n_steps: int | None = None

    def __post_init__(self) -> None:
        _set(self, every_n_steps=_int(self.every_n_steps, "checkpoint.every_n_steps", 0),
             keep=_int(self.keep, "checkpoint.keep", 1),
             keep_every_n_steps=_int(self.keep_every_n_steps or 0,
                                     "checkpoint.keep_every_n_steps", 0) or None)


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
    source: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        _set(self, total_steps=_int(self.total_steps, "total_steps", 1),
             log_every=_int(self.log_every, "log_every", 1), seed=_int(self.seed, "seed"),
             time_budget_s=_float(self.time_budget_s or 0.0, "time_budget_s", 0.0),
             cpu_devices=_int(self.cpu_devices, "cpu_devices", 1),
             grad_accum_steps=_int(self.grad_accum_steps or 1, "grad_accum_steps", 1),
             on_nonfinite=_choice(self.on_nonfinite, "on_nonfinite", ON_NONFINITE),
             peak_flops=None if not self.peak_flops else _float(self.peak_flops, "peak_flops", 0),
             tensorboard=bool(self.tensorboard))
        if "decoder" in self.loss.objectives and self.model.decoder is None:
            raise ConfigError("config.loss.decoder needs config.model.decoder (the decoder's "
                              "shape, e.g. dict(max_len=64))")

    def check_batch(self, batch_shards: int, processes: int, detail: str = "") -> None:
        """The global batch must split over the batch shards × accumulation steps and over
        the processes (hosts) — the one place this is checked. `detail` (e.g. the mesh axes
        and the slice) follows the number of batch shards in the message."""
        batch, accum = self.input.global_batch, self.grad_accum_steps
        if batch % batch_shards:
            raise ConfigError(f"input.global_batch={batch} does not divide over the "
                              f"{batch_shards} batch shards" + (f" {detail}" if detail else ""))
        if batch % (batch_shards * accum):
            raise ConfigError(f"input.global_batch={batch} does not split into "
                              f"grad_accum_steps={accum} micro-batches over {batch_shards} "
                              "shards")
        if batch % processes:
            raise ConfigError(f"input.global_batch={batch} does not divide over the "
                              f"{processes} processes (hosts)")

    def to_dict(self) -> dict[str, Any]:
        """The config as given (plain dicts), for config.json."""
        return thaw(self.source)


TOP_LEVEL = ("seed", "total_steps", "log_every", "time_budget_s", "cpu_devices", "mesh",
             "batch_axes", "sharding_rules", "input", "tokenizer", "model", "model_init", "loss",
             "optim", "lr", "wd", "grad_clip_norm", "schedule", "grad_accum_steps",
             "on_nonfinite", "peak_flops", "evals", "checkpoint", "tensorboard")
_RUN_KEYS = ("seed", "total_steps", "log_every", "time_budget_s", "cpu_devices",
             "grad_accum_steps", "on_nonfinite", "peak_flops", "tensorboard")


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
        input=_record(InputConfig, raw["input"], "input"),
        tokenizer=_record(TokenizerConfig, raw["tokenizer"], "tokenizer"),
        model=ModelConfig.parse(raw["model"]),
        optim=OptimConfig.from_config(raw),
        model_init=_record(ModelInitConfig, raw.get("model_init"), "model_init"),
        loss=LossConfig.parse(raw.get("loss")),
        evals=evals,
        checkpoint=_record(CheckpointConfig, raw.get("checkpoint"), "checkpoint"),
        source=_frozen(raw),
        **{k: raw[k] for k in _RUN_KEYS if k in raw})
