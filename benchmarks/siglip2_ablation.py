"""The SigLIP 2 objectives on the multi-object demo: sigmoid only vs + decoder vs + decoder,
self-distillation and masked prediction, same seed and same wall-clock budget.

    python benchmarks/siglip2_ablation.py                      # 3 runs × 300 s, ~18 min
    python benchmarks/siglip2_ablation.py --budget 120 --rows sigmoid,decoder

Each row trains `configs/demo_siglip2.py:objectives=<row>` in its own process, one after the
other (so the runs never share the 2 cores), for `--budget` seconds of training
(`time_budget_s`: the run stops when the next step would not fit, then runs its final
evaluations). The table has, per row, the steps reached and the final evaluations the config
runs: zero-shot top-1 on held-out images, the decoder's caption exact match, referring
accuracy (IoU ≥ 0.5) and grounded-captioning accuracy (rows without a decoder: "-"), and the
dense probe's per-patch accuracy and mIoU. The last column is the zero-shot difference to the
sigmoid-only row of the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROWS = ("sigmoid", "decoder", "all")
COLUMNS = (  # (header, metrics.jsonl key)
    ("zero-shot top-1", "zeroshot/top1"),
    ("caption exact", "captioning/exact_match"),
    ("caption token acc", "captioning/token_acc"),
    ("referring acc@0.5", "referring/acc@0.5"),
    ("grounded exact", "grounded_captioning/exact_match"),
    ("dense acc (class)", "dense_class/accuracy"),
    ("dense mIoU (class)", "dense_class/miou"),
    ("dense mIoU (shape)", "dense_shape/miou"),
)
CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "configs",
                      "demo_siglip2.py")


def final_metrics(workdir: str) -> dict[str, float]:
    """The last value of every key in `<workdir>/metrics.jsonl`, plus the last step."""
    last: dict[str, float] = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            last.update({k: v for k, v in record.items() if isinstance(v, (int, float))})
    return last


def run_row(row: str, budget: float, workdir: str, extra: list[str]) -> tuple[dict, float]:
    """Trains one row; returns (its final metrics, wall seconds of the whole process)."""
    cmd = [sys.executable, "-m", "siglip_jax.train", "--config",
           f"{CONFIG}:objectives={row}", "--workdir", workdir,
           f"--config.time_budget_s={budget}", *extra]
    start = time.monotonic()
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds = time.monotonic() - start
    if done.returncode:
        print(done.stdout[-3000:], file=sys.stderr)
        raise SystemExit(f"row {row!r} failed (exit {done.returncode}); command: {' '.join(cmd)}")
    return final_metrics(workdir), seconds


def fmt(value: float | None) -> str:
    """A metric as a percentage, '-' when the row has no such evaluation."""
    return "-" if value is None else f"{100 * value:.1f}"


def main(argv: list[str] | None = None) -> int:
    """Runs the rows and prints the markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=300.0,
                        help="training seconds per row (time_budget_s)")
    parser.add_argument("--rows", default=",".join(ROWS),
                        help=f"comma-separated rows among {', '.join(ROWS)}")
    parser.add_argument("--workdir", default="", help="keep the runs here (default: a tmp dir)")
    parser.add_argument("--override", action="append", default=[],
                        help="extra --config.k=v passed to every row")
    args = parser.parse_args(argv)
    rows = [r for r in args.rows.split(",") if r]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        parser.error(f"unknown rows {unknown}; known: {list(ROWS)}")
    root = args.workdir or tempfile.mkdtemp(prefix="siglip2_ablation_")
    results = {}
    for row in rows:
        print(f"training {row} for {args.budget:.0f} s ...", flush=True)
        results[row] = run_row(row, args.budget, os.path.join(root, row), args.override)
    base = results.get("sigmoid", (None,))[0]
    header = ["objectives", "steps", "wall s", *(h for h, _ in COLUMNS), "Δ zero-shot"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row, (metrics, seconds) in results.items():
        delta = "-" if base is None or "zeroshot/top1" not in metrics else (
            f"{100 * (metrics['zeroshot/top1'] - base['zeroshot/top1']):+.1f}")
        cells = [row, str(int(metrics.get("step", 0))), f"{seconds:.0f}",
                 *(fmt(metrics.get(key)) for _, key in COLUMNS), delta]
        print("| " + " | ".join(cells) + " |")
    print(f"(runs kept in {root})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
