"""The planner's analytic cost model (siglip_jax/cost_model.py): FLOPs and activation bytes
against XLA's own numbers for small models, and the remat / frozen-tower arithmetic."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from siglip_jax import cost_model
from siglip_jax.losses import sigmoid_loss_dense
from siglip_jax.models.two_towers import Model


def _small_model(width, depth, *, scan=False, remat="none", pool="map"):
    image = dict(width=width, depth=depth, mlp_dim=4 * width, num_heads=4, patch_size=4,
                 pool_type=pool, scan=scan, remat_policy=remat)
    text = dict(vocab_size=100, width=width, depth=depth, mlp_dim=4 * width, num_heads=4,
                scan=scan, remat_policy=remat)
    model_cfg = dict(image=image, text=text, out_dim=(None, width))
    return Model(**model_cfg), model_cfg


@pytest.mark.parametrize("width, depth, pool", [(128, 2, "map"), (256, 3, "gap")])
def test_analytic_forward_flops_match_xla_cost_analysis(width, depth, pool):
    """XLA counts every op (elementwise too); matmuls must be ≥ 93 % of it and never more."""
    model, model_cfg = _small_model(width, depth, pool=pool)
    batch, res, text_len = 8, 32, 16
    image = jax.ShapeDtypeStruct((batch, res, res, 3), jnp.float32)
    text = jax.ShapeDtypeStruct((batch, text_len), jnp.int32)
    params = jax.eval_shape(model.init, jax.random.key(0), image, text)["params"]
    lowered = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t)[:2]).lower(
        params, image, text)
    xla_flops = lowered.cost_analysis()["flops"]
    towers = cost_model.towers_from_model(Model(**model_cfg), (res, res), text_len)
    analytic = batch * sum(cost_model.forward_flops(t) for t in towers)
    assert 0.93 * xla_flops <= analytic <= xla_flops


def test_training_costs_three_forward_passes_in_xla_too():
    """The planner's convention (train = 3 × forward) checked on XLA's count of a grad step."""
    model, _ = _small_model(128, 2)
    image = jax.ShapeDtypeStruct((8, 32, 32, 3), jnp.float32)
    text = jax.ShapeDtypeStruct((8, 16), jnp.int32)
    params = jax.eval_shape(model.init, jax.random.key(0), image, text)["params"]

    def loss(p, x, t):
        zimg, ztxt, out = model.apply({"params": p}, x, t)
        return sigmoid_loss_dense(zimg, ztxt, out["t_prime"], out["b"])[0]

    fwd = jax.jit(loss).lower(params, image, text).cost_analysis()["flops"]
    step = jax.jit(jax.grad(loss)).lower(params, image, text).cost_analysis()["flops"]
    assert 2.7 <= step / fwd <= 3.3


@pytest.mark.parametrize("scan, remat", [(False, "none"), (True, "nothing_saveable")])
def test_activation_estimate_is_close_to_xla_cpu_temp_memory(scan, remat):
    """float32, so XLA:CPU keeps the dtypes the estimate assumes; within -25 % / +35 %."""
    width, depth, batch, res, text_len = 128, 4, 64, 32, 16
    model, model_cfg = _small_model(width, depth, scan=scan, remat=remat)
    image = jax.ShapeDtypeStruct((batch, res, res, 3), jnp.float32)
    text = jax.ShapeDtypeStruct((batch, text_len), jnp.int32)
    params = jax.eval_shape(model.init, jax.random.key(0), image, text)["params"]

    def loss(p, x, t):
        zimg, ztxt, out = model.apply({"params": p}, x, t, train=True)
        return sigmoid_loss_dense(zimg, ztxt, out["t_prime"], out["b"])[0]

    compiled = jax.jit(jax.grad(loss)).lower(params, image, text).compile()
    measured = compiled.memory_analysis().temp_size_in_bytes
    kept = working = 0
    for tower in cost_model.towers_from_model(Model(**model_cfg), (res, res), text_len):
        k, w = cost_model.activation_bytes(tower, batch, trained=True)
        kept, working = kept + k, max(working, w)
    estimate = kept + working + cost_model.loss_bytes(batch, batch, width, "dense")
    assert 0.75 * measured <= estimate <= 1.35 * measured


def test_remat_and_frozen_towers_shrink_the_activation_estimate():
    tower = cost_model.Tower("img", tokens=196, width=768, depth=12, mlp_dim=3072, heads=12,
                       act_bytes=2, remat="none", pool="map", out_dim=None)
    full, _ = cost_model.activation_bytes(tower, 8, trained=True)
    remat_kept, remat_work = cost_model.activation_bytes(
        dataclasses.replace(tower, remat="nothing_saveable"), 8, trained=True)
    frozen_kept, _ = cost_model.activation_bytes(tower, 8, trained=False)
    assert remat_kept + remat_work < full / 3
    assert frozen_kept == 0
    # Block inputs only under remat: depth × tokens × width × 2 bytes, + the embedding output.
    assert remat_kept == 8 * 13 * 196 * 768 * 2
