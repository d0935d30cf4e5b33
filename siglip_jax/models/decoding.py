"""Inference with the LocCa caption decoder: batched greedy (autoregressive) and one-shot
parallel decoding, as pure functions to jit.

Sequences are decoder ids [B, L] (`data/locca.DecoderVocab`): a prompt `[task, prefix...]`
of `prefix_len` ids, then the generated ids up to and including eos, then 0 (pad).

Greedy: a fixed-shape `lax.while_loop` over positions. At step t the decoder runs on the
whole current sequence shifted right by one (CapPa's autoregressive input, id 0 first:
models/decoder.shift_right; causal self-attention, so ids after t do not matter) and the
argmax of its logits at position t + 1 becomes id t + 1 for every row whose prompt ends at
or before t + 1 and that has not produced eos yet. The loop stops when every row is done or
the sequence is full (L - 1 steps at most). There is no key/value cache: each step re-runs
the decoder on L ids, O(L²) decoder work per sequence, fine for evaluation-sized decoders
and short targets.

Box constraint (`box_rows`, e.g. the "aref" rows): the 4 ids after the prompt are restricted
to the location ids and the 5th is eos, so a referring answer always parses as a box. Other
rows are unconstrained (any id may follow).

Parallel (CapPa): one decoder pass with full self-attention on `[prompt, mask_id...]` (the
same inputs as parallel training, models/decoder.training_inputs; no shift); the argmax at
every position after the prompt is the output, cut after the first eos.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import VariableDict

from siglip_jax.data.locca import DecoderVocab
from siglip_jax.models.common import ImageBatch
from siglip_jax.models.decoder import shift_right

BOX_TOKENS = 4
LogitsFn = Callable[[jax.Array], jax.Array]  # decoder input ids [B, L] -> logits [B, L, V]


def prompt_mask(prefix_len_b: jax.Array, length: int) -> jax.Array:
    """bool [B, L]: True at the prompt positions (position < prefix_len)."""
    return jnp.arange(length)[None, :] < jnp.asarray(prefix_len_b, jnp.int32)[:, None]


def greedy_decode(logits_fn: LogitsFn, prompt_bxl: jax.Array, prefix_len_b: jax.Array, *,
                  eos_id: int, box_rows_b: jax.Array | None = None,
                  loc_range: tuple[int, int] | None = None) -> jax.Array:
    """Greedy autoregressive decoding (see the module docstring) -> ids int32 [B, L].

    Args:
      logits_fn: causal decoder logits [B, L, V] of input ids [B, L] (the image is closed
        over); it is given the sequence shifted right (position p sees ids < p and predicts
        id p).
      prompt_bxl: the prompts, left-aligned; ids at positions >= prefix_len are ignored.
      prefix_len_b: prompt lengths (>= 1: the task token).
      eos_id: the id that ends a row.
      box_rows_b: bool [B], rows whose answer is a box (needs `loc_range`).
      loc_range: [start, stop) of the location ids.
    """
    prefix_len_b = jnp.asarray(prefix_len_b, jnp.int32)
    batch, length = prompt_bxl.shape
    tokens = jnp.where(prompt_mask(prefix_len_b, length), prompt_bxl, 0).astype(jnp.int32)
    if box_rows_b is not None and loc_range is None:
        raise ValueError("greedy_decode: box_rows_b needs loc_range (the location id range)")
    box_rows_b = (jnp.zeros((batch,), bool) if box_rows_b is None
                  else jnp.asarray(box_rows_b, bool).reshape(batch))

    def cond(carry):
        t, _, done_b = carry
        return (t < length - 1) & ~jnp.all(done_b)

    def body(carry):
        t, tokens, done_b = carry
        pos = t + 1  # The position being written.
        logits_bxv = jax.lax.dynamic_index_in_dim(logits_fn(shift_right(tokens)), pos, axis=1,
                                                  keepdims=False)
        if loc_range is not None:
            vocab = jnp.arange(logits_bxv.shape[-1])
            is_loc_v = (vocab >= loc_range[0]) & (vocab < loc_range[1])
            k_b = pos - prefix_len_b  # 0-based index into the answer.
            want_loc_b = box_rows_b & (k_b < BOX_TOKENS)
            want_eos_b = box_rows_b & (k_b == BOX_TOKENS)
            allowed_bxv = jnp.where(want_loc_b[:, None], is_loc_v[None, :],
                                    jnp.where(want_eos_b[:, None], (vocab == eos_id)[None, :],
                                              True))
            logits_bxv = jnp.where(allowed_bxv, logits_bxv, -jnp.inf)
        next_b = jnp.argmax(logits_bxv, axis=-1).astype(jnp.int32)
        write_b = (pos >= prefix_len_b) & ~done_b
        tokens = tokens.at[:, pos].set(jnp.where(write_b, next_b, tokens[:, pos]))
        done_b = done_b | (write_b & (next_b == eos_id))
        return t + 1, tokens, done_b

    start = jnp.maximum(jnp.min(prefix_len_b) - 1, 0)
    _, tokens, _ = jax.lax.while_loop(cond, body, (start, tokens, jnp.zeros((batch,), bool)))
    return tokens


def cut_after_eos(tokens_bxl: jax.Array, prefix_len_b: jax.Array, eos_id: int) -> jax.Array:
    """Zero every id after the first eos that follows the prompt."""
    length = tokens_bxl.shape[1]
    answer = ~prompt_mask(prefix_len_b, length)
    is_eos = answer & (tokens_bxl == eos_id)
    eos_before = jnp.cumsum(is_eos, axis=1) - is_eos  # eos strictly before the position
    return jnp.where(eos_before > 0, 0, tokens_bxl)


def parallel_decode(logits_fn: LogitsFn, prompt_bxl: jax.Array, prefix_len_b: jax.Array, *,
                    eos_id: int, mask_id: int) -> jax.Array:
    """One-shot parallel decoding (see the module docstring) -> ids int32 [B, L].

    `logits_fn` must run the decoder with full (parallel) self-attention.
    """
    length = prompt_bxl.shape[1]
    prompt = prompt_mask(prefix_len_b, length)
    inputs = jnp.where(prompt, prompt_bxl, mask_id).astype(jnp.int32)
    guess = jnp.argmax(logits_fn(inputs), axis=-1).astype(jnp.int32)
    return cut_after_eos(jnp.where(prompt, inputs, guess), prefix_len_b, eos_id)


def image_tokens(model: nn.Module, params: VariableDict, images: ImageBatch
                 ) -> tuple[jax.Array, jax.Array | None]:
    """(un-pooled image tokens [B, N, W], NaFlex patch mask [B, N] or None) of a two-towers
    model's image tower."""
    _, _, out = model.apply({"params": params}, images, None)
    mask = images["mask"] if isinstance(images, Mapping) else None
    return out["img/encoded"], mask


def decode_images(model: nn.Module, params: VariableDict, images: ImageBatch,
                  prompt_bxl: jax.Array, prefix_len_b: jax.Array, *, vocab: DecoderVocab,
                  parallel: bool = False, box_rows_b: jax.Array | None = None) -> jax.Array:
    """Decoded ids [B, L] for images (an image batch or a NaFlex dict) and prompts, with a
    two-towers `model` that has a decoder: greedy (box rows constrained to location ids, see
    the module docstring) or, with `parallel=True`, one-shot parallel. Jit it with `model` and
    the keywords static, e.g. `jax.jit(functools.partial(decode_images, model, vocab=v))`."""
    tokens_bxnxw, mask_bxn = image_tokens(model, params, images)

    def logits_fn(ids_bxl: jax.Array) -> jax.Array:
        return model.apply({"params": params}, tokens_bxnxw, ids_bxl, parallel=parallel,
                           image_mask=mask_bxn, method="decode")

    if parallel:
        return parallel_decode(logits_fn, prompt_bxl, prefix_len_b, eos_id=vocab.eos_id,
                               mask_id=vocab.mask_id)
    loc = (vocab.loc_start, vocab.loc_start + vocab.num_bins)
    return greedy_decode(logits_fn, prompt_bxl, prefix_len_b, eos_id=vocab.eos_id,
                         box_rows_b=box_rows_b, loc_range=loc if box_rows_b is not None else None)
