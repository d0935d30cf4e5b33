"""What each SigLIP 2 objective is for: sigmoid only | + decoder | + self-distillation and
masked prediction | all, several seeds each, same data, model and wall-clock budget.

    python benchmarks/siglip2_ablation.py                       # 4 rows × 3 seeds (+ random)
    python benchmarks/siglip2_ablation.py --seeds 2 --out /tmp/ablation
    python benchmarks/siglip2_ablation.py --out /tmp/ablation --reuse   # table/figure again

Every run trains `configs/siglip2_ablation.py:objectives=<row>,seed=<s>` in its own process,
one after the other (so runs never share the cores), row by row. The rows' step counts (`--steps`,
default the config's STEPS) give each row about the same training time, from the speeds
measured on a 2-core machine, so that a faster row does not simply train longer; `--budget`
(`time_budget_s`, counted from start-up) is only a guard. Rows are the outer loop, so an
interrupted benchmark has whole rows (every seed); all runs share one XLA compilation cache,
so a row's later seeds load its compiled programs.

Printed (and written to <out>/table.md, <out>/results.json): per row the mean ± standard
deviation over seeds of zero-shot top-1, caption token accuracy and exact match, referring
acc@0.5 and mean IoU, grounded-captioning exact match, dense-probe accuracy and mIoU over the
foreground classes (class = colour × shape labels, and shape labels), the steps reached and
training throughput; then the baselines: referring with a trivial predictor that ignores the
phrase (the mean training box; the largest object's box) computed exactly on the held-out
images, and the dense probe on a randomly initialised tower (the `random` row: lr 0); and
the done-when checks of issue 25 in numbers. The figure (<out>/ablation.png) has one panel
per metric with the rows side by side and error bars, and for one held-out image the
decoder's caption and referring boxes and the dense probe's segmentation next to the truth.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)  # The figure module beside this file.
from siglip2_ablation_figure import make_figure, run_data  # noqa: E402

from siglip_jax.console import add_verbose_flag, quiet_startup  # noqa: E402

CONFIG = os.path.join(ROOT, "configs", "siglip2_ablation.py")
ROWS = ("sigmoid", "decoder", "ssl", "all")
DECODER_ROWS, SSL_ROWS = ("decoder", "all"), ("ssl", "all")
COLUMNS = (  # (header, metrics.jsonl key, shown as a percentage)
    ("zero-shot top-1", "zeroshot/top1", True),
    ("caption token acc", "captioning/token_acc", True),
    ("caption exact", "captioning/exact_match", True),
    ("referring acc@0.5", "referring/acc@0.5", True),
    ("referring mean IoU", "referring/mean_iou", True),
    ("grounded exact", "grounded_captioning/exact_match", True),
    ("dense acc (class)", "dense_class/accuracy", True),
    ("dense fg mIoU (class)", "dense_class/miou_fg", True),
    ("dense fg mIoU (shape)", "dense_shape/miou_fg", True),
    ("steps", "step", False),
    ("train ex/s", "examples_per_s", False),
)


def final_metrics(workdir: str) -> dict[str, float]:
    """The last value of every key of `<workdir>/metrics.jsonl`; `examples_per_s` is the
    median over the logged training intervals (the first, which holds compilation, left out
    when there are others)."""
    last: dict[str, float] = {}
    speeds = []
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            if isinstance(record.get("examples_per_s"), (int, float)):
                speeds.append(record["examples_per_s"])
            last.update({k: v for k, v in record.items() if isinstance(v, (int, float))})
    if speeds:
        last["examples_per_s"] = statistics.median(speeds[1:] or speeds)
    return last


def train(row: str, seed: int, args: argparse.Namespace, workdir: str) -> dict[str, float]:
    """Trains one run (or reuses a finished one with --reuse); returns its final metrics."""
    if args.reuse and os.path.exists(os.path.join(workdir, "metrics.jsonl")):
        metrics = final_metrics(workdir)
        if "zeroshot/top1" in metrics:  # Its final evaluations ran: the run is complete.
            return metrics
    config_arg = f"objectives={row},seed={seed},budget={args.budget},start_frac={args.start_frac}"
    config_arg += "".join(f",{kv}" for kv in args.config_arg)
    steps = args.steps.get(row) if row != "random" else 1
    if steps:
        config_arg += f",steps={steps}"
    cmd = [sys.executable, "-m", "siglip_jax.train", "--config", f"{CONFIG}:{config_arg}",
           "--workdir", workdir, *(f"--config.{o}" for o in args.override)]
    start = time.monotonic()
    log_path = os.path.join(os.path.dirname(workdir), f"{os.path.basename(workdir)}.log")
    # One persistent compilation cache for all runs: a row's later seeds (same programs,
    # other values) load its compiled steps and evaluators instead of compiling again.
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": os.environ.get(
        "JAX_COMPILATION_CACHE_DIR", os.path.join(args.out, "xla_cache"))}
    with open(log_path, "w") as log:
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    if code:
        with open(log_path) as log:
            sys.stderr.write(log.read()[-3000:])
        raise SystemExit(f"error: row {row!r} seed {seed} failed (exit {code}); log "
                         f"{log_path}; command: {' '.join(cmd)}")
    return {**final_metrics(workdir), "wall_s": time.monotonic() - start}


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value) of the finite values."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return float("nan"), float("nan")
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else 0.0


def cell(values: list[float], percent: bool) -> str:
    """'mean ± std' of a metric over seeds ('-' when the row has no such evaluation)."""
    mean, std = mean_std(values)
    if math.isnan(mean):
        return "-"
    scale = 100 if percent else 1
    digits = 1 if percent else 0
    return f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}"


def referring_baselines(workdir: str) -> dict[str, dict[str, float]]:
    """acc@0.5 and mean IoU of predictors that ignore the phrase, on the held-out split of
    the run in `workdir`, as expectations over the referred object (the evaluator draws it
    uniformly per image): the mean box of the training split's objects, and the largest
    object's box (row 0)."""
    import numpy as np  # Deliberately late: --help stays instant.

    from siglip_jax.evaluators.decoder_tasks import box_iou

    test, train_split = run_data(workdir, "test"), run_data(workdir, "train")
    valid = np.arange(train_split["boxes"].shape[1])[None] < train_split["num_boxes"][:, None]
    mean_box = train_split["boxes"][valid].mean(0)
    out = {}
    for name, predict in (("mean training box", lambda boxes: mean_box),
                          ("largest object's box", lambda boxes: boxes[0])):
        hits, ious = [], []
        for boxes, n in zip(test["boxes"], test["num_boxes"], strict=True):
            iou = box_iou(np.repeat(predict(boxes)[None], n, 0), boxes[:n])
            hits.append(float(np.mean(iou >= 0.5)))
            ious.append(float(np.mean(iou)))
        out[name] = {"referring/acc@0.5": float(np.mean(hits)),
                     "referring/mean_iou": float(np.mean(ious))}
    return out


def separation(a: list[float], b: list[float] | float) -> float:
    """(mean a − mean b) / the larger standard deviation (b a constant: a's)."""
    ma, sa = mean_std(a)
    mb, sb = (b, 0.0) if isinstance(b, float) else mean_std(b)
    spread = max(sa, sb)
    return (ma - mb) / spread if spread > 0 else math.inf * (1 if ma > mb else -1)


def report(results: dict[str, list[dict]], baselines: dict, args: argparse.Namespace) -> str:
    """The markdown table, the baselines and the done-when checks."""
    header = ["objectives", "seeds", *(h for h, _, _ in COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    order = sorted(results, key=lambda r: r == "random")  # The baseline row last.
    for row, runs in ((r, results[r]) for r in order):
        cells = [cell([r.get(key) for r in runs], pct) for _, key, pct in COLUMNS]
        lines.append("| " + " | ".join([row, str(len(runs)), *cells]) + " |")
    lines.append("")
    lines.append("Baselines (held-out images):")
    for name, metrics in baselines.get("referring", {}).items():
        lines.append(f"- referring, {name}: acc@0.5 {100 * metrics['referring/acc@0.5']:.1f} "
                     f"%, mean IoU {100 * metrics['referring/mean_iou']:.1f} %")
    random_runs = results.get("random") or baselines.get("random", [])
    if random_runs:
        lines.append("- the `random` row above is the randomly initialised tower (lr 0): its "
                     "dense-probe numbers are the dense baseline")
    lines.append("")
    lines.append("Checks (separation = difference of means / the larger std over seeds):")
    for row in DECODER_ROWS:
        for name, metrics in baselines.get("referring", {}).items():
            if row in results:
                trivial = metrics["referring/acc@0.5"]
                s = separation([r.get("referring/acc@0.5") for r in results[row]], trivial)
                lines.append(f"- {row}: referring acc@0.5 vs the {name} "
                             f"({100 * trivial:.1f} %): {s:+.1f} std "
                             f"({'passes' if s > 3 else 'fails'} > 3)")
    for row in SSL_ROWS:
        for key in ("dense_class/miou_fg", "dense_shape/miou_fg"):
            for other in ("sigmoid", "random"):
                if row in results and other in results:
                    s = separation([r.get(key) for r in results[row]],
                                   [r.get(key) for r in results[other]])
                    lines.append(f"- {row}: {key} vs {other}: {s:+.1f} std "
                                 f"({'passes' if s > 3 else 'fails'} > 3)")
    return "\n".join(lines)


def parse_steps(text: str) -> dict[str, int]:
    """'300' (every row) or 'sigmoid=800,decoder=400' → {row: steps}."""
    if not text:
        return {}
    if "=" not in text:
        return dict.fromkeys(ROWS, int(text))
    out = {}
    for part in text.split(","):
        row, _, value = part.partition("=")
        if row not in ROWS:
            raise argparse.ArgumentTypeError(f"--steps: unknown row {row!r}")
        out[row] = int(value)
    return out


def main(argv: list[str] | None = None) -> int:
    """Trains the rows over the seeds, prints the table, writes results and the figure."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--rows", default=",".join(ROWS),
                        help=f"comma-separated rows among {', '.join(ROWS)} (default: all)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per row (0, 1, ...)")
    parser.add_argument("--budget", type=float, default=900.0,
                        help="seconds per run at most, from start-up (time_budget_s, a "
                             "guard; default 900; 0: none)")
    parser.add_argument("--steps", type=parse_steps, default={},
                        help="steps per run: N for every row, or row=N,... (default: the "
                             "config's STEPS)")
    parser.add_argument("--start-frac", type=float, default=0.3,
                        help="where self-distillation and masked prediction switch on, as a "
                             "fraction of the steps (default 0.3; SigLIP 2 uses 0.8)")
    parser.add_argument("--out", default="/tmp/siglip2_ablation",
                        help="folder for the runs, table.md, results.json and ablation.png")
    parser.add_argument("--no-baselines", action="store_true",
                        help="skip the trivial referring predictors and the random tower")
    parser.add_argument("--no-figure", action="store_true", help="skip ablation.png")
    add_verbose_flag(parser)
    parser.add_argument("--reuse", action="store_true",
                        help="reuse finished runs found in --out instead of training again")
    parser.add_argument("--no-train", action="store_true",
                        help="with --reuse: report the finished runs only, train none (a "
                             "partial benchmark's table and figure)")
    parser.add_argument("--config-arg", action="append", default=[],
                        help="extra k=v appended to the config argument of every run "
                             "(configs/siglip2_ablation.py: data_dir, train_per_class, ...)")
    parser.add_argument("--override", action="append", default=[],
                        help="extra k=v passed as --config.k=v to every run")
    args = parser.parse_args(argv)
    rows = [r for r in args.rows.split(",") if r]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        parser.error(f"unknown rows {unknown}; known: {list(ROWS)}")
    if args.seeds < 1:
        parser.error(f"--seeds {args.seeds}; expected at least 1")
    if args.no_train and not args.reuse:
        parser.error("--no-train needs --reuse (it reports the runs --out already has)")
    os.makedirs(args.out, exist_ok=True)
    # The random tower right after the first row: it reuses that row's compiled evaluators.
    all_rows = rows[:1] + ([] if args.no_baselines else ["random"]) + rows[1:]
    results: dict[str, list[dict]] = {row: [] for row in all_rows}
    for row in all_rows:
        for seed in range(args.seeds):
            workdir = os.path.join(args.out, f"{row}_{seed}")
            if args.no_train and "zeroshot/top1" not in (
                    final_metrics(workdir) if os.path.exists(
                        os.path.join(workdir, "metrics.jsonl")) else {}):
                print(f"seed {seed} of {row}: no finished run in {workdir}; skipped")
                continue
            print(f"[{time.strftime('%H:%M:%S')}] seed {seed}: {row} ...", flush=True)
            metrics = train(row, seed, args, workdir)
            results[row].append(metrics)
            wall = metrics.get("wall_s", math.nan)  # Absent for a reused run.
            print(f"  steps {int(metrics.get('step', 0))}, {wall:.0f} s; "
                  + ", ".join(f"{k} {metrics[k]:.3f}" for _, k, pct in COLUMNS
                              if pct and k in metrics), flush=True)
    results = {row: runs for row, runs in results.items() if runs}  # --no-train: finished.
    if not results:
        raise SystemExit(f"error: no finished run in {args.out}")
    first = os.path.join(args.out, f"{next(iter(results))}_0")
    baselines = {} if args.no_baselines else {"referring": referring_baselines(first)}
    text = report(results, baselines, args)
    print(text)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"results": results, "baselines": baselines, "args": vars(args)}, f,
                  indent=1, default=str)
    if not args.no_figure:
        path = os.path.join(args.out, "ablation.png")
        make_figure(results, baselines, args.out, path, COLUMNS)
        print(f"figure: {path}")
    print(f"(runs kept in {args.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main(quiet_startup()))  # Before the figure loads JAX: no TF/libtpu start-up noise.
