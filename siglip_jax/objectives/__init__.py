"""Training objectives added to the sigmoid loss (SigLIP 2 recipe), and their registry.

`config.loss` holds the contrastive loss (`impl` and its options) and, under a key per
objective, the options of each extra objective, e.g.

    c.loss = dict(impl="ring", decoder=dict(weight=1.0), self_distillation=dict(weight=1.0))

An objective module (one per key of `MODULES`) provides:
  * `check_options(raw: Mapping) -> dict`: the options with defaults filled in; raises
    ValueError naming the bad option (schema.py turns it into a one-line ConfigError);
  * `make(run: RunConfig, options: dict, mesh) -> Objective`;
  * `batch_shapes(run: RunConfig, options: dict, batch: int) -> dict[str, tuple[tuple, dtype]]`:
    the extra batch entries it reads (shapes of the global batch, numpy dtypes).

An `Objective` is called once per (micro-)batch inside the differentiated loss with an
`ObjectiveInputs` and returns `(weighted loss scalar, metrics)`; metric names should be
prefixed with the objective's name ("decoder/loss").
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from typing import Any

# Registry: config key -> module path. Order is the order the losses are added.
MODULES: dict[str, str] = {
    "decoder": "siglip_jax.objectives.decoder",
    "self_distillation": "siglip_jax.objectives.distillation",
    "masked_prediction": "siglip_jax.objectives.masked",
}


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

    model: Any
    params: Any
    batch: Mapping[str, Any]
    zimg: Any
    ztxt: Any
    out: Mapping[str, Any]
    step: Any
    teacher: Any
    rng: Any


Objective = Callable[[ObjectiveInputs], tuple[Any, dict[str, Any]]]


def _module(name: str) -> Any:
    if name not in MODULES:
        raise ValueError(f"unknown objective {name!r} (known: {sorted(MODULES)})")
    return importlib.import_module(MODULES[name])


def check_options(name: str, raw: Mapping[str, Any] | None) -> dict[str, Any]:
    """The objective's options with defaults; ValueError naming the bad option."""
    return _module(name).check_options(dict(raw or {}))


def make(run: Any, mesh: Any) -> list[Objective]:
    """The configured objectives of `run.loss.objectives`, in registry order."""
    return [_module(name).make(run, dict(run.loss.objectives[name]), mesh)
            for name in MODULES if name in run.loss.objectives]


def batch_shapes(run: Any, batch: int) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Extra batch entries {key: (global shape, numpy dtype)} read by the configured
    objectives (the input pipeline must produce them)."""
    shapes: dict[str, tuple[tuple[int, ...], Any]] = {}
    for name in MODULES:
        if name in run.loss.objectives:
            shapes.update(_module(name).batch_shapes(run, dict(run.loss.objectives[name]), batch))
    return shapes
