"""Wall time of test files run serially against the same files on pytest-xdist workers.

Each variant is one fresh pytest session (its own compilation cache, so neither reuses the
other's programs), run one after the other on the same machine; the table gives each
variant's wall time, its user + system CPU time (the session and its subprocesses) and its
ratio to the first variant. Run it on an otherwise idle machine: the ratio is what counts.

With `--against REV`, the variants are instead this checkout and REV (a temporary git
worktree), on `-n` workers, alternating `--repeat` times. Each session runs pytest inside its
checkout, which comes first on `sys.path`, so each imports its own package as well as its own
tests: the comparison covers a change to the package, the tests' fixtures or their flags.

    python benchmarks/suite_workers.py                      # 4 heavy files, serial vs -n 2
    python benchmarks/suite_workers.py --workers 2,3 tests/test_step.py tests/test_docs.py
    python benchmarks/suite_workers.py --against HEAD~1 --repeat 2 tests/test_export.py
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_FILES = ("tests/test_step.py", "tests/test_decoder.py", "tests/test_distillation.py",
                 "tests/test_train_modes.py")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_session(files: list[str], workers: int, tests_root: Path = REPO
                ) -> tuple[float, float, str]:
    """(wall s, CPU s, pytest's last line) of one pytest session over `files`, run in
    `tests_root` (a checkout)."""
    command = [sys.executable, "-m", "pytest", "-q", "-m", "not slow", *files]
    if workers > 1:
        command[3:3] = ["-n", str(workers)]
    # Without an inherited JAX_COMPILATION_CACHE_DIR, tests/conftest.py gives each session a
    # fresh cache: a later variant must not read the programs an earlier one compiled.
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    cpu, start = _children_cpu(), time.perf_counter()
    done = subprocess.run(command, cwd=tests_root, env=env, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - start, _children_cpu() - cpu
    last = (done.stdout.strip().splitlines() or ["(no output)"])[-1]
    if done.returncode:
        failed = [line for line in done.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
        raise SystemExit(f"pytest -n {workers} in {tests_root} failed (exit {done.returncode}): "
                         f"{last}\n" + "\n".join(failed) + "\n" + done.stdout[-6000:])
    return wall, cpu, last


def _variants(args: argparse.Namespace, baseline_root: Path | None
              ) -> list[tuple[str, int, Path]]:
    """(label, workers, checkout) of each session to run, in order."""
    counts = [1, *(int(n) for n in args.workers.split(",") if int(n) > 1)]
    if baseline_root is None:
        return [("serial" if n == 1 else f"-n {n}", n, REPO) for n in counts]
    workers = counts[-1]
    return [variant for _ in range(args.repeat) for variant in
            ((f"{args.against}, -n {workers}", workers, baseline_root),
             (f"this checkout, -n {workers}", workers, REPO))]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", default=list(DEFAULT_FILES),
                        help="test files, relative to the repository (default: %(default)s)")
    parser.add_argument("--workers", default="2",
                        help="comma-separated worker counts to compare with serial (default 2)")
    parser.add_argument("--against", metavar="REV",
                        help="compare with git revision REV (package and tests) instead of serial")
    parser.add_argument("--repeat", type=int, default=1,
                        help="with --against: how many times to alternate the two (default 1)")
    args = parser.parse_args(argv)
    print(f"{os.cpu_count()} CPUs; files: {' '.join(args.files)}", flush=True)
    with tempfile.TemporaryDirectory(prefix="suite_workers_") as tmp:
        baseline_root = None
        if args.against:
            baseline_root = Path(tmp) / "baseline"
            subprocess.run(["git", "worktree", "add", "-q", "--detach", str(baseline_root),
                            args.against], cwd=REPO, check=True)
        try:
            rows = []
            for label, workers, root in _variants(args, baseline_root):
                wall, cpu, last = run_session(args.files, workers, root)
                rows.append((label, wall, cpu))
                print(f"  {label}: {wall:.0f} s ({last})", flush=True)
        finally:
            if baseline_root is not None:
                subprocess.run(["git", "worktree", "remove", "--force", str(baseline_root)],
                               cwd=REPO, check=False)
    first = rows[0][1]
    print(f"\n| variant | wall | CPU (user + sys) | wall / {rows[0][0]} |")
    print("| --- | --- | --- | --- |")
    for label, wall, cpu in rows:
        print(f"| {label} | {wall:.0f} s | {cpu:.0f} s | {wall / first:.2f} |")


if __name__ == "__main__":
    main()
