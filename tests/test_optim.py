"""Schedules, decoupled weight decay and frozen parameter groups against hand formulas."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from siglip_jax.config import ConfigError
from siglip_jax.optim import OptimConfig, make_optimizer, make_schedule


def test_warmup_cosine_matches_formula():
    schedule = make_schedule({"decay_type": "cosine", "warmup_steps": 10}, total_steps=110)
    for step in (0, 4, 9, 10, 35, 60, 109, 110):
        warm = min(1.0, (step + 1) / 10)
        progress = min(max((step - 10) / 100, 0.0), 1.0)
        expected = warm * 0.5 * (1 + math.cos(math.pi * progress))
        np.testing.assert_allclose(float(schedule(step)), expected, rtol=1e-6, atol=1e-7)


def test_warmup_frac_and_rsqrt():
    schedule = make_schedule({"decay_type": "rsqrt", "warmup_frac": 0.1, "timescale": 5},
                             total_steps=100)
    np.testing.assert_allclose(float(schedule(4)), 0.5, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(30)), 1 / math.sqrt(20 / 5 + 1), rtol=1e-6)


def test_bad_schedule_names_the_choices():
    with pytest.raises(ConfigError, match="decay_type 'cosin' is not one of"):
        make_schedule({"decay_type": "cosin"}, 10)
    with pytest.raises(ConfigError, match="unknown config key schedule.warmup"):
        make_schedule({"warmup": 3}, 10)


def _config(**overrides):
    defaults = dict(optim=dict(name="sgd", momentum=0.0), lr=0.1, wd=0.01, grad_clip_norm=0.0,
                    schedule=dict(decay_type="constant"))
    return OptimConfig.from_config(ml_collections.ConfigDict({**defaults, **overrides}))


def test_sgd_step_with_decoupled_weight_decay():
    """p ← p − s·(lr·g + wd·p) for kernels; biases get no decay."""
    params = {"dense": {"kernel": jnp.full((2,), 2.0), "bias": jnp.full((2,), 2.0)}}
    grads = {"dense": {"kernel": jnp.full((2,), 0.5), "bias": jnp.full((2,), 0.5)}}
    tx, lr_fn = make_optimizer(_config(), params, total_steps=10)
    updates, _ = tx.update(grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(new["dense"]["kernel"], 2.0 - (0.1 * 0.5 + 0.01 * 2.0), rtol=1e-6)
    np.testing.assert_allclose(new["dense"]["bias"], 2.0 - 0.1 * 0.5, rtol=1e-6)
    np.testing.assert_allclose(float(lr_fn(3)), 0.1)


def test_adam_first_step_is_lr_times_sign():
    params = {"w": {"kernel": jnp.array([1.0, -1.0])}}
    grads = {"w": {"kernel": jnp.array([0.3, -2.0])}}
    tx, _ = make_optimizer(_config(optim=dict(name="adam", b1=0.9, b2=0.95), wd=0.0),
                           params, total_steps=10)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["w"]["kernel"], [-0.1, 0.1], rtol=1e-5)


def test_frozen_group_gets_no_update_and_no_state():
    params = {"img": {"kernel": jnp.ones((64, 64))}, "txt": {"kernel": jnp.ones((4, 4))}}
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    config = _config(optim=dict(name="adam"),
                     schedule=[("img/.*", None), (".*", dict(decay_type="constant"))])
    tx, _ = make_optimizer(config, params, total_steps=10)
    state = tx.init(params)
    updates, _ = tx.update(grads, state, params)
    assert float(jnp.abs(updates["img"]["kernel"]).max()) == 0.0
    assert float(jnp.abs(updates["txt"]["kernel"]).min()) > 0.0
    state_floats = sum(x.size for x in jax.tree_util.tree_leaves(state) if x.ndim)
    assert state_floats == 2 * 16  # Adam's mu and nu for txt only; nothing for the 64×64 img.


def test_group_errors():
    params = {"img": {"kernel": jnp.ones(2)}}
    with pytest.raises(ConfigError, match="regex 'txt/.*' matches no parameter"):
        make_optimizer(_config(schedule=[("txt/.*", None), (".*", {})]), params, 10)
    with pytest.raises(ConfigError, match="every schedule group is frozen"):
        make_optimizer(_config(schedule=[(".*", None)]), params, 10)
    with pytest.raises(ConfigError, match="optim.name 'lamb' is not one of"):
        make_optimizer(_config(optim=dict(name="lamb")), params, 10)
