"""experiment.init_state builds the train state from what build_step already holds (the
abstract state and its shardings) instead of tracing model.init again; the state is still
the plain flax init of the model, laid out as the jitted step expects."""

import jax
import jax.numpy as jnp
import numpy as np
import tiny

from siglip_jax import experiment
from siglip_jax import step as step_lib
from siglip_jax.schema import parse
from siglip_jax.sharding import mesh_of


def test_init_state_reuses_the_step_parts_and_equals_a_plain_flax_init(tmp_path, monkeypatch):
    run = parse(tiny.tiny_config(tmp_path / "data", steps=2))  # No data is read.
    mesh = mesh_of(run.mesh)
    shapes = experiment.input_shapes(run)
    parts = experiment.build_step(run, mesh, shapes)

    def traced_again(*args, **kwargs):
        raise AssertionError("init_state traced model.init for the shapes again")

    monkeypatch.setattr(step_lib, "abstract_params", traced_again)
    state = experiment.init_state(run, parts, mesh, shapes)

    # Reference: flax's own init of the model at the run's seed, on one example.
    _, height, width, _ = shapes["image"]
    reference = jax.jit(parts.model.init)(jax.random.key(run.seed),
                                          jnp.zeros((1, height, width, 3)),
                                          jnp.zeros((1, shapes["labels"][1]), jnp.int32))["params"]
    got = jax.tree_util.tree_flatten_with_path(state["params"])[0]
    want = jax.tree_util.tree_flatten_with_path(reference)[0]
    assert [p for p, _ in got] == [p for p, _ in want]
    for (path, a), (_, b) in zip(got, want, strict=True):
        # Sharded (jit with out_shardings) and unsharded inits round alike up to ~1 ulp.
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=0,
                                   err_msg=jax.tree_util.keystr(path))
    # Adam's moments start at zero, the step counter at 0.
    assert all(not np.asarray(x).any() for x in jax.tree.leaves(state["opt_state"]))
    assert int(state["step"]) == 0
    # Every leaf sits where the jitted step's in_shardings say.
    jax.tree.map(lambda x, s: np.testing.assert_equal(x.sharding.is_equivalent_to(s, x.ndim),
                                                      True),
                 state, parts.shardings)
