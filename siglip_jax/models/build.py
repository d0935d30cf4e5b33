"""The one place the flax model is made from its record: `make_model(run.model)`.

Apart from the record (models/config.py) so that the record does not depend on the two-towers
module: the objectives and the schema read `ModelConfig` without it, and what is built from
the record sits above both.
"""

from __future__ import annotations

from siglip_jax.models.config import ModelConfig, model_kwargs
from siglip_jax.models.two_towers import Model


def make_model(model: ModelConfig) -> Model:
    """The two-towers flax Model of the record."""
    return Model(**model_kwargs(model))  # type: ignore[arg-type]
