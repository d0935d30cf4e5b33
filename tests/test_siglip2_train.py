"""NaFlex training on the 8-device mesh: a dict image batch of mixed aspect ratios goes through
make_global_batch, init_state and the jitted step with the custom-vjp ring loss; the update
equals plain SGD on the dense sigmoid loss computed on one device (independent reference)."""

import jax
import ml_collections
import numpy as np

from siglip_jax import losses
from siglip_jax.models.two_towers import Model
from siglip_jax.optim import OptimConfig, make_optimizer
from siglip_jax.sharding import make_global_batch, make_mesh
from siglip_jax.step import abstract_params, init_state, make_train_step

MODEL = dict(image=dict(kind="naflex", width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=4,
                        posemb_grid=4, pool_type="map"),
             text=dict(vocab_size=32, width=32, depth=1, mlp_dim=64, num_heads=2),
             out_dim=(None, 32))  # fmt: skip
B, N = 8, 20
GRIDS = [(4, 4), (2, 8), (8, 2), (3, 5), (1, 1), (4, 5)]  # Square, wide, tall, odd, tiny, full
SHAPES = {"image": {"patches": (B, N, 48), "mask": (B, N), "spatial_shapes": (B, 2)},
          "labels": (B, 6)}


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    grids = np.array([GRIDS[i % len(GRIDS)] for i in range(B)], np.int32)
    n_real = grids.prod(1)
    mask = np.arange(N)[None, :] < n_real[:, None]
    patches = np.where(mask[..., None], rng.uniform(-1, 1, (B, N, 48)), 0).astype(np.float32)
    labels = rng.integers(2, 32, (B, 6)).astype(np.int32)
    return {"image": {"patches": patches, "mask": mask, "spatial_shapes": grids},
            "labels": labels}


def test_naflex_ring_loss_step_equals_dense_sgd_reference():
    mesh = make_mesh([("data", -1)])
    model = Model(**MODEL)
    abstract = abstract_params(model, SHAPES)
    assert abstract["img"]["pos_embedding"].shape == (4, 4, 32)
    config = ml_collections.ConfigDict(dict(optim=dict(name="sgd", momentum=0.0), lr=0.1,
                                            wd=0.0, grad_clip_norm=0.0,
                                            schedule=dict(decay_type="constant")))  # fmt: skip
    tx, lr_fn = make_optimizer(OptimConfig.from_config(config), abstract, total_steps=10)
    state, _ = init_state(model, tx, SHAPES, mesh, [(".*", "replicate")], seed=0)
    local = _batch()
    batch = make_global_batch(local, mesh, ("data",))
    assert batch["image"]["patches"].sharding.shard_shape((B, N, 48)) == (1, N, 48)
    ring = losses.make_loss("ring", mesh, ("data",))
    before = jax.device_get(state["params"])
    new_state, metrics = jax.jit(make_train_step(model, tx, ring, lr_fn))(state, batch)

    def dense_loss(params):
        zimg, ztxt, out = model.apply({"params": params}, local["image"], local["labels"])
        return losses.sigmoid_loss_dense(zimg, ztxt, out["t_prime"].reshape(()),
                                         out["b"].reshape(()))[0]
    loss, grads = jax.jit(jax.value_and_grad(dense_loss))(before)
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
    expected = jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, before, grads)
    got = jax.device_get(new_state["params"])
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(expected),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # The position grid learns (its gradient reaches every grid cell through the resize).
    assert np.abs(np.asarray(grads["img"]["pos_embedding"])).min() > 0
