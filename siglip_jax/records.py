"""Typed config records: the helpers every section's record is built with.

A config section (a mapping from a config file) becomes a frozen dataclass with `build_record`:
unknown keys raise, missing keys take the field's default, required fields must be present.
The checks (`check_int`, `check_float`, `check_choice`) turn a bad value into a one-line
`ConfigError` naming the key. Nested containers are frozen (`freeze`: read-only mappings and
tuples) so records are immutable; `thaw` turns them back into dicts and lists (for JSON).
Records live beside the code they configure; `schema.parse` composes them into a RunConfig.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, TypeVar

import ml_collections

MISSING = dataclasses.MISSING
R = TypeVar("R")


class ConfigError(ValueError):
    """A config file, key or value that cannot be used; the message says which and why."""


def to_plain(value: Any) -> Any:
    """Converts a ConfigDict (or nested values) into plain dicts/lists for JSON or kwargs."""
    if isinstance(value, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_plain(v) for v in value)
    return value


def check_keys(section: Mapping[str, object], allowed: Iterable[str], where: str) -> None:
    """Raises ConfigError if `section` (a mapping) has keys outside `allowed`."""
    allowed = set(allowed)
    unknown = sorted(set(section.keys()) - allowed)
    if unknown:
        raise ConfigError(f"unknown config key {where}.{unknown[0]}; valid keys under {where}: "
                          f"{', '.join(sorted(allowed))}")


def freeze(value: Any) -> Any:
    """Plain nested containers → read-only mappings and tuples (hashable enough, immutable)."""
    if isinstance(value, Mapping):
        return MappingProxyType({k: freeze(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    return value


def thaw(value: Any) -> Any:
    """The inverse of freezing: read-only mappings/tuples → dicts/lists (for kwargs, JSON)."""
    if isinstance(value, Mapping):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [thaw(v) for v in value]
    return value


def build_record(cls: type[R], raw: Mapping[str, Any] | None, where: str, **extra: Any) -> R:
    """Builds the record `cls` from a mapping: unknown keys raise, missing keys take defaults,
    required keys (no default) raise when absent. `extra` fills fields the mapping may not."""
    raw = dict(to_plain(raw) or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    check_keys(raw, [n for n in fields if n not in extra], where)
    for name, field in fields.items():
        if name in extra or name in raw:
            continue
        if field.default is MISSING and field.default_factory is MISSING:
            raise ConfigError(f"config key {where}.{name} is required")
    return cls(**raw, **extra)


def check_int(value: object, key: str, minimum: int | None = None) -> int:
    """`value` as an int (a float must be integral); ConfigError naming `key` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            isinstance(value, float) and not value.is_integer()):
        raise ConfigError(f"config key {key} expects an int, got {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ConfigError(f"config key {key} must be >= {minimum}, got {value}")
    return value


def check_float(value: object, key: str, minimum: float | None = None) -> float:
    """`value` as a finite float; ConfigError naming `key` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"config key {key} expects a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"config key {key} must be >= {minimum}, got {value}")
    return float(value)


def check_choice(value: object, key: str, choices: Sequence[str]) -> str:
    """`value` if it is one of `choices`; ConfigError naming `key` otherwise."""
    if value not in choices:
        raise ConfigError(f"{key} {value!r} is not one of {tuple(choices)}")
    return value  # type: ignore[return-value]


def set_fields(record: object, **values: object) -> None:
    """Sets fields of a frozen dataclass (for its __post_init__ normalisation)."""
    for name, value in values.items():
        object.__setattr__(record, name, value)
