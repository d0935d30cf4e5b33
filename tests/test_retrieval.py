"""Image↔text retrieval: a hand-computed case, a numpy argsort reference, chance level, and a
toy model that is right by construction run through the padded tf.data pipeline."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from siglip_jax.data.input import MASK_KEY, eval_batches, num_eval_batches
from siglip_jax.evaluators.builder import fix_captions
from siglip_jax.evaluators.common import Embedder
from siglip_jax.evaluators.retrieval import CAPTION_MASK_KEY, RetrievalEvaluator, recall_at_k
from siglip_jax.sharding import batch_sharding, make_mesh, replicated


@pytest.fixture(scope="module")
def mesh():
    return make_mesh([("data", -1)])


def _embedded(mesh, zimg, ztxt, img_valid, txt_valid, batch):
    """Splits numpy arrays into global batch-sharded arrays of `batch` rows, as embed() does."""
    sharding = batch_sharding(mesh, ("data",))
    put = lambda x: jax.device_put(jnp.asarray(x), sharding)
    return [{"zimg": put(zimg[s:s + batch]), "ztxt": put(ztxt[s:s + batch]),
             "img_valid": put(img_valid[s:s + batch]), "txt_valid": put(txt_valid[s:s + batch])}
            for s in range(0, len(zimg), batch)]


def _unit(degrees):
    rad = np.deg2rad(np.asarray(degrees, np.float64))
    return np.stack([np.cos(rad), np.sin(rad)], -1).astype(np.float32)


def test_hand_computed_case_with_masked_caption_and_padding(mesh):
    # Images at 0°, 90°, 180°; two caption slots each (image 1's second caption is missing).
    # Padding rows (images 3..7) sit where they would change every answer if they counted.
    zimg = _unit([0, 90, 180] + [260] * 5)
    ztxt = np.stack([_unit([10, 170]), _unit([80, 200]), _unit([105, 260])]
                    + [_unit([180, 180])] * 5)
    img_valid = np.arange(8) < 3
    txt_valid = np.array([[True, True], [True, False], [True, True]] + [[False, False]] * 5)
    result = recall_at_k(_embedded(mesh, zimg, ztxt, img_valid, txt_valid, 8), mesh,
                         ks=(1, 2, 3))
    # Image→text (cos of angle differences): image 0's best is its own 10° caption; image 1's
    # own 80° caption (cos 10°) beats 105° (cos 15°); image 2's captions (cos 75°, cos 80°)
    # lose to image 0's 170° caption (cos 10°): rank 1. The masked 200° caption (cos 20°)
    # would have pushed it to rank 2.
    assert result["img2txt_r1"] == pytest.approx(2 / 3)
    assert result["img2txt_r2"] == result["img2txt_r3"] == 1.0
    # Text→image: 10° → 0° rank 0; 170° → 0° loses to 180° and 90°: rank 2; 80° → 90° rank 0;
    # 105° → 180° (cos 75°) loses to 90° (cos 15°): rank 1; 260° → 180° (cos 80°) beats
    # 0° (cos 100°) and 90° (cos 170°): rank 0. (Padding images at 260° would win it.)
    assert result["txt2img_r1"] == pytest.approx(3 / 5)
    assert result["txt2img_r2"] == pytest.approx(4 / 5)
    assert result["txt2img_r3"] == 1.0
    assert (result["num_images"], result["num_texts"]) == (3.0, 5.0)


def _reference(zimg, ztxt, img_valid, txt_valid, ks):
    """big_vision's argsort formulation in float64 on the valid rows only."""
    c = ztxt.shape[1]
    imgs = np.flatnonzero(img_valid)
    owner = np.repeat(np.arange(len(zimg)), c)[txt_valid.reshape(-1)]
    texts = ztxt.reshape(-1, ztxt.shape[-1])[txt_valid.reshape(-1)].astype(np.float64)
    sim = zimg[imgs].astype(np.float64) @ texts.T  # [images, texts]
    text_owner = np.searchsorted(imgs, owner)
    per_image = np.argsort(-sim, axis=1)
    per_text = np.argsort(-sim, axis=0)
    queries = np.isin(np.arange(len(imgs)), text_owner)
    out = {}
    for k in ks:
        i2t = (text_owner[per_image[:, :k]] == np.arange(len(imgs))[:, None]).any(1)
        out[f"img2txt_r{k}"] = i2t[queries].mean()
        out[f"txt2img_r{k}"] = (per_text[:k] == text_owner[None]).any(0).mean()
    return out


def test_matches_numpy_argsort_reference_with_masks(mesh):
    rng = np.random.default_rng(0)
    n, c, d, batch = 93, 3, 16, 32  # 93 images: the last of three batches is padded.
    zimg = rng.normal(size=(96, d)).astype(np.float32)
    ztxt = (zimg[:, None] + 1.5 * rng.normal(size=(96, c, d))).astype(np.float32)
    zimg /= np.linalg.norm(zimg, axis=-1, keepdims=True)
    ztxt /= np.linalg.norm(ztxt, axis=-1, keepdims=True)
    img_valid = np.arange(96) < n
    txt_valid = (rng.uniform(size=(96, c)) < 0.8) & img_valid[:, None]
    txt_valid[5] = False  # An image without captions: a candidate, never a query.
    result = recall_at_k(_embedded(mesh, zimg, ztxt, img_valid, txt_valid, batch), mesh)
    want = _reference(zimg, ztxt, img_valid, txt_valid, (1, 5, 10))
    for key, value in want.items():
        assert result[key] == pytest.approx(value, abs=1e-12), key
    assert 0.2 < want["img2txt_r1"] < 0.9  # The case is neither trivial nor hopeless.
    assert result["num_images"] == n - 1 and result["num_texts"] == txt_valid.sum()


def test_unrelated_embeddings_give_chance_level(mesh):
    """Random pairing: E[txt2img R@k] = k/N; E[img2txt R@k] = 1 − C(M−c, k)/C(M, k)."""
    rng = np.random.default_rng(1)
    n, c, d = 1024, 2, 32
    zimg = rng.normal(size=(n, d)).astype(np.float32)
    ztxt = rng.normal(size=(n, c, d)).astype(np.float32)
    result = recall_at_k(_embedded(mesh, zimg, ztxt, np.ones(n, bool), np.ones((n, c), bool),
                                   256), mesh)
    m = n * c
    for k in (1, 5, 10):
        t2i = k / n
        i2t = 1 - np.prod([(m - c - j) / (m - j) for j in range(k)])
        # Four binomial standard deviations over the queries.
        assert abs(result[f"txt2img_r{k}"] - t2i) < 4 * np.sqrt(t2i * (1 - t2i) / m) + 1e-9
        assert abs(result[f"img2txt_r{k}"] - i2t) < 4 * np.sqrt(i2t * (1 - i2t) / n)


class _ToyModel(nn.Module):
    """Image → row `pixel (0,0,0)` of a random unit table; text → row `token 0`."""

    num_rows: int

    @nn.compact
    def __call__(self, image, text, train=False):
        table = self.param("table", nn.initializers.normal(1.0), (self.num_rows, 16))
        table = table / jnp.linalg.norm(table, axis=-1, keepdims=True)
        zimg = None if image is None else table[image[:, 0, 0, 0].astype(jnp.int32)]
        ztxt = None if text is None else table[text[:, 0]]
        return zimg, ztxt, {}


def _toy_evaluator(mesh, ids_per_image, captions, batch):
    """37 images whose i-th caption token lists are `captions` (ragged), via tf.data."""
    n = len(ids_per_image)
    images = np.zeros((n, 2, 2, 3), np.float32)
    images[:, 0, 0, 0] = ids_per_image
    ragged = tf.ragged.constant([[[t, 1] for t in caps] for caps in captions], tf.int32,
                                 ragged_rank=1)
    data = tf.data.Dataset.from_tensor_slices({"image": images, "labels": ragged})
    model = _ToyModel(64)
    params = model.init(jax.random.key(0), jnp.zeros((8, 2, 2, 3)),
                        jnp.zeros((8, 2), jnp.int32))["params"]
    embedder = Embedder(model, mesh, ("data",),
                        jax.tree_util.tree_map(lambda _: replicated(mesh), params))
    fix = fix_captions(3)
    batches = lambda: eval_batches(data, fix, local_batch=batch,
                                   num_batches=num_eval_batches(n, batch))
    return RetrievalEvaluator(embedder=embedder, batches=batches), params


def test_toy_model_identical_embeddings_recall_one_through_padded_pipeline(mesh):
    """37 images (batch 16: last batch padded), 1–4 captions each cut to 3 and masked."""
    n = 37
    counts = 1 + np.arange(n) % 4
    captions = [[i] * int(k) for i, k in zip(range(n), counts, strict=True)]
    evaluator, params = _toy_evaluator(mesh, np.arange(n), captions, 16)
    batch = next(iter(evaluator.batches()))
    assert batch["labels"].shape == (16, 3, 2)
    np.testing.assert_array_equal(batch[CAPTION_MASK_KEY].sum(1), np.minimum(counts[:16], 3))
    assert batch[MASK_KEY].all()
    result = evaluator.run(params)
    assert result == {"img2txt_r1": 1.0, "img2txt_r5": 1.0, "img2txt_r10": 1.0,
                      "txt2img_r1": 1.0, "txt2img_r5": 1.0, "txt2img_r10": 1.0,
                      "num_images": 37.0, "num_texts": float(np.minimum(counts, 3).sum())}


def test_toy_model_shifted_pairing_misses_at_one(mesh):
    """Every caption describes the next image: nothing is retrieved at rank 1."""
    n = 37
    captions = [[(i + 1) % n] * 2 for i in range(n)]
    evaluator, params = _toy_evaluator(mesh, np.arange(n), captions, 16)
    result = evaluator.run(params)
    assert result["img2txt_r1"] == 0.0 and result["txt2img_r1"] == 0.0
    assert result["num_texts"] == 2 * n


def test_fix_captions_pads_truncates_and_masks():
    ragged = tf.ragged.constant([[[5, 1]], [[6, 1], [7, 1], [8, 1], [9, 1]]], tf.int32,
                                ragged_rank=1)
    data = tf.data.Dataset.from_tensor_slices({"labels": ragged})  # Elements [n_i, 2].
    out = [fix_captions(3)(ex) for ex in data]
    np.testing.assert_array_equal(out[0]["labels"], [[5, 1], [1, 1], [1, 1]])
    np.testing.assert_array_equal(out[0][CAPTION_MASK_KEY], [True, False, False])
    np.testing.assert_array_equal(out[1]["labels"], [[6, 1], [7, 1], [8, 1]])
    np.testing.assert_array_equal(out[1][CAPTION_MASK_KEY], [True, True, True])
    single = fix_captions(0)({"labels": tf.constant([4, 1])})
    assert single["labels"].shape == (1, 2) and single[CAPTION_MASK_KEY].numpy().tolist() == [
        True]
