"""Shared by the evaluators: jitted, sharded image and text tower calls, and the batch mask key."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from siglip_jax.sharding import batch_sharding, num_batch_shards, replicated

# The padding mask of evaluation batches, data.input.MASK_KEY (tests/test_zeroshot.py checks
# they agree). Not imported from there: data.input loads TensorFlow, and the evaluator modules
# (whose options records schema.py reads through evaluators/config.py) must import without it
# so an entry point can set TensorFlow's logging up before TensorFlow loads.
MASK_KEY = "_mask"


class Evaluator(Protocol):
    """A periodic evaluation: its cadence and a run over the current params."""

    every_n_steps: int  # 0: only at the end of training.

    def run(self, params: optax.Params) -> dict[str, float]:
        """Metrics of the params, e.g. {"top1": 0.9, ...}."""


class Embedder:
    """Runs the model's image or text tower on batches sharded over the mesh's batch axes.

    `model.apply({"params": p}, image, text)` must return `(zimg, ztxt, out)` with either input
    allowed to be None. Inputs that every process holds in full (class prompts) go through
    `embed_texts`; per-process shares of a batch (evaluation images) through `embed_images`.
    """

    def __init__(self, model: nn.Module, mesh: Mesh, batch_axes: Sequence[str],
                 param_shardings: Mapping[str, object]):
        self.mesh, self.batch_axes = mesh, tuple(batch_axes)
        self.num_shards = num_batch_shards(mesh, self.batch_axes)
        data = batch_sharding(mesh, self.batch_axes)
        # Public so a caller can also lower/compile it for other devices (plan --compile).
        self.image_step = jax.jit(
            lambda params, images: model.apply({"params": params}, images, None)[0],
            in_shardings=(param_shardings, data), out_shardings=data)
        self._text_fn = jax.jit(
            lambda params, texts: model.apply({"params": params}, None, texts)[1],
            in_shardings=(param_shardings, data), out_shardings=replicated(mesh))

        def texts_nd(params, tokens):  # [B, ..., L] → [B, ..., D]
            ztxt = model.apply({"params": params}, None, tokens.reshape(-1, tokens.shape[-1]))[1]
            return ztxt.reshape(*tokens.shape[:-1], ztxt.shape[-1])

        self._batch_text_fn = jax.jit(texts_nd, in_shardings=(param_shardings, data),
                                      out_shardings=data)

    def image_fn(self, params: optax.Params, images: jax.Array) -> jax.Array:
        """Normalised image embeddings of a global, batch-sharded image array."""
        return self.image_step(params, images)

    def batch_text_fn(self, params: optax.Params, tokens: jax.Array) -> jax.Array:
        """Normalised text embeddings [B, ..., D] of a global, batch-sharded [B, ..., L] array."""
        return self._batch_text_fn(params, tokens)

    def embed_texts(self, params: optax.Params, tokens: np.ndarray, batch_size: int = 1024
                    ) -> jax.Array:
        """Normalised text embeddings [N, D] (replicated) of token ids every process holds."""
        tokens = np.asarray(tokens, np.int32)
        chunk = max(self.num_shards, batch_size // self.num_shards * self.num_shards)
        outputs = []
        for start in range(0, len(tokens), chunk):
            part = tokens[start:start + chunk]
            padded = np.concatenate(
                [part, np.repeat(part[-1:], (-len(part)) % self.num_shards, axis=0)])
            array = jax.make_array_from_callback(
                padded.shape, batch_sharding(self.mesh, self.batch_axes),
                lambda index, padded=padded: padded[index])
            outputs.append(self._text_fn(params, array)[:len(part)])
        return jnp.concatenate(outputs, axis=0)
