"""The planner's verdict: a training config on a slice → a `Plan` (numbers and problems).

`make_plan(config, parse_topology("v4-256"))` parses the config once and runs the trainer's
own builders (`experiment.build_step`) on an `AbstractMesh` of the slice's shape, so the
parameter and optimizer-state bytes per chip are those of the trainer's sharded abstract
state; activations and FLOPs come from the analytic cost model (cost_model.py). Nothing is
allocated and no data is read. `plan.py` is the command line and the report.

A plan has errors (do not launch) when: the config has unknown keys or bad values; the mesh
does not fit the slice; the global batch does not divide over the batch axes, the hosts or
the accumulation steps; a sharding rule matches no parameter; a schedule group is frozen but
some of its parameters are trained by an earlier group (or a frozen tower would stay at its
random init); a checkpoint, tokenizer or data path is missing (a local one, or a gs:// one
that can be reached; or the data path is still the recipes' placeholder); a pp string names
an unknown op or passes it bad arguments; or the estimated memory exceeds the chip's HBM.
"""

from __future__ import annotations

import dataclasses
import glob
import inspect
import math
import os
import re
from collections.abc import Sequence

import jax.numpy as jnp
import ml_collections
from jax.sharding import AbstractMesh

from siglip_jax import cost_model, fsutil
from siglip_jax.cost_model import DecoderShape, ExtraPass, Tower
from siglip_jax.data import pp
from siglip_jax.data.tokenizer import Tokenizer
from siglip_jax.experiment import (
    StepParts,
    build_step,
    check_batch,
    check_vocab,
    image_input_dtype,
    image_input_keys,
    input_shapes,
)
from siglip_jax.metrics import PEAK_FLOPS_PER_CHIP
from siglip_jax.optim import frozen_group_problems
from siglip_jax.recipes import PLACEHOLDER
from siglip_jax.records import ConfigError
from siglip_jax.schema import RunConfig, parse
from siglip_jax.sharding import ShardingError, mesh_shape
from siglip_jax.tpu_slices import GiB, SliceError, format_bytes, parse_slice

MEMORY_ERROR = "estimated memory per chip"  # How the analytic memory error starts.


# ----------------------------------------------------------------------------- the slice


@dataclasses.dataclass(frozen=True)
class Topology:
    """A slice: how many JAX devices (chips), their memory and peak FLOP/s, and hosts."""

    name: str
    label: str
    chips: int
    hosts: int
    hbm_bytes: int
    peak_flops: float  # Per chip.
    source: str


class PlanError(ValueError):
    """A topology or command-line value the planner cannot use."""


def parse_topology(name: str, cpu_memory_bytes: int | None = None) -> Topology:
    """"v4-256" → 128 chips of 32 GiB (tpu_slices.parse_slice); also cpu-N (N emulated
    devices sharing this host's memory)."""
    m = re.fullmatch(r"cpu-(\d+)", name.strip().lower())
    if m:
        count = int(m.group(1))
        if count < 1:
            raise PlanError(f"topology {name!r}: the size must be at least 1")
        memory = cpu_memory_bytes or _host_memory_bytes()
        return Topology(name, "emulated CPU device", count, 1, memory // count,
                        PEAK_FLOPS_PER_CHIP["cpu"] / count,
                        "host RAM (os.sysconf); peak: an assumed 165 GFLOP/s f32 for the host "
                        "(a 2-core AMD Zen 3), not measured here")
    try:
        spec = parse_slice(name)
    except SliceError as e:
        raise PlanError(str(e).replace("TPU slice", "topology").replace(
            " or v4:2x2x4", ", v4:2x2x4 or cpu-8")) from None
    chip = spec.chip
    return Topology(name, f"{chip.label} chip", spec.chips, spec.hosts, chip.hbm_bytes,
                    chip.peak_flops,
                    f"HBM, peak bf16 FLOP/s and chips per host as {chip.source} states them")


def _host_memory_bytes() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 16 * GiB


def resolve_mesh(mesh_spec: Sequence[tuple[str, int]], devices: int) -> dict[str, int]:
    """Axis sizes of the config's mesh on `devices` chips (one size may be -1)."""
    try:
        return mesh_shape(mesh_spec, devices)
    except ValueError as e:
        raise PlanError(str(e).replace("devices", "chips")) from None


# ----------------------------------------------------------------------------- the plan


@dataclasses.dataclass
class Plan:
    """Everything the planner computed; `errors` non-empty means: do not launch."""

    config_name: str
    topology: Topology
    run: RunConfig | None = None  # The parsed config (None if it does not parse).
    mesh: dict[str, int] = dataclasses.field(default_factory=dict)
    batch_axes: tuple[str, ...] = ()
    params: dict[str, int] = dataclasses.field(default_factory=dict)
    image_hw: tuple[int, int] | None = None
    image_tokens: int | None = None  # NaFlex: the patch budget N.
    example_bytes: int = 0  # One preprocessed example (image, token ids, objectives' entries).
    text_len: int | None = None
    global_batch: int = 0
    accum: int = 1
    per_device_batch: float = 0.0
    bytes: dict[str, int] = dataclasses.field(default_factory=dict)
    flops: dict[str, float] = dataclasses.field(default_factory=dict)
    total_steps: int = 0
    dataset_size: int | None = None
    mfu: float = 0.4
    towers: tuple[Tower, ...] = ()
    decoder: DecoderShape | None = None
    passes: tuple[ExtraPass, ...] = ()  # Extra image-tower passes of the objectives.
    frozen: tuple[str, ...] = ()
    errors: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def memory_total(self) -> int:
        """Estimated peak bytes per chip."""
        return sum(self.bytes.values())

    @property
    def step_seconds(self) -> float | None:
        """Estimated seconds per step at the assumed MFU."""
        flops = self.flops.get("model")
        if not flops or not self.topology.peak_flops:
            return None
        return flops / (self.topology.chips * self.topology.peak_flops * self.mfu)


def make_plan(config: ml_collections.ConfigDict, topology: Topology, *,
              config_name: str = "config", dataset_size: int | None = None,
              mfu: float = 0.4) -> Plan:
    """Parses `config` (once: a config that does not parse is the plan's error) and computes
    its plan on `topology` (nothing is allocated; no data is read)."""
    plan = Plan(config_name, topology, dataset_size=dataset_size, mfu=mfu)
    try:
        plan.run = run = parse(config)
    except ConfigError as e:
        plan.errors.append(str(e))
        return plan
    _analyse(run, plan)
    check_pp_strings(run, plan)
    check_paths(run, plan)
    return plan


def _analyse(run: RunConfig, plan: Plan) -> None:
    """Fills `plan` in step by step, from the trainer's own builders on an abstract mesh."""
    plan.total_steps = run.total_steps
    if run.peak_flops:
        plan.topology = dataclasses.replace(plan.topology, peak_flops=run.peak_flops)
    if not _mesh_and_batch(run, plan):
        return
    parts = _step_parts(run, plan)
    if parts is None:
        return
    _memory(run, plan, parts)
    plan.flops = cost_model.step_flops(plan.towers, plan.decoder, plan.passes, plan.frozen,
                                       global_batch=plan.global_batch, accum=plan.accum)


def _mesh_and_batch(run: RunConfig, plan: Plan) -> bool:
    """Mesh axis sizes and batch divisibility (the trainer's own check)."""
    topology = plan.topology
    try:
        plan.mesh = resolve_mesh(run.mesh.axes, topology.chips)
    except PlanError as e:
        plan.errors.append(str(e))
        return False
    plan.batch_axes = run.mesh.batch_axes
    shards = math.prod(plan.mesh[a] for a in plan.batch_axes)
    plan.global_batch, plan.accum = run.input.global_batch, run.grad_accum_steps
    axes = " × ".join(f"{a}={plan.mesh[a]}" for a in plan.batch_axes)
    try:
        check_batch(run, shards, topology.hosts, f"({axes}) of {topology.name}")
    except ConfigError as e:
        plan.errors.append(str(e))
    plan.per_device_batch = plan.global_batch / shards
    return True


def _step_parts(run: RunConfig, plan: Plan) -> StepParts | None:
    """The trainer's StepParts (model, optimizer, abstract state, shardings) on an abstract
    mesh of the slice's shape; None (with the errors noted) if the config cannot build them."""
    plan.text_len = run.tokenizer.max_len
    shapes = input_shapes(run, max(1, plan.global_batch // plan.accum))
    if shapes is None:
        plan.errors.append("cannot tell the training image size: input.pp has no resize/crop "
                           "or patchify op and input.data has no image_size")
        return None
    image = shapes["image"]
    plan.image_hw = None if isinstance(image, dict) else tuple(image[1:3])
    plan.image_tokens = image["mask"][1] if isinstance(image, dict) else None
    image_dtype = image_input_dtype(run)  # Bytes per image value on the device:
    pixel = jnp.dtype(image_dtype).itemsize if image_dtype else 4
    plan.example_bytes = 4 * plan.text_len + (
        4 * math.prod(image["patches"][1:]) + image["mask"][1] + 8 if isinstance(image, dict)
        else pixel * math.prod(image[1:])) + sum(  # + the objectives' entries: views (as the
        (pixel if k in image_input_keys(run) else 4) * math.prod(v[1:])  # image), decoder
        for k, v in shapes.items()  # tokens (≤ 4 bytes a value).
        if k not in ("image", "labels") and not isinstance(v, dict))
    mesh = AbstractMesh(tuple(plan.mesh.values()), tuple(plan.mesh))
    try:
        parts = build_step(run, mesh, shapes)
        plan.towers = cost_model.towers_from_model(
            parts.model, plan.image_tokens or plan.image_hw, plan.text_len)
        dec_options = run.loss.objectives.get("decoder", {})
        plan.decoder = cost_model.decoder_shape(
            parts.model, plan.towers[0].tokens, int(dec_options.get("tasks_per_example", 1)),
            int(dec_options.get("vocab_chunk", 0)))
        plan.passes = cost_model.objective_passes(run.loss.objectives, plan.towers[0])
    except ShardingError as e:
        plan.errors.append(f"sharding_rules: {e}")
        return None
    except ConfigError as e:
        plan.errors.append(str(e))
        return None
    except (ValueError, KeyError, TypeError) as e:
        plan.errors.append(f"config.model: {e}")
        return None
    params = parts.abstract_state["params"]
    plan.params = cost_model.param_counts(params)
    _note_unsharded(run, plan, parts)
    plan.errors.extend(frozen_group_problems(run.optim, params, run.model_init.parts()))
    plan.frozen = cost_model.frozen_towers(params, parts.frozen)
    return parts


def _memory(run: RunConfig, plan: Plan, parts: StepParts) -> None:
    """Bytes per chip (cost_model.memory_bytes); an error if they exceed the chip's HBM."""
    micro = max(1, plan.global_batch // (math.prod(plan.mesh[a] for a in plan.batch_axes)
                                         * plan.accum))
    plan.bytes = cost_model.memory_bytes(
        parts.abstract_state, parts.shardings, parts.frozen, plan.towers, plan.decoder,
        plan.passes, plan.frozen, micro=micro,
        loss_batch=plan.global_batch // plan.accum, accum=plan.accum, loss_impl=run.loss.impl,
        input_bytes=int(plan.per_device_batch) * plan.example_bytes)  # All micro-batches.
    topology = plan.topology
    if plan.memory_total > topology.hbm_bytes:
        parts_text = ", ".join(f"{k} {format_bytes(v)}" for k, v in plan.bytes.items())
        plan.errors.append(f"{MEMORY_ERROR} {format_bytes(plan.memory_total)} exceeds the "
                           f"{format_bytes(topology.hbm_bytes)} HBM of a {topology.label} "
                           f"({parts_text}); use more chips, fsdp, remat or grad_accum_steps")
    elif plan.memory_total > 0.85 * topology.hbm_bytes:
        plan.notes.append(f"the estimate uses {plan.memory_total / topology.hbm_bytes:.0%} of "
                          "HBM: little headroom for XLA's own buffers")


def _note_unsharded(run: RunConfig, plan: Plan, parts: StepParts) -> None:
    """A note for large parameters an fsdp rule had to leave replicated (no divisible dim)."""
    if not any(str(rule).startswith("fsdp") for _, rule in run.mesh.rules):
        return
    left = cost_model.unsharded_params(parts.abstract_state["params"],
                                       parts.shardings["params"])
    if left:
        plan.notes.append(f"{len(left)} parameter(s) of >= 1M elements stay replicated under "
                          f"the fsdp rule (no dimension divisible by the axis), e.g. "
                          f"{left[0][0]!r} {left[0][1]}")


# ----------------------------------------------------------------------------- checks


REMOTE_TIMEOUT_S = 30.0  # How long the planner waits for a gs:// look-up.


def _check_path(what: str, path: str, notes: list[str], errors: list[str],
                pattern: bool = False) -> bool:
    """A path must exist (a glob must match); a remote one (gs://) is looked up if it can be
    reached, else noted as not checked; the recipes' placeholders (containing YOUR_BUCKET) are
    errors. Whether the path was found."""
    if not path:
        return False
    if PLACEHOLDER in path:
        errors.append(f"{what} is the placeholder {path!r}: pass the real path as a config "
                      "argument (see the config's docstring)")
        return False
    if fsutil.is_remote(path):
        found, _ = fsutil.remote_lookup(path, pattern=pattern, timeout_s=REMOTE_TIMEOUT_S)
        if found is None:  # The same words whatever the cause: plan reports stay comparable.
            notes.append(f"{what} {path!r} is remote and could not be reached (no credentials, "
                         f"no network or no answer in {REMOTE_TIMEOUT_S:.0f} s): not checked "
                         "here")
            return False
    else:
        expanded = os.path.expanduser(path)
        found = bool(glob.glob(expanded)) if pattern else os.path.exists(expanded)
    if not found:
        errors.append(f"{what}: no file matches {path!r}" if pattern
                      else f"{what}: not found: {path!r}")
    return found


def check_pp_strings(run: RunConfig, plan: Plan) -> None:
    """Every pp string (input.pp, evals.*.pp) parses, names registered ops, and passes each op
    arguments its signature accepts (the ops are not built: that needs the tokenizer)."""
    strings = [("input.pp", run.input.pp)]
    strings += [(f"evals.{e.name}.pp", e.pp) for e in run.evals]
    for where, pp_string in strings:
        try:
            calls = pp.parse(str(pp_string))
        except pp.PPError as e:
            plan.errors.append(f"{where}: {e}")
            continue
        for call in calls:
            op = f"pp op #{call.index + 1} {call.text!r}"
            if call.name not in pp.OPS:
                plan.errors.append(f"{where}: {op}: unknown op {call.name!r}; registered ops: "
                                   f"{', '.join(sorted(pp.OPS))}")
                continue
            try:
                inspect.signature(pp.OPS[call.name]).bind(None, *call.args, **call.kwargs)
            except TypeError as e:
                plan.errors.append(f"{where}: {op}: {e}")


def check_paths(run: RunConfig, plan: Plan) -> None:
    """model_init checkpoints, the tokenizer and the training data (local ones must exist)."""
    for key, path in run.model_init.parts().items():
        _check_path(f"model_init.{key} checkpoint", path, plan.notes, plan.errors)
    tok = run.tokenizer.model
    if _check_path("tokenizer.model", tok, plan.notes, plan.errors):
        vocab = plan.towers[1].vocab_size if len(plan.towers) > 1 else None
        try:
            check_vocab(Tokenizer(tok), vocab)
        except ConfigError as e:
            plan.errors.append(str(e))
    data = run.input.data
    if data.name == "tar":
        patterns = data.pattern or ""
        if not patterns:
            plan.errors.append("input.data.pattern is empty: pass the tar shards (data=...)")
        for pattern in [patterns] if isinstance(patterns, str) else list(patterns):
            _check_path("input.data.pattern", pattern, plan.notes, plan.errors, pattern=True)
