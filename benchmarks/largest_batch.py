"""Largest global batch that fits per loss implementation, from the TPU compiler (no TPU needed).

    python benchmarks/largest_batch.py                          # LiT B/16, v4-8 and v4-32
    python benchmarks/largest_batch.py --slices v4-8 --impls ring,softmax --start_per_chip 2048
    python benchmarks/largest_batch.py --bisect --deadline 1500  # one bisection step if time allows

For each TPU slice and each loss implementation the trainer's own step
(siglip_jax.compiled_step.compile_train_step: the config's model, mesh, rules, dtype, scan and
remat) is compiled on compile-only devices with a doubling global batch, from
--start_per_chip × chips until the compiler reports that the program does not fit the chip's
HBM (or --cap); if the start does not fit, the batch halves instead. --bisect adds, after all
doubling searches, one step between the last fit and the first failure (1.5 × the last fit).
Batches stay multiples of the chip count (the batch is sharded over all chips). Memory is the
compiler's buffer assignment; nothing runs on a TPU. Each compile takes tens of seconds to
minutes on a small machine: progress and timings go to stderr, the markdown table to stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import time
from typing import Any

GiB = 1024**3


def _parse(argv: list[str]) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/lit_b16.py:data=/tmp,img=/tmp",
                   help="config spec (file.py:args)")
    p.add_argument("--slices", default="v4-8,v4-32", help="comma-separated TPU slices")
    p.add_argument("--impls", default="ring,all_gather,softmax", help="loss implementations")
    p.add_argument("--start_per_chip", type=int, default=1024,
                   help="first global batch = this × chips (a power of two)")
    p.add_argument("--cap", type=int, default=2**20, help="largest global batch tried")
    p.add_argument("--bisect", action="store_true",
                   help="one more compile between the last fit and the first failure")
    p.add_argument("--max_compiles", type=int, default=24, help="stop after this many compiles")
    p.add_argument("--deadline", type=float, default=0.0,
                   help="seconds; start no new compile after this (0: no limit)")
    p.add_argument("overrides", nargs="*", help="extra key=value config overrides")
    return p.parse_args(argv)


@dataclasses.dataclass
class Search:
    """The outcome of the search for one slice and one loss implementation."""

    slice_name: str
    chips: int
    impl: str
    largest: int | None = None  # Largest global batch that fit.
    largest_bytes: int | None = None  # Compiled bytes per chip at `largest`.
    largest_step: str = ""  # The roofline step-time estimate at `largest`, with its bound.
    first_fail: int | None = None  # Smallest global batch seen not to fit.
    fail_note: str = ""
    compiles: list[tuple[int, bool, float, float]] = dataclasses.field(default_factory=list)
    incomplete: str = ""  # Why the search stopped early, if it did.
    probe: Any = None  # Compiles one more batch for this slice and impl (used by bisect).


class Budget:
    """Counts compiles and wall time; says when no new compile may start."""

    def __init__(self, max_compiles: int, deadline: float) -> None:
        self.start = time.perf_counter()
        self.max_compiles = max_compiles
        self.deadline = deadline
        self.used = 0

    def exhausted(self) -> str:
        """Why no further compile may start ('' if one may)."""
        if self.used >= self.max_compiles:
            return f"compile budget ({self.max_compiles}) used up"
        if self.deadline and time.perf_counter() - self.start > self.deadline:
            return f"deadline ({self.deadline:.0f} s) passed"
        return ""


def _probe(config_spec: str, overrides: list[str], slice_name: str, impl: str, batch: int,
           budget: Budget) -> tuple[bool, int, str, float, str]:
    """Compiles the step at one global batch: (fits, bytes per chip, failure note, compile
    seconds, the estimated step time and its bound)."""
    import jax

    from siglip_jax.compiled_step import compile_train_step
    from siglip_jax.config import load_config
    from siglip_jax.schema import parse

    config = load_config(config_spec, [*overrides, f"input.global_batch={batch}",
                                       f"loss.impl={impl}"])
    t0 = time.perf_counter()
    budget.used += 1
    report = compile_train_step(parse(config), slice_name)
    seconds = time.perf_counter() - t0
    jax.clear_caches()
    if report.oom is not None:
        return False, 0, report.oom, seconds, ""
    note = "" if report.fits else (f"{report.total_bytes / GiB:.2f} GiB > "
                                   f"{report.chip.hbm_bytes / GiB:.2f} GiB HBM")
    estimate = (f"{report.step_seconds:.2f} s ({report.bound})" if report.step_seconds
                else "")
    return report.fits, report.total_bytes, note, seconds, estimate


def search(args: argparse.Namespace, slice_name: str, impl: str, budget: Budget) -> Search:
    """Doubling (or, if the start does not fit, halving) search; bisection comes later."""
    from siglip_jax.tpu_slices import parse_slice

    spec = parse_slice(slice_name)
    out = Search(spec.name, spec.chips, impl)

    def probe(batch: int) -> bool | None:
        why = budget.exhausted()
        if why:
            out.incomplete = why
            return None
        fits, total, note, secs, estimate = _probe(args.config, args.overrides, slice_name,
                                                   impl, batch, budget)
        out.compiles.append((batch, fits, total / GiB, secs))
        print(f"# [{time.perf_counter() - budget.start:7.0f} s] {spec.name} {impl:10s} "
              f"batch {batch:8d} ({batch // spec.chips} per chip): "
              + (f"fits, {total / GiB:.2f} GiB per chip, est. step {estimate}" if fits
                 else f"DOES NOT FIT ({note})")
              + f", compiled in {secs:.0f} s", file=sys.stderr, flush=True)
        if fits and (out.largest is None or batch > out.largest):
            out.largest, out.largest_bytes, out.largest_step = batch, total, estimate
        if not fits and (out.first_fail is None or batch < out.first_fail):
            out.first_fail, out.fail_note = batch, note
        return fits

    batch = args.start_per_chip * spec.chips
    fits = probe(batch)
    if fits is False:  # Halve until something fits.
        while fits is False and batch // 2 >= spec.chips:
            batch //= 2
            fits = probe(batch)
    else:
        while fits and batch * 2 <= args.cap:
            batch *= 2
            fits = probe(batch)
        if fits:
            out.incomplete = out.incomplete or f"still fits at the cap {args.cap}"
    out.probe = probe
    return out


def bisect(out: Search) -> None:
    """One compile at 1.5 × the largest fit when the first failure is twice it."""
    if (out.largest and out.first_fail and out.first_fail == 2 * out.largest
            and out.largest % (2 * out.chips) == 0):
        out.probe(out.largest * 3 // 2)


def _versions() -> str:
    """jax and libtpu versions and the machine's CPU model."""
    from importlib import metadata

    import jax

    try:
        libtpu = metadata.version("libtpu")
    except metadata.PackageNotFoundError:
        libtpu = "not installed"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines()
                      if line.startswith("Model name")), "unknown CPU")
    except OSError:
        model = "unknown CPU"
    return (f"jax {jax.__version__}, libtpu {libtpu}; machine: {model}, "
            f"{os.cpu_count()} logical CPUs")


def _cell(batch: int | None, chips: int) -> str:
    return "—" if batch is None else f"{batch:,} ({batch // chips:,})"


def print_table(results: list[Search], args: Any) -> None:
    """The markdown table of the searches."""
    print(f"\n{args.config} {' '.join(args.overrides)}".rstrip())
    print(f"{_versions()}\nmemory is the compiler's (buffer assignment per chip); nothing ran "
          "on a TPU\n")
    print("| slice | chips | loss impl | largest fitting global batch (per chip) | "
          "compiled GiB per chip | est. step there (bound) | first failing batch (per chip) | "
          "compiles (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        gib = "—" if r.largest_bytes is None else f"{r.largest_bytes / GiB:.2f}"
        fail = _cell(r.first_fail, r.chips)
        if r.incomplete:
            fail += f" [incomplete: {r.incomplete}]"
        secs = sum(c[3] for c in r.compiles)
        print(f"| {r.slice_name} | {r.chips} | {r.impl} | {_cell(r.largest, r.chips)} | {gib} | "
              f"{r.largest_step or '—'} | {fail} | {len(r.compiles)} ({secs:.0f}) |")
    for r in results:
        if r.fail_note:
            print(f"\n{r.slice_name} {r.impl} at {r.first_fail}: {r.fail_note}")


def main(argv: list[str] | None = None) -> None:
    """Run the searches and print a markdown table."""
    args = _parse(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    budget = Budget(args.max_compiles, args.deadline)
    results = [search(args, s, impl, budget)
               for s in args.slices.split(",") for impl in args.impls.split(",")]
    if args.bisect:  # After every doubling search, so a deadline cuts bisections first.
        for r in results:
            bisect(r)
    print_table(results, args)


if __name__ == "__main__":
    main()
