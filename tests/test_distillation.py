"""Self-distillation and masked prediction (SigLIP 2 §2.3): the EMA teacher in the train state,
both losses against numpy references, the switch-on step, resume, the local_crops pp op, and
a ring + both objectives train step with gradient accumulation on the 8-device mesh whose
losses equal the numpy reference computed outside the step (tests/test_dinov2_parity.py checks
the losses against DINOv2's own code)."""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow as tf
from tiny import SELFSUP_HEAD as HEAD
from tiny import SELFSUP_MODEL as MODEL

from siglip_jax import losses
from siglip_jax.config import ConfigError
from siglip_jax.models.two_towers import Model
from siglip_jax.objectives import distillation, masked, registry, selfsup
from siglip_jax.objectives.base import ema_update, teacher_spec
from siglip_jax.objectives.options import DEFAULTS, check_options
from siglip_jax.optim import OptimConfig, make_optimizer
from siglip_jax.sharding import make_mesh, path_str
from siglip_jax.step import (
    abstract_params,
    fresh_heads,
    head_restarts,
    init_state,
    make_train_step,
    restart_heads,
    state_shardings,
)

SHAPES = {"image": (16, 16, 16, 3), "labels": (16, 6)}


def _objectives(start=0, ema=0.9, centering="sinkhorn"):
    sd = check_options("self_distillation", dict(HEAD, n_local=2, local_size=8, centering=centering,
                                         ema=ema))
    mp = check_options("masked_prediction", dict(HEAD, centering=centering, ema=ema))
    return (distillation.SelfDistillation(sd, 32, start, ema),
            masked.MaskedPrediction(mp, 32, start, ema, patch=(8, 8)))


def _batch(seed=0, n=16):
    rng = np.random.default_rng(seed)
    return {"image": rng.uniform(-1, 1, (n, 16, 16, 3)).astype(np.float32),
            "labels": rng.integers(2, 32, (n, 6)).astype(np.int32),
            "local_views": rng.uniform(-1, 1, (n, 2, 8, 8, 3)).astype(np.float32)}


@jax.jit
def _init(rng):
    """The tiny model's params (jitted: an eager init compiles op by op)."""
    return Model(**MODEL).init(rng, jnp.zeros((1, 16, 16, 3)), jnp.zeros((1, 6), jnp.int32))[
        "params"]


def _dense_loss(zimg, ztxt, t_prime, b):
    return losses.sigmoid_loss_dense(zimg, ztxt, t_prime, b)


def _setup(objs, optim="sgd"):
    mesh = make_mesh([("data", -1)])
    model = Model(**MODEL)
    config = OptimConfig.from_config(dict(
        optim=dict(name=optim) if optim == "adam" else dict(name="sgd", momentum=0.0),
        lr=0.1, wd=0.0, grad_clip_norm=0.0, schedule=dict(decay_type="constant")))
    tx, lr_fn = make_optimizer(config, abstract_params(model, SHAPES, objs), total_steps=10)
    rules = ((".*", "replicate"),)
    state, shardings = init_state(model, tx, SHAPES, mesh, rules, seed=0, objectives=objs)
    return mesh, model, tx, lr_fn, rules, state, shardings


# ----------------------------------------------------------------------------- numpy refs


def _gelu(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _head_np(p, x, layers=3):
    x = np.asarray(x, np.float64)
    for i in range(layers):
        x = x @ np.asarray(p[f"mlp_{i}"]["kernel"], np.float64) + np.asarray(
            p[f"mlp_{i}"]["bias"], np.float64)
        if i < layers - 1:
            x = _gelu(x)
    x = x / (np.linalg.norm(x, axis=-1, keepdims=True) + 1e-6)
    protos = np.asarray(p["prototypes"], np.float64)
    return x @ (protos / (np.linalg.norm(protos, axis=0, keepdims=True) + 1e-6))


def _sinkhorn_np(scores, temp, iters=3):
    q = np.exp(scores / temp).T  # [K, n] as in DINOv2.
    k, n = q.shape
    q = q / q.sum()
    for _ in range(iters):
        q = q / q.sum(axis=1, keepdims=True) / k
        q = q / q.sum(axis=0, keepdims=True) / n
    return (q * n).T


def _ce_np(targets, student, temp):
    s = student / temp
    logp = s - np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1, keepdims=True)) - s.max(
        -1, keepdims=True)
    return float(np.mean(-(targets * logp).sum(-1)))


@jax.jit
def _noisy(tree, seed):
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree_util.tree_unflatten(treedef, [
        x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys,
                                                                         strict=True)])


def _reference_losses(model, state, batch, step, seed, *, accum, patch, sinkhorn_over="micro"):
    """(self-distillation, masked-prediction) losses of one train step with `accum`
    micro-batches, computed outside the step on one device: micro-batch m holds rows
    m, m + accum, … (`step.micro_batches`) and draws its mask from
    fold_in(fold_in(fold_in(key(seed), step), m), masked.SALT) as the step and the objective
    do; per micro-batch the numpy heads and cross-entropy; the mean over micro-batches.
    Sinkhorn-Knopp normalises the teacher scores over all rows of each micro-batch (the
    global micro-batch, not one device's share; `sinkhorn_over="micro"`) or over all rows of
    the step's batch, every micro-batch jointly (`"step"`, what one optimizer step without
    accumulation would do)."""
    params, teacher = state["params"], state["teacher"]
    both = {**params, **teacher}
    features = jax.jit(lambda p, x, m: model.apply(
        {"params": p}, x, patch_mask=m, mask_token=params["mask_token"],
        method=Model.image_features))
    parts = []  # Per micro-batch: SD teacher, SD student scores, n, MP teacher, MP student.
    for m in range(accum):
        image, views = batch["image"][m::accum], batch["local_views"][m::accum]
        b, n = views.shape[:2]
        flat = views.reshape(b * n, *views.shape[2:])
        no_mask = lambda x: jnp.zeros((x.shape[0], (x.shape[1] // patch[0]) *
                                       (x.shape[2] // patch[1])), bool)
        fs, _ = features(params, flat, no_mask(flat))
        ft, tt = features(both, image, no_mask(image))
        rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step), m)
        mask, _ = masked.random_mask(jax.random.fold_in(rng, masked.SALT), b,
                                     no_mask(image).shape[1], 0.5)
        _, ts = features(params, image, mask)
        rows = np.nonzero(np.asarray(mask))  # Row-major: image by image, patches in order.
        parts.append((_head_np(teacher["distill_head"], ft), _head_np(params["distill_head"], fs),
                      n, _head_np(teacher["masked_head"], np.asarray(tt)[rows]),
                      _head_np(params["masked_head"], np.asarray(ts)[rows])))
    if sinkhorn_over == "micro":
        targets = [(_sinkhorn_np(p[0], 0.04), _sinkhorn_np(p[3], 0.04)) for p in parts]
    else:
        sd_all = _sinkhorn_np(np.concatenate([p[0] for p in parts]), 0.04)
        mp_all = _sinkhorn_np(np.concatenate([p[3] for p in parts]), 0.04)
        cut = lambda x, k: np.split(x, np.cumsum([len(p[k]) for p in parts])[:-1])
        targets = list(zip(cut(sd_all, 0), cut(mp_all, 3), strict=True))
    sd = [_ce_np(np.repeat(t_sd, p[2], axis=0), p[1], 0.1)
          for p, (t_sd, _) in zip(parts, targets, strict=True)]
    mp = [_ce_np(t_mp, p[4], 0.1) for p, (_, t_mp) in zip(parts, targets, strict=True)]
    return float(np.mean(sd)), float(np.mean(mp))


# ----------------------------------------------------------------------------- tests


def test_ema_update_and_momentum_schedule_by_hand():
    teacher = {"img": {"w": jnp.array([1.0, 2.0])}}
    student = {"img": {"w": jnp.array([3.0, 6.0])}, "txt": {"w": jnp.array([9.0])}}
    out = ema_update(teacher, student, 0.9)
    np.testing.assert_allclose(out["img"]["w"], [1.2, 2.4], rtol=1e-6)  # .9·1+.1·3, .9·2+.1·6
    assert set(out) == {"img"}
    spec = teacher_spec(_objectives(start=5, ema=0.99))
    assert spec.parts == ("distill_head", "img", "masked_head")
    assert [float(spec.momentum(jnp.int32(s))) for s in (0, 4, 5, 9)] == pytest.approx(
        [0.0, 0.0, 0.99, 0.99])
    with pytest.raises(ConfigError, match="different ema"):
        teacher_spec([_objectives(ema=0.9)[0], _objectives(ema=0.8)[1]])


def test_sinkhorn_and_cross_entropy_match_numpy():
    rng = np.random.default_rng(0)
    scores = rng.uniform(-1, 1, (6, 5)).astype(np.float32)
    student = rng.uniform(-1, 1, (6, 5)).astype(np.float32)
    q = selfsup.sinkhorn_knopp(jnp.asarray(scores), 0.1)
    np.testing.assert_allclose(q, _sinkhorn_np(scores.astype(np.float64), 0.1), rtol=1e-4,
                               atol=1e-6)
    np.testing.assert_allclose(np.sum(q, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(selfsup.cross_entropy(q, jnp.asarray(student), 0.1),
                               _ce_np(np.asarray(q, np.float64), student, 0.1), rtol=1e-5)


@pytest.mark.parametrize("centering", ["sinkhorn", "softmax"])
def test_distillation_loss_matches_numpy(centering):
    model = Model(**MODEL)
    sd = _objectives(centering=centering)[0]
    params = {**_init(jax.random.key(0)), **jax.jit(sd.init_params)(jax.random.key(1))}
    teacher = _noisy({k: params[k] for k in sd.teacher_parts}, 2)
    batch = _batch(n=3)
    got = jax.jit(lambda *a: sd.loss(model, *a))(params, teacher, batch["image"],
                                                 batch["local_views"])
    features = jax.jit(lambda p, x: model.apply({"params": p}, x, method=Model.image_features))

    views = batch["local_views"].reshape(6, 8, 8, 3)
    fs, _ = features(params, views)
    ft, _ = features({**params, **teacher}, batch["image"])
    st = _head_np(teacher["distill_head"], ft)
    targets = (_sinkhorn_np(st, 0.04) if centering == "sinkhorn" else
               np.exp(st / 0.04) / np.exp(st / 0.04).sum(-1, keepdims=True))
    ss = _head_np(params["distill_head"], fs)
    ref = np.mean([_ce_np(targets[b:b + 1], ss[2 * b + v:2 * b + v + 1], 0.1)
                   for b in range(3) for v in range(2)])
    np.testing.assert_allclose(got, ref, rtol=2e-4)


def test_masked_prediction_loss_matches_numpy():
    model = Model(**MODEL)
    mp = _objectives()[1]
    params = {**_init(jax.random.key(0)), **jax.jit(mp.init_params)(jax.random.key(1))}
    teacher = _noisy({k: params[k] for k in mp.teacher_parts}, 3)
    image = _batch(n=3)["image"]
    mask, ids = masked.random_mask(jax.random.key(4), 3, 4, 0.5)
    mask_np, ids_np = np.asarray(mask), np.asarray(ids)
    assert mask_np.sum(1).tolist() == [2, 2, 2]
    for b in range(3):
        assert ids_np[b].tolist() == np.flatnonzero(mask_np[b]).tolist()
    got = jax.jit(lambda *a: mp.loss(model, *a))(params, teacher, image, mask, ids)

    features = jax.jit(lambda p, x, m, t: model.apply(
        {"params": p}, x, patch_mask=m, mask_token=t, method=Model.image_features))
    _, ts = features(params, image, mask, params["mask_token"])
    _, tt = features({**params, **teacher}, image, jnp.zeros_like(mask), params["mask_token"])
    ts, tt = np.asarray(ts), np.asarray(tt)
    rows = [(b, i) for b in range(3) for i in np.flatnonzero(mask_np[b])]
    ss = _head_np(params["masked_head"], np.stack([ts[b, i] for b, i in rows]))
    st = _head_np(teacher["masked_head"], np.stack([tt[b, i] for b, i in rows]))
    np.testing.assert_allclose(got, _ce_np(_sinkhorn_np(st, 0.04), ss, 0.1), rtol=2e-4)


def test_patch_mask_replaces_patch_embeddings_before_the_position_embedding():
    model = Model(**MODEL)
    params = _init(jax.random.key(0))
    patch = np.random.default_rng(0).uniform(-1, 1, (8, 8, 3)).astype(np.float32)
    image = np.tile(patch, (2, 2, 1))[None]  # Four identical patches.
    kernel = np.asarray(params["img"]["embedding"]["kernel"])  # [8, 8, 3, W]
    embedded = patch.reshape(-1) @ kernel.reshape(-1, kernel.shape[-1]) + np.asarray(
        params["img"]["embedding"]["bias"])
    mask = jnp.array([[True, False, True, False]])
    plain, tokens = model.apply({"params": params}, image, method=Model.image_features)
    same, same_tokens = model.apply({"params": params}, image, patch_mask=mask,
                                    mask_token=jnp.asarray(embedded),
                                    method=Model.image_features)
    np.testing.assert_allclose(same_tokens, tokens, rtol=1e-4, atol=1e-5)
    _, other = model.apply({"params": params}, image, patch_mask=mask,
                           mask_token=jnp.asarray(embedded + np.linspace(-1, 1, embedded.size)),
                           method=Model.image_features)
    diff = np.abs(np.asarray(other) - np.asarray(tokens)).max(axis=-1)[0]
    assert (diff > 1e-2).all()  # Every token attends to the masked ones.


def test_position_grid_is_resized_bilinearly_for_another_image_size():
    model = Model(**{**MODEL, "image": dict(MODEL["image"], patch_size=4)})
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8, 8, 3)),  # 2x2 grid
                                 jnp.zeros((1, 6), jnp.int32))["params"]
    grid = np.asarray(params["img"]["pos_embedding"]).reshape(2, 2, -1)
    # Bilinear with half-pixel centres, edges clamped: 2 -> 4 samples at (i + .5)/2 - .5.
    coords = np.clip((np.arange(4) + 0.5) / 2 - 0.5, 0, 1)
    lo, frac = np.floor(coords).astype(int), coords - np.floor(coords)
    hi = np.minimum(lo + 1, 1)
    rows = grid[lo] * (1 - frac)[:, None, None] + grid[hi] * frac[:, None, None]
    up = rows[:, lo] * (1 - frac)[None, :, None] + rows[:, hi] * frac[None, :, None]
    big = dict(params, img=dict(params["img"], pos_embedding=up.reshape(1, 16, -1)))
    image = np.random.default_rng(1).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    got, _ = model.apply({"params": params}, image, method=Model.image_features)
    want, _ = model.apply({"params": big}, image, method=Model.image_features)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def adam_run():
    """(objectives on from step 2 with EMA 0.9, the setup with Adam, the jitted step): one
    compile shared by the teacher and resume tests."""
    objs = _objectives(start=2, ema=0.9)
    setup = _setup(objs, optim="adam")
    _, model, tx, lr_fn, *_ = setup
    step = jax.jit(make_train_step(model, tx, _dense_loss, lr_fn, objectives=objs, seed=3))
    return objs, setup, step


def test_teacher_is_outside_the_optimizer_and_follows_by_ema_after_switch_on(adam_run):
    objs, (mesh, model, tx, lr_fn, _, state, _), step = adam_run
    state = jax.tree_util.tree_map(jnp.copy, state)
    assert sorted(state["teacher"]) == ["distill_head", "img", "masked_head"]
    for path, _ in jax.tree_util.tree_flatten_with_path(state["opt_state"])[0]:
        assert "teacher" not in path_str(path)
    mus = optax.tree_utils.tree_get_all_with_path(state["opt_state"], "mu")
    assert mus and all(jax.tree_util.tree_structure(mu) ==
                       jax.tree_util.tree_structure(state["params"]) for _, mu in mus)
    for part in state["teacher"]:  # Starts as a copy of the student.
        jax.tree_util.tree_map(np.testing.assert_array_equal, state["teacher"][part],
                               state["params"][part])

    heads = ("distill_head", "masked_head", "mask_token")
    for i in range(3):
        before = jax.device_get(state)
        state, metrics = step(state, _batch(i))
        after = jax.device_get(state)
        on = i >= 2
        for name in ("self_distillation/loss", "masked_prediction/loss"):
            assert (float(metrics[name]) > 0) == on, (i, name)
        if not on:  # Loss exactly 0 and no gradient: the heads keep their init (Adam, wd 0).
            assert float(metrics["loss"]) == float(metrics["sigmoid/loss"])
            for h in heads:
                jax.tree_util.tree_map(np.testing.assert_array_equal, after["params"][h],
                                       before["params"][h])
        else:
            total = (float(metrics["sigmoid/loss"]) + float(metrics["self_distillation/loss"])
                     + 0.25 * float(metrics["masked_prediction/loss"]))
            np.testing.assert_allclose(float(metrics["loss"]), total, rtol=1e-5)
            for h in heads:
                moved = jax.tree_util.tree_map(lambda a, b: np.abs(a - b).max(),
                                               after["params"][h], before["params"][h])
                assert max(jax.tree_util.tree_leaves(moved)) > 0, h
        m = 0.9 if on else 0.0
        teacher_before = dict(before["teacher"])
        if i == 2:  # At switch-on the heads restart from a fresh draw (step.restart_heads).
            for restart in head_restarts(objs):
                teacher_before.update(jax.device_get(fresh_heads(restart, 3)))
        for part in after["teacher"]:
            jax.tree_util.tree_map(
                lambda t, t0, p, m=m: np.testing.assert_allclose(
                    t, np.float32(m) * t0 + np.float32(1 - m) * p, rtol=1e-6, atol=1e-7),
                after["teacher"][part], teacher_before[part], after["params"][part])


def test_resume_with_the_teacher_is_bit_exact(tmp_path, adam_run):
    from siglip_jax.checkpoints.orbax_io import Checkpointer

    objs, (mesh, model, tx, lr_fn, rules, state, _), step = adam_run
    for i in range(3):  # Past switch-on (step 2): the teacher is an EMA, not a copy.
        state, _ = step(state, _batch(i))
    with Checkpointer(str(tmp_path), every_n_steps=1, use_async=False) as ckpt:
        ckpt.maybe_save(3, state, force=True)
    saved = jax.device_get(state)
    uninterrupted, _ = step(state, _batch(3))

    abstract, _ = state_shardings(abstract_params(model, SHAPES, objs), tx, mesh, rules,
                                  teacher_spec(objs).parts)
    with Checkpointer(str(tmp_path), every_n_steps=1, use_async=False) as ckpt:
        restored = ckpt.restore(abstract, 3)
    assert "teacher" in restored
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(restored), saved)
    resumed, _ = step(restored, _batch(3))
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(resumed),
                           jax.device_get(uninterrupted))


def test_bad_options_name_the_option():
    with pytest.raises(ValueError, match="unknown option 'tmep'"):
        check_options("self_distillation", {"tmep": 1})
    with pytest.raises(ValueError, match="mask_ratio=1.5"):
        check_options("masked_prediction", {"mask_ratio": 1.5})
    with pytest.raises(ValueError, match="start_frac=2"):
        check_options("masked_prediction", {"start_frac": 2})
    with pytest.raises(ValueError, match="centering='center'"):
        check_options("self_distillation", {"centering": "center"})
    assert check_options("self_distillation", {})["n_local"] == 8
    assert check_options("masked_prediction", {})["weight"] == 0.25


def test_every_objective_with_options_has_a_module_and_the_other_way_round():
    # The schema checks the sections of objectives/options.DEFAULTS; the step builds those of
    # objectives/registry.MODULES: a name in one and not the other would be checked and never
    # trained, or trained with options nobody checked.
    assert list(registry.MODULES) == list(DEFAULTS)


def test_local_crops_op_shapes_and_determinism():
    from siglip_jax.data import pp

    fn = pp.get_preprocess_fn("value_range(-1, 1)|local_crops(3, 8, scale=(0.1, 0.3))")
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3)).astype(np.uint8)
    ex = {"image": image, "_seed": np.array([7, 1], np.int64)}
    a = fn(ex)["local_views"].numpy()
    assert a.shape == (3, 8, 8, 3) and a.dtype == np.float32
    assert a.min() >= -1 - 1e-5 and a.max() <= 1 + 1e-5
    np.testing.assert_array_equal(fn(ex)["local_views"].numpy(), a)  # Same seed, same crops.
    ds = tf.data.Dataset.from_tensors(ex).map(fn)
    np.testing.assert_array_equal(next(iter(ds))["local_views"].numpy(), a)
    other = fn({**ex, "_seed": np.array([7, 2], np.int64)})["local_views"].numpy()
    assert np.abs(other - a).max() > 0.1
    assert np.abs(a[0] - a[1]).max() > 0.1  # The crops of one example differ.
    # A crop of a constant image is that constant (without the colour ops).
    plain = pp.get_preprocess_fn("value_range(-1, 1)|local_crops(3, 8, color=False)")
    flat = plain({"image": np.full((32, 32, 3), 255, np.uint8), "_seed": ex["_seed"]})
    np.testing.assert_allclose(flat["local_views"].numpy(), 1.0, atol=1e-5)
    with pytest.raises(pp.PPError, match="scale"):
        pp.get_preprocess_fn("local_crops(2, 8, scale=(0.5, 0.2))")


def test_ring_step_with_both_objectives_and_accumulation(tmp_path):
    from tiny import tiny_config

    from siglip_jax import experiment
    from siglip_jax.schema import parse

    config = tiny_config(tmp_path, steps=4, grad_accum_steps=2, **{"input.global_batch": 16})
    with config.unlocked():
        config.loss.self_distillation = dict(HEAD, n_local=2, local_size=16, start_frac=0.5)
        config.loss.masked_prediction = dict(HEAD, start_frac=0.5)
    run = parse(config)
    assert run.loss.impl == "ring"
    mesh = make_mesh(list(run.mesh.axes))
    assert mesh.devices.size == 8
    shapes = experiment.input_shapes(run)
    assert shapes["local_views"] == (16, 2, 16, 16, 3)
    parts = experiment.build_step(run, mesh, shapes)
    state = experiment.init_state(run, parts, mesh, shapes)
    assert "teacher" in parts.abstract_state and "teacher" in state
    rng = np.random.default_rng(0)
    for i in range(3):  # start_frac 0.5 of 4 steps: on from step 2.
        batch = {"image": rng.uniform(-1, 1, shapes["image"]).astype(np.float32),
                 "labels": rng.integers(2, 30, shapes["labels"]).astype(np.int32),
                 "local_views": rng.uniform(-1, 1, shapes["local_views"]).astype(np.float32)}
        before = jax.device_get(state)
        state, metrics = parts.step_fn(state, batch)
        metrics = {k: float(v) for k, v in metrics.items()}
        assert metrics["finite"]
        if i < 2:  # Before switch-on: exactly 0.
            assert metrics["self_distillation/loss"] == metrics["masked_prediction/loss"] == 0.0
        else:  # The reference outside the step: 1 device, numpy heads and Sinkhorn-Knopp.
            for restart in head_restarts(parts.objectives):  # Heads re-drawn at switch-on.
                before = jax.device_get(restart_heads(before, parts.tx, restart, run.seed))
            args = (parts.model, before, batch, i, run.seed)
            kw = dict(accum=2, patch=run.model.image.patch_size)
            got = [metrics["self_distillation/loss"], metrics["masked_prediction/loss"]]
            np.testing.assert_allclose(got, _reference_losses(*args, **kw), rtol=2e-4)
            # Under accumulation Sinkhorn-Knopp normalises over each micro-batch (all its
            # rows, every device), not over the step's whole batch: that would differ.
            over_step = _reference_losses(*args, **kw, sinkhorn_over="step")
            assert np.all(np.abs(np.subtract(got, over_step)) > 1e-3 * np.abs(got)), (
                got, over_step)
        total = (metrics["sigmoid/loss"] + metrics["self_distillation/loss"]
                 + 0.25 * metrics["masked_prediction/loss"])
        np.testing.assert_allclose(metrics["loss"], total, rtol=1e-5)
        if i < 2:  # The teacher is a copy of the student until switch-on.
            jax.tree_util.tree_map(np.testing.assert_array_equal,
                                   jax.device_get(state["teacher"]["img"]),
                                   jax.device_get(state["params"]["img"]))
    diff = jax.tree_util.tree_map(lambda a, b: np.abs(np.asarray(a) - np.asarray(b)).max(),
                                  state["teacher"]["img"], state["params"]["img"])
    assert max(jax.tree_util.tree_leaves(diff)) > 0  # EMA (0.996) lags after switch-on.


def test_plan_counts_the_teacher_and_the_extra_passes():
    import dataclasses

    from siglip_jax import cost_model, planner
    from siglip_jax.config import load_config

    topology = planner.parse_topology("v4-8")
    base = load_config("configs/demo.py", ["input.global_batch=64"])
    extra = load_config("configs/demo.py", ["input.global_batch=64"])
    with extra.unlocked():
        extra.loss.self_distillation = dict(HEAD, n_local=4, local_size=16)
        extra.loss.masked_prediction = dict(HEAD)
    p0, p1 = planner.make_plan(base, topology), planner.make_plan(extra, topology)
    assert not p1.errors, p1.errors
    img = p0.towers[0]
    assert (img.tokens, img.width) == (64, 64)  # demo: 32 px, patch 4, width 64.
    # Heads: 3 Dense (64→24, 24→24, 24→8, with biases) + 8×12 prototypes, each; + mask token.
    head = 64 * 24 + 24 + 24 * 24 + 24 + 24 * 8 + 8 + 8 * 12
    assert p1.params["other"] - p0.params["other"] == 2 * head + 64
    # The teacher: img + both heads, float32, replicated (demo rules), no optimizer state.
    assert p1.bytes["EMA teacher"] == 4 * (p0.params["img"] + 2 * head)
    assert "EMA teacher" not in p0.bytes
    # FLOPs: 3× forward of 4 crops of (16/4)² = 16 tokens and of the masked full image,
    # 1× forward of the teacher's full image, per example.
    local = dataclasses.replace(img, tokens=16)
    want = 64 * (3 * 4 * cost_model.forward_flops(local) + 4 * cost_model.forward_flops(img))
    assert p1.flops["model"] - p0.flops["model"] == pytest.approx(want, rel=1e-9)
    assert p1.bytes["activations"] > p0.bytes["activations"]
