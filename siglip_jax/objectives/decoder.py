"""The LocCa decoder loss (SigLIP 2): token cross-entropy of the caption decoder.

Configured as `config.loss.decoder = dict(weight=1.0, tasks_per_example=1, vocab_chunk=8192)`;
needs
`config.model.decoder` (the decoder's shape, models/decoder.py). The batch carries, per
example, T = tasks_per_example decoder sequences (made by the input pipeline; T = 1: the pp
op `locca_task` samples one task, shapes [B, L] / [B]; T > 1: `locca_task(all_tasks=True)`
gives one row per task, shapes [B, T, L] / [B, T]):

  "dec_tokens"      int32 [B, (T,) L]   `[task, prefix..., target..., eos, 0-pad]` in
                                        DecoderVocab ids (L = model.decoder.max_len)
  "dec_target_mask" float32 [B, (T,) L] 1.0 at the positions holding target tokens (incl. eos)
  "dec_parallel"    bool [B, (T)]       predict this row's targets in parallel (CapPa)

T rows are flattened to B·T decoder rows (example-major), each cross-attending to its
example's image tokens (repeated T times along the batch axis; the image tower runs once).

One decoder pass of length L per (micro-)batch (models/decoder.training_inputs): causal
self-attention and next-token targets for autoregressive rows, full self-attention over the
input with targets (and padding) replaced by the mask id for parallel rows. The decoder
cross-attends to the main forward pass's un-pooled image tokens (out["img/encoded"]; for a
NaFlex batch the patch mask hides padding). Loss = weight × Σ token CE / number of target
tokens of the micro-batch (over all B·T rows); metrics "decoder/loss" (the unweighted mean
CE), "decoder/token_acc" (argmax accuracy over the target tokens) and per task (read from each
row's task token) "decoder/{cap,aref,gcap}_token_acc" (0 when the micro-batch has no target
token of that task).

`vocab_chunk = C > 0` (the default, 8192) computes the cross-entropy and the argmax over
vocabulary blocks of C columns with a custom gradient (objectives/chunked_xent.py): the
decoder returns its final hidden states and the output layer (models/decoder.output_layer) is
applied block by block, so the float32 [B·T, L, V] logits never exist (SigLIP 2 §2.2 uses "a
chunked version of the decoder loss"); loss, gradients and metrics equal the unchunked ones.
`vocab_chunk = 0` materialises the full logits (the reference).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from siglip_jax.data.locca import TASKS
from siglip_jax.models.config import DecoderConfig, ModelConfig, decoder_vocab
from siglip_jax.models.decoder import output_layer, training_inputs
from siglip_jax.objectives.base import Objective, ObjectiveInputs, ShapeSpecs
from siglip_jax.objectives.chunked_xent import chunked_cross_entropy
from siglip_jax.records import ConfigError

_RNG_SALT = 0xDEC


def _decoder(model: ModelConfig) -> DecoderConfig:
    if model.decoder is None:
        raise ConfigError("config.loss.decoder needs config.model.decoder (the decoder's "
                          "shape, e.g. dict(max_len=64))")
    return model.decoder


def batch_shapes(model: ModelConfig, options: Mapping[str, object], batch: int) -> ShapeSpecs:
    """The batch entries the decoder loss reads (global shapes, numpy dtypes)."""
    length, tasks = _decoder(model).max_len, options["tasks_per_example"]
    rows = (batch,) if tasks == 1 else (batch, tasks)
    return {"dec_tokens": ((*rows, length), np.int32),
            "dec_target_mask": ((*rows, length), np.float32),
            "dec_parallel": (rows, np.bool_)}


def token_ce(logits_bxlxv: jax.Array, targets_bxl: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(CE [B, L] float32, argmax [B, L] int32) of full logits [B, L, V]."""
    logits = logits_bxlxv.astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    ce_bxl = -jnp.take_along_axis(logp, targets_bxl[..., None], axis=-1)[..., 0]
    return ce_bxl, jnp.argmax(logits, axis=-1).astype(jnp.int32)


def token_loss(logits_bxlxv: jax.Array, targets_bxl: jax.Array, weights_bxl: jax.Array
               ) -> tuple[jax.Array, jax.Array]:
    """(Σ w·CE / Σ w, Σ w·[argmax = target] / Σ w) over the weighted positions (0 if none)."""
    ce_bxl, argmax_bxl = token_ce(logits_bxlxv, targets_bxl)
    count = jnp.maximum(jnp.sum(weights_bxl), 1.0)
    hit_bxl = (argmax_bxl == targets_bxl).astype(jnp.float32)
    return jnp.sum(ce_bxl * weights_bxl) / count, jnp.sum(hit_bxl * weights_bxl) / count


def make(model: ModelConfig, total_steps: int, options: Mapping[str, object],
         mesh: Mesh | None) -> Objective:
    """The decoder objective for the `model`'s decoder (see the module docstring); it is on
    from the first step."""
    del total_steps, mesh  # Activations follow the batch sharding of the main forward pass.
    decoder = _decoder(model)  # One-line error without a model.decoder.
    vocab = decoder_vocab(model)
    weight, rows = float(options["weight"]), int(options["tasks_per_example"])
    chunk, dtype = int(options["vocab_chunk"]), decoder.dtype

    def objective(inputs: ObjectiveInputs) -> tuple[jax.Array, dict[str, jax.Array]]:
        batch = inputs.batch
        image = batch["image"]
        image_mask = image["mask"] if isinstance(image, Mapping) else None
        image_tokens = inputs.out["img/encoded"]
        dec_tokens = jnp.asarray(batch["dec_tokens"], jnp.int32)
        want = 2 if rows == 1 else 3
        if dec_tokens.ndim != want or (rows > 1 and dec_tokens.shape[1] != rows):
            raise ValueError(
                f"loss.decoder.tasks_per_example={rows} expects dec_tokens "
                f"{'[B, L]' if rows == 1 else f'[B, {rows}, L]'}, got {dec_tokens.shape}; "
                "match it to the pp (locca_task(all_tasks=True) gives one row per task)")
        if rows > 1:  # [B, T, ...] -> [B·T, ...], example-major; image tokens repeated.
            image_tokens = jnp.repeat(image_tokens, rows, axis=0)
            image_mask = None if image_mask is None else jnp.repeat(image_mask, rows, axis=0)
        dec_tokens = dec_tokens.reshape(-1, dec_tokens.shape[-1])
        target_mask = jnp.reshape(batch["dec_target_mask"], dec_tokens.shape)
        parallel = jnp.asarray(batch["dec_parallel"], bool).reshape(-1)
        tokens, targets, weights = training_inputs(dec_tokens, target_mask, parallel,
                                                   vocab.mask_id)
        out = inputs.model.apply(
            {"params": inputs.params}, image_tokens, tokens, parallel=parallel,
            train=True, image_mask=image_mask, method="decode", return_hidden=chunk > 0,
            rngs={"dropout": jax.random.fold_in(inputs.rng, _RNG_SALT)})
        if chunk > 0:  # out: hidden states [B·T, L, D]; logits block by block.
            kernel, bias = output_layer(inputs.params["dec"])
            ce_bxl, argmax_bxl = chunked_cross_entropy(out, kernel, bias, targets,
                                                       chunk=chunk, dtype=dtype)
        else:  # out: the full float32 logits [B·T, L, V].
            ce_bxl, argmax_bxl = token_ce(out, targets)
        hit = (argmax_bxl == targets).astype(jnp.float32) * weights
        count = jnp.maximum(jnp.sum(weights), 1.0)
        loss = jnp.sum(ce_bxl * weights) / count
        metrics = {"decoder/loss": loss, "decoder/token_acc": jnp.sum(hit) / count}
        for task in TASKS:  # Per-task accuracy, the task read from each row's first token.
            w = weights * (dec_tokens[:, :1] == vocab.task_id(task))
            metrics[f"decoder/{task}_token_acc"] = (
                jnp.sum(hit * w) / jnp.maximum(jnp.sum(w), 1.0))
        return weight * loss, metrics

    return objective
