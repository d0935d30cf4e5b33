"""Compiled memory and step-time estimate of recipes on TPU slices, as a markdown table.

    python benchmarks/tpu_estimate.py --config configs/siglip_b16_224.py --slice v4-64
    python benchmarks/tpu_estimate.py --config configs/siglip_b16_224.py:fsdp=32 --slice v4-64
    python benchmarks/tpu_estimate.py --config configs/lit_b16.py --slice v4-32 \
        --set loss.impl=softmax --label "lit_b16 softmax"
    python benchmarks/tpu_estimate.py --check   # the loop correction against unrolled steps

Each row compiles the trainer's own step (siglip_jax.compiled_step, compile-only devices, no
TPU) and reads: the compiler's memory per chip (exact), its FLOPs and bytes accessed as
counted (loop bodies once) and as corrected for loop trips (hlo_cost.loop_counts), the
roofline bound and step estimate, examples/s and MFU (the planner's analytic model FLOPs).
`--check` compiles a tiny SigLIP step twice per layout (data parallel, FSDP): scanned with
the ring loss's hops in a loop, and with no loop at all, whose compiler counts need no
correction; the corrected FLOPs and bytes of the first should match the second (the
CI test tests/test_tpu_compile.py asserts 5 % / 20 %). Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import sys
import time

GiB = 1024**3


def _row(label: str, report, model_flops: float | None) -> str:
    """One markdown row of a compiled report."""
    if report.oom is not None:
        return f"| {label} | {report.slice_name} ({report.chips}) | {report.oom[:80]} |"
    b = report.bounds()
    return (f"| {label} | {report.slice_name} ({report.chips}) | "
            f"{report.argument_bytes / GiB:.2f} / {report.temp_bytes / GiB:.2f} / "
            f"**{report.total_bytes / GiB:.2f} GiB** | "
            f"{report.compiler_flops:.3g} / {report.compiler_bytes_accessed:.3g} | "
            f"{report.flops:.3g} / {report.bytes_accessed:.3g} | "
            f"{(model_flops or 0):.3g} | "
            f"{b['compute']:.2f} / {b['memory']:.2f} / {b['collectives']:.2f} s | "
            f"{report.step_seconds:.2f} s ({report.bound}) | "
            f"{report.examples_per_second:,.0f} | {100 * (report.mfu or 0):.0f} % | "
            f"{report.compile_seconds:.0f} s |")


HEADER = ("| step | slice (chips) | per chip: args / temp / total | compiler FLOPs / bytes "
          "(loop bodies once) | corrected FLOPs / bytes | model FLOPs | compute / HBM / ICI "
          "bound | est. step (bound) | est. examples/s | MFU ≤ | compile |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|")


def _compile(config_arg: str, overrides: list[str], slice_name: str, label: str) -> str:
    from siglip_jax import compiled_step, planner
    from siglip_jax.config import load_config

    config = load_config(config_arg, overrides)
    plan = planner.make_plan(config, planner.parse_topology(slice_name))
    model_flops = plan.flops.get("model")
    per_chip = model_flops and model_flops / plan.topology.chips
    start = time.perf_counter()
    report = compiled_step.compile_train_step(plan.run, slice_name, model_flops=per_chip)
    print(f"{label}: compiled in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return _row(label, report, per_chip)


def _check() -> None:
    from siglip_jax import compiled_step
    from siglip_jax.config import load_config
    from siglip_jax.schema import parse

    print("| layout | compiled as | compiler FLOPs / bytes | corrected FLOPs / bytes |\n"
          "|---|---|---|---|")
    for fsdp in (False, True):
        for scan in (True, False):
            c = load_config("configs/demo.py", ["input.global_batch=32"])
            for tower, depth in (("image", 3), ("text", 2)):
                c.model[tower] = dict(c.model[tower], width=32, depth=depth, mlp_dim=128,
                                      num_heads=2, scan=scan)
            c.model.out_dim, c.loss, c.evals = 32, dict(impl="ring", unroll=not scan), {}
            if fsdp:
                c.mesh, c.batch_axes = [("fsdp", -1)], ("fsdp",)
                c.sharding_rules = [(".*", "fsdp")]
            r = compiled_step.compile_train_step(parse(c), "v4-8")
            print(f"| {'fsdp=4' if fsdp else 'data=4'} | "
                  f"{'scanned, ring loop' if scan else 'unrolled'} | "
                  f"{r.compiler_flops:.4g} / {r.compiler_bytes_accessed:.4g} | "
                  f"{r.flops:.4g} / {r.bytes_accessed:.4g} |", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", help="config path[:args]")
    ap.add_argument("--slice", default="v4-64")
    ap.add_argument("--set", action="append", default=[], help="config override key=value")
    ap.add_argument("--label", default=None)
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args(argv)
    if args.check:
        _check()
        return 0
    if not args.config:
        ap.error("--config is required (or --check)")
    label = args.label or args.config.split("/")[-1].removesuffix(".py")
    print(HEADER)
    print(_compile(args.config, args.set, args.slice, label), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
