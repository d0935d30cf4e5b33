"""The registry of the training objectives added to the sigmoid loss (SigLIP 2 recipe).

`config.loss` holds the contrastive loss (`impl` and its options) and, under a key per
objective, the options of each extra objective, e.g.

    c.loss = dict(impl="ring", decoder=dict(weight=1.0), self_distillation=dict(weight=1.0))

Each objective's options, their defaults and checks are in objectives/options.py (which the
config schema reads; `run.loss.objectives[name]` holds them checked). An objective module
(one per key of `MODULES`, the same keys as `options.DEFAULTS`) provides:
  * `make(model: ModelConfig, total_steps: int, options: dict, mesh) -> Objective`: built
    from the run's model record, its length in steps and the objective's own options;
  * `batch_shapes(model: ModelConfig, options: dict, batch: int) -> ShapeSpecs`: the extra
    batch entries it reads (shapes of the global batch, numpy dtypes);
  * optionally `image_views(options: dict) -> tuple[str, ...]`: extra batch entries of the
    image's shape and dtype (augmented views, pp op `global_view`).

An `Objective` is called once per (micro-)batch inside the differentiated loss with an
`ObjectiveInputs` (objectives/base.py) and returns `(weighted loss scalar, metrics)`; metric
names should be prefixed with the objective's name ("decoder/loss"). The functions here take
the parsed run (`TrainRun`: what of schema.RunConfig they read).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import ModuleType
from typing import Protocol

from jax.sharding import Mesh

from siglip_jax.models.config import ModelConfig
from siglip_jax.objectives import decoder, distillation, masked, options
from siglip_jax.objectives.base import Objective, ShapeSpecs

# Registry: config key -> module. Order is the order the losses are added.
MODULES: dict[str, ModuleType] = {
    options.DECODER: decoder,
    options.SELF_DISTILLATION: distillation,
    options.MASKED_PREDICTION: masked,
}


class LossSection(Protocol):
    """The loss section's per-objective options (schema.LossConfig)."""

    @property
    def objectives(self) -> Mapping[str, Mapping[str, object]]: ...


class TrainRun(Protocol):
    """What the registry reads of a parsed run config (schema.RunConfig)."""

    @property
    def model(self) -> ModelConfig: ...

    @property
    def total_steps(self) -> int: ...

    @property
    def loss(self) -> LossSection: ...


def make(run: TrainRun, mesh: Mesh | None) -> list[Objective]:
    """The configured objectives of `run.loss.objectives`, in registry order."""
    return [module.make(run.model, run.total_steps, dict(run.loss.objectives[name]), mesh)
            for name, module in MODULES.items() if name in run.loss.objectives]


def batch_shapes(run: TrainRun, batch: int) -> ShapeSpecs:
    """Extra batch entries {key: (global shape, numpy dtype)} read by the configured
    objectives (the input pipeline must produce them)."""
    shapes: ShapeSpecs = {}
    for name, module in MODULES.items():
        if name in run.loss.objectives:
            shapes.update(module.batch_shapes(run.model, dict(run.loss.objectives[name]), batch))
    return shapes


def image_views(run: TrainRun) -> tuple[str, ...]:
    """Batch keys the configured objectives read that have the image's shape (e.g. the
    augmented "global_view"), without duplicates."""
    keys: list[str] = []
    for name, module in MODULES.items():
        views = getattr(module, "image_views", None)
        if name in run.loss.objectives and views is not None:
            keys += [k for k in views(dict(run.loss.objectives[name])) if k not in keys]
    return tuple(keys)
