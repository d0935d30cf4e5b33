"""The train state and the train step.

`init_state` creates params and optimizer state already sharded (shapes first, then a jitted
init with out_shardings), optionally overwriting towers with pretrained weights
(`model_init`). `make_train_step` builds the pure step: loss and gradients (accumulated over
micro-batches if asked), no backward pass through frozen parameters, the optax update, and
optionally discarding an update whose loss or gradients are not finite.

Switch-on (SigLIP 2 §2.3): an objective with its own params (`init_params`: heads, mask token)
and a switch-on step `start > 0` gets them re-drawn at the beginning of step `start`, with
their optimizer state reset to the optimizer's init and the teacher's copies set to the new
values (`HeadRestart`, `restart_heads`): weight decay applied before then (they get no
gradient, but decay still shrinks them) does not reach the losses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from siglip_jax.models.common import batch_sharded_activations
from siglip_jax.models.two_towers import Model
from siglip_jax.objectives.base import (
    Objective,
    ObjectiveInputs,
    ema_update,
    objective_params,
    teacher_spec,
)
from siglip_jax.records import ConfigError
from siglip_jax.sharding import (
    follow_params,
    param_shardings,
    path_str,
    replicated,
)

State = dict[str, Any]  # {"params", "opt_state", "step"} (+ "teacher" when objectives need it)
SWITCH_ON_SALT = 0x5357_4F4E  # Folded into the seed's key for the heads' draw at switch-on.


def example_image(shape: tuple[int, ...] | Mapping[str, tuple[int, ...]]
                  ) -> jax.Array | dict[str, jax.Array]:
    """A dummy image batch for model.init: zeros [B, H, W, 3], or for a NaFlex shape dict
    {"patches", "mask", "spatial_shapes"} a patch batch whose images are 1x1 patch grids."""
    if isinstance(shape, Mapping):
        return {"patches": jnp.zeros(shape["patches"], jnp.float32),
                "mask": jnp.ones(shape["mask"], bool),
                "spatial_shapes": jnp.ones(shape["spatial_shapes"], jnp.int32)}
    return jnp.zeros(shape, jnp.float32)


def abstract_params(model: Model, batch_shapes: Mapping[str, object],
                    objectives: Sequence[Objective] = ()) -> optax.Params:
    """Parameter shapes and dtypes (the model's, plus the objectives' heads), without
    allocating anything."""
    return jax.eval_shape(_params_init(model, batch_shapes, objectives), jax.random.key(0))


def _params_init(model: Model, batch_shapes: Mapping[str, object],
                 objectives: Sequence[Objective]) -> Callable[[jax.Array], dict[str, object]]:
    """rng → the model's params on dummy inputs of `batch_shapes`, plus the objectives' heads."""

    def init(rng):
        image = example_image(batch_shapes["image"])
        text = jnp.zeros(batch_shapes["labels"], jnp.int32)
        return {**model.init(rng, image, text)["params"], **objective_params(objectives, rng)}

    return init


def _init_fn(model: Model, tx: optax.GradientTransformation,
             batch_shapes: Mapping[str, tuple[int, ...]], objectives: Sequence[Objective] = ()
             ) -> Callable:

    teacher = teacher_spec(objectives)
    init_params = _params_init(model, batch_shapes, objectives)

    def init_all(rng, pretrained):
        params = {**init_params(rng), **pretrained}
        state = {"params": params, "opt_state": tx.init(params),
                 "step": jnp.zeros((), jnp.int32)}
        if teacher is not None:  # The EMA teacher starts as a copy of the student.
            state["teacher"] = jax.tree_util.tree_map(jnp.copy, {k: params[k]
                                                                 for k in teacher.parts})
        return state
    return init_all


def state_shardings(abstract_params: optax.Params, tx: optax.GradientTransformation, mesh: Mesh,
                    rules: Sequence, teacher_parts: Sequence[str] = ()) -> tuple[State, State]:
    """(abstract state, shardings) for params of the given shapes; nothing is allocated.

    The abstract state's leaves carry their shardings, so it can be passed to
    `jit(...).lower()` to compile a step without creating the model. `teacher_parts` (top-level
    param names) adds state["teacher"], sharded like those params.
    """
    abstract = {"params": abstract_params, "opt_state": jax.eval_shape(tx.init, abstract_params),
                "step": jax.ShapeDtypeStruct((), jnp.int32)}
    pshard = param_shardings(abstract["params"], rules, mesh)
    shardings = {
        "params": pshard,
        "opt_state": follow_params(abstract["opt_state"], abstract["params"], pshard, mesh),
        "step": replicated(mesh),
    }
    if teacher_parts:
        abstract["teacher"] = {k: abstract_params[k] for k in teacher_parts}
        shardings["teacher"] = {k: pshard[k] for k in teacher_parts}
    abstract = jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
    return abstract, shardings


def init_state(model: Model, tx: optax.GradientTransformation,
               batch_shapes: Mapping[str, tuple[int, ...]], mesh: Mesh, rules: Sequence,
               seed: int, pretrained: Mapping[str, optax.Params] | None = None,
               objectives: Sequence[Objective] = (), *,
               abstract: tuple[State, State] | None = None) -> tuple[State, State]:
    """Creates the sharded train state; returns (state, state_shardings).

    `pretrained` maps top-level param names ("img", "txt", "t", "b") to trees of arrays that
    replace the random init of that part; shapes must match. `objectives` add their params
    and, if one needs it, the EMA teacher (a copy of the initial, pretrained-updated params).
    `abstract` is the (abstract state, shardings) pair of `state_shardings` when the caller has
    it already (e.g. experiment.StepParts): model.init is then not traced again for the shapes.
    """

    pretrained = dict(pretrained or {})
    teacher = teacher_spec(objectives)
    abstract, shardings = abstract or state_shardings(
        abstract_params(model, batch_shapes, objectives), tx, mesh, rules,
        teacher.parts if teacher else ())
    check_pretrained(abstract["params"], pretrained)
    pretrained = jax.device_put(pretrained, {k: shardings["params"][k] for k in pretrained})
    init_all = _init_fn(model, tx, batch_shapes, objectives)
    state = jax.jit(init_all, out_shardings=shardings)(jax.random.key(seed), pretrained)
    return state, shardings


def check_pretrained(abstract: Mapping[str, optax.Params],
                     pretrained: Mapping[str, optax.Params]) -> None:
    """Raises ConfigError listing the first mismatching keys between model and checkpoint."""
    problems = []
    for part, tree in pretrained.items():
        if part not in abstract:
            problems.append(f"{part}: not a part of the model (parts: {sorted(abstract)})")
            continue
        want = {path_str(p): tuple(x.shape) for p, x in
                jax.tree_util.tree_flatten_with_path(abstract[part])[0]}
        have = {path_str(p): tuple(np.shape(x)) for p, x in
                jax.tree_util.tree_flatten_with_path(tree)[0]}
        for key in sorted(set(want) | set(have)):
            if want.get(key) != have.get(key):
                problems.append(f"{part}/{key}: model {want.get(key, 'missing')}, "
                                f"checkpoint {have.get(key, 'missing')}")
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ConfigError("model_init does not match the model: " + "; ".join(problems[:3])
                          + more)


def micro_batches(batch: Mapping[str, optax.Params], accum_steps: int
                  ) -> dict[str, optax.Params]:
    """[B, ...] → [accum, B/accum, ...] where micro-batch m takes rows m, m+accum, …, so every
    micro-batch is spread evenly over the devices holding the batch (any nesting of leaves,
    e.g. a NaFlex image dict)."""
    def split(x):
        if x.shape[0] % accum_steps:
            raise ValueError(f"batch of {x.shape[0]} does not split into {accum_steps} "
                             "micro-batches")
        return jnp.swapaxes(x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:]),
                            0, 1)
    return jax.tree_util.tree_map(split, dict(batch))


@dataclasses.dataclass(frozen=True)
class HeadRestart:
    """An objective's own top-level params that start fresh at its switch-on step."""

    start: int  # The objective's switch-on step (> 0).
    parts: tuple[str, ...]  # Top-level param names its `init_params` creates.
    index: int  # Its position among the run's objectives (part of the draw's key).
    init: Callable[[jax.Array], dict[str, object]]  # rng -> {part: params}.


def head_restarts(objectives: Sequence[Objective]) -> tuple[HeadRestart, ...]:
    """The objectives with own params (`init_params`) and a switch-on step `start` > 0."""
    out = []
    for index, objective in enumerate(objectives):
        init = getattr(objective, "init_params", None)
        start = int(getattr(objective, "start", 0))
        if init is None or start <= 0:
            continue
        parts = tuple(sorted(jax.eval_shape(init, jax.random.key(0))))
        out.append(HeadRestart(start, parts, index, init))
    return tuple(out)


def fresh_heads(restart: HeadRestart, seed: int) -> dict[str, object]:
    """The draw `restart_heads` gives the objective's params at its switch-on step (a key of
    its own: not the step-0 init's)."""
    key = jax.random.fold_in(jax.random.key(seed), SWITCH_ON_SALT)
    return restart.init(jax.random.fold_in(key, restart.index))


def _owned_leaves(opt_state: optax.OptState, params: optax.Params,
                  parts: Sequence[str]) -> list[bool]:
    """Per leaf of `opt_state` (flattened): is it a per-parameter state (a moment, an
    accumulator) of a param under one of `parts`? Such a leaf's path ends with that param's
    path; shared leaves (Adam's step count, the schedule's count) end with none."""
    suffixes = {tuple(path) for path, _ in jax.tree_util.tree_flatten_with_path(
        {p: params[p] for p in parts})[0]}
    lengths = sorted({len(s) for s in suffixes})
    return [any(tuple(path[-n:]) in suffixes for n in lengths if len(path) >= n)
            for path, _ in jax.tree_util.tree_flatten_with_path(opt_state)[0]]


def restart_heads(state: State, tx: optax.GradientTransformation, restart: HeadRestart,
                  seed: int) -> State:
    """`state` with the objective's params replaced by `fresh_heads`, their per-parameter
    optimizer state by `tx.init`'s (moments zeroed), and the teacher's copies of them (if
    any) by the same fresh values; everything else, shared optimizer counts included, kept."""
    fresh = fresh_heads(restart, seed)
    params = {**state["params"], **fresh}
    leaves, treedef = jax.tree_util.tree_flatten(state["opt_state"])
    init_leaves, init_def = jax.tree_util.tree_flatten(tx.init(params))
    if init_def != treedef:
        raise ValueError("restart_heads: the optimizer state does not come from `tx`")
    owned = _owned_leaves(state["opt_state"], state["params"], restart.parts)
    opt_state = jax.tree_util.tree_unflatten(treedef, [
        new if own else old for old, new, own in zip(leaves, init_leaves, owned, strict=True)])
    out = {**state, "params": params, "opt_state": opt_state}
    if "teacher" in state:
        out["teacher"] = {**state["teacher"],
                          **{p: fresh[p] for p in restart.parts if p in state["teacher"]}}
    return out


def _restart_at_start(state: State, tx: optax.GradientTransformation, restart: HeadRestart,
                      seed: int) -> State:
    """`restart_heads` if state["step"] == restart.start, else `state`: a `lax.cond` whose
    operands and results are only the restarted leaves (params, their optimizer state, the
    teacher's copies), so the other steps pay a predicate."""
    owned = _owned_leaves(state["opt_state"], state["params"], restart.parts)
    teacher_parts = [p for p in restart.parts if p in state.get("teacher", {})]

    def pick(s):
        return ({p: s["params"][p] for p in restart.parts},
                [x for x, own in zip(jax.tree_util.tree_leaves(s["opt_state"]), owned,
                                     strict=True) if own],
                {p: s["teacher"][p] for p in teacher_parts})

    params, opt_leaves, teacher = jax.lax.cond(
        state["step"] == restart.start, lambda: pick(restart_heads(state, tx, restart, seed)),
        lambda: pick(state))
    leaves, treedef = jax.tree_util.tree_flatten(state["opt_state"])
    fresh = iter(opt_leaves)
    out = {**state, "params": {**state["params"], **params},
           "opt_state": jax.tree_util.tree_unflatten(
               treedef, [next(fresh) if own else x for x, own in zip(leaves, owned,
                                                                     strict=True)])}
    if teacher_parts:
        out["teacher"] = {**state["teacher"], **teacher}
    return out


def make_train_step(model: Model, tx: optax.GradientTransformation, loss_fn: Callable,
                    lr_fn: Callable, *, frozen: optax.Params | None = None,
                    accum_steps: int = 1, skip_nonfinite: bool = False, mesh: Mesh | None = None,
                    batch_axes: Sequence[str] = (), objectives: Sequence[Objective] = (),
                    seed: int = 0) -> Callable[[State, Mapping[str, object]], tuple[State, dict]]:
    """The pure step (state, batch) → (state, metrics), to be jitted by the caller.

    Args:
      frozen: a tree of bools like the params (True = frozen); frozen params are wrapped in
        stop_gradient, so XLA computes no backward pass for them.
      accum_steps: micro-batches per step; the sigmoid loss of each micro-batch uses only its
        own negatives, the self-supervised objectives' Sinkhorn-Knopp teacher targets are
        normalised over each micro-batch's rows (on every device; DINOv2, which has no
        accumulation, normalises over its global batch), and gradients are averaged.
      skip_nonfinite: if the loss or gradient norm is NaN/Inf, keep the old params and
        optimizer state (the step counter still advances).
      mesh, batch_axes: the towers' activations are kept split over these mesh axes along
        the batch (without it FSDP-sharded params pull them into feature sharding).
      objectives: extra losses (siglip_jax.objectives), each called with an ObjectiveInputs
        after the main forward pass; their weighted losses are added to the sigmoid loss.
      seed: base of the per-step PRNG key handed to the objectives.

    A state["teacher"] (see `state_shardings`) follows the new params by EMA after the
    optimizer update, at the momentum the objectives give for the step. At an objective's
    switch-on step its own params (heads, mask token) are first re-drawn (`restart_heads`).
    """

    teacher_of = teacher_spec(objectives)
    restarts = head_restarts(objectives)

    def loss_of(params, batch, step, teacher, rng):
        if frozen is not None:
            params = jax.tree_util.tree_map(
                lambda p, f: jax.lax.stop_gradient(p) if f else p, params, frozen)
        with batch_sharded_activations(mesh, batch_axes):
            zimg, ztxt, out = model.apply({"params": params}, batch["image"], batch["labels"],
                                          train=True)
            bias = out.get("b", jnp.zeros(()))
            loss, metrics = loss_fn(zimg, ztxt, jnp.reshape(out["t_prime"], ()),
                                    jnp.reshape(bias, ()))
            if objectives:
                metrics = {**metrics, "sigmoid/loss": loss}
                inputs = ObjectiveInputs(model, params, batch, zimg, ztxt, out, step,
                                         None if teacher is None
                                         else jax.lax.stop_gradient(teacher), rng)
                for objective in objectives:
                    extra, extra_metrics = objective(inputs)
                    loss = loss + extra
                    metrics = {**metrics, **extra_metrics}
        return loss, metrics

    grad_fn = jax.value_and_grad(loss_of, has_aux=True)

    def loss_and_grads(params, batch, step, teacher):
        rng = jax.random.fold_in(jax.random.key(seed), step)
        if accum_steps == 1:
            return grad_fn(params, batch, step, teacher, rng)
        micro = micro_batches(batch, accum_steps)

        def accumulate(carry, one):
            index, micro_batch = one
            (loss, metrics), grads = grad_fn(params, micro_batch, step, teacher,
                                             jax.random.fold_in(rng, index))
            return jax.tree_util.tree_map(jnp.add, carry, ((loss, metrics), grads)), None

        first = jax.tree_util.tree_map(lambda x: x[0], micro)
        zero = jax.tree_util.tree_map(
            jnp.zeros_like, jax.eval_shape(grad_fn, params, first, step, teacher, rng))
        total, _ = jax.lax.scan(accumulate, zero, (jnp.arange(accum_steps), micro))
        return jax.tree_util.tree_map(lambda x: x / accum_steps, total)

    def train_step(state, batch):
        for restart in restarts:
            state = _restart_at_start(state, tx, restart, seed)
        (loss, metrics), grads = loss_and_grads(state["params"], batch, state["step"],
                                                state.get("teacher"))
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        if skip_nonfinite:
            keep = lambda new, old: jax.tree_util.tree_map(
                lambda n, o: jnp.where(finite, n, o), new, old)
            params = keep(params, state["params"])
            opt_state = keep(opt_state, state["opt_state"])
        metrics = {**metrics, "loss": loss, "grad_norm": grad_norm, "lr": lr_fn(state["step"]),
                   "finite": finite}
        new = {"params": params, "opt_state": opt_state, "step": state["step"] + 1}
        if "teacher" in state:
            new["teacher"] = ema_update(state["teacher"], params,
                                        teacher_of.momentum(state["step"]))
        return new, metrics

    return train_step


def frozen_mask(labels: optax.Params, frozen_label: str) -> optax.Params | None:
    """Tree of bools from optimizer group labels; None when nothing is frozen."""
    mask = jax.tree_util.tree_map(lambda label: label == frozen_label, labels)
    return mask if any(jax.tree_util.tree_leaves(mask)) else None
