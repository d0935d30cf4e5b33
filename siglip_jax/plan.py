"""The planner's command line: check a training config against a TPU slice before renting it.

    python -m siglip_jax.plan --config configs/x.py[:arg] --topology v4-256 \
        [--config.key=value ...] [--dataset-size N] [--mfu 0.4] [--compile]

Nothing is allocated: `planner.make_plan` runs the trainer's own builders on an abstract mesh
of the slice's shape (see planner.py for what it checks, cost_model.py for what is exact and
what is estimated). `--compile` also compiles that step for the slice with the real TPU
compiler (compile-only devices from libtpu, see compiled_step.py) and prints its exact memory
per chip, FLOPs and a roofline time estimate next to the analytic ones; the compiled number
then decides whether the step fits, and each evaluator's image step is compiled too.
Printed: parameters per tower; params, optimizer state, gradients and activations per chip
against the chip's HBM; the per-device batch; steps per epoch; FLOPs per step and a time
estimate at an assumed MFU.

Exit code 0: no problem found; 1: problems, one `error:` line each on stderr (do not launch);
2: the config cannot be loaded, or a bad topology or flag.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from siglip_jax.config import collect_overrides, load_config
from siglip_jax.console import add_verbose_flag, quiet_startup
from siglip_jax.records import ConfigError
from siglip_jax.shutdown import run_main
from siglip_jax.tpu_slices import format_bytes, libtpu_env_defaults

# What lowers a step's memory, cheapest first (docs/tpu.md, "Step memory against big_vision's").
SHRINK_HINT = ("try grad_accum_steps (recipe argument accum), model.image.attention_chunk "
               "(attn_chunk), fsdp or more chips")

if TYPE_CHECKING:
    from siglip_jax.compiled_step import SliceBuild
    from siglip_jax.planner import Plan


# ----------------------------------------------------------------------------- output


def _rate(flops: float) -> str:
    return f"{flops / 1e12:.0f} TFLOP/s" if flops >= 1e12 else f"{flops / 1e9:.0f} GFLOP/s"


def _m(n: int) -> str:
    return f"{n / 1e6:.1f} M"


def _other(n: int) -> str:
    """The parameters outside the towers and decoder: t and b alone (a count), or with the
    self-distillation heads (in millions)."""
    return f"t, b {n}" if n < 10_000 else f"t, b, heads {_m(n)}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def format_plan(plan: Plan) -> str:
    """The human-readable report (errors are printed separately, one a line)."""
    t = plan.topology
    lines = [f"plan {plan.config_name} on {t.name}: {t.chips} × {t.label} "
             f"({format_bytes(t.hbm_bytes)}, peak {_rate(t.peak_flops)} each), {t.hosts} host(s)",
             f"  chip facts    {t.source}"]
    if plan.mesh:
        mesh = " × ".join(f"{k}={v}" for k, v in plan.mesh.items())
        lines.append(f"  mesh          {mesh}; batch split over {', '.join(plan.batch_axes)}")
    if plan.params:
        p = plan.params
        dec = f"dec {_m(p['dec'])} | " if p.get("dec") else ""
        lines.append(f"  parameters    img {_m(p['img'])} | txt {_m(p['txt'])} | {dec}"
                     f"{_other(p['other'])} | total {_m(p['total'])}"
                     + (f"  (frozen: {', '.join(plan.frozen)})" if plan.frozen else ""))
    for tower in plan.towers:
        lines.append(f"  {tower.name} tower     {tower.tokens} tokens × width {tower.width}, "
                     f"depth {tower.depth}, mlp {tower.mlp_dim}, {tower.heads} heads, "
                     f"{8 * tower.act_bytes}-bit activations, remat {tower.remat}")
    if plan.global_batch:
        micro = plan.per_device_batch / plan.accum
        lines.append(f"  batch         global {plan.global_batch} | per device "
                     f"{plan.per_device_batch:g}" + (f" in {plan.accum} micro-batches of "
                                                     f"{micro:g}" if plan.accum > 1 else ""))
    if plan.bytes:
        lines.append("  memory/chip   (params, optimizer state, gradients: exact from shapes and "
                     "sharding rules; activations, loss: analytic estimate)")
        for key, value in plan.bytes.items():
            lines.append(f"    {key:<21}{format_bytes(value):>11}")
        share = plan.memory_total / t.hbm_bytes
        total = format_bytes(plan.memory_total)
        lines.append(f"    {'total':<21}{total:>11}  = {share:.0%} of the "
                     f"{format_bytes(t.hbm_bytes)} per chip")
    if plan.flops:
        line = (f"  FLOPs/step    {plan.flops['model']:.3g} (analytic matmul FLOPs: 3 × forward "
                "for trained towers, 1 × for frozen")
        if plan.flops.get("remat recompute"):
            line += f"; + {plan.flops['remat recompute']:.3g} recomputed under remat"
        lines.append(line + ")")
        seconds = plan.step_seconds
        if seconds:
            lines.append(f"  time          {seconds:.3g} s/step at an assumed {plan.mfu:.0%} MFU; "
                         f"{plan.total_steps} steps ≈ {_duration(seconds * plan.total_steps)}")
    if plan.global_batch:
        if plan.dataset_size:
            epoch = plan.dataset_size / plan.global_batch
            lines.append(f"  data          {plan.dataset_size} examples = {epoch:,.0f} steps per "
                         f"epoch; the run sees {plan.total_steps / epoch:.2f} epochs")
        else:
            lines.append("  data          steps per epoch: pass --dataset-size N")
    for note in plan.notes:
        lines.append(f"  note: {note}")
    lines.append("  result        " + ("FAILED: " + f"{len(plan.errors)} problem(s)"
                                      if plan.errors else "ok: no problem found"))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """Parses the planner's flags and the trainer's `--config.key=value` overrides."""
    parser = argparse.ArgumentParser(
        prog="python -m siglip_jax.plan",
        description="Check a training config against a TPU slice without allocating anything. "
                    "Extra flags --config.KEY=VALUE override config keys, as for training.")
    parser.add_argument("--config", required=True, help="configs/file.py or configs/file.py:arg")
    parser.add_argument("--topology", required=True,
                        help="slice type: v4-32, v4-256, v5litepod-16, v5p-128, v6e-64, cpu-8")
    parser.add_argument("--dataset-size", type=int, default=None,
                        help="examples in the training set (for steps per epoch)")
    parser.add_argument("--mfu", type=float, default=0.4,
                        help="assumed model FLOPs utilisation for the time estimate")
    parser.add_argument("--compile", action="store_true",
                        help="also compile the trainer's own step for the slice with the real TPU "
                             "compiler (needs libtpu, no TPU): exact memory per chip, a roofline "
                             "step time; exits 1 if the compiled step does not fit")
    add_verbose_flag(parser)
    args, rest = parser.parse_known_args(argv)
    return args, collect_overrides(rest, parser.error)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: 0 = the plan is fine, 1 = problems found, 2 = bad input."""
    argv = quiet_startup(argv)
    # Planning never runs a TPU program: keep JAX on the CPU (with libtpu installed it would
    # otherwise try, and warn about, a TPU runtime); --compile gets compile-only TPU devices.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    libtpu_env_defaults()  # libtpu's start-up warnings, when it is installed and no TPU is.
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    # Deliberately imported here, not at the top: the planner loads JAX and TensorFlow, which
    # read the environment set above (quiet_startup's TF settings, JAX_PLATFORMS) when they
    # load; `--help` and flag errors stay fast. (compile_and_compare, run only from here,
    # imports compiled_step the same way.)
    from siglip_jax import planner

    try:
        topology = planner.parse_topology(args.topology)
        if not 0 < args.mfu <= 1:
            raise planner.PlanError(f"--mfu {args.mfu} must be in (0, 1]")
        config = load_config(args.config, overrides)
    except (ConfigError, planner.PlanError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    plan = planner.make_plan(config, topology, config_name=args.config,
                             dataset_size=args.dataset_size, mfu=args.mfu)
    print(format_plan(plan), flush=True)
    if args.compile and not topology.label.startswith("emulated"):
        try:
            compile_error = compile_and_compare(plan, args.topology)
        except (ConfigError, ValueError) as e:
            print(f"error: --compile: {e}", file=sys.stderr)
            return 2
        if compile_error:
            plan.errors.append(compile_error)
    elif args.compile:
        print(f"error: --compile needs a TPU slice, not {args.topology}", file=sys.stderr)
        return 2
    for error in plan.errors:
        print(f"error: {error}", file=sys.stderr)
    return 1 if plan.errors else 0


def compile_and_compare(plan: Plan, slice_name: str) -> str | None:
    """Compiles the train step of the plan's config for the slice, prints the compiler's report
    next to the analytic estimate, and returns an error line if the compiled step does not
    fit (the plan's analytic memory error is dropped when the compiled step fits)."""
    # Delayed like main's import (JAX and TensorFlow load after quiet_startup).
    from siglip_jax import compiled_step, planner

    hbm = plan.topology.hbm_bytes
    analytic_memory = [e for e in plan.errors if e.startswith(planner.MEMORY_ERROR)]
    if len(plan.errors) > len(analytic_memory) or plan.run is None:
        print("  compile       skipped: fix the problems above first", flush=True)
        return None
    print(f"  compile       the trainer's step for {slice_name} (compile-only TPU devices) …",
          flush=True)
    model_flops = plan.flops.get("model")
    build = compiled_step.build_for_slice(plan.run, slice_name)  # Once: train and eval steps.
    report = build.compile_train_step(model_flops=model_flops
                                      and model_flops / plan.topology.chips)  # Per chip.
    print(compiled_step.format_report(report), flush=True)
    if report.oom is not None:
        return (f"the compiled train step does not fit the {format_bytes(hbm)} HBM of a "
                f"{plan.topology.label}: {report.oom}; {SHRINK_HINT}")
    print(f"  analytic vs compiled: {format_bytes(plan.memory_total)} estimated, "
          f"{format_bytes(report.total_bytes)} compiled per chip (ratio "
          f"{plan.memory_total / max(report.total_bytes, 1):.2f})", flush=True)
    if not report.fits:
        return (f"the compiled train step needs {format_bytes(report.total_bytes)} per chip, "
                f"more than the {format_bytes(hbm)} HBM of a {plan.topology.label}; "
                f"{SHRINK_HINT}")
    if analytic_memory:  # The compiler's number is exact: it overrules the estimate.
        plan.errors = [e for e in plan.errors if e not in analytic_memory]
        print("  note: the analytic estimate is over the HBM but the compiled step fits; the "
              "compiler's number is exact", flush=True)
    return _compile_evaluators(build, plan)


def _compile_evaluators(build: SliceBuild, plan: Plan) -> str | None:
    """Compiles each evaluator's image step of the build too; an error line if one does not
    fit."""
    for name, report in build.compile_eval_steps().items():
        if report.oom is not None or not report.fits:
            return (f"evals.{name}: the compiled image step at batch {report.examples_per_step} "
                    f"does not fit the {format_bytes(plan.topology.hbm_bytes)} HBM of a "
                    f"{plan.topology.label}; lower evals.{name}.batch_size")
        print(f"  eval {name:<8} image step at batch {report.examples_per_step}: "
              f"{format_bytes(report.total_bytes)} per chip (compiler), compiled in "
              f"{report.compile_seconds:.1f} s", flush=True)
    return None


if __name__ == "__main__":
    run_main(main)
