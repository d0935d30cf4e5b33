"""Wall time of test files run serially against the same files on pytest-xdist workers.

Each variant is one fresh pytest session (its own compilation cache, so neither reuses the
other's programs), run one after the other on the same machine; the table gives each
variant's wall time, its user + system CPU time (the session and its subprocesses) and its
ratio to the serial run. Run it on an otherwise idle machine: the ratio is what counts.

    python benchmarks/suite_workers.py                      # 4 heavy files, serial vs -n 2
    python benchmarks/suite_workers.py --workers 2,3 tests/test_step.py tests/test_docs.py
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_FILES = ("tests/test_step.py", "tests/test_decoder.py", "tests/test_distillation.py",
                 "tests/test_train_modes.py")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_session(files: list[str], workers: int) -> tuple[float, float, str]:
    """(wall s, CPU s, pytest's last line) of one pytest session over `files`."""
    command = [sys.executable, "-m", "pytest", "-q", "-m", "not slow", *files]
    if workers > 1:
        command[3:3] = ["-n", str(workers)]
    # Without an inherited JAX_COMPILATION_CACHE_DIR, tests/conftest.py gives each session a
    # fresh cache: a later variant must not read the programs an earlier one compiled.
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    cpu, start = _children_cpu(), time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - start, _children_cpu() - cpu
    last = (done.stdout.strip().splitlines() or ["(no output)"])[-1]
    if done.returncode:
        raise SystemExit(f"pytest -n {workers} failed (exit {done.returncode}): {last}")
    return wall, cpu, last


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", default=list(DEFAULT_FILES),
                        help="test files, relative to the repository (default: %(default)s)")
    parser.add_argument("--workers", default="2",
                        help="comma-separated worker counts to compare with serial (default 2)")
    args = parser.parse_args(argv)
    counts = [1, *(int(n) for n in args.workers.split(",") if int(n) > 1)]
    print(f"{os.cpu_count()} CPUs; files: {' '.join(args.files)}", flush=True)
    rows = []
    for workers in counts:
        wall, cpu, last = run_session(args.files, workers)
        rows.append((workers, wall, cpu, last))
        print(f"  workers={workers}: {wall:.0f} s ({last})", flush=True)
    serial = rows[0][1]
    print("\n| workers | wall | CPU (user + sys) | wall / serial |\n| --- | --- | --- | --- |")
    for workers, wall, cpu, _ in rows:
        label = "serial" if workers == 1 else f"-n {workers}"
        print(f"| {label} | {wall:.0f} s | {cpu:.0f} s | {wall / serial:.2f} |")


if __name__ == "__main__":
    main()
