"""Training metrics: a JSONL writer (one object per log step) and the console progress line."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

import numpy as np


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.generic, np.ndarray)) or hasattr(value, "__array__"):
        value = np.asarray(value)
        return value.item() if value.ndim == 0 else value.tolist()
    return value


class MetricWriter:
    """Appends metrics as JSON lines to `<workdir>/metrics.jsonl` (only where `enabled`)."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.enabled = enabled

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Writes one JSON object {"step": step, **metrics}."""
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def format_duration(seconds: float) -> str:
    """Formats seconds as `1h02m`, `3m05s` or `12s`."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(max(seconds, 0)))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class Progress:
    """Measures steps/s and examples/s between log points and estimates the time left.

    The ETA is the smaller of the time to reach `total_steps` at the current rate and the time
    left in the wall-clock budget (if any).
    """

    def __init__(self, total_steps: int, start_step: int, examples_per_step: int,
                 budget_deadline: float | None = None, stream: TextIO | None = None,
                 enabled: bool = True, clock=time.monotonic):
        self.total_steps = total_steps
        self.examples_per_step = examples_per_step
        self.budget_deadline = budget_deadline
        self.stream = stream or sys.stdout
        self.enabled = enabled
        self.clock = clock
        self._last_step = start_step
        self._last_time = clock()

    def reset_clock(self, step: int) -> None:
        """Starts a new measuring interval (e.g. after compilation or an evaluation)."""
        self._last_step, self._last_time = step, self.clock()

    def rates(self, step: int) -> dict[str, float]:
        """steps/s, examples/s and ETA seconds since the last call; starts a new interval."""
        now = self.clock()
        elapsed = max(now - self._last_time, 1e-9)
        steps_per_s = (step - self._last_step) / elapsed
        eta = (self.total_steps - step) / steps_per_s if steps_per_s > 0 else math.inf
        if self.budget_deadline is not None:
            eta = min(eta, max(self.budget_deadline - now, 0.0))
        self._last_step, self._last_time = step, now
        return {"steps_per_s": steps_per_s,
                "examples_per_s": steps_per_s * self.examples_per_step,
                "eta_s": eta}

    def line(self, step: int, metrics: Mapping[str, Any]) -> str:
        """The one-line summary printed at a log step."""
        parts = [f"step {step:>{len(str(self.total_steps))}}/{self.total_steps}"]
        for key, fmt in (("loss", ".4f"), ("lr", ".2e"), ("t", ".2f"), ("b", ".2f"),
                         ("steps_per_s", ".2f"), ("examples_per_s", ".0f"), ("mfu", ".1%")):
            if key in metrics and metrics[key] is not None:
                label = {"steps_per_s": "steps/s", "examples_per_s": "ex/s"}.get(key, key)
                parts.append(f"{label} {float(metrics[key]):{fmt}}")
        if "eta_s" in metrics:
            parts.append(f"ETA {format_duration(float(metrics['eta_s']))}")
        return " | ".join(parts)

    def print(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Prints the progress line (on the logging process only)."""
        if self.enabled:
            print(self.line(step, metrics), file=self.stream, flush=True)
