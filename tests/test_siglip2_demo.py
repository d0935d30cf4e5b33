"""The SigLIP 2 demo end to end: configs/demo_siglip2.py with every objective, shrunk to a
tiny model and data, through the real trainer (pp ops, objectives, EMA teacher, hooks,
decoder, dense-probe and retrieval evaluators). The run is the session's shared one
(tests/conftest.py `siglip2_run`, config tests/tiny.py `siglip2_config`). Checked exactly: the
saved teachers against the EMA formula (and a resume), the final captioning and grounded-
captioning metrics against a greedy decode written out here; zero-shot top-1 is recomputed
in numpy by tests/test_evaluate_cli.py; the evaluators' definitions are tested on oracle
models in tests/test_caption_evals.py and tests/test_dense_probe.py."""

import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import SIGLIP2_EVALS, SIGLIP2_STEPS, siglip2_config

from siglip_jax.checkpoints import loader
from siglip_jax.checkpoints.open import open_model
from siglip_jax.data.builder import make_source
from siglip_jax.data.locca import DecoderVocab
from siglip_jax.data.pp import get_preprocess_fn
from siglip_jax.data.registry import add_example_seeds
from siglip_jax.experiment import resolve_tokenizer
from siglip_jax.models.build import make_model
from siglip_jax.models.config import decoder_vocab
from siglip_jax.objectives import registry as objectives
from siglip_jax.objectives.base import teacher_spec
from siglip_jax.schema import parse
from siglip_jax.step import fresh_heads, head_restarts
from siglip_jax.trainer import train

STEPS = SIGLIP2_STEPS
TASK = {"captioning": "cap", "grounded_captioning": "gcap"}


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


def _greedy_np(decode, image_tokens, tokens, prefix_len, eos_id):
    """Greedy decoding written out: for each position p after the prompt, run the decoder on
    the ids so far shifted right ([0, ids[:-1]], causal) and take the argmax at p; a row stops
    after its first eos (later positions stay 0)."""
    b, length = tokens.shape
    ids = np.where(np.arange(length)[None] < prefix_len[:, None], tokens, 0)
    done = np.zeros(b, bool)
    for p in range(1, length):
        shifted = np.concatenate([np.zeros((b, 1), ids.dtype), ids[:, :-1]], axis=1)
        nxt = np.argmax(np.asarray(decode(image_tokens, shifted))[:, p], axis=-1)
        write = (p >= prefix_len) & ~done
        ids[write, p] = nxt[write]
        done |= write & (nxt == eos_id)
    return ids


@pytest.mark.parametrize("name", ["captioning", "grounded_captioning"])
def test_final_decoder_evaluations_equal_an_independent_greedy_decode(siglip2_run, name):
    """The run's final captioning and grounded-captioning exact match and token accuracy equal
    a greedy decode written out here (numpy loop over positions) of the final params on the
    36 held-out examples the evaluator's pp makes, scored by the module's definition: exact
    match of the ids after the prompt up to eos with the reference; token accuracy over the
    reference's positions (eos included)."""
    final = {k: v for r in siglip2_run.records if r["step"] == STEPS for k, v in r.items()}
    run = parse(siglip2_config(siglip2_run.data_dir))
    spec = next(e for e in run.evals if e.name == name)
    tokenizer = resolve_tokenizer(run.tokenizer, make_source(run.input.data, "input.data"))
    vocab = decoder_vocab(run.model)
    preprocess = get_preprocess_fn(spec.pp, tokenizer=tokenizer, decoder_vocab=vocab)
    # The evaluator's input: its source in order, "_seed" = [process 0, position] (the
    # locca_task op's seeded picks), its pp.
    examples = list(add_example_seeds(make_source(spec.data, "evals").dataset(0, 1), 0)
                    .map(preprocess).as_numpy_iterator())
    assert len(examples) == 36
    stack = lambda key: np.stack([e[key] for e in examples])
    images, tokens, mask = stack("image"), stack("dec_tokens"), stack("dec_target_mask") > 0
    assert (tokens[:, 0] == vocab.task_id(TASK[name])).all() and mask.any(axis=1).all()
    params = _saved(siglip2_run.workdir, STEPS, "params")
    model = make_model(run.model)
    _, _, out = jax.jit(model.apply)({"params": params}, images, None)
    decode = jax.jit(lambda i, x: model.apply({"params": params}, i, x, parallel=False,
                                              method="decode"))
    prefix_len, ref_len = mask.argmax(axis=1), mask.sum(axis=1)
    ids = _greedy_np(decode, out["img/encoded"], tokens, prefix_len, vocab.eos_id)
    exact = hits = 0
    for i in range(36):
        p, n = prefix_len[i], ref_len[i]
        answer = list(ids[i, p:])
        answer = answer[:answer.index(vocab.eos_id) + 1] if vocab.eos_id in answer else answer
        exact += answer == list(tokens[i, p:p + n])
        hits += int(np.sum(ids[i, p:p + n] == tokens[i, p:p + n]))
    assert hits > 0  # Some reference ids decoded (4 steps of training: few), so not vacuous.
    assert final[f"{name}/num_examples"] == 36
    assert final[f"{name}/exact_match"] == pytest.approx(exact / 36, abs=1e-12)
    assert final[f"{name}/token_acc"] == pytest.approx(hits / ref_len.sum(), abs=1e-12)


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
    momentum = teacher_spec(objs).momentum
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
