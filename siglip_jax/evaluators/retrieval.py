"""Image↔text retrieval: recall@k in both directions with several captions per image.

Protocol (COCO / Flickr30k style, as big_vision `image_text_retrieval`): every image has up to
C captions. Image→text: an image query is a hit at k if any of its captions is among the k
texts scoring highest against it. Text→image: a caption query is a hit at k if its own image is
among the k images scoring highest. Scores are dot products of the L2-normalised embeddings at
full float32 precision; the rank of a query is the number of valid negative candidates scoring
at least as high as its best positive (a tie counts against the query, so a collapsed model
cannot score well). A query whose scores against the valid candidates are not all finite is a
miss and is counted in `nonfinite`; when any is, every recall is reported as NaN. Every valid
image is a candidate for every caption; images without any valid caption are not image queries.

Exactness: the last, partial batch is padded and masked (`_mask`), and captions missing from
an image are masked (`_caption_mask`), so no example is dropped or counted twice. Sharding:
embeddings are computed batch-sharded over the mesh's batch axes; the candidate side is then
replicated and every query batch is scored sharded over the batch axes.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from siglip_jax.evaluators.common import MASK_KEY, Embedder
from siglip_jax.sharding import make_global_batch, replicated

CAPTION_MASK_KEY = "_caption_mask"
RECALL_KS = (1, 5, 10)


def _scores(q_qxd: jax.Array, k_kxd: jax.Array) -> jax.Array:
    return jnp.matmul(q_qxd, k_kxd.T, precision=jax.lax.Precision.HIGHEST)


@functools.partial(jax.jit, static_argnames=("num_captions", "ks"))
def img2txt_hits(zimg_bxd: jax.Array, img_valid_b: jax.Array, offset: jax.Array,
                 ztxt_mxd: jax.Array, txt_valid_m: jax.Array, *, num_captions: int,
                 ks: tuple[int, ...]) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Image queries (global ids offset + row) vs all texts (text m belongs to image
    m // num_captions): (hits per k, number of queries, queries with non-finite scores)."""
    scores_bxm = _scores(zimg_bxd, ztxt_mxd)
    txt_owner_m = jnp.arange(ztxt_mxd.shape[0]) // num_captions
    ids_b = offset + jnp.arange(zimg_bxd.shape[0])
    positive_bxm = (txt_owner_m[None, :] == ids_b[:, None]) & txt_valid_m[None, :]
    best_b = jnp.max(jnp.where(positive_bxm, scores_bxm, -jnp.inf), axis=1)
    negative_bxm = ~positive_bxm & txt_valid_m[None, :]
    rank_b = jnp.sum(negative_bxm & ~(scores_bxm < best_b[:, None]), axis=1)
    finite_b = jnp.all(jnp.isfinite(scores_bxm) | ~txt_valid_m[None, :], axis=1)
    query_b = img_valid_b & positive_bxm.any(axis=1)
    hits = jnp.stack([jnp.sum((rank_b < k) & query_b & finite_b) for k in ks])
    return hits, jnp.sum(query_b), jnp.sum(query_b & ~finite_b)


@functools.partial(jax.jit, static_argnames=("ks",))
def txt2img_hits(ztxt_bxcxd: jax.Array, txt_valid_bxc: jax.Array, offset: jax.Array,
                 zimg_nxd: jax.Array, img_valid_n: jax.Array,
                 ks: tuple[int, ...]) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Caption queries of images offset + row vs all images: (hits per k, number of queries,
    queries with non-finite scores)."""
    b, c, d = ztxt_bxcxd.shape
    scores_qxn = _scores(ztxt_bxcxd.reshape(b * c, d), zimg_nxd)
    owner_q = offset + jnp.repeat(jnp.arange(b), c)
    positive_q = jnp.take_along_axis(scores_qxn, owner_q[:, None], axis=1)
    other_qxn = jnp.arange(zimg_nxd.shape[0])[None, :] != owner_q[:, None]
    negative_qxn = other_qxn & img_valid_n[None, :]
    rank_q = jnp.sum(negative_qxn & ~(scores_qxn < positive_q), axis=1)
    finite_q = jnp.all(jnp.isfinite(scores_qxn) | ~img_valid_n[None, :], axis=1)
    query_q = txt_valid_bxc.reshape(b * c)
    hits = jnp.stack([jnp.sum((rank_q < k) & query_q & finite_q) for k in ks])
    return hits, jnp.sum(query_q), jnp.sum(query_q & ~finite_q)


class RetrievalEvaluator:
    """Image↔text recall@k of a two-tower model on a captioned image set.

    Args:
      embedder: sharded tower calls (see evaluators.common.Embedder).
      batches: returns a fresh iterator of this process's padded eval batches with keys
        "image" [b, H, W, 3], "labels" [b, C, L] (C captions per image), "_mask" [b] and
        optionally "_caption_mask" [b, C] (missing captions; default: all present).
      ks: the k of recall@k.
    """

    def __init__(self, *, embedder: Embedder,
                 batches: Callable[[], Iterator[dict[str, np.ndarray]]],
                 ks: Sequence[int] = RECALL_KS, every_n_steps: int = 0):
        self.embedder = embedder
        self.every_n_steps = every_n_steps  # Cadence during training (0: only at the end).
        self.batches = batches
        self.ks = tuple(int(k) for k in ks)

    def embed(self, params: optax.Params) -> list[dict[str, jax.Array]]:
        """Per global batch: zimg [B, D], ztxt [B, C, D], image and caption validity."""
        out = []
        for batch in self._global_batches():
            out.append({
                "zimg": self.embedder.image_fn(params, batch["image"]),
                "ztxt": self.embedder.batch_text_fn(params, batch["labels"]),
                "img_valid": batch[MASK_KEY],
                "txt_valid": batch[CAPTION_MASK_KEY] & batch[MASK_KEY][:, None],
            })
        return out

    def run(self, params: optax.Params) -> dict[str, float]:
        """Evaluates and returns img2txt_r{k}, txt2img_r{k}, num_images and num_texts."""
        return recall_at_k(self.embed(params), self.embedder.mesh, self.ks)

    def _global_batches(self) -> Iterator[dict[str, jax.Array]]:
        for batch in self.batches():
            labels = np.asarray(batch["labels"])
            if labels.ndim == 2:  # One caption per image.
                labels = labels[:, None, :]
            if labels.ndim != 3:
                raise ValueError(f"retrieval: 'labels' must be token ids [batch, captions, len] "
                                 f"or [batch, len], got shape {labels.shape}")
            caption_mask = batch.get(CAPTION_MASK_KEY)
            if caption_mask is None:
                caption_mask = np.ones(labels.shape[:2], bool)
            local = {"image": batch["image"], "labels": labels, MASK_KEY: batch[MASK_KEY],
                     CAPTION_MASK_KEY: np.asarray(caption_mask, bool).reshape(labels.shape[:2])}
            yield make_global_batch(local, self.embedder.mesh, self.embedder.batch_axes)


def recall_at_k(embedded: Sequence[dict[str, jax.Array]], mesh: jax.sharding.Mesh,
                ks: Sequence[int] = RECALL_KS) -> dict[str, float]:
    """Recall@k both ways from per-batch embeddings (see RetrievalEvaluator.embed); NaN recalls
    and a `nonfinite` query count when any score is NaN/Inf."""
    if not embedded:
        raise ValueError("retrieval: the evaluation set produced no batches")
    ks = tuple(int(k) for k in ks)
    num_captions = embedded[0]["ztxt"].shape[1]

    def gather_all(zimg, img_valid, ztxt, txt_valid):
        cat = lambda xs: jnp.concatenate(xs, axis=0)
        ztxt_nxcxd = cat(ztxt)
        return (cat(zimg), cat(img_valid), ztxt_nxcxd.reshape(-1, ztxt_nxcxd.shape[-1]),
                cat(txt_valid).reshape(-1))

    zimg_nxd, img_valid_n, ztxt_mxd, txt_valid_m = jax.jit(
        gather_all, out_shardings=replicated(mesh))(
        *([e[key] for e in embedded] for key in ("zimg", "img_valid", "ztxt", "txt_valid")))

    i2t = np.zeros(len(ks), np.int64)
    t2i = np.zeros(len(ks), np.int64)
    num_images = num_texts = nonfinite = 0
    offset = 0
    for e in embedded:
        hits, count, bad = img2txt_hits(e["zimg"], e["img_valid"], np.int32(offset), ztxt_mxd,
                                        txt_valid_m, num_captions=num_captions, ks=ks)
        i2t += np.asarray(hits)
        num_images += int(count)
        nonfinite += int(bad)
        hits, count, bad = txt2img_hits(e["ztxt"], e["txt_valid"], np.int32(offset), zimg_nxd,
                                        img_valid_n, ks=ks)
        t2i += np.asarray(hits)
        num_texts += int(count)
        nonfinite += int(bad)
        offset += e["zimg"].shape[0]
    if not num_images or not num_texts:
        raise ValueError("retrieval: no valid image-caption pairs in the evaluation set")
    result = {f"img2txt_r{k}": float(h) / num_images for k, h in zip(ks, i2t, strict=True)}
    result.update({f"txt2img_r{k}": float(h) / num_texts for k, h in zip(ks, t2i, strict=True)})
    result.update(num_images=float(num_images), num_texts=float(num_texts))
    if nonfinite:  # Never report a score for a model that produces NaN/Inf.
        result = {k: (math.nan if k.startswith(("img2txt", "txt2img")) else v)
                  for k, v in result.items()}
        result["nonfinite"] = float(nonfinite)
    return result
