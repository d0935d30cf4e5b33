"""The train step: gradient accumulation, frozen towers, skipping non-finite updates, FSDP."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from siglip_jax import losses
from siglip_jax.metrics import compiled_flops
from siglip_jax.models.two_towers import Model
from siglip_jax.optim import FROZEN, OptimConfig, group_labels, make_optimizer
from siglip_jax.sharding import make_mesh
from siglip_jax.step import abstract_params, frozen_mask, init_state, make_train_step

MODEL = dict(
    image=dict(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=8, pool_type="gap"),
    text=dict(vocab_size=32, width=32, depth=1, mlp_dim=64, num_heads=2, pool_type="last"),
    out_dim=16)
SHAPES = {"image": (16, 16, 16, 3), "labels": (16, 6)}


def _batch(seed=0, n=16):
    rng = np.random.default_rng(seed)
    return {"image": rng.uniform(-1, 1, (n, 16, 16, 3)).astype(np.float32),
            "labels": rng.integers(2, 32, (n, 6)).astype(np.int32)}


def _config(schedule=None, optim="sgd"):
    return OptimConfig.from_config(dict(
        optim=dict(name=optim) if optim == "adam" else dict(name="sgd", momentum=0.0),
        lr=0.1, wd=0.0, grad_clip_norm=0.0,
        schedule=schedule or dict(decay_type="constant")))


def _setup(mesh_spec=(("data", -1),), rules=((".*", "replicate"),), schedule=None,
           optim="sgd"):
    mesh = make_mesh(list(mesh_spec))
    model = Model(**MODEL)
    abstract = abstract_params(model, SHAPES)
    config = _config(schedule, optim)
    tx, lr_fn = make_optimizer(config, abstract, total_steps=10)
    frozen = frozen_mask(group_labels(config, abstract), FROZEN)
    state, shardings = init_state(model, tx, SHAPES, mesh, rules, seed=0)
    return mesh, model, tx, lr_fn, frozen, state, shardings


def _dense_loss(zimg, ztxt, t_prime, b):
    return losses.sigmoid_loss_dense(zimg, ztxt, t_prime, b)


def test_accumulated_gradients_are_the_mean_of_micro_batch_gradients():
    mesh, model, tx, lr_fn, _, state, _ = _setup()
    batch = _batch()
    step = jax.jit(make_train_step(model, tx, _dense_loss, lr_fn, accum_steps=2))
    new_state, metrics = step(jax.tree_util.tree_map(jnp.copy, state), batch)

    # Reference: micro-batch m = rows m, m+2, m+4, …; SGD with lr 0.1 and no momentum.
    def loss_of(params, b):
        zimg, ztxt, out = model.apply({"params": params}, b["image"], b["labels"])
        return losses.sigmoid_loss_dense(zimg, ztxt, out["t_prime"].reshape(()),
                                         out["b"].reshape(()))[0]
    micro = [{k: v[m::2] for k, v in batch.items()} for m in range(2)]
    grad_of, loss_of = jax.jit(jax.grad(loss_of)), jax.jit(loss_of)  # One compile each.
    grads = [grad_of(state["params"], b) for b in micro]
    mean_grad = jax.tree_util.tree_map(lambda a, b: (a + b) / 2, *grads)
    expected = jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, state["params"], mean_grad)
    for a, b in zip(jax.tree_util.tree_leaves(new_state["params"]),
                    jax.tree_util.tree_leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    mean_loss = (loss_of(state["params"], micro[0]) + loss_of(state["params"], micro[1])) / 2
    np.testing.assert_allclose(metrics["loss"], mean_loss, rtol=1e-6)


def test_skip_nonfinite_keeps_the_state_bit_identical():
    mesh, model, tx, lr_fn, _, state, _ = _setup(optim="adam")
    step = jax.jit(make_train_step(model, tx, _dense_loss, lr_fn, skip_nonfinite=True))
    bad = _batch()
    bad["image"][3, 0, 0, 0] = np.nan
    before = jax.device_get(state)
    after, metrics = step(jax.tree_util.tree_map(jnp.copy, state), bad)
    assert not bool(metrics["finite"])
    for a, b in zip(jax.tree_util.tree_leaves(before["params"]),
                    jax.tree_util.tree_leaves(after["params"]), strict=True):
        np.testing.assert_array_equal(a, b)
    assert int(after["step"]) == 1
    good, metrics = step(after, _batch())
    assert bool(metrics["finite"])
    changed = [not np.array_equal(a, b) for a, b in zip(
        jax.tree_util.tree_leaves(before["params"]), jax.tree_util.tree_leaves(good["params"]),
        strict=True)]
    assert any(changed)


def test_frozen_image_tower_has_no_backward_pass_and_no_optimizer_state():
    lit = [("img/.*", None), (".*", dict(decay_type="constant"))]
    results = {}
    for name, schedule in (("full", None), ("lit", lit)):
        mesh, model, tx, lr_fn, frozen, state, shardings = _setup(schedule=schedule,
                                                                  optim="adam")
        step = jax.jit(make_train_step(model, tx, _dense_loss, lr_fn, frozen=frozen))
        compiled = step.lower(state, _batch()).compile()
        opt_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(state["opt_state"]))
        new_state, _ = compiled(jax.tree_util.tree_map(jnp.copy, state), _batch())
        results[name] = (compiled_flops(compiled), opt_bytes, state, new_state)
    img_params = results["full"][2]["params"]["img"]
    img_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(img_params))
    # Adam keeps mu and nu: 2 × the image tower's bytes disappear from the optimizer state.
    assert results["full"][1] - results["lit"][1] == 2 * img_bytes
    assert results["lit"][0] < 0.85 * results["full"][0], (results["lit"][0], results["full"][0])
    _, _, before, after = results["lit"]
    for a, b in zip(jax.tree_util.tree_leaves(before["params"]["img"]),
                    jax.tree_util.tree_leaves(after["params"]["img"]), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(before["params"]["txt"]["head"]["kernel"],
                              after["params"]["txt"]["head"]["kernel"])


def test_fsdp_params_and_optimizer_state_are_sharded():
    _, _, _, _, _, state, _ = _setup(mesh_spec=(("data", 2), ("fsdp", 4)),
                                     rules=((".*", "fsdp"),), optim="adam")
    kernel = state["params"]["txt"]["head"]["kernel"]  # (32, 16): largest dim 32 splits by 4.
    assert kernel.shape == (32, 16)
    assert {s.data.shape for s in kernel.addressable_shards} == {(8, 16)}
    mu = [x for p, x in jax.tree_util.tree_flatten_with_path(state["opt_state"])[0]
          if "mu" in jax.tree_util.keystr(p) and "txt" in jax.tree_util.keystr(p)
          and "head" in jax.tree_util.keystr(p) and "kernel" in jax.tree_util.keystr(p)]
    assert len(mu) == 1 and {s.data.shape for s in mu[0].addressable_shards} == {(8, 16)}
    assert isinstance(optax.tree.norm(state["params"]), jax.Array)


def test_mfu_formula_and_measured_peak():
    from siglip_jax.metrics import default_peak_flops, measure_matmul_flops, mfu

    # 2 GFLOP per device per step, 8 devices, 5 steps/s on one host of 100 GFLOP/s peak.
    assert mfu(2e9, 8, 5.0, 100e9, 1) == pytest.approx(0.8)
    assert mfu(None, 8, 5.0, 100e9, 1) is None
    assert default_peak_flops("TPU v4", "tpu") == 275e12
    assert default_peak_flops("TPU v5 lite", "tpu") == 197e12
    peak = measure_matmul_flops(sizes=(256, 512), seconds=0.05)
    assert 1e9 < peak < 1e13  # A real CPU does between 1 GFLOP/s and 10 TFLOP/s.
