"""The dense-feature (linear probe) evaluator: hand-computed patch labels and metrics, the ridge
fit against a least-squares reference, synthetic features, a toy model that is right by
construction, and end-to-end runs on the demo's objects data and a local TFDS dataset."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from siglip_jax.config import ConfigError
from siglip_jax.data import demo_shapes as ds
from siglip_jax.data.input import eval_batches, num_eval_batches
from siglip_jax.data.pp import get_preprocess_fn
from siglip_jax.evaluators import dense_probe as dp
from siglip_jax.evaluators.config import DenseProbeOptions
from siglip_jax.sharding import make_mesh, replicated


def test_patch_labels_hand_computed():
    seg = np.array([[1, 1, 2, 0],
                    [1, 3, 2, 2],
                    [0, 0, 5, 5],
                    [0, 4, 5, 0]])
    # Patches 2×2, row-major: {1,1,1,3} → 1, {2,0,2,2} → 2, {0,0,0,4} → 0, {5,5,5,0} → 5.
    np.testing.assert_array_equal(dp.patch_labels(seg[None], (2, 2), 6), [[1, 2, 0, 5]])
    # 1×4 patches (rows): {1,1,2,0} → 1; {1,3,2,2} → 2; {0,0,5,5} → tie → 0; {0,4,5,0} → 0.
    np.testing.assert_array_equal(dp.patch_labels(seg[None, ..., None], (1, 4), 6),
                                  [[1, 2, 0, 0]])
    ignore = np.array([[9, 9, 9, 3],
                       [9, 9, 4, 9]])
    # 2×2: all ignored → -1; {9, 3, 4, 9} → tie of 3 and 4 → 3.
    np.testing.assert_array_equal(dp.patch_labels(ignore[None], (2, 2), 5, ignore_label=9),
                                  [[-1, 3]])
    with pytest.raises(ValueError, match="segmentation label 9 is outside"):
        dp.patch_labels(ignore[None], (2, 2), 5)
    with pytest.raises(ValueError, match="do not tile"):
        dp.patch_labels(seg[None], (3, 3), 6)


def test_label_sets_from_the_class():
    label = 1 + (2 * 6 + 3)  # blue cross.
    seg = np.array([[0, label]])
    np.testing.assert_array_equal(dp.map_labels(seg, "class"), [[0, 16]])
    np.testing.assert_array_equal(dp.map_labels(seg, "shape"), [[0, 1 + 3]])
    np.testing.assert_array_equal(dp.map_labels(seg, "colour"), [[0, 1 + 2]])
    assert [dp.num_labels(s) for s in ("class", "shape", "colour")] == [37, 7, 7]
    assert dp.num_labels("raw", 21) == 21


def test_metrics_from_a_hand_computed_confusion_matrix():
    true = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 0])
    pred = np.array([0, 0, 0, 0, 0, 1, 0, 0, 1, 1, 1, 2, 2])
    weight = np.array([1.0] * 12 + [0.0])  # The last row is masked out.
    m = np.asarray(dp.confusion(jnp.asarray(pred), jnp.asarray(true), jnp.asarray(weight), 4))
    np.testing.assert_array_equal(m, [[5, 1, 0, 0], [2, 3, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    metrics = dp.probe_metrics(m)
    # IoU: class 0 5/(6+7-5), class 1 3/(6+4-3), class 2 0/1 (predicted only); 3 absent.
    assert metrics["accuracy"] == pytest.approx(8 / 12)
    assert metrics["miou"] == pytest.approx((5 / 8 + 3 / 7 + 0) / 3)
    assert metrics["miou_fg"] == pytest.approx((3 / 7 + 0) / 2)  # Label 0 left out.
    assert metrics["num_patches"] == 12


def test_ridge_matches_a_least_squares_reference():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 6)) * [1, 2, 3, 0.5, 1, 4] + 3
    labels = rng.integers(0, 4, 300)
    stats = dp.ridge_stats(jnp.asarray(x, jnp.float32), jnp.asarray(labels),
                           jnp.ones(300), 4)
    w, b = dp.fit_ridge(stats, 0.1)
    # Reference: min |X w + 1 b - Y|² + lam |w|² as one least-squares problem.
    xc = x - x.mean(0)
    lam = 0.1 * np.trace(xc.T @ xc) / 6
    a = np.block([[x, np.ones((300, 1))], [np.sqrt(lam) * np.eye(6), np.zeros((6, 1))]])
    y = np.concatenate([np.eye(4)[labels], np.zeros((6, 4))])
    ref = np.linalg.lstsq(a, y, rcond=None)[0]
    np.testing.assert_allclose(w, ref[:6], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(b, ref[6], rtol=1e-4, atol=1e-5)


def test_balanced_ridge_is_weighted_least_squares():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(400, 5)) * [1, 3, 0.5, 2, 1] - 1
    labels = np.where(rng.random(400) < 0.8, 0, rng.integers(1, 4, 400))  # Label 0 dominates.
    counts = np.bincount(labels, minlength=5)  # Label 4 never occurs.
    weights = dp.balancing_weights(counts)
    # Hand-computed: n / (K n_c) with K = 4 present labels; absent label 4 weighs 0.
    np.testing.assert_allclose(weights[:4], 400 / (4 * counts[:4]))
    assert weights[4] == 0 and np.isclose((weights[labels]).sum(), 400)
    r = weights[labels]
    stats = dp.ridge_stats(jnp.asarray(x, jnp.float32), jnp.asarray(labels),
                           jnp.asarray(r, jnp.float32), 5)
    w, b = dp.fit_ridge(stats, 0.1)
    # Reference: min sum_i r_i |x_i w + b - y_i|² + lam |w|², rows scaled by sqrt(r_i).
    mean = (r[:, None] * x).sum(0) / r.sum()
    lam = 0.1 * np.trace((r[:, None] * (x - mean)).T @ (x - mean)) / 5
    sr = np.sqrt(r)[:, None]
    a = np.block([[sr * x, sr], [np.sqrt(lam) * np.eye(5), np.zeros((5, 1))]])
    y = np.concatenate([sr * np.eye(5)[labels], np.zeros((5, 5))])
    ref = np.linalg.lstsq(a, y, rcond=None)[0]
    np.testing.assert_allclose(w, ref[:5], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(b, ref[5], rtol=1e-4, atol=1e-5)


def test_balancing_finds_a_rare_label_that_the_plain_probe_calls_background():
    rng = np.random.default_rng(3)
    labels = (rng.random(20000) < 0.05).astype(int)  # 5 % foreground.
    x = labels[:, None] * 1.0 + rng.normal(size=(20000, 1))  # Overlapping feature values.
    recall = {}
    for balanced in (False, True):
        r = dp.balancing_weights(np.bincount(labels[:10000]))[labels[:10000]] if balanced \
            else np.ones(10000)
        stats = dp.ridge_stats(jnp.asarray(x[:10000], jnp.float32),
                               jnp.asarray(labels[:10000]), jnp.asarray(r, jnp.float32), 2)
        w, b = dp.fit_ridge(stats, 1e-3)
        pred = (x[10000:] @ w + b).argmax(-1)
        recall[balanced] = (pred[labels[10000:] == 1] == 1).mean()
    # Unweighted least squares puts the threshold far out in the foreground's tail; the
    # balanced fit puts it between the two means (x = 0.5), where 69 % of foreground lies
    # above: 1 - Phi(-0.5).
    assert recall[False] < 0.05 and abs(recall[True] - 0.69) < 0.05


def _probe_accuracy(x, labels, n_train, num_classes):
    stats = dp.ridge_stats(jnp.asarray(x[:n_train], jnp.float32), jnp.asarray(labels[:n_train]),
                           jnp.ones(n_train), num_classes)
    w, b = dp.fit_ridge(stats, 1e-3)
    pred = (x[n_train:] @ w + b).argmax(-1)
    m = dp.confusion(jnp.asarray(pred), jnp.asarray(labels[n_train:]),
                     jnp.ones(len(pred)), num_classes)
    return dp.probe_metrics(np.asarray(m))


def test_probe_recovers_linear_labels_and_is_at_chance_on_noise():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 5, 6000)
    mixing = rng.normal(size=(5, 16))
    x = np.eye(5)[labels] @ mixing + 0.1 * rng.normal(size=(6000, 16))
    good = _probe_accuracy(x, labels, 3000, 5)
    assert good["accuracy"] == 1.0 and good["miou"] == 1.0
    noise = _probe_accuracy(rng.normal(size=(6000, 16)), labels, 3000, 5)
    assert abs(noise["accuracy"] - 0.2) < 0.035 and noise["miou"] < 0.15


class _SegModel(nn.Module):
    """Right by construction: the "image" is the segmentation map, and each patch's feature
    is the one-hot of its majority label (ties: smallest), so a linear probe is exact."""

    patch: int = 8
    num_classes: int = 37

    @nn.compact
    def __call__(self, image, text=None):
        scale = self.param("scale", nn.initializers.ones, ())
        b, h, w = image.shape[:3]
        p, c = self.patch, self.num_classes
        onehot = jax.nn.one_hot(image.reshape(b, h, w).astype(jnp.int32), c)
        counts = onehot.reshape(b, h // p, p, w // p, p, c).sum((2, 4)).reshape(b, -1, c)
        return None, None, {"img/encoded": scale * jax.nn.one_hot(counts.argmax(-1), c)}


def _demo_batches(source, pp, batch, split):
    def batches():
        data = source.dataset(0, 1)
        n = source.num_examples // 2
        data = data.take(n) if split == "train" else data.skip(n)
        return eval_batches(data, get_preprocess_fn(pp), local_batch=batch,
                            num_batches=num_eval_batches(n, batch))
    return batches


@pytest.mark.parametrize("label_set,balanced", [("class", False), ("shape", True)])
def test_toy_model_is_exact_on_demo_objects(tmp_path, label_set, balanced):
    source = ds.DemoShapes(str(tmp_path), "test", objects=True, train_per_class=1,
                           test_per_class=2)
    mesh = make_mesh([("data", -1)])
    model = _SegModel(num_classes=37)
    params = model.init(jax.random.key(0), jnp.zeros((8, 64, 64, 1)))["params"]
    shardings = jax.tree_util.tree_map(lambda _: replicated(mesh), params)
    # Labels are mapped from the class map: the toy's class one-hots are linear in them too.
    pp = 'copy("segmentation", "image")|keep("image", "segmentation")'
    train_reads = []
    train_batches = _demo_batches(source, pp, 16, "train")

    def counted_train_batches():
        train_reads.append(1)
        return train_batches()

    evaluator = dp.DenseProbeEvaluator(
        model=model, mesh=mesh, batch_axes=("data",), param_shardings=shardings,
        patch_hw=(8, 8), train_batches=counted_train_batches,
        test_batches=_demo_batches(source, pp, 16, "test"),
        options=DenseProbeOptions(label_set=label_set, balanced=balanced))
    metrics = evaluator.run(params)
    assert metrics["accuracy"] == 1.0 and metrics["miou"] == 1.0
    assert metrics["num_patches"] == 36 * 64 and metrics["num_train_patches"] == 36 * 64
    # The balanced probe counts the labels once (an extra pass at the first fit only).
    evaluator.fit(params)
    assert len(train_reads) == (3 if balanced else 2)


def _config(tmp_path, **evals):
    import ml_collections

    from siglip_jax.config import load_config
    from siglip_jax.records import to_plain
    from tests.tiny import DEMO, tiny_overrides

    config = ml_collections.ConfigDict(to_plain(load_config(f"{DEMO}:steps=1",
                                                             tiny_overrides(tmp_path))))
    config.evals = ml_collections.ConfigDict({"dense": {"type": "dense_probe", **evals}})
    return config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny test config's random two-towers model and params, for 64×64 images."""
    from siglip_jax.models.build import make_model
    from siglip_jax.schema import parse

    run = parse(_config(tmp_path_factory.mktemp("unused"), data=dict(name="demo_shapes"),
                        pp="keep('image')"))
    model = make_model(run.model)
    params = model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)),
                        jnp.zeros((1, run.tokenizer.max_len), jnp.int32))["params"]
    return model, params


def _build(config, tiny=None):
    from siglip_jax.evaluators.builder import build_evaluators
    from siglip_jax.schema import parse

    mesh = make_mesh([("data", -1)])
    model, params = tiny or (None, None)
    shardings = jax.tree_util.tree_map(lambda _: replicated(mesh), params)
    evaluator = build_evaluators(parse(config), model=model, mesh=mesh,
                                 param_shardings=shardings, tokenizer=None)["dense"]
    return evaluator, params


def test_end_to_end_tiny_random_model_on_demo_objects(tmp_path, tiny):
    data = dict(name="demo_shapes", split="test", data_dir=str(tmp_path), objects=True,
                train_per_class=1, test_per_class=2)
    config = _config(tmp_path, data=data, batch_size=16, label_set="colour",
                     pp='value_range(-1, 1)|keep("image", "segmentation")')
    evaluator, params = _build(config, tiny)
    metrics = evaluator.run(params)
    assert metrics["num_train_patches"] == 36 * 64 and metrics["num_patches"] == 36 * 64
    # Colours are linear in the pixels the random tower embeds: the probe beats the
    # all-background guess (the share of background patches, computed from the data).
    seg = dp.map_labels(ds.DemoShapes(str(tmp_path), "test", objects=True, train_per_class=1,
                                      test_per_class=2).load()["segmentation"][36:], "colour")
    background = (dp.patch_labels(seg, (8, 8), 7) == 0).mean()
    assert background < metrics["accuracy"] <= 1 and 0 < metrics["miou"] <= 1
    again = evaluator.run(params)
    assert again == metrics  # Deterministic.


def test_a_separate_train_source_fits_and_all_of_data_is_scored(tmp_path, tiny):
    data = dict(name="demo_shapes", split="test", data_dir=str(tmp_path), objects=True,
                train_per_class=1, test_per_class=2)
    config = _config(tmp_path, data=data, train_data={**data, "split": "train"},
                     batch_size=32, pp='value_range(-1, 1)|keep("image", "segmentation")')
    evaluator, params = _build(config, tiny)
    metrics = evaluator.run(params)
    # 36 train images (1 per class) fit; all 72 test images (2 per class) are scored.
    assert metrics["num_train_patches"] == 36 * 64 and metrics["num_patches"] == 72 * 64


def test_config_errors_are_one_line(tmp_path, tiny):
    data = dict(name="demo_shapes", split="test", data_dir=str(tmp_path), objects=True,
                train_per_class=1, test_per_class=1)
    pp = 'value_range(-1, 1)|keep("image", "segmentation")'
    with pytest.raises(ConfigError, match=r"evals.dense.label_set 'depth' is not one of"):
        _build(_config(tmp_path, data=data, pp=pp, label_set="depth"))
    with pytest.raises(ConfigError, match=r"evals.dense.num_classes=0: label_set 'raw'"):
        _build(_config(tmp_path, data=data, pp=pp, label_set="raw"))
    with pytest.raises(ConfigError, match=r"evals.dense.train_fraction must be a number in"):
        _build(_config(tmp_path, data=data, pp=pp, train_fraction=1.0))
    with pytest.raises(ConfigError, match=r"evals.dense.pp must produce \['image', "
                                          r"'segmentation'\]"):
        _build(_config(tmp_path, data=data, pp='keep("image")'), tiny)
    with pytest.raises(ConfigError, match=r"evals.dense.train_data.name 'nope' is not one"):
        _build(_config(tmp_path, data=data, pp=pp, train_data=dict(name="nope")))
    with pytest.raises(ConfigError, match=r"do not tile into the model's 8×8 patches"):
        _build(_config(tmp_path, data=data, pp=f'resize(60)|{pp}'), tiny)


def test_options_record_checks_and_normalises():
    where = "evals.dense"
    opts = DenseProbeOptions(label_set="raw", num_classes=21, ignore_label=255,
                                train_fraction=1 / 4, ridge=1, train_data={"name": "csv",
                                                                           "path": "x.csv"},
                                where=where)
    assert opts.ridge == 1.0 and isinstance(opts.ridge, float) and opts.train_fraction == 0.25
    with pytest.raises(TypeError):  # Frozen: the parsed section cannot change under a run.
        opts.train_data["path"] = "y.csv"
    for bad, message in ((dict(ignore_label=True), r"evals.dense.ignore_label must be an int"),
                         (dict(segmentation_key=""), r"evals.dense.segmentation_key must be a "),
                         (dict(ridge=0), r"evals.dense.ridge must be a positive number"),
                         (dict(num_classes=2.0), r"evals.dense.num_classes must be an int"),
                         (dict(label_set="shape", num_classes=5),
                          r"label_set 'shape' has 7 labels \(leave num_classes 0\)")):
        with pytest.raises(ConfigError, match=message):
            DenseProbeOptions(**bad, where=where)


# ------------------------------------------------------------------------------------------
# A segmentation dataset in TFDS form, prepared locally (no download).

SEG = ds.make_objects_split(1, seed=9, size=64)  # 36 images of 64×64 with class maps.


class SiglipTinySegmentation(tfds.core.GeneratorBasedBuilder):
    """36 demo images (PNG) with a PNG segmentation_mask; 255 marks void columns."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(64, 64, 3)),
            "segmentation_mask": tfds.features.Image(shape=(64, 64, 1)),
        }))

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i in range(36):
            mask = SEG["segmentation"][i].copy()
            mask[:, :4 if i % 2 == 0 else 8] = 255  # "Void" columns, to be ignored.
            yield i, {"image": SEG["image"][i], "segmentation_mask": mask[..., None]}


def test_tfds_segmentation_dataset_with_ignore_label(tmp_path, tiny):
    tfds_dir = str(tmp_path / "tfds")
    SiglipTinySegmentation(data_dir=tfds_dir).download_and_prepare()
    data = dict(name="tfds", tfds_name="siglip_tiny_segmentation", split="train",
                data_dir=tfds_dir)
    pp = ('decode|value_range(-1, 1)|decode(channels=1, key="segmentation_mask")|'
          'keep("image", "segmentation_mask")')
    config = _config(tmp_path, data=data, pp=pp, batch_size=8, label_set="raw",
                     num_classes=37, ignore_label=255, segmentation_key="segmentation_mask",
                     train_fraction=0.25)
    evaluator, params = _build(config, tiny)
    metrics = evaluator.run(params)
    # 8×8 patches of 8×8 pixels per image. Masks with 4 void columns: the first patch column
    # is half void and still votes (64 patches); with 8: it is all void and skipped (56). TFDS
    # shuffles at preparation: count in the order it reads, first 9 train, 27 test.
    masks = [ex["segmentation_mask"] for ex in tfds.builder(
        "siglip_tiny_segmentation", data_dir=tfds_dir).as_dataset(split="train")
        .as_numpy_iterator()]
    patches = [56 if (m[:, 4:8] == 255).all() else 64 for m in masks]
    assert metrics["num_train_patches"] == sum(patches[:9])
    assert metrics["num_patches"] == sum(patches[9:])
    assert 0 < metrics["accuracy"] <= 1 and 0 < metrics["miou"] <= 1


def test_evaluate_entry_point_runs_the_probe_on_an_npz_checkpoint(tmp_path, tiny):
    from siglip_jax.checkpoints.big_vision import save_npz
    from siglip_jax.evaluation import evaluate, format_table

    data = dict(name="demo_shapes", split="test", data_dir=str(tmp_path), objects=True,
                train_per_class=1, test_per_class=2)
    config = _config(tmp_path, data=data, batch_size=16, label_set="shape",
                     pp='value_range(-1, 1)|keep("image", "segmentation")')
    npz = str(tmp_path / "params.npz")
    save_npz(npz, tiny[1])
    results = evaluate(config, npz, log=lambda *_: None)
    assert sorted(results) == ["dense/accuracy", "dense/miou", "dense/miou_fg",
                               "dense/num_patches", "dense/num_train_patches"]
    assert results["dense/num_patches"] == 36 * 64 == results["dense/num_train_patches"]
    direct = _build(config, tiny)[0].run(tiny[1])  # The trainer's hook path, same params.
    assert results["dense/accuracy"] == pytest.approx(direct["accuracy"], abs=1e-6)
    table = format_table(results)
    assert re.search(r"dense +miou +0\.\d{4}\n", table) and re.search(r"num_patches +2304", table)
