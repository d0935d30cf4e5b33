"""Experiment builders: from a parsed config and a device set, everything a run is made of.

The one place where a `RunConfig` (schema.py) becomes objects: the model, the tokenizer, the
input (batch shapes and the iterator), the optimizer, the abstract train state with its
shardings, and the jitted train step (the pretrained parts of `model_init` are loaded by
`checkpoints.open.load_model_init`). The trainer, the planner, the evaluation CLI and the
benchmarks all build through here; the device set may be real devices or compile-only ones
(a TPU slice compiled on a CPU machine), since nothing here allocates the model until
`init_state` is called.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from siglip_jax import losses
from siglip_jax import step as step_lib
from siglip_jax.data import input as input_lib
from siglip_jax.data import pp
from siglip_jax.data.builder import make_source
from siglip_jax.data.config import SourceConfig
from siglip_jax.data.pp import get_preprocess_fn
from siglip_jax.data.sources import Source
from siglip_jax.data.tokenizer import Tokenizer
from siglip_jax.models.build import make_model
from siglip_jax.models.config import decoder_vocab
from siglip_jax.models.two_towers import Model
from siglip_jax.objectives import registry as objectives
from siglip_jax.objectives.base import Objective, teacher_spec
from siglip_jax.optim import FROZEN, group_labels, make_optimizer
from siglip_jax.records import ConfigError
from siglip_jax.schema import RunConfig, TokenizerConfig
from siglip_jax.sharding import batch_sharding, num_batch_shards

BatchShape = tuple[int, ...] | dict[str, tuple[int, ...]]  # a NaFlex image is a dict
BatchShapes = dict[str, BatchShape]
# Where a tokenizer path may come from: a path, a data source or checkpoint with
# `tokenizer_path`, or a callable returning either.
TokenizerFallback = str | Source | Callable[[], object] | None


def setup_jax(run: RunConfig, num_processes: int = 1) -> None:
    """JAX settings that must be made before the backend starts (CPU device count, RNG)."""
    if run.cpu_devices % num_processes:
        raise ConfigError(f"cpu_devices={run.cpu_devices} does not split over {num_processes} "
                          "processes")
    jax.config.update("jax_threefry_partitionable", True)
    jax.config.update("jax_num_cpu_devices", run.cpu_devices // num_processes)


# ----------------------------------------------------------------------------- tokenizer


def resolve_tokenizer(tokenizer: TokenizerConfig, *fallbacks: TokenizerFallback,
                      vocab_size: int | None = None) -> Tokenizer:
    """The sentencepiece tokenizer: `tokenizer.model` if set, else the first fallback that gives
    a path (a path string, a data source with `tokenizer_path`, or a callable returning either);
    checked against the text tower's `vocab_size`."""
    path = tokenizer.model
    for fallback in fallbacks:
        if path:
            break
        value = fallback() if callable(fallback) else fallback
        path = value if isinstance(value, str) or value is None else getattr(
            value, "tokenizer_path", None)
    if not path:
        raise ConfigError("config.tokenizer.model is not set and neither a checkpoint nor the "
                          "data source provides a tokenizer; give a sentencepiece .model path")
    if "://" not in path and not os.path.exists(os.path.expanduser(path)):
        raise ConfigError(f"tokenizer file {path!r} does not exist")
    result = Tokenizer(os.path.expanduser(path) if "://" not in path else path)
    check_vocab(result, vocab_size)
    return result


def check_vocab(tokenizer: Tokenizer, vocab_size: int | None) -> None:
    """The text tower's embedding table must cover every id the tokenizer produces."""
    if vocab_size is not None and tokenizer.vocab_size > int(vocab_size):
        raise ConfigError(f"tokenizer.model {tokenizer.model_path!r} has {tokenizer.vocab_size} "
                          f"pieces but model.text.vocab_size is {vocab_size}: ids past it have "
                          "no embedding")


# ----------------------------------------------------------------------------- input


_SIZE_OPS = ("resize", "central_crop", "random_crop", "inception_crop")


def infer_image_size(run: RunConfig) -> tuple[int, int] | None:
    """The training image size without reading data: the last resize/crop op of input.pp,
    else input.data.image_size; None if neither says."""
    return pp_image_size(run.input.pp, run.input.data)


def pp_image_size(pp_string: str, data: SourceConfig) -> tuple[int, int] | None:
    """The image size a pp string produces (its last resize/crop op), else the data source's
    `image_size`; None if neither says."""
    size = None
    try:
        calls = pp.parse(pp_string)
    except pp.PPError:
        calls = []
    for call in calls:
        if call.name in _SIZE_OPS:
            value = call.args[0] if call.args else call.kwargs.get("size")
            size = value if value is not None else size
    if size is None:
        size = getattr(data, "image_size", None)  # demo_shapes has one
    if size is None:
        return None
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def naflex_budget(pp_string: str) -> tuple[int, int] | None:
    """(patch size, max_num_patches) of a pp string's `patchify` op (a NaFlex pipeline), or
    None when it has none (fixed-resolution images)."""
    try:
        calls = pp.parse(pp_string)
    except pp.PPError:
        return None
    for call in calls:
        if call.name == "patchify":
            names = ("patch_size", "max_num_patches")
            bound = dict(zip(names, call.args[:2], strict=False)) | call.kwargs
            return int(bound["patch_size"]), int(bound["max_num_patches"])
    return None


def input_shapes(run: RunConfig, batch: int | None = None) -> BatchShapes | None:
    """The global batch's shapes without reading data: images [B, H, W, 3] (or the NaFlex dict
    {"patches" [B, N, p·p·3], "mask" [B, N], "spatial_shapes" [B, 2]}) and token ids
    [B, max_len], plus the entries the extra objectives read (siglip_jax.objectives; augmented
    views such as "global_view" have the image's shape); None when
    the pp does not say the image size."""
    batch = run.input.global_batch if batch is None else batch
    budget = naflex_budget(run.input.pp)
    if budget is not None:
        patch, num = budget
        image: BatchShape = {"patches": (batch, num, patch * patch * 3), "mask": (batch, num),
                             "spatial_shapes": (batch, 2)}
    else:
        image_hw = infer_image_size(run)
        if image_hw is None:
            return None
        image = (batch, *image_hw, 3)
    shapes: BatchShapes = {"image": image, "labels": (batch, run.tokenizer.max_len)}
    shapes.update({k: shape for k, (shape, _) in objectives.batch_shapes(run, batch).items()})
    shapes.update({k: image for k in objectives.image_views(run)})  # e.g. "global_view".
    return shapes


def check_batch(run: RunConfig, batch_shards: int, processes: int, detail: str = "") -> None:
    """The global batch must split over the batch shards × accumulation steps and over
    the processes (hosts) — the one place this is checked. `detail` (e.g. the mesh axes
    and the slice) follows the number of batch shards in the message."""
    batch, accum = run.input.global_batch, run.grad_accum_steps
    if batch % batch_shards:
        raise ConfigError(f"input.global_batch={batch} does not divide over the "
                          f"{batch_shards} batch shards" + (f" {detail}" if detail else ""))
    if batch % (batch_shards * accum):
        raise ConfigError(f"input.global_batch={batch} does not split into "
                          f"grad_accum_steps={accum} micro-batches over {batch_shards} "
                          "shards")
    if batch % processes:
        raise ConfigError(f"input.global_batch={batch} does not divide over the "
                          f"{processes} processes (hosts)")


def build_input(run: RunConfig, mesh: Mesh, start_step: int, *, source: Source | None = None,
                tokenizer: Tokenizer | None = None
                ) -> tuple[Iterator[dict[str, np.ndarray]], Tokenizer, Source]:
    """(this process's batch iterator, the tokenizer, the data source) for training."""
    shards = num_batch_shards(mesh, run.mesh.batch_axes)
    check_batch(run, shards, jax.process_count())
    source = source or make_source(run.input.data)
    tokenizer = tokenizer or resolve_tokenizer(run.tokenizer, source,
                                               vocab_size=run.model.text.vocab_size)
    preprocess = get_preprocess_fn(run.input.pp, tokenizer=tokenizer,
                                   decoder_vocab=decoder_vocab(run.model))
    image_dtype = image_input_dtype(run)
    if image_dtype is not None:
        preprocess = input_lib.cast_entries(preprocess, image_input_keys(run), image_dtype)
    global_batch = run.input.global_batch
    shard_ids = input_lib.local_shard_ids(batch_sharding(mesh, run.mesh.batch_axes),
                                          global_batch)
    batches = input_lib.train_batches(
        source, preprocess, shard_ids=shard_ids, num_shards=shards,
        shard_batch=global_batch // shards, seed=run.seed,
        shuffle_buffer=run.input.shuffle_buffer, start_step=start_step, cache=run.input.cache)
    return batches, tokenizer, source


# ----------------------------------------------------------------------------- seq_lens

_BUDGET_RE = re.compile(r"\b(resize_to_patches|patchify)\(\s*([^,()]+),\s*[^,()]+")


def pp_at_budget(pp_string: str, max_num_patches: int) -> str:
    """The NaFlex pp with the patch budget (second argument) of its `resize_to_patches` and
    `patchify` ops set to `max_num_patches`."""
    out, count = _BUDGET_RE.subn(lambda m: f"{m.group(1)}({m.group(2)}, {max_num_patches}",
                                 pp_string)
    if not count or naflex_budget(out) is None:
        raise ConfigError(f"input.seq_lens needs a NaFlex input.pp with resize_to_patches(p, n) "
                          f"and patchify(p, n); got {pp_string!r}")
    return out


def length_runs(run: RunConfig) -> list[RunConfig]:
    """One RunConfig per entry of input.seq_lens: its patch budget and global batch, and its
    own input seed (each length reads its own shuffle of the data); [run] without seq_lens."""
    if not run.input.seq_lens:
        return [run]
    return [dataclasses.replace(run, seed=run.seed + 1 + i, input=dataclasses.replace(
        run.input, pp=pp_at_budget(run.input.pp, n), global_batch=b, seq_lens=()))
        for i, (n, b) in enumerate(run.input.seq_lens)]


def length_choices(run: RunConfig) -> np.ndarray:
    """The index into input.seq_lens of every step 0..total_steps-1, uniform and seeded by
    run.seed (the same on every process and at every resume); zeros without seq_lens."""
    if not run.input.seq_lens:
        return np.zeros(run.total_steps, np.int64)
    rng = np.random.default_rng([run.seed, 0x5E9_1E45])
    return rng.integers(0, len(run.input.seq_lens), size=run.total_steps)


def build_train_input(run: RunConfig, mesh: Mesh, start_step: int, *,
                      tokenizer: Tokenizer | None = None
                      ) -> tuple[Iterator[dict[str, np.ndarray]], Tokenizer, Source]:
    """`build_input`, or with input.seq_lens one pipeline per length merged step by step as
    `length_choices` says; each resumes after the batches it gave before `start_step`."""
    if not run.input.seq_lens:
        return build_input(run, mesh, start_step, tokenizer=tokenizer)
    runs = length_runs(run)
    choices = length_choices(run)
    done = np.bincount(choices[:start_step], minlength=len(runs))
    pipes = []
    for sub, skip in zip(runs, done, strict=True):
        batches, tokenizer, source = build_input(sub, mesh, int(skip), tokenizer=tokenizer)
        pipes.append(batches)

    def merged() -> Iterator[dict[str, np.ndarray]]:
        for step in range(start_step, run.total_steps):
            yield next(pipes[int(choices[step])])
        yield next(pipes[0])  # One look-ahead past the end (the loop prefetches a batch).

    return merged(), tokenizer, source


class CompiledSteps:
    """The jitted step compiled once per batch shape (with input.seq_lens, once per length)."""

    def __init__(self, jitted: jax.stages.Wrapped):
        self.jitted = jitted
        self.compiled: dict[tuple, jax.stages.Compiled] = {}

    def get(self, state: optax.Params, batch: Mapping[str, object]) -> jax.stages.Compiled:
        """The compiled step for this batch's shapes (compiled now if new)."""
        key = tuple((jax.tree_util.keystr(p), tuple(x.shape))
                    for p, x in jax.tree_util.tree_leaves_with_path(batch))
        if key not in self.compiled:
            self.compiled[key] = self.jitted.lower(state, batch).compile()
        return self.compiled[key]

    def __call__(self, state: optax.Params, batch: Mapping[str, object]
                 ) -> tuple[optax.Params, dict[str, jax.Array]]:
        return self.get(state, batch)(state, batch)


# ----------------------------------------------------------------------------- the step


@dataclasses.dataclass(frozen=True)
class StepParts:
    """Everything the jitted train step is made of (see build_step); nothing allocated."""

    model: Model
    tx: optax.GradientTransformation
    lr_fn: optax.Schedule  # step -> learning rate (first trained group)
    frozen: optax.Params | None  # tree of bools like the params (True = frozen), None if none is
    abstract_state: dict[str, optax.Params]  # ShapeDtypeStructs carrying their shardings
    shardings: dict[str, optax.Params]  # NamedShardings of the state
    data_sharding: dict[str, NamedSharding]  # per batch key
    step_fn: jax.stages.Wrapped  # jit of (state, batch) -> (state, metrics), state donated
    objectives: tuple[Objective, ...] = ()  # siglip_jax.objectives, as made for this run


def make_loss_fn(run: RunConfig, mesh: Mesh) -> losses.LossFn:
    """The loss named by run.loss.impl over the mesh's batch axes."""
    return losses.make_loss(run.loss.impl, mesh, run.mesh.batch_axes, **run.loss.options)


def build_step(run: RunConfig, mesh: Mesh, shapes: Mapping[str, Sequence[int]]) -> StepParts:
    """The model, optimizer, abstract state + shardings and jitted train step, for `mesh`
    (real or compile-only devices) and global batch `shapes`; nothing is allocated."""
    shapes = {k: v if isinstance(v, Mapping) else tuple(v) for k, v in shapes.items()}
    model = make_model(run.model)
    extra = tuple(objectives.make(run, mesh))
    teacher = teacher_spec(extra)
    abstract_params = step_lib.abstract_params(model, shapes, extra)
    tx, lr_fn = make_optimizer(run.optim, abstract_params, run.total_steps)
    frozen = step_lib.frozen_mask(group_labels(run.optim, abstract_params), FROZEN)
    abstract, shardings = step_lib.state_shardings(abstract_params, tx, mesh, run.mesh.rules,
                                                   teacher.parts if teacher else ())
    train_step = step_lib.make_train_step(
        model, tx, make_loss_fn(run, mesh), lr_fn, frozen=frozen,
        accum_steps=run.grad_accum_steps, skip_nonfinite=run.on_nonfinite == "skip",
        mesh=mesh, batch_axes=run.mesh.batch_axes,  # Activations stay batch-sharded.
        objectives=extra, seed=run.seed)
    data_sharding = {k: batch_sharding(mesh, run.mesh.batch_axes) for k in shapes}
    # Real or compile-only TPU devices (an AbstractMesh, the planner's, never compiles).
    on_tpu = isinstance(mesh, Mesh) and mesh.devices.flat[0].platform == "tpu"
    step_fn = jax.jit(train_step, in_shardings=(shardings, data_sharding),
                      out_shardings=(shardings, None), donate_argnums=(0,),
                      compiler_options=dict(run.tpu_compiler_options) if on_tpu else None)
    return StepParts(model, tx, lr_fn, frozen, abstract, shardings, data_sharding, step_fn,
                     extra)


def image_input_dtype(run: RunConfig) -> str | None:
    """"bfloat16" when the images go to the device in bfloat16, else None (float32).

    A fixed-resolution image tower that computes in bfloat16 casts its input image to
    bfloat16 as its first op (`ViT`), so the input pipeline casting it instead changes no
    value (both round to nearest even; tests/test_experiment.py checks it) and halves the
    images' device memory and host-to-device bytes: with B/16 at 224 px and 1 024 images per
    chip, 0.57 GiB of the step's peak (docs/tpu.md). The augmented views the objectives add
    (`objectives.image_views`) go the same way; NaFlex patches stay float32.
    """
    dtype = run.model.image.overrides.get("dtype")
    if run.model.image.kind != "vit" or dtype is None or np.dtype(dtype) != jnp.bfloat16:
        return None
    return "bfloat16"


def image_input_keys(run: RunConfig) -> tuple[str, ...]:
    """The batch entries that are images of the image tower: "image" and its views."""
    return ("image", *objectives.image_views(run))


def abstract_batch(parts: StepParts, shapes: Mapping[str, BatchShape],
                   run: RunConfig | None = None) -> dict[str, optax.Params]:
    """ShapeDtypeStructs of a global batch with the step's data shardings (for `.lower`);
    `run` gives the dtypes of the extra objectives' entries (default float32) and of the
    images (`image_input_dtype`)."""
    dtypes = {"labels": jnp.int32, "mask": jnp.bool_, "spatial_shapes": jnp.int32}
    if run is not None:
        dtypes.update({k: dtype for k, (_, dtype) in
                       objectives.batch_shapes(run, run.input.global_batch).items()})
        image_dtype = image_input_dtype(run)
        if image_dtype is not None:
            dtypes.update({k: jnp.dtype(image_dtype) for k in image_input_keys(run)})

    def leaf(key: str, shape: Sequence[int], sharding: NamedSharding) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(tuple(shape), dtypes.get(key, jnp.float32), sharding=sharding)

    return {k: {kk: leaf(kk, vv, parts.data_sharding[k]) for kk, vv in v.items()}
            if isinstance(v, Mapping) else leaf(k, v, parts.data_sharding[k])
            for k, v in shapes.items()}


def init_state(run: RunConfig, parts: StepParts, mesh: Mesh, shapes: Mapping[str, BatchShape],
               pretrained: Mapping[str, optax.Params] | None = None) -> dict[str, optax.Params]:
    """The train state, created already sharded (random init, then the pretrained parts), with
    the abstract state and shardings `build_step` computed (not traced again)."""
    state, _ = step_lib.init_state(parts.model, parts.tx, shapes, mesh, run.mesh.rules,
                                   run.seed, pretrained, parts.objectives,
                                   abstract=(parts.abstract_state, parts.shardings))
    return state
