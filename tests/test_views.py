"""Augmented views of SigLIP 2 §2.3 (data/ops_views.py, data/ops_color.py) and their routing:
crops are regions of the image at their scale, the colour ops follow dense numpy formulas
(ITU-R 601 grayscale, solarisation at 128, a 9-tap reflect-padded Gaussian, torchvision's
brightness / contrast / saturation blends), views are seeded per example (equal eagerly and
in tf.data), and in the train step the teacher and the masked student read "global_view"
while the sigmoid loss reads "image".
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from jax.sharding import Mesh

from siglip_jax import losses
from siglip_jax.data import ops_color, pp
from siglip_jax.models.two_towers import Model
from siglip_jax.objectives import distillation, masked
from siglip_jax.objectives.base import ObjectiveInputs, objective_params
from siglip_jax.objectives.options import check_options
from siglip_jax.optim import OptimConfig, make_optimizer
from siglip_jax.records import ConfigError
from siglip_jax.step import abstract_params, init_state, make_train_step

H = W = 60


def _coords():
    """Float image whose channels are (row, column, 0) of each pixel."""
    r, c = np.meshgrid(np.arange(H, dtype=np.float32), np.arange(W, dtype=np.float32),
                       indexing="ij")
    return np.stack([r, c, np.zeros_like(r)], -1)


def _region(view):
    """(rows, cols) spans of the source pixels a nearest-resized view shows, and whether the
    view is that rectangle, possibly flipped left-right, row-major monotone."""
    rows, cols = view[..., 0], view[..., 1]
    rows_ok = np.all(rows == rows[:, :1]) and np.all(np.diff(rows[:, 0]) >= 0)
    cols_ok = np.all(cols == cols[:1, :])
    d = np.diff(cols[0])
    flipped = bool(np.all(d <= 0) and np.any(d < 0))
    cols_ok = cols_ok and (np.all(d >= 0) or flipped)
    span = lambda v: (int(v.min()), int(v.max()))
    return span(rows), span(cols), bool(rows_ok and cols_ok), flipped


@pytest.mark.parametrize("op,scale,out", [
    ("local_crops(4, 20, scale=(0.05, 0.4), color=False, method='nearest', antialias=False)",
     (0.05, 0.4), "local_views"),
    ("global_view(scale=(0.4, 1.0), color=False, method='nearest', antialias=False)",
     (0.4, 1.0), "global_view")])
def test_crops_are_regions_of_the_image_at_their_scale(op, scale, out):
    fn = pp.get_preprocess_fn(op)
    size = 20 if out == "local_views" else H
    fracs, flips = [], []
    for s in range(12):
        views = fn({"image": _coords(), "_seed": np.array([5, s], np.int64)})[out].numpy()
        for view in views.reshape(-1, size, size, 3):
            (r0, r1), (c0, c1), is_rect, flipped = _region(view)
            assert is_rect
            # Nearest sampling of a crop of h rows at `size` shows rows r0..r1 with
            # r1 - r0 + 1 >= h·(1 - 1/size) - 1 (the first and last sample lie inside the crop).
            shown = (r1 - r0 + 1) * (c1 - c0 + 1) / (H * W)
            slack = (1 - 1 / size) ** 2
            assert scale[0] * slack - 4 / H <= shown <= scale[1] + 1e-6, shown
            fracs.append(shown)
            flips.append(flipped)
    assert min(fracs) < scale[0] + 0.4 * (scale[1] - scale[0]) < max(fracs)  # The range is used.
    assert 0 < np.mean(flips) < 1  # Flipped about half the time.


def test_global_view_defaults_to_the_image_size_and_range():
    image = np.random.default_rng(0).integers(0, 256, (24, 32, 3)).astype(np.uint8)
    out = pp.get_preprocess_fn("value_range(-1, 1)|global_view")(
        {"image": image, "_seed": np.array([1, 2], np.int64)})
    assert out["global_view"].shape == (24, 32, 3) and out["global_view"].dtype == tf.float32
    assert -1 <= out["global_view"].numpy().min() and out["global_view"].numpy().max() <= 1
    raw = pp.get_preprocess_fn("global_view(12)")({"image": image})["global_view"]
    assert raw.shape == (12, 12, 3) and raw.dtype == tf.uint8  # Before value_range: uint8.
    with pytest.raises(pp.PPError, match="scale"):
        pp.get_preprocess_fn("global_view(scale=(0.5, 0.2))")


def test_views_are_seeded_per_example_equal_eagerly_and_in_tf_data():
    fn = pp.get_preprocess_fn("value_range(-1, 1)|global_view|local_crops(3, 16)")
    rng = np.random.default_rng(1)
    examples = [{"image": rng.integers(0, 256, (32, 32, 3)).astype(np.uint8),
                 "_seed": np.array([9, i], np.int64)} for i in range(3)]
    eager = [fn(ex) for ex in examples]
    ds = tf.data.Dataset.from_tensor_slices({k: np.stack([e[k] for e in examples])
                                             for k in examples[0]})
    graph = list(ds.map(fn, num_parallel_calls=2, deterministic=True))
    for a, b in zip(eager, graph, strict=True):
        for key in ("global_view", "local_views"):
            np.testing.assert_array_equal(a[key].numpy(), b[key].numpy())
    again = fn({**examples[0], "_seed": np.array([9, 0], np.int64)})
    np.testing.assert_array_equal(again["global_view"].numpy(), eager[0]["global_view"].numpy())
    other = fn({**examples[0], "_seed": np.array([9, 7], np.int64)})
    assert np.abs(other["global_view"].numpy() - eager[0]["global_view"].numpy()).max() > 0.1


# ----------------------------------------------------------------------------- colour ops


def _img(seed=0, shape=(10, 12, 3)):
    return np.random.default_rng(seed).uniform(0, 1, shape).astype(np.float32)


def test_grayscale_and_solarize_match_their_formulas():
    x = _img()
    seed = tf.constant([0, 0], tf.int64)
    luma = 0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]
    np.testing.assert_allclose(ops_color.grayscale(tf.constant(x), seed, 1.0).numpy(),
                               np.repeat(luma[..., None], 3, -1), atol=1e-6)
    np.testing.assert_array_equal(ops_color.grayscale(tf.constant(x), seed, 0.0).numpy(), x)
    levels = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, -1)
    unit = ops_color.to_unit(tf.constant(levels), (0, 255))
    got = ops_color.from_unit(ops_color.solarize(unit, seed, 1.0), (0, 255), tf.uint8).numpy()
    np.testing.assert_array_equal(got, np.where(levels >= 128, 255 - levels, levels))


def test_blur_matches_a_dense_reflect_padded_gaussian():
    x, sigma = _img(1, (12, 14, 3)), 1.3
    t = np.arange(9) - 4.0
    k = np.exp(-0.5 * (t / sigma) ** 2)
    k2 = np.outer(k, k) / k.sum() ** 2
    padded = np.pad(x, ((4, 4), (4, 4), (0, 0)), mode="reflect")
    want = np.zeros_like(x)
    for i in range(12):
        for j in range(14):
            want[i, j] = np.einsum("ab,abc->c", k2, padded[i:i + 9, j:j + 9])
    got = ops_color.blur(tf.constant(x), tf.constant(sigma)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("which", ["brightness", "contrast", "saturation"])
def test_jitter_factors_follow_torchvision_blends(which):
    x = _img(2) * 0.5 + 0.2  # In [0.2, 0.7]: no factor (≤ 1.4) clips it.
    strength = {"brightness": (0.4, 0, 0, 0), "contrast": (0, 0.4, 0, 0),
                "saturation": (0, 0, 0.2, 0)}[which]
    luma = 0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]
    base = {"brightness": np.zeros_like(x), "contrast": np.full_like(x, luma.mean()),
            "saturation": np.repeat(luma[..., None], 3, -1)}[which]
    for s in range(4):
        got = ops_color.color_jitter(tf.constant(x), tf.constant([3, s], tf.int64), 1.0,
                                     strength).numpy()
        # out = f·x + (1 - f)·base for one factor f: solve it from the pixel farthest from base.
        i = np.unravel_index(np.argmax(np.abs(x - base)), x.shape)
        f = (got[i] - base[i]) / (x[i] - base[i])
        assert 1 - sum(strength) - 1e-4 <= f <= 1 + sum(strength) + 1e-4
        np.testing.assert_allclose(got, np.clip(f * x + (1 - f) * base, 0, 1), atol=2e-5)


def test_grayscale_probability_is_dinos_0_2():
    x = tf.constant(_img(3, (4, 4, 3)))
    ds = tf.data.Dataset.range(600).map(
        lambda i: ops_color.grayscale(x, tf.stack([tf.constant(4, tf.int64), i]), 0.2))
    gray = [float(np.ptp(v.numpy(), axis=-1).max()) < 1e-6 for v in ds]
    assert abs(np.mean(gray) - 0.2) < 0.05  # 600 draws: σ ≈ 0.016.


# ----------------------------------------------------------------------------- routing

MODEL = dict(
    image=dict(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=8, pool_type="map"),
    text=dict(vocab_size=32, width=32, depth=1, mlp_dim=64, num_heads=2, pool_type="last"),
    out_dim=16)
HEAD = dict(head_hidden=24, head_bottleneck=8, head_layers=3, prototypes=12)


def test_objectives_read_the_global_view_by_default():
    assert check_options("self_distillation", {})["global_key"] == "global_view"
    assert check_options("masked_prediction", {})["global_key"] == "global_view"
    assert distillation.image_views({}) == ("global_view",)
    assert masked.image_views({"global_key": "image"}) == ()


def _objs():
    sd = check_options("self_distillation", dict(HEAD, n_local=2, local_size=8))
    mp = check_options("masked_prediction", HEAD)
    return (distillation.SelfDistillation(sd, 32, 0, 0.9),
            masked.MaskedPrediction(mp, 32, 0, 0.9, patch=(8, 8)))


def _batch(rng):
    u = lambda *s: rng.uniform(-1, 1, s).astype(np.float32)
    return u, {"image": u(8, 16, 16, 3), "global_view": u(8, 16, 16, 3),
               "labels": rng.integers(2, 32, (8, 6)).astype(np.int32),
               "local_views": u(8, 2, 8, 8, 3)}


def test_objectives_read_the_global_view_not_the_image():
    """The step hands every objective the whole batch (step.py `ObjectiveInputs`): called as
    the step calls them, changing only "image" leaves both losses unchanged and changing
    only "global_view" moves both. (Cheap twin of the `slow` train-step test below.)"""
    objs = _objs()
    model = Model(**MODEL)

    def shapes(key):
        params = model.init(key, jnp.zeros((1, 16, 16, 3)), jnp.zeros((1, 6), jnp.int32))
        return {**params["params"], **objective_params(objs, key)}

    # Random values of the params' shapes (a jitted init costs seconds of compiling).
    rng = np.random.default_rng(1)
    params = jax.tree_util.tree_map(lambda x: rng.normal(0, 0.3, x.shape).astype(np.float32),
                                    jax.eval_shape(shapes, jax.random.key(0)))
    teacher = {k: jax.tree_util.tree_map(lambda x: x + 0.05, params[k])
               for k in ("img", "distill_head", "masked_head")}

    @jax.jit
    def call(batch):
        inputs = ObjectiveInputs(model, params, batch, None, None, {}, jnp.int32(0), teacher,
                                 jax.random.key(2))
        return [o(inputs)[0] for o in objs]

    u, base = _batch(np.random.default_rng(0))
    a = [float(x) for x in call(base)]
    new_image = [float(x) for x in call({**base, "image": u(8, 16, 16, 3)})]
    new_view = [float(x) for x in call({**base, "global_view": u(8, 16, 16, 3)})]
    assert all(x > 0 for x in a) and new_image == a
    assert all(x != y for x, y in zip(new_view, a, strict=True))
    with pytest.raises(ConfigError, match="global_view"):
        call({k: v for k, v in base.items() if k != "global_view"})


@pytest.mark.slow  # Cheap twin: test_objectives_read_the_global_view_not_the_image.
def test_train_step_routes_the_global_view_to_teacher_and_masked_student():
    """Changing only "image" moves only the sigmoid loss; changing only "global_view" moves
    only the self-supervised losses (start 0: on from the first step)."""
    objs = _objs()
    shapes = {"image": (8, 16, 16, 3), "labels": (8, 6)}
    model = Model(**MODEL)
    optim = OptimConfig.from_config(dict(optim=dict(name="adam"), lr=1e-3, wd=0.0,
                                         schedule=dict(decay_type="constant")))
    tx, lr_fn = make_optimizer(optim, abstract_params(model, shapes, objs), total_steps=4)
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    state, _ = init_state(model, tx, shapes, mesh, ((".*", "replicate"),), seed=0,
                          objectives=objs)
    loss = lambda zimg, ztxt, t, b: losses.sigmoid_loss_dense(zimg, ztxt, t, b)
    step = jax.jit(make_train_step(model, tx, loss, lr_fn, objectives=objs, seed=1))
    u, base = _batch(np.random.default_rng(0))
    names = ("sigmoid/loss", "self_distillation/loss", "masked_prediction/loss")
    run = lambda batch: {k: float(v) for k, v in step(state, batch)[1].items() if k in names}
    a = run(base)
    new_image = run({**base, "image": u(8, 16, 16, 3)})
    new_view = run({**base, "global_view": u(8, 16, 16, 3)})
    assert all(a[k] > 0 for k in names)
    assert new_image["sigmoid/loss"] != a["sigmoid/loss"]
    assert new_image["self_distillation/loss"] == a["self_distillation/loss"]
    assert new_image["masked_prediction/loss"] == a["masked_prediction/loss"]
    assert new_view["sigmoid/loss"] == a["sigmoid/loss"]
    assert new_view["self_distillation/loss"] != a["self_distillation/loss"]
    assert new_view["masked_prediction/loss"] != a["masked_prediction/loss"]
    without = {k: v for k, v in base.items() if k != "global_view"}
    with pytest.raises(ConfigError, match="global_view"):
        step(state, without)
