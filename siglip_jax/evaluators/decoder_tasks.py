"""Evaluators of the LocCa caption decoder: captioning, referring expressions (phrase -> box)
and grounded captioning (box -> phrase).

Each evaluation example is one decoder sequence made by the `locca_task` pp op with a single
task, e.g. `locca_task(max_len=16, tasks=("aref",), box_key="dec_box")`: the prompt is
`dec_tokens` up to the first position of `dec_target_mask`, the reference answer the ids at
the masked positions (ending with eos). The model decodes the prompt (models/decoding.py:
greedy, or one-shot parallel with `parallel=True`) and the answer is the generated ids after
the prompt up to and including the first eos. Rows whose task token is not the evaluator's
task (the pp op falls back to "cap" for examples without boxes) and padding rows are skipped.

Metrics (per evaluator; the caller prefixes the evaluator's name):
  captioning:           exact_match (answer equals the reference, or any of the references
                        in "dec_refs" [C, L] when the pp gives `refs_key="dec_refs"`),
                        token_acc (generated id == reference id, position by position, over
                        the reference's ids incl. eos), num_examples;
  referring:            acc@0.5 (IoU of the decoded box with "dec_box" >= 0.5), mean_iou,
                        num_examples; a box with a non-location id has IoU 0;
  grounded_captioning:  exact_match, token_acc, num_examples.
No CIDEr: no maintained CIDEr package is installed with this project.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from siglip_jax.data.locca import DecoderVocab, tokens_to_box
from siglip_jax.evaluators.common import MASK_KEY
from siglip_jax.models import decoding
from siglip_jax.sharding import batch_sharding, make_global_batch, replicated

TASK_OF = {"captioning": "cap", "referring": "aref", "grounded_captioning": "gcap"}
BOX_KEY, REFS_KEY = "dec_box", "dec_refs"
IOU_THRESHOLD = 0.5
# `(params, global batch) -> {"generated" [B, L], the batch's other arrays}` (make_decode_fn).
DecodeFn = Callable[[optax.Params, Mapping[str, jax.Array]], dict[str, jax.Array]]


def box_iou(a_nx4: np.ndarray, b_nx4: np.ndarray) -> np.ndarray:
    """IoU [N] of boxes (ymin, xmin, ymax, xmax) row by row; 0 for an empty union or a NaN
    coordinate (an inverted box has area 0)."""
    a = np.asarray(a_nx4, np.float64).reshape(-1, 4)
    b = np.asarray(b_nx4, np.float64).reshape(-1, 4)
    area = lambda x: np.clip(x[:, 2] - x[:, 0], 0, None) * np.clip(x[:, 3] - x[:, 1], 0, None)
    h = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    w = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = h * w
    union = area(a) + area(b) - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)
    return np.nan_to_num(iou, nan=0.0)


def split_rows(tokens_bxl: np.ndarray, target_mask_bxl: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray]:
    """(prompt length [B], reference length [B]) of pp sequences: the prompt ends at the first
    target position; the reference is the masked positions (ids incl. eos)."""
    mask = np.asarray(target_mask_bxl) > 0
    has = mask.any(axis=1)
    prefix_len = np.where(has, mask.argmax(axis=1), np.asarray(tokens_bxl).shape[1])
    return prefix_len.astype(np.int32), mask.sum(axis=1).astype(np.int32)


def answer_of(row: np.ndarray, start: int, eos_id: int) -> list[int]:
    """The ids of `row` from `start` up to and including the first eos (or the row's end)."""
    out = []
    for token in np.asarray(row)[start:].tolist():
        out.append(int(token))
        if token == eos_id:
            break
    return out


def text_scores(generated_bxl: np.ndarray, tokens_bxl: np.ndarray,
                target_mask_bxl: np.ndarray, valid_b: np.ndarray, eos_id: int,
                refs_bxcxl: np.ndarray | None = None) -> dict[str, float]:
    """exact_match, token_acc and num_examples of generated sequences vs the references."""
    prefix_len, ref_len = split_rows(tokens_bxl, target_mask_bxl)
    exact = hits = count = rows = 0
    for i in np.flatnonzero(valid_b):
        p, n = int(prefix_len[i]), int(ref_len[i])
        reference = [int(t) for t in tokens_bxl[i, p:p + n]]
        answer = answer_of(generated_bxl[i], p, eos_id)
        options = [reference]
        if refs_bxcxl is not None:
            options += [answer_of(r, 0, eos_id) for r in refs_bxcxl[i] if r[0] != 0]
        exact += answer in options
        hits += int(np.sum(generated_bxl[i, p:p + n] == tokens_bxl[i, p:p + n]))
        count += n
        rows += 1
    if not rows:
        return {"exact_match": float("nan"), "token_acc": float("nan"), "num_examples": 0.0}
    return {"exact_match": exact / rows, "token_acc": hits / max(count, 1),
            "num_examples": float(rows)}


def box_scores(generated_bxl: np.ndarray, tokens_bxl: np.ndarray, target_mask_bxl: np.ndarray,
               boxes_bx4: np.ndarray, valid_b: np.ndarray, vocab: DecoderVocab
               ) -> dict[str, float]:
    """acc@0.5, mean_iou and num_examples of decoded boxes vs the true boxes."""
    prefix_len, _ = split_rows(tokens_bxl, target_mask_bxl)
    rows = np.flatnonzero(valid_b)
    if not len(rows):
        return {"acc@0.5": float("nan"), "mean_iou": float("nan"), "num_examples": 0.0}
    ids = np.stack([np.pad(generated_bxl[i, prefix_len[i]:prefix_len[i] + 4],
                           (0, 4 - len(generated_bxl[i, prefix_len[i]:prefix_len[i] + 4])))
                    for i in rows])
    iou = box_iou(tokens_to_box(ids, vocab), np.asarray(boxes_bx4)[rows])
    return {"acc@0.5": float(np.mean(iou >= IOU_THRESHOLD)), "mean_iou": float(np.mean(iou)),
            "num_examples": float(len(rows))}


def scores(kind: str, collected: Mapping[str, np.ndarray], vocab: DecoderVocab
           ) -> dict[str, float]:
    """The metrics of evaluator `kind` from the collected arrays (see DecoderTaskEvaluator)."""
    tokens = collected["dec_tokens"]
    known = [vocab.task_id(t) for t in TASK_OF.values()]
    unknown = collected[MASK_KEY] & ~np.isin(tokens[:, 0], known)
    if unknown.any():
        raise ValueError(f"{kind}: a sequence starts with id {tokens[unknown][0, 0]}, not one of "
                         f"the model decoder's task ids {known}: the pp's locca_task vocabulary "
                         "differs from the model's")
    valid = collected[MASK_KEY] & (tokens[:, 0] == vocab.task_id(TASK_OF[kind]))
    if kind == "referring":
        return box_scores(collected["generated"], tokens, collected["dec_target_mask"],
                          collected[BOX_KEY], valid, vocab)
    return text_scores(collected["generated"], tokens, collected["dec_target_mask"], valid,
                       vocab.eos_id, collected.get(REFS_KEY))


def make_decode_fn(model: nn.Module, vocab: DecoderVocab, mesh: Mesh,
                   batch_axes: tuple[str, ...], param_shardings: Mapping[str, object], *,
                   parallel: bool = False, constrain_boxes: bool = True) -> DecodeFn:
    """Jitted `(params, global batch) -> {"generated" [B, L], the batch minus "image"}`, all
    replicated: decodes each row's prompt (dec_tokens before its first target position) with
    `models.decoding.decode_images`, greedy or parallel; with `constrain_boxes` the "aref"
    rows answer 4 location ids and eos."""

    def decode(params: optax.Params, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        tokens, has_target = batch["dec_tokens"], batch["dec_target_mask"] > 0
        prefix_len = jnp.where(has_target.any(axis=1), jnp.argmax(has_target, axis=1),
                               tokens.shape[1])
        box_rows = (tokens[:, 0] == vocab.task_id("aref")) if constrain_boxes else None
        generated = decoding.decode_images(model, params, batch["image"], tokens, prefix_len,
                                           vocab=vocab, parallel=parallel, box_rows_b=box_rows)
        return {**{k: v for k, v in batch.items() if k != "image"}, "generated": generated}

    return jax.jit(decode, in_shardings=(param_shardings, batch_sharding(mesh, batch_axes)),
                   out_shardings=replicated(mesh))


class DecoderTaskEvaluator:
    """Decodes every evaluation example and scores it (see the module docstring).

    Args:
      kind: "captioning" | "referring" | "grounded_captioning".
      decode: `(params, global batch dict) -> dict` returning "generated" ids [B, L] and the
        batch's other arrays, replicated (`make_decode_fn`).
      batches: a fresh iterator of this process's padded eval batches ("image", "dec_tokens",
        "dec_target_mask", "_mask", and "dec_box" / "dec_refs" when used).
      mesh, batch_axes: where the global batches live.
      vocab: the decoder vocabulary.
    """

    def __init__(self, *, kind: str, decode: DecodeFn,
                 batches: Callable[[], Iterator[dict[str, np.ndarray]]], mesh: Mesh,
                 batch_axes: tuple[str, ...], vocab: DecoderVocab, every_n_steps: int = 0):
        if kind not in TASK_OF:
            raise ValueError(f"decoder evaluator kind {kind!r} is not one of {list(TASK_OF)}")
        self.kind, self.decode, self.batches = kind, decode, batches
        self.mesh, self.batch_axes, self.vocab = mesh, tuple(batch_axes), vocab
        self.every_n_steps = every_n_steps  # Cadence during training (0: only at the end).
        self.keys = ("image", "dec_tokens", "dec_target_mask", MASK_KEY,
                     *((BOX_KEY,) if kind == "referring" else ()))

    def collect(self, params: optax.Params) -> dict[str, np.ndarray]:
        """Generated ids and the batch arrays of the whole evaluation set (host numpy)."""
        parts: dict[str, list[np.ndarray]] = {}
        for local in self.batches():
            keys = [k for k in (*self.keys, REFS_KEY) if k in local]
            batch = make_global_batch({k: local[k] for k in keys}, self.mesh, self.batch_axes)
            for key, value in self.decode(params, batch).items():
                parts.setdefault(key, []).append(np.asarray(jax.device_get(value)))
        if not parts:
            raise ValueError(f"{self.kind}: the evaluation set produced no batches")
        return {k: np.concatenate(v) for k, v in parts.items()}

    def run(self, params: optax.Params) -> dict[str, float]:
        """Decodes the evaluation set and returns the metrics of this evaluator's kind."""
        return scores(self.kind, self.collect(params), self.vocab)
