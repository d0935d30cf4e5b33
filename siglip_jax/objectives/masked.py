"""Masked prediction on patch features (TIPS, arXiv:2410.16512; SigLIP 2 §2.3): the student's
image tower sees the augmented global view (batch[global_key], default "global_view", made by
the pp op `global_view`, data/ops_views.py) with a random `mask_ratio` of its patch
embeddings replaced by the learned `mask_token` [W]; at those positions its tokens, through
the DINO-style head `masked_head`, are pulled by cross-entropy to the EMA teacher's sharpened
(Sinkhorn-Knopp centred) prototype distribution of the same patch of the same, unmasked view
(SigLIP 2 §2.3: "both the student and the teacher see the same, global view (up to masking
in the student)"; the sigmoid loss keeps batch["image"]).
Config: `config.loss.masked_prediction = dict(...)` with the options of
`objectives/options.DEFAULTS`; docs/siglip2_training.md ("Options and defaults") gives the
sources of each default.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import VariableDict
from jax.sharding import Mesh

import siglip_jax.objectives.selfsup as selfsup
from siglip_jax.models.config import ModelConfig
from siglip_jax.objectives.base import ObjectiveInputs, ShapeSpecs
from siglip_jax.objectives.options import MASKED_PREDICTION, check_options

NAME = MASKED_PREDICTION
SALT = 0x6D61736B  # Folded into the step's key for the mask.

def batch_shapes(model: ModelConfig, options: Mapping[str, object], batch: int) -> ShapeSpecs:
    """No extra batch entries of their own shape (the view has the image's: `image_views`)."""
    return {}


def image_views(options: Mapping[str, object]) -> tuple[str, ...]:
    """Batch entries of the image's shape this objective reads besides "image"."""
    return selfsup.image_views(check_options(NAME, options))


def _head(opts: Mapping[str, object]) -> selfsup.ProjectionHead:
    return selfsup.ProjectionHead(opts["head_hidden"], opts["head_bottleneck"],
                                  opts["prototypes"], opts["head_layers"])


def random_mask(rng: jax.Array, batch: int, num: int, ratio: float) -> tuple[jax.Array, jax.Array]:
    """(mask [B, N] bool with exactly k = max(1, round(ratio·N)) True per row, the masked
    positions [B, k] in increasing order)."""
    k = max(1, int(round(ratio * num)))
    rank = jnp.argsort(jnp.argsort(jax.random.uniform(rng, (batch, num)), axis=1), axis=1)
    mask = rank < k
    ids = jnp.sort(jnp.argsort(rank, axis=1)[:, :k], axis=1)
    return mask, ids


@dataclasses.dataclass(frozen=True)
class MaskedPrediction:
    """The objective: call with an ObjectiveInputs → (weighted loss, metrics)."""

    options: Mapping[str, object]
    width: int
    start: int
    ema: float
    patch: tuple[int, int] = (16, 16)  # The image tower's patch size (h, w).
    teacher_parts: tuple[str, ...] = ("img", "masked_head")

    def init_params(self, rng: jax.Array) -> dict[str, object]:
        """{"masked_head": head params, "mask_token": [W]}."""
        k_head, k_token = jax.random.split(rng)
        head = _head(self.options).init(k_head, jnp.zeros((1, self.width), jnp.float32))
        token = 0.02 * jax.random.normal(k_token, (self.width,), jnp.float32)
        return {"masked_head": head["params"], "mask_token": token}

    def loss(self, model: nn.Module, params: VariableDict, teacher: VariableDict,
             image: jax.Array, mask: jax.Array, ids: jax.Array) -> jax.Array:
        """Unweighted iBOT patch loss (`selfsup.masked_patch_loss`) at the masked positions `ids`
        [B, k] (mask [B, N])."""
        opts = self.options
        _, tokens_s = model.apply({"params": params}, image, patch_mask=mask,
                                  mask_token=params["mask_token"], train=True,
                                  method="image_features")
        _, tokens_t = model.apply({"params": {**params, **teacher}}, image, train=False,
                                  method="image_features")
        num = mask.shape[1]  # A class token (pool_type "tok") comes first: keep the patches.
        pick = lambda t: jnp.take_along_axis(t[:, -num:], ids[..., None], axis=1)
        scores_s = _head(opts).apply({"params": params["masked_head"]}, pick(tokens_s))
        scores_t = _head(opts).apply({"params": teacher["masked_head"]}, pick(tokens_t))
        return selfsup.masked_patch_loss(scores_t, scores_s, teacher_temp=opts["teacher_temp"],
                                         student_temp=opts["student_temp"],
                                         centering=opts["centering"])

    def __call__(self, inputs: ObjectiveInputs) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(weight · loss from the switch-on step on, else 0; metrics)."""
        if inputs.teacher is None:
            raise ValueError(f"{NAME}: the train state has no EMA teacher")
        image = selfsup.batch_view(inputs.batch, self.options["global_key"], NAME)
        num = self.num_patches(image.shape[1:3])
        mask, ids = random_mask(jax.random.fold_in(inputs.rng, SALT), image.shape[0], num,
                                self.options["mask_ratio"])
        loss = selfsup.switched(inputs.step, self.start, lambda: self.loss(
            inputs.model, inputs.params, inputs.teacher, image, mask, ids))
        return self.options["weight"] * loss, {f"{NAME}/loss": loss}

    def num_patches(self, hw: tuple[int, int]) -> int:
        """Patches of an image of size `hw` (h, w)."""
        return (hw[0] // self.patch[0]) * (hw[1] // self.patch[1])


def make(model: ModelConfig, total_steps: int, options: Mapping[str, object],
         mesh: Mesh | None) -> MaskedPrediction:
    """The masked-prediction objective for the `model`'s ViT image tower."""
    del mesh
    opts = check_options(NAME, options)
    tower = model.image
    selfsup.check_vit_tower(tower.kind, NAME)
    return MaskedPrediction(opts, tower.width, selfsup.start_step(total_steps, opts),
                            opts["ema"], patch=tower.patch_size)
