"""The `evals.<name>` config sections: `EvalConfig` and each evaluator type's options record.

A section holds the keys every evaluator has (`SHARED_KEYS`: type, data, pp, every_n_steps,
batch_size) and its type's own keys. Each type's own keys are defined once, here, as a frozen
options record (`ZeroShotOptions`, `RetrievalOptions`, ...) whose fields are the keys and
whose defaults are theirs, and checked in the record (one-line ConfigErrors naming
`evals.<name>.<key>`); the evaluator modules (zeroshot.py, retrieval.py, dense_probe.py,
decoder_tasks.py) take them. `OPTIONS` maps each type to its record; `EvalConfig.parse`
builds a section's record from it. The records live here, not beside each evaluator, so that
the config schema can check a run's evaluators without importing the evaluators (and with
them the model).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType

from siglip_jax.data.config import SourceConfig, parse_source
from siglip_jax.data.demo_classes import COLOURS, SHAPES
from siglip_jax.records import ConfigError, check_int, check_keys, freeze, set_fields, to_plain

# The dense probe's label sets (evaluators/dense_probe.py): the demo maps' or the raw values.
DEMO_CLASSES = len(COLOURS) * len(SHAPES)
LABEL_SETS: dict[str, int | None] = {  # name -> number of labels (None: num_classes option)
    "class": 1 + DEMO_CLASSES,
    "shape": 1 + len(SHAPES),
    "colour": 1 + len(COLOURS),
    "raw": None,
}


def _check_bool(value: object, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"config key {key} expects true or false, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class ZeroShotOptions:
    """The `zeroshot` type's own keys of an `evals.<name>` section, with their defaults.

    class_names: a list of names, an asset name ("imagenet"), or "from_data" (the source's).
    templates: a list of templates with "{}", one such string, or an asset ("clip80", "clip7").
      Both must be set; the names and assets are checked when the evaluator is built
      (evaluators/builder.py), before any data is read.
    canonicalize: prompts are lower-cased and stripped of punctuation before tokenizing, as
      big_vision and HF SigLIP do.
    """

    class_names: str | tuple[str, ...] | None = None
    templates: str | tuple[str, ...] | None = None
    canonicalize: bool = True
    where: dataclasses.InitVar[str] = "evals.<name>"  # The section, for error messages.

    def __post_init__(self, where: str) -> None:
        _check_bool(self.canonicalize, f"{where}.canonicalize")
        set_fields(self, class_names=freeze(self.class_names), templates=freeze(self.templates))


@dataclasses.dataclass(frozen=True)
class RetrievalOptions:
    """The `retrieval` type's own keys of an `evals.<name>` section, with their defaults.

    max_captions: use at most this many captions per image and pad/mask images with fewer
      (required when the number varies, e.g. 5 for COCO); 0 = as the pp produces them.
    """

    max_captions: int = 0
    where: dataclasses.InitVar[str] = "evals.<name>"  # The section, for error messages.

    def __post_init__(self, where: str) -> None:
        set_fields(self, max_captions=check_int(self.max_captions, f"{where}.max_captions", 0))


@dataclasses.dataclass(frozen=True)
class DenseProbeOptions:
    """The `dense_probe` type's own keys of an `evals.<name>` section, with their defaults
    (docs/evaluation.md explains each); a bad value is a ConfigError naming the key."""

    label_set: str = "class"  # "class" | "shape" | "colour" (demo maps) | "raw"
    num_classes: int = 0  # The number of labels with label_set "raw".
    ignore_label: int | None = None  # A map value that does not vote (e.g. 255).
    segmentation_key: str = "segmentation"  # The pp output holding the map.
    train_fraction: float = 0.5  # The first fraction of `data` fits the probe.
    train_data: SourceConfig | None = None  # A separate source section to fit on.
    ridge: float = 1e-3  # Relative to the mean feature variance.
    balanced: bool = False  # Weight each train patch by 1 / its label's frequency.
    where: dataclasses.InitVar[str] = "evals.<name>"  # The section, for error messages.

    def __post_init__(self, where: str) -> None:
        label_set, num_classes = self.label_set, self.num_classes
        if label_set not in LABEL_SETS:
            raise ConfigError(f"{where}.label_set {label_set!r} is not one of "
                              f"{tuple(LABEL_SETS)}")
        if not isinstance(num_classes, int) or isinstance(num_classes, bool):
            raise ConfigError(f"{where}.num_classes must be an int, got {num_classes!r}")
        if label_set == "raw" and num_classes < 2:
            raise ConfigError(f"{where}.num_classes={num_classes}: label_set 'raw' needs "
                              "the number of segmentation labels (>= 2)")
        if label_set != "raw" and num_classes not in (0, LABEL_SETS[label_set]):
            raise ConfigError(f"{where}.num_classes={num_classes}: label_set "
                              f"{label_set!r} has {LABEL_SETS[label_set]} labels "
                              "(leave num_classes 0)")
        ignore = self.ignore_label
        if ignore is not None and (not isinstance(ignore, int) or isinstance(ignore, bool)):
            raise ConfigError(f"{where}.ignore_label must be an int or None, got {ignore!r}")
        if not isinstance(self.segmentation_key, str) or not self.segmentation_key:
            raise ConfigError(f"{where}.segmentation_key must be a non-empty string, got "
                              f"{self.segmentation_key!r}")
        fraction = self.train_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not (
                0 < fraction < 1):
            raise ConfigError(f"{where}.train_fraction must be a number in (0, 1), got "
                              f"{fraction!r}")
        ridge = self.ridge
        if isinstance(ridge, bool) or not isinstance(ridge, int | float) or not ridge > 0:
            raise ConfigError(f"{where}.ridge must be a positive number, got {ridge!r}")
        if not isinstance(self.balanced, bool):
            raise ConfigError(f"{where}.balanced must be true or false, got {self.balanced!r}")
        train_data = None if self.train_data is None else parse_source(
            self.train_data, f"{where}.train_data")
        set_fields(self, train_fraction=float(fraction), ridge=float(ridge),
                   train_data=train_data)


@dataclasses.dataclass(frozen=True)
class DecoderTaskOptions:
    """The `captioning` and `grounded_captioning` types' own keys of an `evals.<name>` section.

    parallel: one-shot parallel decoding instead of greedy.
    """

    parallel: bool = False
    where: dataclasses.InitVar[str] = "evals.<name>"  # The section, for error messages.

    def __post_init__(self, where: str) -> None:
        _check_bool(self.parallel, f"{where}.parallel")


@dataclasses.dataclass(frozen=True)
class ReferringOptions:
    """The `referring` type's own keys of an `evals.<name>` section.

    parallel: one-shot parallel decoding instead of greedy.
    constrain_boxes: the 4 answer ids are location ids, then eos.
    """

    parallel: bool = False
    constrain_boxes: bool = True
    where: dataclasses.InitVar[str] = "evals.<name>"  # The section, for error messages.

    def __post_init__(self, where: str) -> None:
        _check_bool(self.parallel, f"{where}.parallel")
        _check_bool(self.constrain_boxes, f"{where}.constrain_boxes")


EvalOptions = (ZeroShotOptions | RetrievalOptions | DenseProbeOptions | DecoderTaskOptions
               | ReferringOptions)

OPTIONS: Mapping[str, type[EvalOptions]] = MappingProxyType({  # type -> its options record
    "zeroshot": ZeroShotOptions,
    "retrieval": RetrievalOptions,
    "dense_probe": DenseProbeOptions,
    # The LocCa decoder's tasks (evaluators/decoder_tasks.py).
    "captioning": DecoderTaskOptions,
    "referring": ReferringOptions,
    "grounded_captioning": DecoderTaskOptions,
})
SHARED_KEYS = ("type", "data", "pp", "every_n_steps", "batch_size")


def option_keys(kind: str) -> tuple[str, ...]:
    """The own config keys of evaluator type `kind`: its options record's fields."""
    return tuple(field.name for field in dataclasses.fields(OPTIONS[kind]))


def option_defaults(kind: str) -> dict[str, object]:
    """{key: default} of evaluator type `kind`'s own keys."""
    return {field.name: field.default for field in dataclasses.fields(OPTIONS[kind])}


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """One evaluator: name, type, data section, pp, cadence, batch size and the type's own
    options (the record `OPTIONS[type]`)."""

    name: str
    type: str
    data: SourceConfig
    pp: str
    options: EvalOptions
    every_n_steps: int = 0
    batch_size: int = 256

    @classmethod
    def parse(cls, name: str, raw: Mapping[str, object]) -> EvalConfig:
        """From one `evals.<name>` section; ConfigError naming the key if it is bad."""
        where = f"evals.{name}"
        raw = dict(to_plain(raw) or {})
        kind = raw.get("type")
        if kind not in OPTIONS:
            raise ConfigError(f"{where}.type {kind!r} is not one of {tuple(OPTIONS)}")
        own = option_keys(kind)
        check_keys(raw, (*SHARED_KEYS, *own), where)
        for key in ("data", "pp"):
            if key not in raw:
                raise ConfigError(f"config key {where}.{key} is required")
        data = parse_source(raw["data"], f"{where}.data")
        options = OPTIONS[kind](**{k: raw[k] for k in own if k in raw}, where=where)
        return cls(name, kind, data, str(raw["pp"]), options,
                   check_int(raw.get("every_n_steps", 0), f"{where}.every_n_steps", 0),
                   check_int(raw.get("batch_size", 256), f"{where}.batch_size", 1))
