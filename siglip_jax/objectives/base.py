"""What every training objective is called with, and the hooks the train step reads.

An objective module builds its `Objective` from the run's model record, the run length and
its own options (objectives/registry.py says how). `ObjectiveInputs` is what the train step
passes an objective inside the differentiated loss; an `Objective` returns `(weighted loss
scalar, metrics)`.

An objective may also add params and use an EMA teacher: it exposes `init_params(rng)` (its
own top-level params, created next to the model's) and, to use the teacher, `teacher_parts`
(top-level param names the teacher copies, e.g. ("img", "distill_head")), `ema` (momentum)
and `start` (switch-on step). `step.py` reads them through the functions here
(`objective_params`, `teacher_spec`, `ema_update`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import VariableDict

from siglip_jax.models.common import ImageBatch
from siglip_jax.records import ConfigError

ShapeSpecs = dict[str, tuple[tuple[int, ...], type]]  # key -> (global shape, numpy dtype).


@dataclasses.dataclass(frozen=True)
class ObjectiveInputs:
    """What an objective sees inside the train step's differentiated loss.

    Attributes:
      model: the two-towers flax module (`models.two_towers.Model`, unbound); call
        `model.apply({"params": params}, ..., method="image_features")` for extra forward
        passes.
      params: the student's params (frozen parts already wrapped in stop_gradient).
      batch: this (micro-)batch, every key the input pipeline produced.
      zimg, ztxt: the L2-normalised embeddings of the main forward pass (or None).
      out: the main forward pass's extra outputs ("img/encoded" [B, N, W] un-pooled image
        tokens, "txt/encoded", "t_prime", ...).
      step: the global step (int32 scalar), e.g. for switch-on schedules.
      teacher: the EMA teacher's params if the state has one, else None (no gradient).
      rng: a PRNG key for this (micro-)batch (fold in your own salt).
    """

    model: nn.Module
    params: VariableDict
    batch: Mapping[str, ImageBatch]
    zimg: jax.Array | None
    ztxt: jax.Array | None
    out: Mapping[str, jax.Array]
    step: jax.Array
    teacher: VariableDict | None
    rng: jax.Array


Objective = Callable[[ObjectiveInputs], tuple[jax.Array, dict[str, jax.Array]]]


# ----------------------------------------------------------------------------- the teacher


@dataclasses.dataclass(frozen=True)
class TeacherSpec:
    """What the EMA teacher holds and how fast it follows the student."""

    parts: tuple[str, ...]  # Top-level param names copied into state["teacher"].
    momentum: Callable[[jax.Array], jax.Array]  # step -> m of teacher = m·teacher + (1-m)·student.


def objective_params(objectives: Sequence[Objective], rng: jax.Array) -> dict[str, object]:
    """The objectives' own top-level params (heads, mask token), merged."""
    params: dict[str, object] = {}
    for i, objective in enumerate(objectives):
        init = getattr(objective, "init_params", None)
        if init is not None:
            params.update(init(jax.random.fold_in(rng, 1_000_003 + i)))
    return params


def teacher_spec(objectives: Sequence[Objective]) -> TeacherSpec | None:
    """The teacher the objectives need (union of their parts), None if none needs one.

    Before the earliest switch-on step the momentum is 0 (the teacher is a copy of the
    student, as SigLIP 2 initialises it at switch-on); from then on the objectives' `ema`,
    which must agree."""
    users = [o for o in objectives if getattr(o, "teacher_parts", ())]
    if not users:
        return None
    emas = {float(o.ema) for o in users}
    if len(emas) > 1:
        raise ConfigError(f"config.loss: the objectives sharing the EMA teacher give different "
                          f"ema values {sorted(emas)}; give them the same")
    ema, start = emas.pop(), min(int(o.start) for o in users)
    parts = tuple(sorted({p for o in users for p in o.teacher_parts}))
    return TeacherSpec(parts, lambda step: jnp.where(step < start, 0.0, ema))


def ema_update(teacher: VariableDict, params: VariableDict, momentum: jax.Array | float
               ) -> dict[str, object]:
    """teacher = m·teacher + (1-m)·student for the teacher's parts (dtype kept)."""
    def mix(t, s):
        m = jnp.asarray(momentum, jnp.float32)
        return (m * t.astype(jnp.float32) + (1 - m) * s.astype(jnp.float32)).astype(t.dtype)
    return {k: jax.tree_util.tree_map(mix, v, params[k]) for k, v in teacher.items()}
