"""experiment.init_state builds the train state from what build_step already holds (the
abstract state and its shardings) instead of tracing model.init again; the state is still
the plain flax init of the model, laid out as the jitted step expects."""

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf
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



def test_the_pipelines_bfloat16_cast_rounds_like_the_towers():
    """tf.cast to bfloat16 rounds to nearest, ties to even, as XLA's convert in the tower."""
    ulp = 2.0 ** -7  # bfloat16's spacing in [1, 2).
    values = np.array([1 + ulp / 2, 1 + 3 * ulp / 2, 1 + ulp / 2 + 2 ** -20, -1 - ulp / 2,
                       1 + ulp / 4, 0.1, -3.3, 1e-3], np.float32)
    cast = experiment.input_lib.cast_entries(lambda ex: ex, ("image",), "bfloat16")
    got = cast({"image": tf.constant(values), "labels": tf.constant([1])})
    assert got["labels"].dtype == tf.int32
    assert np.array_equal(got["image"].numpy(), np.asarray(jnp.asarray(values, jnp.bfloat16)))
    # By hand: ties go to the even neighbour (1 and 1 + 2 ulp), just above a tie goes up.
    np.testing.assert_array_equal(got["image"].numpy()[:4].astype(np.float32),
                                  [1.0, 1 + 2 * ulp, 1 + ulp, -1.0])


def test_a_bfloat16_image_tower_gets_bfloat16_images_and_the_same_step(tmp_path):
    """With model.image.dtype=bfloat16 the input pipeline casts the images (the tower's first
    op would cast them anyway): half the device bytes, and the step's loss equals that of the
    same batch given in float32, which the tower casts itself."""
    config = tiny.tiny_config(tmp_path / "data", steps=2)
    with config.unlocked():
        config.model.image.dtype = "bfloat16"
    run = parse(config)
    assert experiment.image_input_dtype(run) == "bfloat16"
    mesh = mesh_of(run.mesh)
    shapes = experiment.input_shapes(run)
    parts = experiment.build_step(run, mesh, shapes)
    batch = next(experiment.build_input(run, mesh, 0)[0])
    assert batch["image"].dtype == jnp.bfloat16 and batch["labels"].dtype == np.int32
    assert experiment.abstract_batch(parts, shapes, run)["image"].dtype == jnp.bfloat16

    state = experiment.init_state(run, parts, mesh, shapes)
    as_f32 = dict(batch, image=np.asarray(batch["image"], np.float32))
    _, got = parts.step_fn(jax.tree.map(jnp.copy, state), batch)
    _, want = parts.step_fn(jax.tree.map(jnp.copy, state), as_f32)
    assert float(got["loss"]) == float(want["loss"])
