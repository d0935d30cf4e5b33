"""Experiment configs: load a `configs/*.py` file, apply `a.b=value` overrides, lock.

A config file defines `get_config(arg=None) -> ml_collections.ConfigDict`. It is named on the
command line as `path/to/file.py` or `path/to/file.py:arg`; a run's saved `config.json` loads
too. Overrides name an existing key with
a dotted path; the value is parsed as a Python literal and must have the key's type. Unknown
keys, wrong types and missing files are `ConfigError`s with a one-line message.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import ml_collections

from siglip_jax import fsutil
from siglip_jax.records import ConfigError


def load_config(spec: str, overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
    """Loads `file.py[:arg]`, applies `key=value` overrides and returns the locked config."""
    path, arg = split_spec(spec)
    config = _call_get_config(path, arg)
    for override in overrides:
        apply_override(config, override)
    config.lock()
    return config


def split_spec(spec: str) -> tuple[str, str | None]:
    """Splits `file.py:arg` into the path and the (optional) argument string."""
    path, sep, arg = spec.partition(".py:")
    if sep:
        return path + ".py", arg
    return spec, None


def _call_get_config(path: str, arg: str | None) -> ml_collections.ConfigDict:
    if path.endswith(".json") and fsutil.is_remote(path):  # A run's config.json on gs://.
        if not fsutil.exists(path):
            raise ConfigError(f"config file not found: {path!r}")
    elif not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path!r}")
    if path.endswith(".json"):  # A run's saved config.json (written by the trainer).
        if arg is not None:
            raise ConfigError(f"{path}: a .json config takes no argument")
        try:
            return ml_collections.ConfigDict(json.loads(fsutil.read_text(path)))
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read config file {path!r}: {e}") from None
    module_spec = importlib.util.spec_from_file_location(
        f"siglip_jax_config_{abs(hash(os.path.abspath(path)))}", path
    )
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # A broken config file: say which file and what failed.
        raise ConfigError(f"cannot import config file {path!r}: {type(e).__name__}: {e}") from e
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        raise ConfigError(f"config file {path!r} defines no get_config(arg=None) function")
    try:
        config = get_config(arg) if arg is not None else get_config()
    except ConfigError as e:  # The config's own complaint, said of its file.
        raise ConfigError(f"{path}: {e}") from e
    except (TypeError, ValueError, KeyError) as e:
        raise ConfigError(f"{path}: get_config({arg!r}) failed: {e}") from e
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{path}: get_config() returned {type(config).__name__}, "
                          "expected ml_collections.ConfigDict")
    return config


def collect_overrides(rest: Sequence[str], error: Callable[[str], object]) -> list[str]:
    """`--config.a.b=v` / `--config.a.b v` flags → ["a.b=v", …]; `error(msg)` for anything else
    (pass argparse's `parser.error`)."""
    overrides, i = [], 0
    while i < len(rest):
        item = rest[i]
        if not item.startswith("--config."):
            error(f"unrecognized argument {item!r} (overrides look like --config.key=value)")
        item = item[len("--config."):]
        if "=" not in item:
            if i + 1 >= len(rest):
                error(f"override --config.{item} has no value")
            item, i = f"{item}={rest[i + 1]}", i + 1
        overrides.append(item)
        i += 1
    return overrides


def parse_config_arg(arg: str) -> dict[str, Any]:
    """Parses a config argument string `k=v,k2=v2` into a dict of Python literals."""
    result: dict[str, Any] = {}
    if not arg:
        return result
    for item in arg.split(","):
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"config argument {item!r} is not of the form key=value")
        result[key.strip()] = _literal_or_string(value.strip())
    return result


def apply_override(config: ml_collections.ConfigDict, override: str) -> None:
    """Sets `a.b.c=value` in `config`; the key must exist and the value must fit its type."""
    key, sep, raw = override.partition("=")
    if not sep:
        raise ConfigError(f"override {override!r} is not of the form key=value")
    *parents, leaf = key.split(".")
    node = config
    walked: list[str] = []
    for name in parents:
        node = _child(node, name, walked)
        walked.append(name)
        if not isinstance(node, ml_collections.ConfigDict):
            raise ConfigError(f"config key {'.'.join(walked)!r} is a value, not a group; "
                              f"cannot set {key!r}")
    _child(node, leaf, walked)  # Raises for an unknown key.
    old = node[leaf]
    value = _parse_value(raw, old, key)
    try:
        if isinstance(old, ml_collections.ConfigDict):  # A whole new group replaces the old.
            with node.ignore_type():
                node[leaf] = value
        else:
            node[leaf] = value
    except TypeError as e:
        raise ConfigError(f"config key {key!r} expects {_type_name(old)}, got {raw!r}") from e


def _child(node: ml_collections.ConfigDict, name: str, walked: Sequence[str]) -> Any:
    if name not in node:
        where = ".".join(walked) or "<top level>"
        choices = ", ".join(sorted(node.keys()))
        full = ".".join([*walked, name])
        raise ConfigError(f"unknown config key {full!r}; valid keys under {where}: {choices}")
    return node[name]


def _parse_value(raw: str, old: Any, key: str) -> Any:
    """Parses the override string into a value of the old value's type."""
    if isinstance(old, bool):
        lowered = raw.strip().lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ConfigError(f"config key {key!r} expects a bool (true/false), got {raw!r}")
    if isinstance(old, str):
        # Strings are taken as they are; quotes around them are optional.
        value = _literal_or_string(raw)
        return value if isinstance(value, str) or value is None else raw
    value = _literal_or_string(raw)
    if old is None:
        return value
    if isinstance(old, int) and isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(old, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(old, (tuple, list)) and isinstance(value, (tuple, list)):
        return type(old)(value)
    if isinstance(old, ml_collections.ConfigDict):
        if isinstance(value, (dict, list, tuple)):
            return value  # A whole new group (e.g. schedule groups); checked where it is read.
        raise ConfigError(f"config key {key!r} is a group; set its fields one by one "
                          f"(valid: {', '.join(sorted(old.keys()))}) or give a whole dict")
    if value is None or isinstance(value, type(old)):
        return value
    raise ConfigError(f"config key {key!r} expects {_type_name(old)}, got {raw!r}")


def _literal_or_string(raw: str) -> Any:
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def _type_name(value: Any) -> str:
    return {bool: "a bool", int: "an int", float: "a float", str: "a string",
            tuple: "a tuple", list: "a list"}.get(type(value), type(value).__name__)
