"""The planner: check a training config against a TPU slice before renting it.

    python -m siglip_jax.plan --config configs/x.py[:arg] --topology v4-256 \
        [--config.key=value ...] [--dataset-size N] [--mfu 0.4] [--compile]

Nothing is allocated: the trainer's own builders (`experiment.build_step`) run on an
`AbstractMesh` of the slice's shape, so the parameter and optimizer-state bytes per chip are
those of the trainer's sharded abstract state. `--compile` also compiles that step for the
slice with the real TPU compiler (compile-only devices from libtpu, see compiled_step.py) and
prints its exact memory per chip, FLOPs and a roofline time estimate next to the analytic
ones; the compiled number then decides whether the step fits. Printed: parameters per
tower; params, optimizer state, gradients and activations per chip against the chip's HBM;
the per-device batch; steps per epoch; FLOPs per step and a time estimate at an assumed MFU.

What is exact and what is estimated:
  * params, optimizer state, gradients: exact bytes of the sharded arrays (shapes × dtypes ÷
    the shard counts the rules give), not counting XLA's buffer padding;
  * activations: an ANALYTIC estimate of what the backward pass keeps (per block: residual,
    LayerNorm outputs, q/k/v, attention logits and probabilities, MLP hidden), following the
    towers' dtype and remat policy, plus the ring loss's per-device blocks; XLA may fuse some
    of these away or keep extra temporaries (the test suite compares it with XLA's own
    number for small models);
  * FLOPs: ANALYTIC matmul FLOPs (2·m·n·k per dense/attention product), training =
    3 × forward for trained towers and 1 × forward for frozen ones (the usual MFU
    convention); recomputation under remat is reported separately, not counted as useful.

It exits non-zero with one line per problem when: the config cannot be loaded or has unknown
keys; the mesh does not fit the slice; the global batch does not divide over the batch axes,
the hosts or the accumulation steps; a sharding rule matches no parameter; a schedule group
is frozen but some of its parameters are trained by an earlier group (or a frozen tower would
stay at its random init); a local checkpoint, tokenizer or data path is missing (or the data
path is still the recipes' placeholder); a pp string names an unknown op or passes it bad
arguments; or the estimated (or, with --compile, the compiled) memory exceeds the chip's HBM.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import math
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

import jax

from siglip_jax.config import ConfigError
from siglip_jax.console import quiet_startup
from siglip_jax.schema import RunConfig, parse

GiB = 1024**3
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
    from siglip_jax.metrics import PEAK_FLOPS_PER_CHIP
    from siglip_jax.tpu_slices import SliceError, parse_slice

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
    from siglip_jax.sharding import mesh_shape

    try:
        return mesh_shape(mesh_spec, devices)
    except ValueError as e:
        raise PlanError(str(e).replace("devices", "chips")) from None


# ----------------------------------------------------------------------------- the model


@dataclasses.dataclass(frozen=True)
class Tower:
    """The dimensions of one transformer tower that memory and FLOPs depend on."""

    name: str
    tokens: int
    width: int
    depth: int
    mlp_dim: int
    heads: int
    act_bytes: int
    remat: str
    pool: str
    out_dim: int | None
    patch_input: int = 0  # patch_h * patch_w * channels (image tower), 0 for text.
    vocab_size: int | None = None  # Text tower only.


def towers_from_model(model: Any, image: tuple[int, int] | int, text_len: int
                      ) -> tuple[Tower, Tower]:
    """The image and text Tower of a two-towers model at the given input sizes (`image`: the
    (H, W) of fixed-resolution images, or a NaFlex patch budget N)."""
    import jax.numpy as jnp

    from siglip_jax.models.two_towers import towers

    vit, txt = towers(model)
    ph, pw = (vit.patch_size, vit.patch_size) if isinstance(vit.patch_size, int) \
        else tuple(vit.patch_size)
    tokens = image if isinstance(image, int) else (image[0] // ph) * (image[1] // pw)
    tokens += 1 if vit.pool_type == "tok" else 0

    def nbytes(dtype: Any) -> int:
        return jnp.dtype(dtype or jnp.float32).itemsize

    image = Tower("img", tokens, vit.width, vit.depth, vit.mlp_dim or 4 * vit.width,
                  vit.num_heads, nbytes(vit.dtype), vit.remat_policy, vit.pool_type,
                  vit.num_classes, ph * pw * 3)
    text = Tower("txt", text_len, txt.width, txt.depth, txt.mlp_dim or 4 * txt.width,
                 txt.num_heads, nbytes(txt.dtype), txt.remat_policy, txt.pool_type,
                 txt.num_classes, vocab_size=txt.vocab_size)
    return image, text


def forward_flops(t: Tower) -> float:
    """Matmul FLOPs of one example through the tower (analytic, 2 FLOPs per multiply-add)."""
    n, d, m = t.tokens, t.width, t.mlp_dim
    per_block = 2 * n * 4 * d * d + 2 * 2 * n * n * d + 2 * 2 * n * d * m
    flops = t.depth * per_block + 2 * n * t.patch_input * d  # + patch embedding (image).
    if t.pool == "map":  # One probe query: q/out projections, k/v over n tokens, MLP.
        flops += 2 * 2 * d * d + 2 * 2 * n * d * d + 2 * 2 * n * d + 2 * 2 * d * m
    if t.out_dim:
        flops += 2 * d * t.out_dim
    return float(flops)


@dataclasses.dataclass(frozen=True)
class DecoderShape:
    """The LocCa caption decoder's shape (models/decoder.py) for the estimates."""

    tokens: int  # max_len L
    image_tokens: int  # N, cross-attention keys
    image_width: int
    width: int
    depth: int
    mlp_dim: int
    heads: int
    vocab_size: int
    act_bytes: int
    remat: str
    rows: int = 1  # Decoder sequences per image (loss.decoder.tasks_per_example).


def decoder_shape(model: Any, image_tokens: int, rows: int = 1) -> DecoderShape | None:
    """The decoder of a two-towers model (None without one), at `image_tokens` keys, run on
    `rows` sequences per image."""
    import jax.numpy as jnp

    from siglip_jax.models.decoder import make_decoder
    from siglip_jax.models.two_towers import towers
    from siglip_jax.models.variants import text_kwargs

    if model.decoder is None:
        return None
    vit, txt = towers(model)
    dec = make_decoder(model.decoder, text_kwargs(model.text), txt.vocab_size)
    return DecoderShape(dec.max_len, image_tokens, vit.width, dec.width, dec.depth,
                        dec.mlp_dim or 4 * dec.width, dec.num_heads, dec.vocab_size,
                        jnp.dtype(dec.dtype or jnp.float32).itemsize, dec.remat_policy, rows)


def decoder_forward_flops(d: DecoderShape) -> float:
    """Matmul FLOPs of one example through the decoder: per block self-attention over L
    tokens, cross-attention to N image tokens, MLP; the image projection and output layer."""
    n, k, w, m = d.tokens, d.image_tokens, d.width, d.mlp_dim
    self_attn = 2 * n * 4 * w * w + 2 * 2 * n * n * w
    cross = 2 * n * 2 * w * w + 2 * k * 2 * d.image_width * w + 2 * 2 * n * k * w
    per_block = self_attn + cross + 2 * 2 * n * w * m
    proj = 2 * k * d.image_width * w if d.image_width != w else 0
    return float(d.depth * per_block + proj + 2 * n * w * d.vocab_size)


def decoder_activation_bytes(d: DecoderShape, batch: int) -> int:
    """Bytes the decoder keeps for its backward pass for `batch` examples: per block (as a
    tower block of L tokens, plus cross-attention q/out, k/v of N image tokens and the
    [heads, L, N] logits and probabilities), the projected image tokens, and the float32
    logits, log-probabilities and their gradient [L, V]."""
    a, n, k, w = d.act_bytes, d.tokens, d.image_tokens, d.width
    block = _block_bytes(Tower("dec", n, w, d.depth, d.mlp_dim, d.heads, a, d.remat, "none",
                               None))
    block += n * w * (2 * a + 2 * 4) + 2 * k * w * a + 2 * d.heads * n * k * a
    embed = n * w * a
    if d.remat == "nothing_saveable":
        kept = d.depth * embed + 2 * block
    else:
        kept = d.depth * block
    return batch * (kept + embed + k * w * a + 3 * 4 * n * d.vocab_size)


def _block_bytes(t: Tower) -> int:
    """Bytes one block keeps for its backward pass, per example (no remat).

    Per token: the block input, both residual streams, q/k/v and the attention output at the
    activation dtype; LayerNorm normalised values and outputs in float32 (float32 scale and
    bias); the MLP hidden before and after GELU plus its tanh; attention logits and
    probabilities [heads, tokens, tokens].
    """
    a, f32 = t.act_bytes, 4
    per_token_width = a + 3 * a + a + a + 4 * f32
    return (t.tokens * t.width * per_token_width + 3 * t.tokens * t.mlp_dim * a
            + 2 * t.heads * t.tokens * t.tokens * a)


def activation_bytes(t: Tower, batch: int, trained: bool) -> tuple[int, int]:
    """(bytes kept until the backward pass, peak working bytes) of the tower for `batch`.

    A trained tower without remat keeps every block's tensors and needs one block's worth
    more for the backward pass of a block; with `nothing_saveable` it keeps only each block's
    input and works on one recomputed block plus its backward (2 blocks); other policies save
    matmul outputs and are counted as no remat (an upper bound). A frozen tower keeps
    nothing and works on one block at a time.
    """
    block = _block_bytes(t) * batch
    embed = t.tokens * t.width * t.act_bytes * batch
    if not trained:
        return 0, block + embed
    if t.remat == "nothing_saveable":
        return t.depth * embed + embed, 2 * block
    return t.depth * block + embed, block


@dataclasses.dataclass(frozen=True)
class ExtraPass:
    """An extra image-tower pass of an objective (self-distillation, masked prediction)."""

    tower: Tower  # At the pass's input size.
    per_image: int  # Tower inputs per training image (local crops per image, or 1).
    trained: bool  # False for the EMA teacher (forward only).
    head_rows: int = 0  # Rows through the projection head per training image.
    prototypes: int = 0


def objective_passes(run: RunConfig, image: Tower) -> tuple[ExtraPass, ...]:
    """The extra passes of the configured self-distillation / masked-prediction objectives
    (one teacher forward on the full image serves both)."""
    objectives = run.loss.objectives
    passes = []
    if "self_distillation" in objectives:
        o = objectives["self_distillation"]
        grid = o["local_size"] // math.isqrt(image.patch_input // 3)  # Square patches.
        local = dataclasses.replace(image, tokens=grid * grid + (image.pool == "tok"))
        passes.append(ExtraPass(local, o["n_local"], True, o["n_local"], o["prototypes"]))
        passes.append(ExtraPass(image, 1, False, 1, o["prototypes"]))
    if "masked_prediction" in objectives:
        o = objectives["masked_prediction"]
        rows = max(1, round(o["mask_ratio"] * image.tokens))
        passes.append(ExtraPass(image, 1, True, rows, o["prototypes"]))
        if "self_distillation" not in objectives:
            passes.append(ExtraPass(image, 1, False, 0, 0))
        passes.append(ExtraPass(image, 0, False, rows, o["prototypes"]))  # Teacher's head.
    return tuple(passes)


def loss_bytes(per_device_batch: int, global_batch: int, dim: int, impl: str) -> int:
    """Per-device memory of the sigmoid loss: logits blocks and embedding blocks (float32)."""
    b = per_device_batch
    cols = global_batch if impl in ("all_gather", "softmax", "dense") else b
    return 4 * (3 * b * cols + 4 * b * dim + 2 * cols * dim)


# ----------------------------------------------------------------------------- the plan


@dataclasses.dataclass
class Plan:
    """Everything the planner computed; `errors` non-empty means: do not launch."""

    config_name: str
    topology: Topology
    mesh: dict[str, int] = dataclasses.field(default_factory=dict)
    batch_axes: tuple[str, ...] = ()
    params: dict[str, int] = dataclasses.field(default_factory=dict)
    image_hw: tuple[int, int] | None = None
    image_tokens: int | None = None  # NaFlex: the patch budget N.
    example_bytes: int = 0  # One preprocessed example (image + token ids).
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


def _check_path(what: str, path: str, notes: list[str], errors: list[str],
                pattern: bool = False) -> None:
    """A local path must exist (a glob must match); a remote one is noted, not checked; the
    recipes' placeholders (containing YOUR_BUCKET) are errors."""
    from siglip_jax.recipes import PLACEHOLDER

    if not path:
        return
    if PLACEHOLDER in path:
        errors.append(f"{what} is the placeholder {path!r}: pass the real path as a config "
                      "argument (see the config's docstring)")
        return
    if "://" in path:
        notes.append(f"{what} {path!r} is remote: not checked here")
        return
    expanded = os.path.expanduser(path)
    if pattern:
        if not glob.glob(expanded):
            errors.append(f"{what}: no file matches {path!r}")
    elif not os.path.exists(expanded):
        errors.append(f"{what}: not found: {path!r}")


def check_pp_strings(run: RunConfig, plan: Plan) -> None:
    """Every pp string (input.pp, evals.*.pp) parses, names registered ops, and passes each op
    arguments its signature accepts (the ops are not built: that needs the tokenizer)."""
    import inspect

    from siglip_jax.data import pp

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
    errors_before = len(plan.errors)
    _check_path("tokenizer.model", tok, plan.notes, plan.errors)
    if tok and "://" not in tok and len(plan.errors) == errors_before:
        from siglip_jax.data.tokenizer import Tokenizer
        from siglip_jax.experiment import check_vocab

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


def make_plan(config: Any, topology: Topology, *, config_name: str = "config",
              dataset_size: int | None = None, mfu: float = 0.4) -> Plan:
    """Computes the plan of `config` on `topology` (nothing is allocated; no data is read)."""
    plan = Plan(config_name, topology, dataset_size=dataset_size, mfu=mfu)
    try:
        run = parse(config)
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
    _flops(plan)


def _mesh_and_batch(run: RunConfig, plan: Plan) -> bool:
    """Mesh axis sizes and batch divisibility (the trainer's own check)."""
    from siglip_jax.experiment import check_batch

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


def _step_parts(run: RunConfig, plan: Plan) -> Any:
    """The trainer's StepParts (model, optimizer, abstract state, shardings) on an abstract
    mesh of the slice's shape; None (with the errors noted) if the config cannot build them."""
    from jax.sharding import AbstractMesh

    from siglip_jax.experiment import build_step, input_shapes
    from siglip_jax.optim import frozen_group_problems
    from siglip_jax.sharding import ShardingError, tree_paths

    plan.text_len = run.tokenizer.max_len
    shapes = input_shapes(run, max(1, plan.global_batch // plan.accum))
    if shapes is None:
        plan.errors.append("cannot tell the training image size: input.pp has no resize/crop "
                           "or patchify op and input.data has no image_size")
        return None
    image = shapes["image"]
    plan.image_hw = None if isinstance(image, dict) else tuple(image[1:3])
    plan.image_tokens = image["mask"][1] if isinstance(image, dict) else None
    plan.example_bytes = 4 * plan.text_len + (
        4 * math.prod(image["patches"][1:]) + image["mask"][1] + 8 if isinstance(image, dict)
        else 4 * math.prod(image[1:]))
    mesh = AbstractMesh(tuple(plan.mesh.values()), tuple(plan.mesh))
    try:
        parts = build_step(run, mesh, shapes)
        plan.towers = towers_from_model(parts.model, plan.image_tokens or plan.image_hw,
                                        plan.text_len)
        plan.decoder = decoder_shape(parts.model, plan.towers[0].tokens, int(
            run.loss.objectives.get("decoder", {}).get("tasks_per_example", 1)))
        plan.passes = objective_passes(run, plan.towers[0])
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
    for name in ("img", "txt", "dec"):
        plan.params[name] = _count(params.get(name, {}))
    plan.params["total"] = _count(params)
    plan.params["other"] = plan.params["total"] - sum(plan.params[n] for n in ("img", "txt",
                                                                              "dec"))
    _note_unsharded(params, parts.shardings["params"], run.mesh.rules, plan)
    plan.errors.extend(frozen_group_problems(run.optim, params, run.model_init.parts()))
    paths = tree_paths(params)
    frozen = parts.frozen or jax.tree.map(lambda _: False, params)
    frozen_paths = {p for p, f in zip(paths, jax.tree.leaves(frozen), strict=True) if f}
    plan.frozen = tuple(t for t in ("img", "txt")
                        if any(p.startswith(t + "/") for p in paths)
                        and all(p in frozen_paths for p in paths if p.startswith(t + "/")))
    return parts


def _memory(run: RunConfig, plan: Plan, parts: Any) -> None:
    """Bytes per chip: exact for the trainer's sharded state, analytic for activations."""
    state, shardings = parts.abstract_state, parts.shardings
    frozen = parts.frozen or jax.tree.map(lambda _: False, state["params"])
    plan.bytes["params"] = sharded_bytes(state["params"], shardings["params"])
    plan.bytes["optimizer state"] = sharded_bytes(state["opt_state"], shardings["opt_state"])
    # Frozen params get no backward pass (step.py wraps them in stop_gradient).
    trained = jax.tree.map(lambda f, x: None if f else x, frozen, state["params"])
    plan.bytes["gradients"] = sharded_bytes(trained, jax.tree.map(
        lambda f, s: None if f else s, frozen, shardings["params"]))
    if plan.accum > 1:  # step.py accumulates the full gradient tree (zeros for frozen params).
        plan.bytes["gradient accumulator"] = plan.bytes["params"]

    micro = max(1, plan.global_batch // (math.prod(plan.mesh[a] for a in plan.batch_axes)
                                         * plan.accum))
    kept, working = 0, 0
    for tower in plan.towers:
        k, w = activation_bytes(tower, micro, trained=tower.name not in plan.frozen)
        kept, working = kept + k, max(working, w)
    for p in plan.passes:  # Objectives: student passes keep theirs, the teacher works.
        k, w = activation_bytes(p.tower, micro * p.per_image, trained=p.trained)
        kept, working = kept + k, max(working, w)
        kept += 3 * 4 * micro * p.head_rows * p.prototypes  # Head scores, softmax, targets.
    plan.bytes["activations"] = kept + working
    if plan.decoder is not None:
        plan.bytes["decoder activations"] = decoder_activation_bytes(plan.decoder,
                                                                     micro * plan.decoder.rows)
    if "teacher" in state:  # The EMA teacher: params only, no optimizer state.
        plan.bytes["EMA teacher"] = sharded_bytes(state["teacher"], shardings["teacher"])
    plan.bytes["loss"] = loss_bytes(micro, plan.global_batch // plan.accum, _embed_dim(plan),
                                    run.loss.impl)
    plan.bytes["input batch"] = int(plan.per_device_batch) * plan.example_bytes  # All micros.
    topology = plan.topology
    if plan.memory_total > topology.hbm_bytes:
        parts_text = ", ".join(f"{k} {_gib(v)}" for k, v in plan.bytes.items())
        plan.errors.append(f"{MEMORY_ERROR} {_gib(plan.memory_total)} exceeds the "
                           f"{_gib(topology.hbm_bytes)} HBM of a {topology.label} "
                           f"({parts_text}); use more chips, fsdp, remat or grad_accum_steps")
    elif plan.memory_total > 0.85 * topology.hbm_bytes:
        plan.notes.append(f"the estimate uses {plan.memory_total / topology.hbm_bytes:.0%} of "
                          "HBM: little headroom for XLA's own buffers")


def sharded_bytes(abstract: Any, shardings: Any) -> int:
    """Bytes one device holds of `abstract` laid out by `shardings` (None leaves skipped)."""
    total = 0
    for leaf, sharding in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings),
                              strict=True):
        total += math.prod(sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
    return total


def _embed_dim(plan: Plan) -> int:
    text = plan.towers[1]
    return text.out_dim or text.width


def _flops(plan: Plan) -> None:
    """Analytic FLOPs per step: 3 × forward for trained towers, 1 × for frozen, plus the loss."""
    model_flops = remat_flops = 0.0
    for tower in plan.towers:
        fwd = forward_flops(tower) * plan.global_batch
        trained = tower.name not in plan.frozen
        model_flops += fwd * (3 if trained else 1)
        if trained and tower.remat != "none":
            remat_flops += fwd
    if plan.decoder is not None:  # Always trained (its own or the default group).
        fwd = decoder_forward_flops(plan.decoder) * plan.global_batch * plan.decoder.rows
        model_flops += 3 * fwd
        remat_flops += fwd if plan.decoder.remat != "none" else 0.0
    for p in plan.passes:  # Heads are not counted (small next to the tower).
        model_flops += (forward_flops(p.tower) * plan.global_batch * p.per_image
                        * (3 if p.trained else 1))
    loss_fwd = 2.0 * plan.global_batch * (plan.global_batch / plan.accum) * _embed_dim(plan)
    plan.flops = {"model": model_flops + 3 * loss_fwd, "remat recompute": remat_flops}


def _count(tree: Any) -> int:
    import jax

    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))


def _note_unsharded(abstract: Any, shardings: Any, rules: Any, plan: Plan) -> None:
    """A note for large parameters an fsdp rule had to leave replicated (no divisible dim)."""
    import jax

    from siglip_jax.sharding import tree_paths

    if not any(str(rule).startswith("fsdp") for _, rule in rules):
        return
    left = [(p, x) for p, x, s in zip(tree_paths(abstract), jax.tree.leaves(abstract),
                                      jax.tree.leaves(shardings), strict=True)
            if math.prod(x.shape) >= 1_000_000 and tuple(s.shard_shape(x.shape)) == x.shape]
    if left:
        plan.notes.append(f"{len(left)} parameter(s) of >= 1M elements stay replicated under "
                          f"the fsdp rule (no dimension divisible by the axis), e.g. "
                          f"{left[0][0]!r} {tuple(left[0][1].shape)}")


# ----------------------------------------------------------------------------- output


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2**20:.1f} MiB"


def _rate(flops: float) -> str:
    return f"{flops / 1e12:.0f} TFLOP/s" if flops >= 1e12 else f"{flops / 1e9:.0f} GFLOP/s"


def _m(n: int) -> str:
    return f"{n / 1e6:.1f} M"


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
             f"({_gib(t.hbm_bytes)}, peak {_rate(t.peak_flops)} each), {t.hosts} host(s)",
             f"  chip facts    {t.source}"]
    if plan.mesh:
        mesh = " × ".join(f"{k}={v}" for k, v in plan.mesh.items())
        lines.append(f"  mesh          {mesh}; batch split over {', '.join(plan.batch_axes)}")
    if plan.params:
        p = plan.params
        dec = f"dec {_m(p['dec'])} | " if p.get("dec") else ""
        lines.append(f"  parameters    img {_m(p['img'])} | txt {_m(p['txt'])} | {dec}"
                     f"t, b {p['other']} | total {_m(p['total'])}"
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
            lines.append(f"    {key:<21}{_gib(value):>11}")
        share = plan.memory_total / t.hbm_bytes
        lines.append(f"    {'total':<21}{_gib(plan.memory_total):>11}  = {share:.0%} of the "
                     f"{_gib(t.hbm_bytes)} per chip")
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
    args, rest = parser.parse_known_args(argv)
    from siglip_jax.config import collect_overrides

    return args, collect_overrides(rest, parser.error)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: 0 = the plan is fine, 1 = problems found, 2 = bad input."""
    argv = quiet_startup(argv)
    # Planning never runs a TPU program: keep JAX on the CPU (with libtpu installed it would
    # otherwise try, and warn about, a TPU runtime); --compile gets compile-only TPU devices.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from siglip_jax.tpu_slices import libtpu_env_defaults

    libtpu_env_defaults()  # libtpu's start-up warnings, when it is installed and no TPU is.
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    from siglip_jax.config import ConfigError, load_config

    try:
        topology = parse_topology(args.topology)
        if not 0 < args.mfu <= 1:
            raise PlanError(f"--mfu {args.mfu} must be in (0, 1]")
        config = load_config(args.config, overrides)
    except (ConfigError, PlanError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    plan = make_plan(config, topology, config_name=args.config,
                     dataset_size=args.dataset_size, mfu=args.mfu)
    print(format_plan(plan), flush=True)
    if args.compile and not topology.label.startswith("emulated"):
        try:
            compile_error = compile_and_compare(config, args.topology, plan)
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


def compile_and_compare(config: Any, slice_name: str, plan: Plan) -> str | None:
    """Compiles the train step for the slice, prints the compiler's report next to the
    analytic estimate, and returns an error line if the compiled step does not fit."""
    from siglip_jax.compiled_step import build_for_slice, format_report

    hbm = plan.topology.hbm_bytes
    analytic_memory = [e for e in plan.errors if e.startswith(MEMORY_ERROR)]
    if len(plan.errors) > len(analytic_memory):
        print("  compile       skipped: fix the problems above first", flush=True)
        return None
    print(f"  compile       the trainer's step for {slice_name} (compile-only TPU devices) …",
          flush=True)
    model_flops = plan.flops.get("model")
    build = build_for_slice(config, slice_name)  # Built once: train and eval steps.
    report = build.compile_train_step(model_flops=model_flops
                                      and model_flops / plan.topology.chips)  # Per chip.
    print(format_report(report), flush=True)
    if report.oom is not None:
        return (f"the compiled train step does not fit the {_gib(hbm)} HBM of a "
                f"{plan.topology.label}: {report.oom}")
    print(f"  analytic vs compiled: {_gib(plan.memory_total)} estimated, "
          f"{_gib(report.total_bytes)} compiled per chip (ratio "
          f"{plan.memory_total / max(report.total_bytes, 1):.2f})", flush=True)
    if not report.fits:
        return (f"the compiled train step needs {_gib(report.total_bytes)} per chip, more than "
                f"the {_gib(hbm)} HBM of a {plan.topology.label}")
    if analytic_memory:  # The compiler's number is exact: it overrules the estimate.
        plan.errors = [e for e in plan.errors if e not in analytic_memory]
        print("  note: the analytic estimate is over the HBM but the compiled step fits; the "
              "compiler's number is exact", flush=True)
    return _compile_evaluators(build, plan)


def _compile_evaluators(build: Any, plan: Plan) -> str | None:
    """Compiles each evaluator's image step of a `compiled_step.SliceBuild` too; an error line
    if one does not fit."""
    for name, report in build.compile_eval_steps().items():
        if report.oom is not None or not report.fits:
            return (f"evals.{name}: the compiled image step at batch {report.examples_per_step} "
                    f"does not fit the {_gib(plan.topology.hbm_bytes)} HBM of a "
                    f"{plan.topology.label}; lower evals.{name}.batch_size")
        print(f"  eval {name:<8} image step at batch {report.examples_per_step}: "
              f"{_gib(report.total_bytes)} per chip (compiler), compiled in "
              f"{report.compile_seconds:.1f} s", flush=True)
    return None


if __name__ == "__main__":
    from siglip_jax.shutdown import run_main

    run_main(main)
