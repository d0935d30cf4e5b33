"""Mesh construction, regex partition rules and global batch assembly on 8 CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from siglip_jax.sharding import follow_params, make_global_batch, make_mesh, param_shardings


def test_mesh_fills_minus_one():
    mesh = make_mesh([("data", -1), ("fsdp", 2)])
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2}
    with pytest.raises(ValueError, match="does not divide the 8 devices"):
        make_mesh([("data", 3), ("fsdp", -1)])
    with pytest.raises(ValueError, match="uses 4 devices, but there are 8"):
        make_mesh([("data", 2), ("fsdp", 2)])


def test_rules_first_match_wins_and_fsdp_picks_largest_divisible_dim():
    mesh = make_mesh([("data", 4), ("fsdp", 2)])
    params = {"img": {"kernel": jnp.zeros((3, 8)), "bias": jnp.zeros((3,))},
              "txt": {"kernel": jnp.zeros((6, 4))}}
    shardings = param_shardings(params, [("img/bias", "replicate"), (".*", "fsdp")], mesh)
    assert shardings["img"]["kernel"].spec == P(None, "fsdp")
    assert shardings["img"]["bias"].spec == P()
    assert shardings["txt"]["kernel"].spec == P("fsdp", None)
    with pytest.raises(ValueError, match="regex 'tx/.*' matches no parameter"):
        param_shardings(params, [("tx/.*", "replicate")], mesh)


def test_optimizer_state_follows_params():
    mesh = make_mesh([("data", 4), ("fsdp", 2)])
    params = {"w": {"kernel": jnp.zeros((4, 8))}}
    shardings = param_shardings(params, [(".*", "fsdp")], mesh)
    state = ({"count": jnp.zeros(()), "mu": {"w": {"kernel": jnp.zeros((4, 8))}}},)
    follow = follow_params(state, params, shardings, mesh)
    assert follow[0]["mu"]["w"]["kernel"].spec == P(None, "fsdp")
    assert follow[0]["count"].spec == P()


def test_global_batch_is_sharded_over_batch_axes():
    mesh = make_mesh([("data", -1)])
    local = {"x": np.arange(16 * 3).reshape(16, 3).astype(np.float32)}
    batch = make_global_batch(local, mesh, ("data",))
    assert batch["x"].shape == (16, 3)
    assert [s.data.shape for s in batch["x"].addressable_shards] == [(2, 3)] * 8
    np.testing.assert_array_equal(np.asarray(batch["x"]), local["x"])
    assert jax.device_count() == 8
