"""Zero-shot classification: hand-computed cases and a toy model that is right by construction."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from siglip_jax.data.input import MASK_KEY, eval_batches, num_eval_batches
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
