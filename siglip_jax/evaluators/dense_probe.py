"""Dense-feature evaluation: a linear probe on frozen patch features predicts per-patch labels.

The image tower's un-pooled tokens (`out["img/encoded"]`, [B, N, W]) are the features. Each
patch gets the majority label of its pixels in the segmentation map (ties: the smallest
label; pixels equal to `ignore_label` do not vote; a patch with no voting pixel is skipped).
A linear probe is fitted in closed form by ridge regression onto one-hot labels on a train
section of the data, and evaluated on the held-out section:

    mu, ybar = feature and one-hot means;  Cxx = X^T X - n mu mu^T;  Cxy = X^T Y - n mu ybar^T
    w = (Cxx + lam I)^-1 Cxy,  b = ybar - mu w,  lam = ridge * trace(Cxx) / W

(`ridge` is relative to the mean feature variance, so it does not depend on the feature
scale). With `balanced`, the fit is weighted least squares: a train patch with label c
weighs n / (K n_c) (n_c patches of label c, K labels present), so background, most of a
demo map's patches, no longer outweighs the objects; mu, ybar, Cxx and Cxy are then the
weighted sums (a first pass over the train section's labels counts n_c).
Prediction = argmax_c (x w + b)_c. Only the sufficient statistics X^T X [W, W],
X^T Y [W, C] and the sums are accumulated over batches (on device in float32 per batch, on
the host in float64 across batches), so memory does not grow with the data and the fit is
deterministic. Metrics from the test confusion matrix M (rows true, columns predicted):
`accuracy` = trace(M) / sum(M), `miou` = mean over classes c present in the ground truth
or the predictions of M_cc / (row_c + col_c - M_cc), and `miou_fg` the same mean over the
present classes other than label 0 (the demo maps' background, which covers most patches).

Label sets for the demo's segmentation maps (0 background, 1 + class, class = colour·6 +
shape): "class" (37 labels), "shape" (7: 0 background, 1 + shape) and "colour" (7: 0
background, 1 + colour). "raw" uses the map's values as they are, with `num_classes` given
(a segmentation dataset such as a TFDS one with a `segmentation_mask`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from siglip_jax.data.demo_classes import SHAPES
from siglip_jax.evaluators.common import MASK_KEY
from siglip_jax.evaluators.config import LABEL_SETS, DenseProbeOptions
from siglip_jax.sharding import batch_sharding, make_global_batch, replicated


def num_labels(label_set: str, num_classes: int = 0) -> int:
    """Number of labels the probe predicts for a label set."""
    fixed = LABEL_SETS[label_set]
    return num_classes if fixed is None else fixed


def map_labels(segmentation: np.ndarray, label_set: str) -> np.ndarray:
    """Demo segmentation labels (0 background, 1 + class) → the label set's (int32)."""
    seg = np.asarray(segmentation).astype(np.int32)
    if label_set in ("class", "raw"):
        return seg
    fg = seg > 0
    cls = np.maximum(seg - 1, 0)
    part = cls % len(SHAPES) if label_set == "shape" else cls // len(SHAPES)
    return np.where(fg, 1 + part, 0).astype(np.int32)


def patch_labels(labels_bxhxw: np.ndarray, patch_hw: tuple[int, int], num_classes: int,
                 ignore_label: int | None = None) -> np.ndarray:
    """Majority label per patch, row-major [B, gh·gw] (int32); -1 where no pixel votes.

    Ties go to the smallest label; pixels equal to `ignore_label` do not vote. The map must
    be [B, H, W] (or [B, H, W, 1]) with H, W multiples of the patch; other labels than
    [0, num_classes) and ignore_label are an error.
    """
    labels = np.asarray(labels_bxhxw)
    if labels.ndim == 4 and labels.shape[-1] == 1:
        labels = labels[..., 0]
    ph, pw = patch_hw
    if labels.ndim != 3 or labels.shape[1] % ph or labels.shape[2] % pw:
        raise ValueError(f"segmentation maps of shape {labels.shape} do not tile into "
                         f"{ph}×{pw} patches; expected [B, H, W] with H, W multiples")
    labels = labels.astype(np.int64)
    valid = np.ones(labels.shape, bool) if ignore_label is None else labels != ignore_label
    bad = valid & ((labels < 0) | (labels >= num_classes))
    if bad.any():
        raise ValueError(f"segmentation label {int(labels[bad][0])} is outside [0, "
                         f"{num_classes}); set num_classes or ignore_label")
    b, h, w = labels.shape
    gh, gw = h // ph, w // pw
    patch_index = (np.arange(h)[:, None] // ph) * gw + np.arange(w)[None, :] // pw
    flat = (np.arange(b)[:, None, None] * (gh * gw) + patch_index[None]) * num_classes
    counts = np.bincount((flat + np.where(valid, labels, 0))[valid],
                         minlength=b * gh * gw * num_classes)
    counts = counts.reshape(b, gh * gw, num_classes)
    return np.where(counts.sum(-1) > 0, counts.argmax(-1), -1).astype(np.int32)


def ridge_stats(x_nxw: jax.Array, labels_n: jax.Array, weight_n: jax.Array,
                num_classes: int) -> dict[str, jax.Array]:
    """Weighted sufficient statistics (a row's weight r >= 0; 0 leaves it out):
    xtx = sum r x x^T [W, W], xty = sum r x y^T [W, C], sx = sum r x [W], sy = sum r y [C]
    and n = sum r."""
    x = x_nxw.astype(jnp.float32)
    y = jax.nn.one_hot(jnp.maximum(labels_n, 0), num_classes)
    weighted = x * weight_n[:, None]
    hi = jax.lax.Precision.HIGHEST
    return {"xtx": jnp.matmul(weighted.T, x, precision=hi),
            "xty": jnp.matmul(weighted.T, y, precision=hi),
            "sx": weighted.sum(0), "sy": (y * weight_n[:, None]).sum(0), "n": weight_n.sum()}


def balancing_weights(label_counts_c: np.ndarray) -> np.ndarray:
    """Per-label weights n / (K n_c) for the K labels with n_c > 0 (0 for absent labels):
    every present label then carries the same total weight, and the weights sum to n."""
    counts = np.asarray(label_counts_c, np.float64)
    present = counts > 0
    weights = np.zeros_like(counts)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights


def fit_ridge(stats: Mapping[str, np.ndarray | jax.Array], ridge: float
              ) -> tuple[np.ndarray, np.ndarray]:
    """Closed-form ridge regression with an unpenalised bias: (w [W, C], b [C]) in float64."""
    n = float(stats["n"])
    if n <= 0:
        raise ValueError("the probe's train section has no labelled patches")
    xtx, xty = (np.asarray(stats[k], np.float64) for k in ("xtx", "xty"))
    mu, ybar = np.asarray(stats["sx"], np.float64) / n, np.asarray(stats["sy"], np.float64) / n
    cxx = xtx - n * np.outer(mu, mu)
    cxy = xty - n * np.outer(mu, ybar)
    scale = np.trace(cxx) / len(cxx)
    lam = ridge * (scale if scale > 0 else 1.0)
    w = np.linalg.solve(cxx + lam * np.eye(len(cxx)), cxy)
    return w, ybar - mu @ w


def confusion(pred_n: jax.Array, labels_n: jax.Array, weight_n: jax.Array,
              num_classes: int) -> jax.Array:
    """Weighted confusion counts [C, C]: rows true label, columns predicted label."""
    true = jax.nn.one_hot(jnp.maximum(labels_n, 0), num_classes) * weight_n[:, None]
    pred = jax.nn.one_hot(pred_n, num_classes)
    return jnp.matmul(true.T, pred, precision=jax.lax.Precision.HIGHEST)


def probe_metrics(confusion_cxc: np.ndarray) -> dict[str, float]:
    """accuracy, miou (over classes present in truth or prediction), miou_fg (the same
    without label 0) and num_patches."""
    m = np.asarray(confusion_cxc, np.float64)
    total = m.sum()
    tp = np.diag(m)
    union = m.sum(0) + m.sum(1) - tp
    present = union > 0
    fg = present & (np.arange(len(m)) > 0)
    return {"accuracy": float(tp.sum() / total) if total else float("nan"),
            "miou": float(np.mean(tp[present] / union[present])) if present.any()
            else float("nan"),
            "miou_fg": float(np.mean(tp[fg] / union[fg])) if fg.any() else float("nan"),
            "num_patches": float(total)}


class DenseProbeEvaluator:
    """Linear-probe segmentation quality of the image tower's patch features.

    Args:
      model: the two-towers model; `model.apply({"params": p}, images, None)[2]["img/encoded"]`
        are the [B, N, W] patch features (a leading class token, if any, is dropped).
      mesh, batch_axes, param_shardings: where the params live and how batches are sharded.
      patch_hw: the image tower's patch size (the segmentation map is cut into these).
      train_batches / test_batches: fresh iterators of this process's padded batches with
        "image", the segmentation key and "_mask" (see data.input.eval_batches).
      options: label_set, num_classes, ignore_label, segmentation_key, ridge and balanced are
        used (see the module docstring); train_fraction and train_data make the batches
        (builder.py).
    """

    def __init__(self, *, model: nn.Module, mesh: Mesh, batch_axes: tuple[str, ...],
                 param_shardings: Mapping[str, object], patch_hw: tuple[int, int],
                 train_batches: Callable[[], Iterator[dict[str, np.ndarray]]],
                 test_batches: Callable[[], Iterator[dict[str, np.ndarray]]],
                 options: DenseProbeOptions | None = None, every_n_steps: int = 0):
        options = DenseProbeOptions() if options is None else options
        self.every_n_steps = every_n_steps  # Cadence during training (0: only at the end).
        self.mesh, self.batch_axes, self.patch_hw = mesh, tuple(batch_axes), patch_hw
        self.train_batches, self.test_batches = train_batches, test_batches
        self.label_set, self.ignore_label = options.label_set, options.ignore_label
        self.num_classes = num_labels(options.label_set, options.num_classes)
        self.segmentation_key, self.ridge = options.segmentation_key, options.ridge
        self.balanced = options.balanced
        c = self.num_classes
        data, rep = batch_sharding(mesh, self.batch_axes), replicated(mesh)

        def features(params, images):
            encoded = model.apply({"params": params}, images, None)[2]["img/encoded"]
            gh, gw = images.shape[1] // patch_hw[0], images.shape[2] // patch_hw[1]
            extra = encoded.shape[1] - gh * gw
            if extra not in (0, 1):
                raise ValueError(f"the image tower gives {encoded.shape[1]} tokens for a "
                                 f"{gh}×{gw} patch grid")
            return encoded[:, extra:].reshape(-1, encoded.shape[-1])

        def stats(params, images, labels, weight):
            return ridge_stats(features(params, images), labels.reshape(-1),
                               weight.reshape(-1), c)

        def counts(params, images, labels, weight, w, b):
            x = features(params, images).astype(jnp.float32)
            scores = jnp.matmul(x, w, precision=jax.lax.Precision.HIGHEST) + b[None, :]
            return confusion(scores.argmax(-1), labels.reshape(-1), weight.reshape(-1), c)

        self._stats = jax.jit(stats, in_shardings=(param_shardings, data, data, data),
                              out_shardings=rep)
        self._counts = jax.jit(counts, in_shardings=(param_shardings, data, data, data, rep,
                                                     rep), out_shardings=rep)

    def _patch_labels(self, batch: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """This process's patch labels [B, N] (>= 0) and whether each one counts [B, N]."""
        seg = map_labels(batch[self.segmentation_key], self.label_set)
        labels = patch_labels(seg, self.patch_hw, self.num_classes, self.ignore_label)
        return np.maximum(labels, 0), (labels >= 0) & batch[MASK_KEY][:, None]

    def _global_batches(self, batches: Iterator[dict[str, np.ndarray]],
                        label_weights: np.ndarray | None = None
                        ) -> Iterator[dict[str, jax.Array]]:
        for batch in batches:
            labels, valid = self._patch_labels(batch)
            weight = valid.astype(np.float32)
            if label_weights is not None:
                weight *= label_weights[labels].astype(np.float32)
            local = {"image": batch["image"], "labels": labels, "weight": weight}
            yield make_global_batch(local, self.mesh, self.batch_axes)

    @functools.cached_property
    def train_label_weights(self) -> np.ndarray:
        """`balancing_weights` of the train section's patch-label counts (summed over all
        processes): a pass over the labels only, made at the first balanced fit and kept (the
        labels do not change with the params, so later evaluations do not read them again)."""
        counts = np.zeros(self.num_classes, np.int64)
        for batch in self.train_batches():
            labels, valid = self._patch_labels(batch)
            counts += np.bincount(labels[valid], minlength=self.num_classes)
        if jax.process_count() > 1:
            counts = np.asarray(multihost_utils.process_allgather(counts)).sum(0)
        return balancing_weights(counts)

    def fit(self, params: optax.Params) -> tuple[np.ndarray, np.ndarray, float]:
        """The probe (w [W, C], b [C]) fitted on the train section (class-balanced with
        `balanced`), and its patch count."""
        label_weights = self.train_label_weights if self.balanced else None
        total: dict[str, np.ndarray] = {}
        for batch in self._global_batches(self.train_batches(), label_weights):
            for key, value in self._stats(params, batch["image"], batch["labels"],
                                          batch["weight"]).items():
                total[key] = total.get(key, 0) + np.asarray(value, np.float64)
        if not total:
            raise ValueError("the probe's train section is empty")
        w, b = fit_ridge(total, self.ridge)
        return w, b, float(round(total["n"]))  # Balancing weights sum to the patch count.

    def run(self, params: optax.Params) -> dict[str, float]:
        """Fits the probe, then: accuracy, miou, miou_fg, num_patches (test),
        num_train_patches."""
        w, b, n_train = self.fit(params)
        w32, b32 = w.astype(np.float32), b.astype(np.float32)
        total = np.zeros((self.num_classes, self.num_classes), np.float64)
        for batch in self._global_batches(self.test_batches()):
            total += np.asarray(self._counts(params, batch["image"], batch["labels"],
                                             batch["weight"], w32, b32), np.float64)
        return {**probe_metrics(total), "num_train_patches": n_train}
