"""Training metrics: JSONL + TensorBoard writer, the console progress line, and MFU.

MFU = achieved FLOP/s ÷ peak FLOP/s. Achieved FLOPs per step come from the compiled step's
`cost_analysis()` (per device, summed over devices). Peak FLOP/s per chip come from
`config.peak_flops`, or else from `PEAK_FLOPS_PER_CHIP` by device kind (published bf16 peaks).
CPUs differ too much for a table, and a shared CPU's rate moves with the load, so on CPU the
peak is an estimate: the best rate of short f32 matmuls of several sizes, measured at start
and again at every log step (the device is idle then), the best so far (`PeakFlops`). The
progress line then shows `mfu ≈x%`. On CPU all emulated devices of a process share one host,
so the peak is per process, not per device.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TextIO

import jax
import jax.numpy as jnp
import numpy as np


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.generic, np.ndarray)) or hasattr(value, "__array__"):
        value = np.asarray(value)
        return value.item() if value.ndim == 0 else value.tolist()
    return value


def _finite_or_none(value: Any) -> tuple[Any, bool]:
    """`value` with every non-finite float replaced by None, and whether any was."""
    if isinstance(value, float) and not math.isfinite(value):
        return None, True
    if isinstance(value, (list, tuple)):
        items = [_finite_or_none(v) for v in value]
        return [v for v, _ in items], any(bad for _, bad in items)
    if isinstance(value, dict):
        items = {k: _finite_or_none(v) for k, v in value.items()}
        return {k: v for k, (v, _) in items.items()}, any(bad for _, bad in items.values())
    return value, False


def strict_json_record(step: int, metrics: Mapping[str, object]) -> dict[str, object]:
    """{"step", **metrics} as strict JSON values: NaN/Inf become null and the affected keys
    are listed under "nonfinite" (json.dumps would otherwise write the non-standard NaN)."""
    record: dict[str, object] = {"step": int(step)}
    nonfinite = []
    for key, value in metrics.items():
        record[key], bad = _finite_or_none(_jsonable(value))
        if bad:
            nonfinite.append(key)
    if nonfinite:
        record["nonfinite"] = nonfinite
    return record


class MetricWriter:
    """Appends metrics as JSON lines to `<workdir>/metrics.jsonl` and, if `tensorboard`, to
    TensorBoard event files in `<workdir>/tb` (only where `enabled`: process 0).

    Lines are strict JSON: a NaN/Inf value is written as null and its key is listed under
    "nonfinite" (TensorBoard still receives the NaN, which it plots as such)."""

    def __init__(self, workdir: str, enabled: bool = True, tensorboard: bool = True):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.enabled = enabled
        self._tb = None
        if enabled and tensorboard:
            import tensorflow as tf

            self._tb = tf.summary.create_file_writer(os.path.join(workdir, "tb"))

    def write(self, step: int, metrics: Mapping[str, object]) -> None:
        """Writes one JSON object {"step": step, **metrics} (and the scalars to TensorBoard)."""
        if not self.enabled:
            return
        record = strict_json_record(step, metrics)
        import tensorflow as tf

        with tf.io.gfile.GFile(self.path, "a") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")
        if self._tb is not None:
            with self._tb.as_default(step=int(step)):
                for key, value in metrics.items():
                    value = _jsonable(value)
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        tf.summary.scalar(key, value)
            self._tb.flush()

    def close(self) -> None:
        """Flushes and closes the TensorBoard writer."""
        if self._tb is not None:
            self._tb.close()


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

    def line(self, step: int, metrics: Mapping[str, object]) -> str:
        """The one-line summary printed at a log step."""
        parts = [f"step {step:>{len(str(self.total_steps))}}/{self.total_steps}"]
        for key, fmt in (("loss", ".4f"), ("lr", ".2e"), ("t", ".2f"), ("b", ".2f"),
                         ("steps_per_s", ".2f"), ("examples_per_s", ".0f"), ("mfu", ".1%")):
            if key in metrics and metrics[key] is not None:
                label = {"steps_per_s": "steps/s", "examples_per_s": "ex/s"}.get(key, key)
                approx = "≈" if key == "mfu" and metrics.get("mfu_estimated") else ""
                parts.append(f"{label} {approx}{float(metrics[key]):{fmt}}")
        if "eta_s" in metrics:
            parts.append(f"ETA {format_duration(float(metrics['eta_s']))}")
        return " | ".join(parts)

    def print(self, step: int, metrics: Mapping[str, object]) -> None:
        """Prints the progress line (on the logging process only)."""
        if self.enabled:
            print(self.line(step, metrics), file=self.stream, flush=True)


# Peak dense FLOP/s per chip by `device_kind` (lower-cased prefix match): published bf16 peaks.
# CPUs are measured instead (PeakFlops); "cpu" is the figure when `default_peak_flops` is asked.
PEAK_FLOPS_PER_CHIP: dict[str, float] = {
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,
    "tpu v5e": 197e12,
    "tpu v5p": 459e12,
    "tpu v5": 459e12,
    "tpu v6 lite": 918e12,
    "tpu v6e": 918e12,
    "cpu": 165e9,
}


def default_peak_flops(device_kind: str, platform: str) -> float | None:
    """The table's peak for this device (None if unknown)."""
    kind = device_kind.lower()
    for prefix in sorted(PEAK_FLOPS_PER_CHIP, key=len, reverse=True):
        if kind.startswith(prefix):
            return PEAK_FLOPS_PER_CHIP[prefix]
    return PEAK_FLOPS_PER_CHIP.get(platform.lower())


def measure_matmul_flops(sizes: Sequence[int] = (512, 1024, 2048), seconds: float = 0.3
                         ) -> float:
    """Best FLOP/s of square f32 matmuls on this process's first device (the practical peak).

    Each size gets an equal share of `seconds` (at least one timed call): short calls catch
    the quiet moments of a shared machine, large ones the rate a lone process reaches.
    """
    matmul = jax.jit(lambda x: x @ x)
    best_rate = 0.0
    for size in sizes:
        a = jax.device_put(jnp.ones((size, size), jnp.float32), jax.local_devices()[0])
        matmul(a).block_until_ready()  # Compile outside the timing.
        best, deadline = math.inf, time.perf_counter() + seconds / len(sizes)
        while time.perf_counter() < deadline or best == math.inf:
            start = time.perf_counter()
            matmul(a).block_until_ready()
            best = min(best, time.perf_counter() - start)
        best_rate = max(best_rate, 2 * size**3 / best)
    return best_rate


class PeakFlops:
    """The MFU denominator per chip: configured, published (accelerators) or, on CPU, an
    estimate that is the best matmul rate measured so far in the run.

    The trainer makes one with `for_device` at start, logs `describe()`, and at each log step
    (with the device idle) adds `mfu_metrics(...)` to the metrics; that call re-measures a
    CPU estimate briefly first, so a quieter moment later in the run raises it.
    """

    def __init__(self, value: float | None, source: str,
                 measure: Callable[..., float] | None = None):
        self.value = value
        self.source = source  # "config", "published", "measured" or "unknown".
        self._measure = measure

    @classmethod
    def for_device(cls, device: jax.Device, configured: float | None = None,
                   measure: Callable[..., float] = measure_matmul_flops) -> PeakFlops:
        """`configured` if set; else the published peak; else on CPU a measured estimate."""
        if configured:
            return cls(float(configured), "config")
        if device.platform == "cpu":
            return cls(measure(), "measured", measure)
        value = default_peak_flops(device.device_kind, device.platform)
        return cls(value, "published" if value else "unknown")

    @property
    def is_estimate(self) -> bool:
        """True when the peak was measured on this host (MFU is then an estimate)."""
        return self.source == "measured"

    def refresh(self, seconds: float = 0.03, sizes: Sequence[int] = (512, 1024)) -> float:
        """Re-measures a CPU estimate briefly and keeps the best so far; returns the peak."""
        if self.is_estimate and self._measure is not None:
            self.value = max(self.value or 0.0, self._measure(sizes=sizes, seconds=seconds))
        return self.value or 0.0

    def describe(self) -> str:
        """The start-up log line saying which peak MFU is measured against."""
        if not self.value:
            return "peak for MFU: unknown for this device (set peak_flops); no MFU shown"
        rate = f"{self.value / 1e9:.0f} GFLOP/s" if self.value < 1e12 else \
            f"{self.value / 1e12:.0f} TFLOP/s"
        what = {"config": "from config.peak_flops", "published": "published bf16 peak",
                "measured": "CPU estimate: best f32 matmul so far, re-measured at each "
                            "log step"}[self.source]
        return f"peak for MFU: {rate} per chip ({what})"

    def mfu_metrics(self, flops_per_device_step: float | None, num_devices: int,
                    steps_per_s: float, num_chips: int) -> dict[str, float]:
        """{"mfu", "mfu_peak_flops"} (+ "mfu_estimated": True on CPU) for the metrics; {} when
        the MFU is unknown."""
        if self.is_estimate:
            self.refresh()
        value = mfu(flops_per_device_step, num_devices, steps_per_s, self.value, num_chips)
        if value is None:
            return {}
        out: dict[str, float] = {"mfu": value, "mfu_peak_flops": self.value}
        if self.is_estimate:
            out["mfu_estimated"] = True
        return out


def compiled_flops(compiled: jax.stages.Compiled) -> float | None:
    """FLOPs of one call of a compiled (per-device SPMD) program, from XLA's cost analysis."""
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # Not every backend implements it.
        return None
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def mfu(flops_per_device_step: float | None, num_devices: int, steps_per_s: float,
        peak_per_chip: float | None, num_chips: int) -> float | None:
    """Model FLOPs utilisation, or None when either number is unknown."""
    if not flops_per_device_step or not peak_per_chip or steps_per_s <= 0:
        return None
    return flops_per_device_step * num_devices * steps_per_s / (peak_per_chip * num_chips)
