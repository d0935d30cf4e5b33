"""Zero-shot classification: class names × prompt templates → text classifier → image top-k.

Protocol (the standard one from CLIP/SigLIP papers): every class name is put into every
template (class names and templates may be packaged assets, see evaluators/prompts.py); the
prompts are tokenized as the builder says (by default canonicalised: lower-cased, punctuation
removed, as big_vision and HF SigLIP do); the text embeddings (L2-normalised by the model) are
renormalised, averaged over templates per class and renormalised again; an image is assigned
the class with the largest dot product (computed at full float32 precision). Metrics: top-1
and top-5 accuracy and mean per-class recall, from exact counts over the evaluation set
(padding examples of the last batch are masked out). Metrics cannot flatter a broken model: a
class tied with the true one counts as ranked above it (the rank of an image is the number of
other classes scoring at least as high), and an image whose scores are not all finite is a miss
and is counted in `nonfinite`; when any is, the accuracies are reported as NaN.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from siglip_jax.evaluators.common import MASK_KEY, Embedder
from siglip_jax.evaluators.prompts import prompts
from siglip_jax.sharding import make_global_batch

__all__ = ["ZeroShotEvaluator", "accumulate", "class_embeddings", "prompts"]


def class_embeddings(ztxt_ctxd: jax.Array, num_classes: int) -> jax.Array:
    """Averages normalised prompt embeddings per class and renormalises: [C*T, D] → [C, D]."""
    ztxt = ztxt_ctxd.reshape(num_classes, -1, ztxt_ctxd.shape[-1])
    ztxt = ztxt / (jnp.linalg.norm(ztxt, axis=-1, keepdims=True) + 1e-8)
    zcls = ztxt.mean(axis=1)
    return zcls / (jnp.linalg.norm(zcls, axis=-1, keepdims=True) + 1e-8)


@jax.jit
def _counts(zimg_nxd, zcls_cxd, labels_n, mask_n):
    """Per-batch counts: top-1 and top-5 hits, and per-class hits/totals for mean recall."""
    logits = jnp.matmul(zimg_nxd, zcls_cxd.T, precision=jax.lax.Precision.HIGHEST)
    num_classes = zcls_cxd.shape[0]
    k = min(5, num_classes)
    label_logit = jnp.take_along_axis(logits, labels_n[:, None], axis=1)
    other = jnp.arange(num_classes)[None, :] != labels_n[:, None]
    # How many other classes are not strictly below the true one (ties and NaN count above).
    rank = (other & ~(logits < label_logit)).sum(axis=1)
    finite_n = jnp.isfinite(logits).all(axis=1)
    top1 = (rank == 0) & mask_n & finite_n
    top5 = (rank < k) & mask_n & finite_n
    onehot = jax.nn.one_hot(labels_n, num_classes) * mask_n[:, None]
    return {"top1": top1.sum(), "top5": top5.sum(), "count": mask_n.sum(),
            "nonfinite": (mask_n & ~finite_n).sum(),
            "class_hits": (onehot * top1[:, None]).sum(0), "class_count": onehot.sum(0)}


class ZeroShotEvaluator:
    """Zero-shot classification accuracy of a two-tower model on a labelled image set.

    Args:
      embedder: sharded tower calls (see evaluators.common.Embedder).
      class_names: one name per label id.
      templates: prompt templates with `{}` where the class name goes.
      tokenize: list of strings → int32 token ids [N, L], as used in training.
      batches: returns a fresh iterator of this process's padded eval batches with keys
        "image", "label" and "_mask" (see data.input.eval_batches).
    """

    def __init__(self, *, embedder: Embedder, class_names: Sequence[str],
                 templates: Sequence[str], tokenize: Callable[[list[str]], np.ndarray],
                 batches: Callable[[], Iterator[dict[str, np.ndarray]]],
                 every_n_steps: int = 0):
        self.embedder = embedder
        self.every_n_steps = every_n_steps  # Cadence during training (0: only at the end).
        self.class_names = list(class_names)
        self.templates = list(templates)
        self.tokens = tokenize(prompts(self.class_names, self.templates))
        self.batches = batches

    def classifier(self, params: optax.Params) -> jax.Array:
        """The [C, D] class embeddings for `params`."""
        ztxt = self.embedder.embed_texts(params, self.tokens)
        return class_embeddings(ztxt, len(self.class_names))

    def run(self, params: optax.Params) -> dict[str, float]:
        """Evaluates: top1, top5, mean_class_recall, num_examples (+ nonfinite when > 0)."""
        zcls = self.classifier(params)
        return accumulate(
            _counts(self.embedder.image_fn(params, batch["image"]), zcls, batch["label"],
                    batch[MASK_KEY])
            for batch in self._global_batches())

    def _global_batches(self) -> Iterator[dict[str, jax.Array]]:
        for batch in self.batches():
            local = {k: batch[k] for k in ("image", "label", MASK_KEY)}
            yield make_global_batch(local, self.embedder.mesh, self.embedder.batch_axes)


def accumulate(counts: Iterable[dict[str, jax.Array]]) -> dict[str, float]:
    """Sums per-batch counts and turns them into accuracies (NaN if any score was non-finite)."""
    total: dict[str, np.ndarray] = {}
    for batch_counts in counts:
        for key, value in batch_counts.items():
            total[key] = total.get(key, 0) + np.asarray(value, np.float64)
    count = float(total["count"])
    seen = total["class_count"] > 0
    nonfinite = float(total.get("nonfinite", 0))
    result = {
        "top1": float(total["top1"]) / count,
        "top5": float(total["top5"]) / count,
        "mean_class_recall": float(np.mean(total["class_hits"][seen] / total["class_count"][seen])),
        "num_examples": count,
    }
    if nonfinite:
        result.update(top1=math.nan, top5=math.nan, mean_class_recall=math.nan,
                      nonfinite=nonfinite)
    return result
