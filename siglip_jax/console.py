"""Quiet console start-up for the command-line entry points.

Every entry point (train, evaluate, predict, plan, plot, export, demo_shapes) calls
`argv = quiet_startup(argv)` first thing in `main()`, before TensorFlow or JAX is imported.
On a normal run it hides start-up noise that says nothing to a user:

- TensorFlow's oneDNN notice (printed at each TF library load, whatever
  `TF_CPP_MIN_LOG_LEVEL` says) and its CPU-feature notice: `TF_ENABLE_ONEDNN_OPTS=0` and
  `TF_CPP_MIN_LOG_LEVEL=2` are set unless already in the environment. oneDNN only changes
  TensorFlow's own CPU kernels (the input pipeline); JAX does not use them.
- orbax's `Metadata file does not exist` warning (python logger `absl`) when a checkpoint
  written without that file is opened.
- libtpu's TPU_ACCELERATOR_TYPE / TPU_WORKER_HOSTNAMES warnings when libtpu is installed on a
  machine without a TPU (harmless defaults are set, tpu_slices.libtpu_env_defaults).
- gloo's `[Gloo] Rank i is connected to …` lines (C++ writes them to stdout) in multi-process
  CPU runs: stdout is passed through a line filter, only when the run is multi-process.

`--verbose` on the command line (removed from argv here) or `SIGLIP_VERBOSE=1` keeps all of it.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import re
import sys
import threading
from collections.abc import Mapping, Sequence

from siglip_jax.tpu_slices import libtpu_env_defaults

VERBOSE_FLAG = "--verbose"
VERBOSE_ENV = "SIGLIP_VERBOSE"
# Environment variables set (unless present) before TensorFlow's first import.
QUIET_ENV: dict[str, str] = {"TF_CPP_MIN_LOG_LEVEL": "2", "TF_ENABLE_ONEDNN_OPTS": "0"}
# Python log messages (logger "absl") that are dropped on a quiet run.
QUIET_LOG_PATTERNS: tuple[str, ...] = (r"^Metadata file does not exist",)
# Lines written by native code to stdout that are dropped on a quiet run.
QUIET_STDOUT_PATTERNS: tuple[str, ...] = (r"^\[Gloo\] Rank \d+ is connected to",)


def is_verbose(argv: Sequence[str] = ()) -> bool:
    """True when `--verbose` is in argv or SIGLIP_VERBOSE is set to a true value."""
    env = os.environ.get(VERBOSE_ENV, "").strip().lower()
    return VERBOSE_FLAG in argv or env not in ("", "0", "false", "no")


class _DropMatching(logging.Filter):
    """Drops log records whose message matches one of the patterns."""

    def __init__(self, patterns: Sequence[str]):
        super().__init__()
        self.regexes = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(r.search(message) for r in self.regexes)


def _is_multiprocess(argv: Sequence[str]) -> bool:
    """Whether the command line or environment asks for more than one process."""
    value = os.environ.get("SIGLIP_NUM_PROCESSES", "")
    for i, arg in enumerate(argv):
        if arg == "--num_processes" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--num_processes="):
            value = arg.split("=", 1)[1]
    return value.isdigit() and int(value) > 1


def filter_native_stdout(patterns: Sequence[str]) -> None:
    """Routes file descriptor 1 through a thread that drops lines matching `patterns`.

    For text that native code writes straight to the descriptor (no logging to configure).
    The original descriptor is restored, and the rest of the pipe copied, at interpreter exit.
    """
    regexes = [re.compile(p.encode()) for p in patterns]
    sys.stdout.flush()
    original = os.dup(1)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 1)
    os.close(write_end)

    def pump() -> None:
        with os.fdopen(read_end, "rb", buffering=0) as pipe:
            pending = b""
            while chunk := pipe.read(65536):
                lines = (pending + chunk).split(b"\n")
                pending = lines.pop()
                kept = [line + b"\n" for line in lines if not any(r.search(line) for r in regexes)]
                if kept:
                    os.write(original, b"".join(kept))
            if pending:
                os.write(original, pending)

    thread = threading.Thread(target=pump, name="stdout-filter", daemon=True)
    thread.start()

    def restore() -> None:
        try:
            sys.stdout.flush()
        except (OSError, ValueError):
            pass
        os.dup2(original, 1)  # Closes the pipe's last write end: the pump drains and ends.
        thread.join(timeout=5)

    atexit.register(restore)


def quiet_startup(argv: Sequence[str] | None = None) -> list[str]:
    """Hides start-up noise unless verbose (see the module doc); returns argv minus --verbose.

    `argv` defaults to sys.argv[1:]. Call it before TensorFlow or JAX is imported.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    verbose = is_verbose(args)
    args = [a for a in args if a != VERBOSE_FLAG]
    if verbose:
        os.environ[VERBOSE_ENV] = "1"  # Processes started from this one stay verbose too.
        return args
    quiet_library()
    if _is_multiprocess(args):
        filter_native_stdout(QUIET_STDOUT_PATTERNS)
    return args


def add_verbose_flag(parser: argparse.ArgumentParser) -> None:
    """Lists --verbose in a CLI's --help (quiet_startup has already taken it out of argv)."""
    parser.add_argument(VERBOSE_FLAG, action="store_true",
                        help="keep the start-up noise of TensorFlow, libtpu, orbax and gloo "
                             f"(same as {VERBOSE_ENV}=1)")


def quiet_library() -> None:
    """The part of `quiet_startup` that suits a library call (`siglip_jax.load`): the
    TensorFlow and libtpu environment defaults and the orbax log filter, unless
    SIGLIP_VERBOSE is set. Environment variables already set are kept; it takes effect only
    if called before TensorFlow loads and JAX starts its backend."""
    if is_verbose():
        return
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    libtpu_env_defaults()  # libtpu installed (the test extra) on a machine without a TPU.
    from absl import logging as absl_logging  # Its logger class must be set up by absl.

    absl_logger = absl_logging.get_absl_logger()
    if not any(isinstance(f, _DropMatching) for f in absl_logger.filters):
        absl_logger.addFilter(_DropMatching(QUIET_LOG_PATTERNS))


EVAL_LINE_WIDTH = 160  # A longer eval line is split: one line per evaluator.


def format_value(key: str, value: float) -> str:
    """A metric for the console: counts (num_*, nonfinite, or any whole number ≥ 2) as
    integers, everything else with 4 decimals."""
    name = key.rpartition("/")[2]
    value = float(value)
    whole = value == value and abs(value) != float("inf") and value.is_integer()
    if whole and (name.startswith("num_") or name == "nonfinite" or abs(value) >= 2):
        return str(int(value))
    return f"{value:.4f}"


def format_eval(step: int, results: Mapping[str, float], seconds: float) -> str:
    """`eval at step N: name/metric value, ... (Xs)`; when longer than EVAL_LINE_WIDTH, a
    header line and one indented line per evaluator (the part of the key before its last /)."""
    items = [f"{k} {format_value(k, v)}" for k, v in results.items()]
    line = f"eval at step {step}: " + ", ".join(items) + f" ({seconds:.1f}s)"
    if len(line) <= EVAL_LINE_WIDTH:
        return line
    groups: dict[str, list[str]] = {}
    for key, value in results.items():
        name, _, metric = key.rpartition("/")
        groups.setdefault(name, []).append(f"{metric} {format_value(key, value)}")
    return "\n".join([f"eval at step {step} ({seconds:.1f}s):",
                      *(f"  {name}: {', '.join(parts)}" for name, parts in groups.items())])
