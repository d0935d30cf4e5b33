"""The `evals.<name>` config sections: `EvalConfig` and the evaluator type → options map.

A section holds the keys every evaluator has (`SHARED_KEYS`: type, data, pp, every_n_steps,
batch_size) and its type's own keys. Each evaluator module defines its own keys once, as a
frozen options record (`ZeroShotOptions`, `RetrievalOptions`, ...) whose fields are the keys
and whose defaults are theirs, and checks them in the record (one-line ConfigErrors naming
`evals.<name>.<key>`). `OPTIONS` maps each type to that record; `EvalConfig.parse` builds a
section's record from it, so a key and its default are written in one place.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType

from siglip_jax.data.config import SourceConfig, parse_source
from siglip_jax.evaluators.decoder_tasks import DecoderTaskOptions, ReferringOptions
from siglip_jax.evaluators.dense_probe import DenseProbeOptions
from siglip_jax.evaluators.retrieval import RetrievalOptions
from siglip_jax.evaluators.zeroshot import ZeroShotOptions
from siglip_jax.records import ConfigError, check_int, check_keys, to_plain

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
