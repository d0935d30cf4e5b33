"""What the TPU compiler says about a compiled step: memory per chip, FLOPs, collectives, time.

`analyse(compiled, chip)` reads a `jax.stages.Compiled` (compiled for one device per chip):
  * memory per chip, EXACT (the compiler's buffer assignment): argument, output, aliased
    (outputs written in place of donated arguments), temporaries and generated code; their
    total (arguments + outputs − aliased + temporaries + code) against the chip's HBM;
  * FLOPs and bytes accessed per chip from the compiler's cost analysis, which counts a loop
    body once: corrected by `hlo_cost.loop_counts` (FLOPs scaled by the trip-count-weighted
    ÷ once matmul FLOPs; bytes plus the extra trips' bytes read from the HLO), checked in
    tests/test_tpu_compile.py against the same step compiled with no loops (FLOPs within
    5 %, bytes within 20 %); and the bytes each chip sends through collectives (all-gather,
    reduce-scatter, all-reduce, collective-permute, all-to-all), read from the scheduled HLO
    text; ops inside loop bodies (scanned layers, accumulation, the ring loss's hops) count
    once per known trip count;
  * an ESTIMATED step time: a roofline, the largest of FLOPs ÷ peak FLOP/s, bytes accessed ÷
    HBM bandwidth and collective bytes ÷ ICI bandwidth (it assumes perfect overlap, so it is
    a lower bound on the real step time), naming which bound; the compiler's own estimate
    `optimal_seconds` is reported next to it only when it is positive and finite (it can be
    negative for large programs).

`compile_train_step(run, "v4-256")` builds the trainer's own step (`build_step`: the parsed
config's model, mesh, sharding rules, loss, dtype, scan, remat, accumulation) on compile-only
devices of the slice and analyses it; a program that does not fit is reported (`oom`), not
raised. `build_for_slice(run, slice)` builds once for both the train step and the
evaluators' image steps (`SliceBuild.compile_train_step`, `.compile_eval_steps`). They take
the typed `schema.RunConfig` (`parse(config)` at the entry point).
Times are compiler/roofline estimates, never measurements.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from siglip_jax.evaluators.common import Embedder
from siglip_jax.experiment import (
    BatchShapes,
    StepParts,
    abstract_batch,
    build_step,
    input_shapes,
    pp_image_size,
)
from siglip_jax.hlo_cost import (  # noqa: F401 (re-exported: compiled_step's public API)
    COLLECTIVES,
    LoopCounts,
    collective_bytes,
    hlo_op_dtypes,
    loop_counts,
    shape_bytes,
)
from siglip_jax.records import ConfigError
from siglip_jax.schema import RunConfig
from siglip_jax.sharding import mesh_of
from siglip_jax.tpu_slices import Chip, Slice, compile_only_devices, parse_slice

GiB = 1024**3

@dataclasses.dataclass(frozen=True)
class CompiledReport:
    """Per-chip memory, cost and time estimate of one compiled program on one slice."""

    slice_name: str
    chips: int
    chip: Chip
    examples_per_step: int
    compile_seconds: float
    argument_bytes: int = 0
    output_bytes: int = 0
    alias_bytes: int = 0
    temp_bytes: int = 0
    code_bytes: int = 0
    flops: float = 0.0  # Per chip: the compiler's count × the loop factor (see analyse).
    bytes_accessed: float = 0.0
    matmul_flops: float = 0.0  # Per chip: dots and convolutions read from the HLO, loops counted.
    compiler_flops: float = 0.0  # The compiler's cost analysis as is (loop bodies once).
    compiler_bytes_accessed: float = 0.0
    collectives: Mapping[str, int] = dataclasses.field(default_factory=dict)
    compiler_optimal_seconds: float | None = None  # Raw; see optimal_seconds.
    model_flops: float | None = None  # Per chip, useful work only (e.g. the planner's).
    oom: str | None = None  # The compiler's out-of-memory message when it does not fit.

    @property
    def total_bytes(self) -> int:
        """HBM the program needs per chip: arguments + outputs − aliased + temp + code."""
        return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes
                + self.code_bytes)

    @property
    def fits(self) -> bool:
        """Compiled, and its per-chip total fits the chip's HBM."""
        return self.oom is None and self.total_bytes <= self.chip.hbm_bytes

    @property
    def collective_total(self) -> int:
        """Bytes through collectives per chip per step."""
        return int(sum(self.collectives.values()))

    def bounds(self) -> dict[str, float]:
        """Seconds per step if only compute, HBM traffic or ICI traffic limited it."""
        chip = self.chip
        return {"compute": self.flops / chip.peak_flops if chip.peak_flops else 0.0,
                "memory": self.bytes_accessed / chip.hbm_bytes_per_s
                if chip.hbm_bytes_per_s else 0.0,
                "collectives": self.collective_total / chip.ici_bytes_per_s
                if chip.ici_bytes_per_s else 0.0}

    @property
    def step_seconds(self) -> float | None:
        """Roofline estimate (largest bound); None if the program did not compile."""
        if self.oom is not None:
            return None
        return max(self.bounds().values()) or None

    @property
    def bound(self) -> str | None:
        """Which roofline bound sets the estimate."""
        if self.step_seconds is None:
            return None
        bounds = self.bounds()
        return max(bounds, key=bounds.get)

    @property
    def optimal_seconds(self) -> float | None:
        """The compiler's own time estimate, only when sane (positive and finite)."""
        value = self.compiler_optimal_seconds
        if value is None or not math.isfinite(value) or value <= 0:
            return None
        return value

    @property
    def examples_per_second(self) -> float | None:
        """Examples per second of the whole slice at the roofline estimate."""
        step = self.step_seconds
        return self.examples_per_step / step if step else None

    @property
    def mfu(self) -> float | None:
        """model FLOPs (else the compiler's FLOPs) ÷ (roofline time × peak), an upper bound.

        Model FLOPs above the compiled step's count (`model_flops_exceed`) are capped at it:
        the program cannot do more work than it holds (SigLIP 2's self-supervised passes sit
        in a `lax.cond` until their switch-on step, which the planner counts in full)."""
        step = self.step_seconds
        if not step or not self.chip.peak_flops:
            return None
        return min(self.model_flops or self.flops, self.flops) / (step * self.chip.peak_flops)

    @property
    def model_flops_exceed(self) -> bool:
        """Whether the planner's model FLOPs exceed the compiled step's by more than 5 %."""
        return bool(self.model_flops and self.model_flops > 1.05 * self.flops)


def _cost(compiled: jax.stages.Compiled) -> dict[str, float]:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # Older JAX returned one dict per program.
        cost = cost[0] if cost else {}
    return dict(cost or {})


def analyse(compiled: jax.stages.Compiled, chip: Chip, *, slice_name: str, chips: int,
            examples_per_step: int, compile_seconds: float = 0.0,
            model_flops: float | None = None) -> CompiledReport:
    """Reads memory, cost and collectives of a `jax.stages.Compiled` (one device per chip).

    The compiler's cost analysis counts every loop body once, however often it runs (12
    scanned layers count as one); FLOPs and bytes accessed are corrected by
    `hlo_cost.loop_counts` (see `LoopCounts.correct`).
    """
    mem = compiled.memory_analysis()
    cost = _cost(compiled)
    optimal = cost.get("optimal_seconds")
    hlo = compiled.as_text()
    flops, accessed = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
    counts = loop_counts(hlo)
    loop_flops, loop_bytes = counts.correct(flops, accessed)
    return CompiledReport(
        slice_name=slice_name, chips=chips, chip=chip, examples_per_step=examples_per_step,
        compile_seconds=compile_seconds,
        argument_bytes=int(mem.argument_size_in_bytes),
        output_bytes=int(mem.output_size_in_bytes),
        alias_bytes=int(mem.alias_size_in_bytes),
        temp_bytes=int(mem.temp_size_in_bytes),
        code_bytes=int(mem.generated_code_size_in_bytes),
        flops=loop_flops, bytes_accessed=loop_bytes, matmul_flops=counts.flops_weighted,
        compiler_flops=flops, compiler_bytes_accessed=accessed,
        collectives=collective_bytes(hlo),
        compiler_optimal_seconds=None if optimal is None else float(optimal),
        model_flops=model_flops)


def is_hbm_oom(error: BaseException) -> bool:
    """Whether a compile error is the TPU compiler's "program does not fit in HBM"."""
    text = str(error)
    return "HbmOom" in text or "RESOURCE_EXHAUSTED" in text or "exceeds the HBM" in text.lower()


@dataclasses.dataclass(frozen=True)
class SliceBuild:
    """The trainer's step built ONCE for a TPU slice (compile-only devices): the train step and
    every evaluator's image step compile from the same model, params and shardings."""

    run: RunConfig
    spec: Slice
    mesh: jax.sharding.Mesh
    shapes: BatchShapes  # The global batch's shapes (experiment.input_shapes).
    parts: StepParts

    def compile_train_step(self, *, model_flops: float | None = None) -> CompiledReport:
        """Compiles and analyses the train step; a program over HBM is reported (`oom`)."""
        spec, examples = self.spec, self.run.input.global_batch
        start = time.perf_counter()
        lowered = self.parts.step_fn.lower(self.parts.abstract_state,
                                           abstract_batch(self.parts, self.shapes, self.run))
        try:
            compiled = lowered.compile()
        except Exception as e:  # The TPU compiler reports HBM overflow as a runtime error.
            if not is_hbm_oom(e):
                raise
            message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            return CompiledReport(spec.name, spec.chips, spec.chip, examples,
                                  time.perf_counter() - start, oom=message[:400])
        return analyse(compiled, spec.chip, slice_name=spec.name, chips=spec.chips,
                       examples_per_step=examples, compile_seconds=time.perf_counter() - start,
                       model_flops=model_flops)

    def compile_eval_steps(self) -> dict[str, CompiledReport]:
        """Compiles each evaluator's image-embedding step (its batch size and pp's image size,
        the trainer's params and shardings); {evaluator name: report}. Evaluators whose pp does
        not fix the image size (or NaFlex ones) are left out."""
        spec, parts = self.spec, self.parts
        if not self.run.evals or isinstance(self.shapes["image"], dict):
            return {}
        params = parts.abstract_state["params"]
        embedder = Embedder(parts.model, self.mesh, self.run.mesh.batch_axes,
                            parts.shardings["params"])
        reports = {}
        for ev in self.run.evals:
            image_hw = pp_image_size(ev.pp, ev.data)
            if image_hw is None:
                continue
            batch = max(embedder.num_shards, ev.batch_size // embedder.num_shards
                        * embedder.num_shards)
            images = jax.ShapeDtypeStruct((batch, *image_hw, 3), jnp.float32,
                                          sharding=parts.data_sharding["image"])
            start = time.perf_counter()
            lowered = embedder.image_step.lower(params, images)
            try:
                compiled = lowered.compile()
            except Exception as e:  # The TPU compiler reports HBM overflow as a runtime error.
                if not is_hbm_oom(e):
                    raise
                reports[ev.name] = CompiledReport(spec.name, spec.chips, spec.chip, batch,
                                                  time.perf_counter() - start,
                                                  oom=str(e).strip().splitlines()[0][:400])
                continue
            reports[ev.name] = analyse(compiled, spec.chip, slice_name=spec.name,
                                       chips=spec.chips, examples_per_step=batch,
                                       compile_seconds=time.perf_counter() - start)
        return reports


def build_for_slice(run: RunConfig, slice_name: str | Slice) -> SliceBuild:
    """Builds the trainer's step of `run` (experiment.build_step: its mesh, rules, loss,
    dtypes, scan and remat) once on compile-only devices of a TPU slice; nothing compiled yet."""
    spec = parse_slice(slice_name) if isinstance(slice_name, str) else slice_name
    shapes = input_shapes(run)
    if shapes is None:
        raise ConfigError("cannot tell the training image size: input.pp has no resize/crop "
                          "or patchify op and input.data has no image_size")
    mesh = mesh_of(run.mesh, compile_only_devices(spec))
    return SliceBuild(run, spec, mesh, shapes, build_step(run, mesh, shapes))


def compile_train_step(run: RunConfig, slice_name: str | Slice, *,
                       model_flops: float | None = None) -> CompiledReport:
    """Compiles the trainer's own step of `run` for a TPU slice (compile-only devices) and
    analyses it (to compile the evaluators' steps too, build once with `build_for_slice`)."""
    return build_for_slice(run, slice_name).compile_train_step(model_flops=model_flops)


def compile_eval_steps(run: RunConfig, slice_name: str | Slice) -> dict[str, CompiledReport]:
    """Compiles each evaluator's image-embedding step for a TPU slice; {evaluator name: report}
    (see SliceBuild.compile_eval_steps); {} without evaluators or a known image size."""
    if not run.evals or input_shapes(run) is None:
        return {}
    return build_for_slice(run, slice_name).compile_eval_steps()


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def _seconds(s: float | None) -> str:
    if s is None:
        return "n/a"
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def format_report(report: CompiledReport) -> str:
    """A short human-readable report (per chip), saying what is exact and what is estimated."""
    chip = report.chip
    head = (f"compiled for {report.slice_name} ({report.chips} × {chip.label}) in "
            f"{report.compile_seconds:.1f} s")
    if report.oom is not None:
        return f"{head}\n  DOES NOT FIT {chip.label} HBM ({_gib(chip.hbm_bytes)}): {report.oom}"
    lines = [
        head,
        f"  memory per chip (compiler, exact): arguments {_gib(report.argument_bytes)}, "
        f"temp {_gib(report.temp_bytes)}, output {_gib(report.output_bytes)} "
        f"(aliased {_gib(report.alias_bytes)}), code {_gib(report.code_bytes)}",
        f"  total {_gib(report.total_bytes)} of {_gib(chip.hbm_bytes)} HBM "
        f"({100 * report.total_bytes / chip.hbm_bytes:.0f} %)"
        + ("" if report.fits else "  DOES NOT FIT"),
        f"  per chip per step: {report.flops:.3g} FLOPs, {report.bytes_accessed:.3g} bytes "
        f"accessed, {report.collective_total:.3g} bytes through collectives "
        + "(" + ", ".join(f"{k} {v:.3g}" for k, v in report.collectives.items() if v) + ")",
        f"  (loops counted per trip; the compiler's cost analysis, loop bodies once: "
        f"{report.compiler_flops:.3g} FLOPs, {report.compiler_bytes_accessed:.3g} bytes)",
    ]
    bounds = report.bounds()
    lines.append(
        f"  step time (ESTIMATE, roofline lower bound): {_seconds(report.step_seconds)}, "
        f"{report.bound}-bound (compute {_seconds(bounds['compute'])}, HBM "
        f"{_seconds(bounds['memory'])}, ICI {_seconds(bounds['collectives'])})")
    if report.examples_per_second:
        what = "model" if report.model_flops else "compiler"
        lines.append(f"  → {report.examples_per_second:,.0f} examples/s, MFU ≤ "
                     f"{100 * report.mfu:.0f} % ({what} FLOPs at that time)")
        if report.model_flops_exceed:
            lines.append(f"  note: the planner's model FLOPs ({report.model_flops:.3g}) exceed "
                         f"the compiled step's ({report.flops:.3g}); work inside a lax.cond "
                         "(objectives that switch on mid-run) is counted by the planner in "
                         "full, by the compiler partly: MFU uses the compiled count")
    if report.optimal_seconds is not None:
        lines.append(f"  the compiler's own estimate (optimal_seconds): "
                     f"{_seconds(report.optimal_seconds)}")
    elif report.compiler_optimal_seconds is not None:
        lines.append(f"  the compiler's own estimate is not usable "
                     f"(optimal_seconds = {report.compiler_optimal_seconds:.3g})")
    return "\n".join(lines)
