"""The SigLIP 2 demo end to end: configs/demo_siglip2.py with every objective, shrunk to a
tiny model and data, through the real trainer (pp ops, objectives, EMA teacher, hooks,
decoder, dense-probe and retrieval evaluators). The run is the session's shared one
(tests/conftest.py `siglip2_run`, config tests/tiny.py `siglip2_config`)."""

import math

import pytest
from tiny import SIGLIP2_EVALS, SIGLIP2_STEPS

from siglip_jax.checkpoints.open import open_model
from siglip_jax.data.locca import DecoderVocab

STEPS = SIGLIP2_STEPS


def test_every_objective_trains_and_switches_on_when_configured(siglip2_run):
    steps = {r["step"]: r for r in siglip2_run.records if "loss" in r}
    assert sorted(steps) == list(range(1, STEPS + 1))
    vocab = DecoderVocab(64, 32)  # demo tokenizer's 64 pieces, 32 location bins
    # The decoder's output layer starts at zero: uniform over the vocabulary at step 1.
    assert steps[1]["decoder/loss"] == pytest.approx(math.log(vocab.size), rel=1e-5)
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


def test_checkpoint_holds_the_teacher_and_the_decoder(siglip2_run):
    opened = open_model(siglip2_run.workdir)
    assert "dec" in opened.params and "img" in opened.params
