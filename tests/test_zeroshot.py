"""Zero-shot classification: hand-computed cases and a toy model that is right by construction."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from siglip_jax.data.input import MASK_KEY, eval_batches, num_eval_batches
from siglip_jax.evaluators import prompts as prompt_lib
from siglip_jax.evaluators.common import Embedder
from siglip_jax.evaluators.zeroshot import (
    ZeroShotEvaluator,
    _counts,
    accumulate,
    class_embeddings,
    prompts,
)
from siglip_jax.sharding import make_mesh, replicated


def test_prompts_are_class_major():
    assert prompts(["cat", "dog"], ["a {}", "the {}!"]) == ["a cat", "the cat!", "a dog",
                                                           "the dog!"]
    with pytest.raises(ValueError, match="has no '{}'"):
        prompts(["cat"], ["a photo"])


def test_hand_computed_three_classes_two_templates():
    # Template embeddings per class (already unit norm), class-major [C*T, D].
    ztxt = jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0],     # class 0 → (1, 1, 0)/√2
                      [0.0, 0.0, 1.0], [0.0, 0.0, 1.0],     # class 1 → (0, 0, 1)
                      [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])  # class 2 → (−1, −1, 0)/√2
    zcls = class_embeddings(ztxt, 3)
    s = 1 / np.sqrt(2)
    np.testing.assert_allclose(zcls, [[s, s, 0], [0, 0, 1], [-s, -s, 0]], atol=1e-6)
    # Image 0 is nearest class 0; image 1 class 1; image 2 is nearest class 1 but labelled 2
    # (class 2 is its last choice: rank 2, so top-1 wrong and top-5 right with 3 classes);
    # image 3 is padding and must not count even though it would be "correct".
    zimg = jnp.array([[0.8, 0.6, 0.0], [0.1, 0.0, 0.99], [0.6, 0.0, 0.8], [1.0, 0.0, 0.0]])
    labels = jnp.array([0, 1, 2, 0])
    mask = jnp.array([True, True, True, False])
    result = accumulate([_counts(zimg, zcls, labels, mask)])
    assert result == {"top1": 2 / 3, "top5": 1.0, "mean_class_recall": pytest.approx(2 / 3),
                      "num_examples": 3.0}


class _ToyModel(nn.Module):
    """Image → one-hot of the class written in pixel (0, 0, 0); text → one-hot of token 0."""

    num_classes: int

    @nn.compact
    def __call__(self, image, text, train=False):
        self.param("unused", nn.initializers.zeros, (1,))
        zimg = None if image is None else jax.nn.one_hot(
            image[:, 0, 0, 0].astype(jnp.int32), self.num_classes)
        ztxt = None if text is None else jax.nn.one_hot(text[:, 0], self.num_classes)
        return zimg, ztxt, {}


def test_toy_model_scores_exactly_one_with_uneven_batches():
    """37 examples, global batch 16: the padded last batch must not change the counts."""
    num_classes, num_examples, batch = 5, 37, 16
    labels = np.arange(num_examples) % num_classes
    images = np.zeros((num_examples, 4, 4, 3), np.float32)
    images[:, 0, 0, 0] = labels
    mesh = make_mesh([("data", -1)])
    model = _ToyModel(num_classes)
    params = model.init(jax.random.key(0), jnp.zeros((8, 4, 4, 3)), jnp.zeros((8, 2), jnp.int32))
    params = params["params"]
    embedder = Embedder(model, mesh, ("data",), jax.tree_util.tree_map(
        lambda _: replicated(mesh), params))
    names = [f"c{i}" for i in range(num_classes)]
    tokenize = lambda texts: np.array([[int(t[-1]), 1] for t in texts], np.int32)

    def batches():
        data = tf.data.Dataset.from_tensor_slices({"image": images, "label": labels})
        return eval_batches(data, lambda x: x, local_batch=batch,
                            num_batches=num_eval_batches(num_examples, batch))

    evaluator = ZeroShotEvaluator(embedder=embedder, class_names=names,
                                  templates=["{}", "a {}"], tokenize=tokenize, batches=batches)
    result = evaluator.run(params)
    assert result == {"top1": 1.0, "top5": 1.0, "mean_class_recall": 1.0, "num_examples": 37.0}

    # Shift the labels by one: nothing is right at top-1.
    labels = (labels + 1) % num_classes
    assert evaluator.run(params)["top1"] == 0.0


def test_eval_batches_pad_and_mask_exactly():
    data = tf.data.Dataset.from_tensor_slices({"x": np.arange(10)})
    out = list(eval_batches(data, lambda e: e, local_batch=4, num_batches=4))
    assert len(out) == 4
    assert [b[MASK_KEY].sum() for b in out] == [4, 4, 2, 0]
    seen = np.concatenate([b["x"][b[MASK_KEY]] for b in out])
    np.testing.assert_array_equal(seen, np.arange(10))


# ----------------------------------------------------------------------------- assets, config


def test_packaged_assets_are_the_standard_lists():
    names = prompt_lib.class_names("imagenet")
    assert len(names) == 1000
    # Spot checks against the ImageNet-1k label order (CLIP notebook names).
    assert (names[0], names[100], names[283], names[409], names[817], names[999]) == (
        "tench", "black swan", "Persian cat", "analog clock", "sports car", "toilet paper")
    # The CLIP list's two known duplicates are kept so numbers stay comparable.
    assert names[657] == names[744] == "missile" and names[836] == names[837] == "sunglasses"
    clip80, clip7 = prompt_lib.templates("clip80"), prompt_lib.templates("clip7")
    assert len(clip80) == len(set(clip80)) == 80 and len(clip7) == 7
    assert set(clip7) <= set(clip80)
    assert clip80[0] == "a bad photo of a {}." and clip80[-1] == "a tattoo of the {}."
    assert clip7[0] == "itap of a {}." and all(t.count("{}") == 1 for t in clip80)


def test_prompt_values_lists_strings_and_errors():
    assert prompt_lib.templates("a photo of a {}") == ["a photo of a {}"]
    assert prompt_lib.class_names(("a", "b")) == ["a", "b"]
    assert prompt_lib.prompts(["x{y}"], ["the {}."]) == ["the x{y}."]
    with pytest.raises(ValueError, match="not a packaged asset"):
        prompt_lib.class_names("imagnet")
    with pytest.raises(ValueError, match=r"not a packaged asset \['clip7', 'clip80'\]"):
        prompt_lib.templates("clip81")
    with pytest.raises(ValueError, match="empty"):
        prompt_lib.templates([])


def _demo_config(tmp_path, **evals):
    from pathlib import Path

    from siglip_jax.config import load_config

    demo = str(Path(__file__).resolve().parents[1] / "configs" / "demo.py")
    data = str(tmp_path / "demo_data")
    overrides = {"input.data.data_dir": data, "input.data.train_per_class": 2,
                 "evals.zeroshot.data.data_dir": data, "evals.zeroshot.data.train_per_class": 2,
                 "evals.zeroshot.data.test_per_class": 1}
    overrides.update(evals)
    return load_config(demo, [f"{k}={v}" for k, v in overrides.items()])


def _with_zeroshot(config, **changes):
    """A copy of `config` whose evals.zeroshot section has `changes` (of any type)."""
    import ml_collections

    from siglip_jax.records import to_plain

    config = ml_collections.ConfigDict(to_plain(config))
    config.evals = ml_collections.ConfigDict(
        {"zeroshot": {**to_plain(config.evals.zeroshot), **changes}})
    return config


def test_builder_rejects_unknown_asset_before_reading_data(tmp_path):
    from siglip_jax.config import ConfigError
    from siglip_jax.evaluators.builder import build_evaluators
    from siglip_jax.schema import parse

    never = tmp_path / "never"
    config = _with_zeroshot(_demo_config(tmp_path), templates="clip90",
                            data=dict(name="demo_shapes", split="test", data_dir=str(never)))
    with pytest.raises(ConfigError, match=r"evals.zeroshot: templates 'clip90'"):
        build_evaluators(parse(config), model=None, mesh=None, param_shardings=None,
                         tokenizer=None)
    assert not never.exists()


def test_builder_canonicalises_prompts_and_reads_asset_templates(tmp_path):
    from siglip_jax.data.builder import make_source
    from siglip_jax.data.config import parse_source
    from siglip_jax.evaluators.builder import build_evaluators
    from siglip_jax.experiment import resolve_tokenizer
    from siglip_jax.schema import parse

    mesh = make_mesh([("data", -1)])
    config = _demo_config(tmp_path, **{"evals.zeroshot.templates": "['A Photo of a {}!']"})
    tokenizer = resolve_tokenizer(parse(config).tokenizer, make_source(
        parse_source(config.input.data, "input.data")))
    model = _ToyModel(3)
    params = model.init(jax.random.key(0), jnp.zeros((8, 4, 4, 3)),
                        jnp.zeros((8, 2), jnp.int32))["params"]
    shardings = jax.tree_util.tree_map(lambda _: replicated(mesh), params)
    evaluator = build_evaluators(parse(config), model=model, mesh=mesh,
                                 param_shardings=shardings, tokenizer=tokenizer)["zeroshot"]
    names = evaluator.class_names
    want = tokenizer.encode([f"a photo of a {n}" for n in names], 8, "sticky")
    np.testing.assert_array_equal(evaluator.tokens, want)
    assert evaluator.every_n_steps == 500 and len(names) == 36

    config = _with_zeroshot(config, templates="clip7", class_names=["red circle", "blue square"])
    evaluator = build_evaluators(parse(config), model=model, mesh=mesh,
                                 param_shardings=shardings, tokenizer=tokenizer)["zeroshot"]
    assert evaluator.tokens.shape == (2 * 7, 8)
    assert evaluator.templates == prompt_lib.templates("clip7")


def test_builder_checks_pp_outputs_at_build_time(tmp_path):
    from siglip_jax.config import ConfigError
    from siglip_jax.evaluators.builder import build_evaluators
    from siglip_jax.schema import parse

    mesh = make_mesh([("data", -1)])
    config = _with_zeroshot(_demo_config(tmp_path), pp='value_range(-1, 1)|keep("image")')
    with pytest.raises(ConfigError, match=r"evals.zeroshot.pp must produce \['image', 'label'\]"
                                          r"; it produces \['image'\]"):
        build_evaluators(parse(config), model=None, mesh=mesh, param_shardings=None,
                         tokenizer=None)
    config = _with_zeroshot(config, pp='keep("image", "labels")')
    with pytest.raises(ConfigError, match=r"evals.zeroshot.pp: pp op 'keep' needs "
                                          r"key 'labels'; example has \['image', 'label', "):
        build_evaluators(parse(config), model=None, mesh=mesh, param_shardings=None,
                         tokenizer=None)
