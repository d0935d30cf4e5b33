"""The SigLIP 2 demo end to end: configs/demo_siglip2.py with every objective, shrunk to a
tiny model and data, through the real trainer (pp ops, objectives, EMA teacher, hooks,
decoder, dense-probe and retrieval evaluators). The run is the session's shared one
(tests/conftest.py `siglip2_run`, config tests/tiny.py `siglip2_config`)."""

import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import SIGLIP2_EVALS, SIGLIP2_STEPS, siglip2_config

from siglip_jax import objectives
from siglip_jax.checkpoints import loader
from siglip_jax.checkpoints.open import open_model
from siglip_jax.data.locca import DecoderVocab
from siglip_jax.objectives import selfsup
from siglip_jax.schema import parse
from siglip_jax.step import fresh_heads, head_restarts
from siglip_jax.trainer import train

STEPS = SIGLIP2_STEPS


def test_every_objective_trains_and_switches_on_when_configured(siglip2_run):
    steps = {r["step"]: r for r in siglip2_run.records if "loss" in r}
    assert sorted(steps) == list(range(1, STEPS + 1))
    vocab = DecoderVocab(64, 32)  # demo tokenizer's 64 pieces, 32 location bins
    # The decoder's output layer starts at zero: uniform over the output vocabulary (every
    # id but the mask id, as in big_vision CapPa) at step 1.
    assert steps[1]["decoder/loss"] == pytest.approx(math.log(vocab.mask_id), rel=1e-5)
    for name in ("self_distillation/loss", "masked_prediction/loss"):
        assert steps[1][name] == 0.0 and steps[2][name] == 0.0  # before round(0.5 · 4) = 2
        assert steps[3][name] > 0.0 and steps[4][name] > 0.0
    for r in steps.values():  # The total is the sum of the weighted parts.
        total = (r["sigmoid/loss"] + r["decoder/loss"] + r["self_distillation/loss"]
                 + 0.25 * r["masked_prediction/loss"])
        assert r["loss"] == pytest.approx(total, rel=1e-5)


def test_final_evaluations_cover_every_held_out_image(siglip2_run):
    final = {k: v for r in siglip2_run.records if r["step"] == STEPS for k, v in r.items()}
    assert {f"{name}/" for name in (*SIGLIP2_EVALS, "retrieval")} <= {
        k.split("/")[0] + "/" for k in final}
    for name in ("zeroshot", "captioning", "referring", "grounded_captioning"):
        assert final[f"{name}/num_examples"] == 36  # 36 classes × 1 test image
    assert final["retrieval/num_images"] == final["retrieval/num_texts"] == 36
    assert 0.0 <= final["referring/acc@0.5"] <= 1.0
    assert 0.0 <= final["captioning/token_acc"] <= 1.0
    for name in ("dense_class", "dense_shape"):
        assert 0.0 < final[f"{name}/accuracy"] <= 1.0 and 0.0 < final[f"{name}/miou"] <= 1.0


def _saved(workdir, step, key):
    return loader.load_state_entry(os.path.join(workdir, "checkpoints", str(step)), key)


def _assert_ema(teacher_new, teacher_old, student_new, m, where):
    """teacher_new == m·teacher_old + (1 − m)·student_new, leaf by leaf (float32)."""
    for path, got in jax.tree_util.tree_flatten_with_path(teacher_new)[0]:
        old, new = teacher_old, student_new
        for key in path:
            old, new = old[key.key], new[key.key]
        want = np.float32(m) * old + np.float32(1 - m) * new
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7,
                                   err_msg=f"{where}: {jax.tree_util.keystr(path)}")


def test_checkpoint_holds_the_teacher_and_the_decoder(siglip2_run, tmp_path):
    """Every saved teacher is the EMA of the saved students: teacher_{k+1} = m_k·teacher_k +
    (1 − m_k)·student_{k+1} with the code's schedule m_k (0 before the switch-on step
    round(0.5 · 4) = 2, then the config's ema 0.996) and, at the switch-on step, the heads'
    teacher copies restarted from the heads' fresh draw. The run is then resumed from its
    step-3 checkpoint (a copy of the workdir, without the evaluators): the resumed step-4
    teacher follows the same formula and equals the uninterrupted run's bit for bit."""
    opened = open_model(siglip2_run.workdir)
    assert "dec" in opened.params and "img" in opened.params
    assert "teacher" not in opened.params
    run = parse(siglip2_config(siglip2_run.data_dir))
    objs = objectives.make(run, None)
    momentum = selfsup.teacher_spec(objs).momentum
    ema = {o.ema for o in objs if getattr(o, "teacher_parts", ())}
    assert ema == {0.996} and {o.start for o in objs if hasattr(o, "start")} == {2}
    assert [float(momentum(jnp.int32(k))) for k in range(4)] == pytest.approx(
        [0.0, 0.0, 0.996, 0.996])
    fresh = {}
    for restart in head_restarts(objs):
        fresh.update(jax.device_get(fresh_heads(restart, run.seed)))
    assert sorted(fresh) == ["distill_head", "mask_token", "masked_head"]
    workdir = siglip2_run.workdir
    teacher = {k: _saved(workdir, k, "teacher") for k in range(1, STEPS + 1)}
    student = {k: _saved(workdir, k, "params") for k in range(1, STEPS + 1)}
    assert sorted(teacher[1]) == ["distill_head", "img", "masked_head"]
    for k in range(1, STEPS):  # State step k → k + 1 (metrics step k + 1).
        old = dict(teacher[k])
        if k == 2:  # Switch-on: the heads (and the teacher's copies) restart.
            old.update({p: fresh[p] for p in old if p in fresh})
        _assert_ema(teacher[k + 1], old, student[k + 1], float(momentum(jnp.int32(k))),
                    f"step {k + 1}")
    diff = np.abs(teacher[STEPS]["img"]["embedding"]["kernel"]
                  - student[STEPS]["img"]["embedding"]["kernel"]).max()
    assert diff > 0  # The teacher lags the student after switch-on.

    # Resume from step 3 in a copy of the workdir (the shared run is read only).
    resumed_dir = str(tmp_path / "run")
    shutil.copytree(workdir, resumed_dir)
    shutil.rmtree(os.path.join(resumed_dir, "checkpoints", str(STEPS)))
    config = siglip2_config(siglip2_run.data_dir)
    with config.unlocked():
        config.evals = {}
    assert train(config, resumed_dir)["step"] == STEPS
    resumed_teacher = _saved(resumed_dir, STEPS, "teacher")
    _assert_ema(resumed_teacher, teacher[STEPS - 1], _saved(resumed_dir, STEPS, "params"),
                0.996, "resumed")
    jax.tree_util.tree_map(np.testing.assert_array_equal, resumed_teacher, teacher[STEPS])
    jax.tree_util.tree_map(np.testing.assert_array_equal,
                           _saved(resumed_dir, STEPS, "params"), student[STEPS])
