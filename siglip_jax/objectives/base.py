"""What every training objective sees: the run it is built for and the inputs it is called with.

`TrainRun` is the part of a parsed run config (schema.RunConfig satisfies it) an objective
reads: the model record, the run length and the loss section's objective options.
`ObjectiveInputs` is what the train step passes an objective inside the differentiated loss;
an `Objective` returns `(weighted loss scalar, metrics)`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Protocol

import jax
from flax.typing import VariableDict

from siglip_jax.models.config import ModelConfig
from siglip_jax.models.two_towers import ImageBatch, Model

ShapeSpecs = dict[str, tuple[tuple[int, ...], type]]  # key -> (global shape, numpy dtype).


class LossSection(Protocol):
    """The loss section's per-objective options (schema.LossConfig)."""

    @property
    def objectives(self) -> Mapping[str, Mapping[str, object]]: ...


class TrainRun(Protocol):
    """What an objective reads of a parsed run config (schema.RunConfig)."""

    @property
    def model(self) -> ModelConfig: ...

    @property
    def total_steps(self) -> int: ...

    @property
    def loss(self) -> LossSection: ...


@dataclasses.dataclass(frozen=True)
class ObjectiveInputs:
    """What an objective sees inside the train step's differentiated loss.

    Attributes:
      model: the two-towers flax module (unbound); call `model.apply({"params": params}, ...,
        method=...)` for extra forward passes.
      params: the student's params (frozen parts already wrapped in stop_gradient).
      batch: this (micro-)batch, every key the input pipeline produced.
      zimg, ztxt: the L2-normalised embeddings of the main forward pass (or None).
      out: the main forward pass's extra outputs ("img/encoded" [B, N, W] un-pooled image
        tokens, "txt/encoded", "t_prime", ...).
      step: the global step (int32 scalar), e.g. for switch-on schedules.
      teacher: the EMA teacher's params if the state has one, else None (no gradient).
      rng: a PRNG key for this (micro-)batch (fold in your own salt).
    """

    model: Model
    params: VariableDict
    batch: Mapping[str, ImageBatch]
    zimg: jax.Array | None
    ztxt: jax.Array | None
    out: Mapping[str, jax.Array]
    step: jax.Array
    teacher: VariableDict | None
    rng: jax.Array


Objective = Callable[[ObjectiveInputs], tuple[jax.Array, dict[str, jax.Array]]]
