"""Switch-on of the self-supervised objectives (SigLIP 2 §2.3): the heads and the mask token are
re-drawn at the switch-on step with fresh optimizer state, the teacher equals the student
there, and a run resumed from a checkpoint taken before switch-on is bit-exact.

The schedule has a large decoupled decay before switch-on (wd 0.6 at a constant schedule for
6 steps: the heads, which get no gradient, shrink by 0.4^6 ≈ 4e-3), as `wd·Σs(t)` ≈ 60 does in
the full recipe (1e-4 over 80 % of a 1.22 M-step cosine schedule).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from tiny import SELFSUP_HEAD as HEAD
from tiny import SELFSUP_MODEL as MODEL

from siglip_jax import losses
from siglip_jax.checkpoints.orbax_io import Checkpointer
from siglip_jax.models.two_towers import Model
from siglip_jax.objectives import distillation, masked
from siglip_jax.objectives.base import objective_params, teacher_spec
from siglip_jax.objectives.options import check_options
from siglip_jax.optim import OptimConfig, make_optimizer
from siglip_jax.step import (
    abstract_params,
    fresh_heads,
    head_restarts,
    init_state,
    make_train_step,
    restart_heads,
    state_shardings,
)

SHAPES = {"image": (8, 16, 16, 3), "labels": (8, 6)}
START, WD, SEED = 6, 0.6, 3
HEADS = ("distill_head", "masked_head", "mask_token")


def _objectives(start=START):
    sd = check_options("self_distillation", dict(HEAD, n_local=2, local_size=8, ema=0.9))
    mp = check_options("masked_prediction", dict(HEAD, ema=0.9))
    return (distillation.SelfDistillation(sd, 32, start, 0.9),
            masked.MaskedPrediction(mp, 32, start, 0.9, patch=(8, 8)))


def _batch(i):
    rng = np.random.default_rng(i)
    return {"image": rng.uniform(-1, 1, (8, 16, 16, 3)).astype(np.float32),
            "labels": rng.integers(2, 32, (8, 6)).astype(np.int32),
            "local_views": rng.uniform(-1, 1, (8, 2, 8, 8, 3)).astype(np.float32)}


def _kernels(tree):
    """The Dense kernels (and the mask token) of the heads, by path."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in flat
            if "kernel" in jax.tree_util.keystr(p) or "mask_token" in jax.tree_util.keystr(p)}


@pytest.fixture(scope="module")
def run():
    """(objectives, tx, mesh, rules, model, jitted step, state shardings, [state entering steps
    0 … START+2], on the devices): one compile of the step."""
    objs = _objectives()
    model = Model(**MODEL)
    optim = OptimConfig.from_config(dict(optim=dict(name="adam"), lr=1e-3, wd=WD,
                                         schedule=dict(decay_type="constant")))
    tx, lr_fn = make_optimizer(optim, abstract_params(model, SHAPES, objs), total_steps=10)
    # One device: the restart is not about sharding (test_distillation's ring step crosses
    # switch-on on the 8-device mesh), and it halves the compile.
    mesh, rules = Mesh(np.array(jax.devices()[:1]), ("data",)), ((".*", "replicate"),)
    state, shardings = init_state(model, tx, SHAPES, mesh, rules, seed=0, objectives=objs)
    loss = lambda zimg, ztxt, t, b: losses.sigmoid_loss_dense(zimg, ztxt, t, b)
    step = jax.jit(make_train_step(model, tx, loss, lr_fn, objectives=objs, seed=SEED),
                   in_shardings=(shardings, None), out_shardings=(shardings, None))
    states = [state]
    for i in range(START + 2):
        state, metrics = step(state, _batch(i))
        assert bool(metrics["finite"])
        assert (float(metrics["self_distillation/loss"]) > 0) == (i >= START), i
        states.append(state)
    return objs, tx, mesh, rules, model, step, shardings, states


def test_head_restarts_name_the_objectives_own_params():
    restarts = head_restarts(_objectives())
    assert [(r.start, r.parts, r.index) for r in restarts] == [
        (START, ("distill_head",), 0), (START, ("mask_token", "masked_head"), 1)]
    assert head_restarts(_objectives(start=0)) == ()  # On from step 0: the init is fresh.


def test_decay_before_switch_on_is_large_and_the_heads_restart_at_their_init_scale(run):
    objs, tx, *_, step, shardings, states = run
    before = states[START]  # The state entering the switch-on step.
    assert int(before["step"]) == START
    init = jax.device_get(objective_params(objs, jax.random.key(12345)))
    reference = _kernels(init)  # An independent draw: the initialisers' statistics.
    decayed = _kernels(jax.device_get({h: before["params"][h] for h in HEADS}))
    for name, kernel in decayed.items():  # Without the restart the losses would see these.
        if "kernel" in name:  # (The mask token is not decayed: it only gets a gradient.)
            assert kernel.std() < 0.01 * reference[name].std(), name

    restart = jax.jit(restart_heads, static_argnums=(1, 2, 3), out_shardings=shardings)
    after = before
    for r in head_restarts(objs):
        after = restart(after, tx, r, SEED)
    fresh = _kernels(jax.device_get({h: after["params"][h] for h in HEADS}))
    assert fresh.keys() == reference.keys()
    for name, kernel in fresh.items():
        want = reference[name]
        assert 0.7 < kernel.std() / want.std() < 1.4, (name, kernel.std(), want.std())
        assert abs(kernel.mean()) < 3 * want.std() / np.sqrt(kernel.size), name
        assert np.abs(kernel - decayed[name]).max() > 0.1 * want.std(), name  # A new draw.
    # The teacher equals the student at switch-on: the image tower (momentum 0 until then)
    # and the restarted heads.
    host = jax.device_get(after)
    for part in host["teacher"]:
        jax.tree_util.tree_map(np.testing.assert_array_equal, host["teacher"][part],
                               host["params"][part])
    # The train step does exactly this at step START: restarting again is a no-op, so the
    # step gives the same state from `before` and from `after`.
    from_before = states[START + 1]
    from_after, _ = step(after, _batch(START))
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                           jax.device_get(from_before), jax.device_get(from_after))


def test_restart_resets_only_the_heads_optimizer_state(run):
    objs, tx, *_, states = run
    state = jax.device_get(states[2])
    # Every float leaf of the optimizer state moved off its init (counts are ints).
    junk = jax.tree_util.tree_map(
        lambda x: x + 1.0 if jnp.issubdtype(x.dtype, jnp.floating) else x, state["opt_state"])
    restart = head_restarts(objs)[1]
    out = jax.device_get(restart_heads({**state, "opt_state": junk}, tx, restart, SEED))
    init = jax.device_get(tx.init(out["params"]))
    flat = lambda t: jax.tree_util.tree_flatten_with_path(t)[0]
    n_head = n_other = 0
    for (path, got), (_, old), (_, fresh) in zip(flat(out["opt_state"]), flat(junk),
                                                 flat(init), strict=True):
        name = jax.tree_util.keystr(path)
        if any(f"'{p}'" in name for p in restart.parts):
            np.testing.assert_array_equal(got, fresh, err_msg=name)  # Moments zeroed.
            n_head += 1
        else:  # The rest of the model's moments, the distill head's, and Adam's count.
            np.testing.assert_array_equal(got, old, err_msg=name)
            n_other += 1
    assert n_head == 2 * (3 * 2 + 2) and n_other > n_head  # mu, nu: 3 Dense, protos, token.
    np.testing.assert_array_equal(out["params"]["mask_token"],
                                  fresh_heads(restart, SEED)["mask_token"])
    jax.tree_util.tree_map(np.testing.assert_array_equal, out["params"]["distill_head"],
                           state["params"]["distill_head"])


def test_resume_across_switch_on_is_bit_exact(run, tmp_path):
    objs, tx, mesh, rules, model, step, _, states = run
    saved = START - 1
    with Checkpointer(str(tmp_path), every_n_steps=1, use_async=False) as ckpt:
        ckpt.maybe_save(saved, states[saved], force=True)
    abstract, _ = state_shardings(abstract_params(model, SHAPES, objs), tx, mesh, rules,
                                  teacher_spec(objs).parts)
    with Checkpointer(str(tmp_path), every_n_steps=1, use_async=False) as ckpt:
        state = ckpt.restore(abstract, saved)
    for i in range(saved, START + 2):  # Through the switch-on step and one past it.
        state, _ = step(state, _batch(i))
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(state),
                           jax.device_get(states[START + 2]))
