"""Local-to-global self-distillation (SILC, arXiv:2310.13355; SigLIP 2 §2.3): the student's
image tower sees `n_local` small crops of each image (batch["local_views"] [B, n, s, s, 3]),
the EMA teacher sees the augmented global view (batch[global_key], default "global_view",
the image's shape; pp ops `local_crops` and `global_view`, data/ops_views.py; SigLIP 2 §2.3
applies the additional losses on augmented views, the sigmoid loss keeps batch["image"]);
both pooled features go through the
DINO-style head `distill_head` (student) / the teacher's copy of it, and the student's
prototype distribution of every crop is pulled to the teacher's sharpened (Sinkhorn-Knopp
centred) one by cross-entropy. Config: `config.loss.self_distillation = dict(...)` with the
options of `objectives/options.DEFAULTS`; docs/siglip2_training.md ("Options and defaults")
gives the sources of each default.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.typing import VariableDict
from jax.sharding import Mesh

import siglip_jax.objectives.selfsup as selfsup
from siglip_jax.models.config import ModelConfig
from siglip_jax.objectives.base import ObjectiveInputs, ShapeSpecs
from siglip_jax.objectives.options import SELF_DISTILLATION, check_options
from siglip_jax.records import ConfigError

NAME = SELF_DISTILLATION
VIEWS_KEY = "local_views"

def batch_shapes(model: ModelConfig, options: Mapping[str, object], batch: int) -> ShapeSpecs:
    """{"local_views": ((B, n_local, s, s, 3), float32)}."""
    opts = check_options(NAME, options)
    size = opts["local_size"]
    return {VIEWS_KEY: ((batch, opts["n_local"], size, size, 3), np.float32)}


def image_views(options: Mapping[str, object]) -> tuple[str, ...]:
    """Batch entries of the image's shape this objective reads besides "image"."""
    return selfsup.image_views(check_options(NAME, options))


def _head(opts: Mapping[str, object]) -> selfsup.ProjectionHead:
    return selfsup.ProjectionHead(opts["head_hidden"], opts["head_bottleneck"],
                                  opts["prototypes"], opts["head_layers"])


@dataclasses.dataclass(frozen=True)
class SelfDistillation:
    """The objective: call with an ObjectiveInputs → (weighted loss, metrics)."""

    options: Mapping[str, object]
    width: int
    start: int
    ema: float
    teacher_parts: tuple[str, ...] = ("img", "distill_head")

    def init_params(self, rng: jax.Array) -> dict[str, object]:
        """{"distill_head": head params}."""
        head = _head(self.options).init(rng, jnp.zeros((1, self.width), jnp.float32))
        return {"distill_head": head["params"]}

    def loss(self, model: nn.Module, params: VariableDict, teacher: VariableDict,
             image: jax.Array, local_views: jax.Array) -> jax.Array:
        """Unweighted loss: mean over images and views of CE(teacher(image), student(view))."""
        opts = self.options
        b, n = local_views.shape[:2]
        flat = jnp.reshape(local_views, (b * n, *local_views.shape[2:]))
        feats_s, _ = model.apply({"params": params}, flat, train=True,
                                 method="image_features")
        scores_s = _head(opts).apply({"params": params["distill_head"]}, feats_s)
        feats_t, _ = model.apply({"params": {**params, **teacher}}, image, train=False,
                                 method="image_features")
        scores_t = _head(opts).apply({"params": teacher["distill_head"]}, feats_t)
        return selfsup.distillation_loss(
            scores_t, jnp.reshape(scores_s, (b, n, -1)),  # Row b·n + v is view v of image b.
            teacher_temp=opts["teacher_temp"], student_temp=opts["student_temp"],
            centering=opts["centering"])

    def __call__(self, inputs: ObjectiveInputs) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(weight · loss from the switch-on step on, else 0; metrics)."""
        if inputs.teacher is None:
            raise ValueError(f"{NAME}: the train state has no EMA teacher")
        loss = selfsup.switched(inputs.step, self.start, lambda: self.loss(
            inputs.model, inputs.params, inputs.teacher,
            selfsup.batch_view(inputs.batch, self.options["global_key"], NAME),
            inputs.batch[VIEWS_KEY]))
        return self.options["weight"] * loss, {f"{NAME}/loss": loss}


def make(model: ModelConfig, total_steps: int, options: Mapping[str, object],
         mesh: Mesh | None) -> SelfDistillation:
    """The self-distillation objective for the `model`'s ViT image tower."""
    del mesh
    opts = check_options(NAME, options)
    tower = model.image
    selfsup.check_vit_tower(tower.kind, NAME)
    patch = tower.patch_size
    if any(opts["local_size"] % int(p) for p in patch):
        raise ConfigError(f"config.loss.{NAME}.local_size={opts['local_size']}: expected a "
                          f"multiple of the image patch size {patch}")
    return SelfDistillation(opts, tower.width, selfsup.start_step(total_steps, opts),
                            opts["ema"])
