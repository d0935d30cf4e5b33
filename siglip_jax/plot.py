"""Plots of a training run: `python -m siglip_jax.plot <workdir> [--out DIR]`.

Reads `<workdir>/metrics.jsonl` (one JSON object per log step or evaluation, written by
`siglip_jax.metrics.MetricWriter`) and writes one PNG per group of metrics, plus
`overview.png` with every panel in a grid:

  loss.png, lr.png, t.png, b.png     the training scalars (other numeric ones get a PNG too,
                                     e.g. grad_norm.png, examples_per_s.png, mfu.png)
  logit_means.png                    pos_logit_mean and neg_logit_mean together
  <name>.png                         keys `name/metric` grouped by `name`: one PNG per
                                     evaluator (e.g. zeroshot.png with top1, top5, ...) and
                                     `skipped.png` for the data-skip counters

When a resumed run logged a step twice (steps redone after the last checkpoint), the later
record wins. A truncated last line (a process killed mid-write) is ignored with a warning.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from siglip_jax.console import add_verbose_flag, quiet_startup

METRICS_FILE = "metrics.jsonl"
# Keys that are not worth a plot: redundant with another key, or bookkeeping.
IGNORED_KEYS = frozenset({"step", "steps_per_s", "eta_s", "finite"})
# Keys drawn together in one panel (panel name: keys).
TOGETHER = {"logit_means": ("pos_logit_mean", "neg_logit_mean")}
FIRST = ("loss", "lr", "t", "b")  # Panel order: these first, then the rest alphabetically.
# Panels whose y range ignores the first steps (the initial loss would flatten the rest).
ROBUST_Y = ("loss", "grad_norm")
SKIP_FRACTION = 0.05  # Share of a robust panel's first points left out of its y range.
# Line styles per key within a panel: identical curves (top-1 = mean class recall on a balanced
# set) still show as two lines.
STYLES = (("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"), ((0, (5, 1, 1, 1)), "v"),
          ((0, (1, 3)), "x"))

Series = dict[str, tuple[list[int], list[float]]]  # key: (steps, values)


class MetricsFileError(ValueError):
    """The metrics file is missing, empty or not JSON lines."""


def _open(path: str, mode: str):
    """Opens a local path, or a remote one (gs://...) through tf.io.gfile."""
    if "://" in path:
        import tensorflow as tf

        return tf.io.gfile.GFile(path, mode)
    return open(path, mode)


def _exists(path: str) -> bool:
    if "://" in path:
        import tensorflow as tf

        return tf.io.gfile.exists(path)
    return os.path.exists(path)


def read_metrics(path: str) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file; raises MetricsFileError if there are none."""
    if not _exists(path):
        raise MetricsFileError(f"no metrics file {path!r} (is this a training workdir?)")
    with _open(path, "r") as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines):
                print(f"warning: {path}:{number}: ignoring a truncated last line", file=sys.stderr)
                break
            raise MetricsFileError(f"{path}:{number}: not a JSON object ({e.msg})") from None
        if not isinstance(record, dict) or "step" not in record:
            raise MetricsFileError(f"{path}:{number}: expected a JSON object with a 'step' key")
        records.append(record)
    if not records:
        raise MetricsFileError(f"metrics file {path!r} holds no records")
    return records


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def collect_series(records: Iterable[Mapping[str, Any]]) -> Series:
    """Numeric key → (steps, values) sorted by step; a later record for a step wins."""
    by_key: dict[str, dict[int, float]] = {}
    for record in records:
        step = int(record["step"])
        for key, value in record.items():
            number = _number(value)
            if key in IGNORED_KEYS or key.endswith("num_examples") or number is None:
                continue
            by_key.setdefault(key, {})[step] = number
    return {key: (sorted(points), [points[s] for s in sorted(points)])
            for key, points in by_key.items()}


def group_panels(series: Series) -> dict[str, list[str]]:
    """Panel name → keys drawn in it, in display order (training scalars first)."""
    panels: dict[str, list[str]] = {}
    together = {key: name for name, keys in TOGETHER.items() for key in keys}
    for key in sorted(series):
        if "/" in key:
            name = key.split("/", 1)[0]
        else:
            name = together.get(key, key)
        panels.setdefault(name, []).append(key)

    def order(name: str) -> tuple[int, int, str]:
        if name in FIRST:
            return (0, FIRST.index(name), name)
        grouped = any("/" in key for key in panels[name])
        return (2 if grouped else 1, 0, name)

    return {name: panels[name] for name in sorted(panels, key=order)}


def _file_name(panel: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", panel).strip("_") or "metric"


def robust_ylim(values: Sequence[float], skip_fraction: float = SKIP_FRACTION
                ) -> tuple[float, float] | None:
    """A y range for `values` (in step order) that leaves out the first `skip_fraction` of the
    points (at least one when there are more than three); None when nothing is left out."""
    finite = [v for v in values if math.isfinite(v)]
    if len(finite) <= 3:
        return None
    skip = max(1, int(len(finite) * skip_fraction))
    rest = finite[skip:]
    low, high = min(rest), max(rest)
    if min(finite[:skip]) >= low and max(finite[:skip]) <= high:
        return None  # The first points are inside the range anyway.
    pad = 0.05 * (high - low) or 0.05 * abs(high) or 0.05
    return low - pad, high + pad


def draw_panel(ax: Any, panel: str, keys: Sequence[str], series: Series,
               xlim: tuple[int, int]) -> None:
    """Draws one panel: a line per key, each with its own line style and marker."""
    limits = []
    for index, key in enumerate(keys):
        steps, values = series[key]
        label = key.split("/", 1)[1] if "/" in key else key
        linestyle, marker = STYLES[index % len(STYLES)]
        ax.plot(steps, values, linestyle=linestyle, marker=marker,
                markevery=max(1, len(steps) // 30), markersize=4 + 2 * (index == 0),
                fillstyle="none" if index else "full", linewidth=1.2, label=label)
        if panel in ROBUST_Y:
            limits.append((robust_ylim(values), values[0], steps[0]))
    title = panel
    if limits and all(lim is not None for lim, _, _ in limits):
        low = min(lim[0] for lim, _, _ in limits)
        high = max(lim[1] for lim, _, _ in limits)
        ax.set_ylim(low, high)
        first, step = limits[0][1], limits[0][2]
        if not low <= first <= high:
            title += f" (step {step}: {first:.4g}, off the scale)"
    ax.set_title(title)
    ax.set_xlabel("step")
    if xlim[1] > xlim[0]:  # Every panel spans the whole run, so evals line up with training.
        pad = 0.02 * (xlim[1] - xlim[0])
        ax.set_xlim(xlim[0] - pad, xlim[1] + pad)
    ax.grid(True, alpha=0.3)
    if len(keys) > 1 or "/" in keys[0]:  # Name the lines unless the title already does.
        ax.legend(fontsize="small")
    ax.ticklabel_format(axis="x", style="plain", useOffset=False)


def _save(fig: Any, path: str) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    with _open(path, "wb") as f:
        f.write(buffer.getvalue())


def plot_workdir(workdir: str, out: str | None = None) -> list[str]:
    """Writes the PNG plots of `<workdir>/metrics.jsonl` into `out` (default <workdir>/plots)
    and returns their paths."""
    series = collect_series(read_metrics(os.path.join(workdir, METRICS_FILE)))
    if not series:
        raise MetricsFileError(f"{os.path.join(workdir, METRICS_FILE)!r} holds no numeric "
                               "metrics to plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = group_panels(series)
    steps = [step for key_steps, _ in series.values() for step in key_steps]
    xlim = (min(steps), max(steps))
    out = out or os.path.join(workdir, "plots")
    if "://" in out:
        import tensorflow as tf

        tf.io.gfile.makedirs(out)
    else:
        os.makedirs(out, exist_ok=True)
    written = []
    for name, keys in panels.items():
        fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
        draw_panel(ax, name, keys, series, xlim)
        path = os.path.join(out, f"{_file_name(name)}.png")
        _save(fig, path)
        plt.close(fig)
        written.append(path)
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.5 * rows), squeeze=False,
                             layout="constrained")
    for ax, (name, keys) in zip(axes.flat, panels.items(), strict=False):
        draw_panel(ax, name, keys, series, xlim)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(workdir)
    path = os.path.join(out, "overview.png")
    _save(fig, path)
    plt.close(fig)
    written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (2 on a missing/bad metrics file)."""
    argv = quiet_startup(argv)
    parser = argparse.ArgumentParser(
        prog="python -m siglip_jax.plot",
        description="Write PNG plots of a training run's metrics.jsonl.")
    parser.add_argument("workdir", help="the training workdir (holds metrics.jsonl)")
    parser.add_argument("--out", help="output directory (default: <workdir>/plots)")
    add_verbose_flag(parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        written = plot_workdir(args.workdir, args.out)
    except (MetricsFileError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(written)} plots to {os.path.dirname(written[0])}: "
          + ", ".join(os.path.basename(p) for p in written))
    return 0


if __name__ == "__main__":
    from siglip_jax.shutdown import run_main

    run_main(main)
