"""The LocCa decoder loss (SigLIP 2): token cross-entropy of the caption decoder.

Configured as `config.loss.decoder = dict(weight=1.0)`; needs `config.model.decoder` (the
decoder's shape, models/decoder.py). The batch carries, per example, one decoder sequence
(made by the input pipeline):

  "dec_tokens"      int32 [B, L]   `[task, prefix..., target..., eos, 0-pad]` in DecoderVocab
                                   ids (L = model.decoder.max_len)
  "dec_target_mask" float32 [B, L] 1.0 at the positions holding target tokens (incl. eos)
  "dec_parallel"    bool [B]       predict this example's targets in parallel (CapPa)

One decoder pass of length L per (micro-)batch (models/decoder.training_inputs): causal
self-attention and next-token targets for autoregressive rows, full self-attention over the
input with targets (and padding) replaced by the mask id for parallel rows. The decoder
cross-attends to the main forward pass's un-pooled image tokens (out["img/encoded"]; for a
NaFlex batch the patch mask hides padding). Loss = weight × Σ token CE / number of target
tokens of the micro-batch; metrics "decoder/loss" (the unweighted mean CE) and
"decoder/token_acc" (argmax accuracy over the target tokens).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from siglip_jax.config import ConfigError

OPTIONS: dict[str, Any] = {"weight": 1.0}
_RNG_SALT = 0xDEC


def check_options(raw: Mapping[str, Any]) -> dict[str, Any]:
    """`weight` (a finite number >= 0, default 1.0); unknown options raise ValueError."""
    unknown = sorted(set(raw) - set(OPTIONS))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}; valid: {sorted(OPTIONS)}")
    options = {**OPTIONS, **raw}
    weight = options["weight"]
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (
            np.isfinite(weight) and weight >= 0):
        raise ValueError(f"weight must be a finite number >= 0, got {weight!r}")
    options["weight"] = float(weight)
    return options


def _max_len(run: Any) -> int:
    from siglip_jax.models.decoder import decoder_kwargs
    from siglip_jax.models.variants import text_kwargs
    from siglip_jax.schema import thaw

    if run.model.decoder is None:
        raise ConfigError("config.loss.decoder needs config.model.decoder (the decoder's "
                          "shape, e.g. dict(max_len=64))")
    return decoder_kwargs(thaw(run.model.decoder), text_kwargs(thaw(run.model.text)))["max_len"]


def batch_shapes(run: Any, options: dict[str, Any], batch: int
                 ) -> dict[str, tuple[tuple[int, ...], Any]]:
    """The batch entries the decoder loss reads (global shapes, numpy dtypes)."""
    length = _max_len(run)
    return {"dec_tokens": ((batch, length), np.int32),
            "dec_target_mask": ((batch, length), np.float32),
            "dec_parallel": ((batch,), np.bool_)}


def token_loss(logits_bxlxv: jax.Array, targets_bxl: jax.Array, weights_bxl: jax.Array
               ) -> tuple[jax.Array, jax.Array]:
    """(Σ w·CE / Σ w, Σ w·[argmax = target] / Σ w) over the weighted positions (0 if none)."""
    logits = logits_bxlxv.astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    ce_bxl = -jnp.take_along_axis(logp, targets_bxl[..., None], axis=-1)[..., 0]
    count = jnp.maximum(jnp.sum(weights_bxl), 1.0)
    loss = jnp.sum(ce_bxl * weights_bxl) / count
    hit_bxl = (jnp.argmax(logits, axis=-1) == targets_bxl).astype(jnp.float32)
    return loss, jnp.sum(hit_bxl * weights_bxl) / count


def make(run: Any, options: dict[str, Any], mesh: Any) -> Any:
    """The decoder objective of a run (see the module docstring)."""
    del mesh  # Activations follow the batch sharding of the main forward pass.
    from siglip_jax.models.decoder import training_inputs, vocab_of
    from siglip_jax.schema import thaw

    _max_len(run)  # One-line error without a model.decoder.
    mask_id = vocab_of(thaw(run.model.decoder), run.model.vocab_size).mask_id
    weight = float(options["weight"])

    def objective(inputs: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
        batch = inputs.batch
        image = batch["image"]
        image_mask = image["mask"] if isinstance(image, Mapping) else None
        parallel = jnp.asarray(batch["dec_parallel"], bool)
        tokens, targets, weights = training_inputs(
            batch["dec_tokens"], batch["dec_target_mask"], parallel, mask_id)
        logits = inputs.model.apply(
            {"params": inputs.params}, inputs.out["img/encoded"], tokens, parallel=parallel,
            train=True, image_mask=image_mask, method="decode",
            rngs={"dropout": jax.random.fold_in(inputs.rng, _RNG_SALT)})
        loss, acc = token_loss(logits, targets, weights)
        return weight * loss, {"decoder/loss": loss, "decoder/token_acc": acc}

    return objective
