"""The SigLIP 2 demo end to end: configs/demo_siglip2.py with every objective, shrunk to a
tiny model and data, through the real trainer (pp ops, objectives, EMA teacher, hooks,
decoder and dense-probe evaluators)."""

import json
import math

import pytest

from siglip_jax.config import load_config
from siglip_jax.data.locca import DecoderVocab
from tests.tiny import REPO

CONFIG = f"{REPO}/configs/demo_siglip2.py"
EVALS = ("zeroshot", "dense_class", "dense_shape", "captioning", "referring",
         "grounded_captioning")
STEPS = 4


def _overrides(data_dir) -> list[str]:
    values = {
        "log_every": 1, "time_budget_s": 0, "tensorboard": False, "checkpoint.every_n_steps": 2,
        "input.data.data_dir": data_dir, "input.data.train_per_class": 2,
        "input.data.test_per_class": 1, "input.global_batch": 16, "input.shuffle_buffer": 64,
        "model.image.width": 32, "model.image.depth": 1, "model.image.mlp_dim": 64,
        "model.image.num_heads": 2, "model.text.width": 32, "model.text.depth": 1,
        "model.text.mlp_dim": 64, "model.text.num_heads": 2, "model.out_dim": 32,
        "model.decoder.width": 32, "model.decoder.depth": 1, "model.decoder.mlp_dim": 64,
        "model.decoder.num_heads": 2,
        # Switch on at step 2 of 4, so both sides of the switch run.
        "loss.self_distillation.start_frac": 0.5, "loss.masked_prediction.start_frac": 0.5,
        "loss.self_distillation.prototypes": 16, "loss.masked_prediction.prototypes": 16,
        "loss.self_distillation.head_hidden": 32, "loss.masked_prediction.head_hidden": 32,
    }
    for name in EVALS:
        values.update({f"evals.{name}.data.data_dir": data_dir,
                       f"evals.{name}.data.train_per_class": 2,
                       f"evals.{name}.data.test_per_class": 1, f"evals.{name}.batch_size": 16})
    return [f"{k}={v}" for k, v in values.items()]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from siglip_jax.trainer import train

    data_dir = str(tmp_path_factory.mktemp("data"))
    workdir = str(tmp_path_factory.mktemp("run"))
    config = load_config(f"{CONFIG}:objectives=all,steps={STEPS}", _overrides(data_dir))
    summary = train(config, workdir)
    with open(f"{workdir}/metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    return summary, records, workdir


def test_every_objective_trains_and_switches_on_when_configured(run):
    _, records, _ = run
    steps = {r["step"]: r for r in records if "loss" in r}
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


def test_final_evaluations_cover_every_held_out_image(run):
    _, records, _ = run
    final = {k: v for r in records if r["step"] == STEPS for k, v in r.items()}
    for name in ("zeroshot", "captioning", "referring", "grounded_captioning"):
        assert final[f"{name}/num_examples"] == 36  # 36 classes × 1 test image
    assert 0.0 <= final["referring/acc@0.5"] <= 1.0
    assert 0.0 <= final["captioning/token_acc"] <= 1.0
    for name in ("dense_class", "dense_shape"):
        assert 0.0 < final[f"{name}/accuracy"] <= 1.0 and 0.0 < final[f"{name}/miou"] <= 1.0


def test_checkpoint_holds_the_teacher_and_the_decoder(run):
    from siglip_jax.checkpoints.open import open_model

    _, _, workdir = run
    opened = open_model(workdir)
    assert "dec" in opened.params and "img" in opened.params
