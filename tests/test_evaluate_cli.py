"""The evaluation CLI and the checkpoint loader on a checkpoint written by the trainer: results
equal the trainer's own final evaluation and a plain numpy zero-shot computation; the same
params as .npz give the same numbers; missing or mismatching checkpoints are one-line errors.

The checkpoint is the session's shared SigLIP 2 run (tests/conftest.py `siglip2_run`: 4 steps,
seven evaluators at the end, among them zero-shot and retrieval on 36 held-out images)."""

import json
import os
import re

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from tiny import SIGLIP2_STEPS, siglip2_config

from siglip_jax.checkpoints import big_vision as bv
from siglip_jax.checkpoints import loader
from siglip_jax.data.builder import make_source
from siglip_jax.data.config import parse_source
from siglip_jax.evaluate import main
from siglip_jax.evaluation import evaluate, format_table
from siglip_jax.experiment import resolve_tokenizer
from siglip_jax.models.two_towers import Model
from siglip_jax.records import to_plain
from siglip_jax.schema import parse

TEST_IMAGES = 36  # 36 classes × 1 held-out image.
# referring and grounded_captioning pick one object per image with TensorFlow's unseeded RNG
# during evaluation (their eval pipeline adds no "_seed", data/pp.py `_seed`): their scores
# change from one evaluation to the next, so only their example counts are compared here.
UNSEEDED = ("referring/", "grounded_captioning/")


def _config(data_dir, evals=None):
    """The run's config with only the evaluators named in `evals` (default: all of them)."""
    config = siglip2_config(data_dir)
    if evals is not None:
        with config.unlocked():
            for name in set(config.evals) - set(evals):
                del config.evals[name]
    return config


@pytest.fixture(scope="module")
def trained(siglip2_run, tmp_path_factory):
    """(folder, data_dir, workdir, summary, zero-shot-only config.json for the CLI)."""
    tmp = tmp_path_factory.mktemp("evalrun")
    zeroshot_json = str(tmp / "zeroshot.json")
    with open(zeroshot_json, "w") as f:
        json.dump(to_plain(_config(siglip2_run.data_dir, evals=("zeroshot",))), f)
    return tmp, siglip2_run.data_dir, siglip2_run.workdir, siglip2_run.summary, zeroshot_json


def test_results_equal_training_evaluation_and_numpy(trained):
    """zero-shot and retrieval here (the run's config minus the other evaluators); all seven
    against the trainer's: test_cli_without_config_uses_the_workdirs_config_json."""
    _, data_dir, workdir, summary, _ = trained
    config = _config(data_dir, evals=("zeroshot", "retrieval"))
    results = evaluate(config, workdir, log=lambda *_: None)
    assert set(results) == {k for k in summary if k.startswith(("zeroshot/", "retrieval/"))}
    for key, value in results.items():
        assert value == pytest.approx(summary[key], abs=1e-9), key
    assert results["retrieval/num_images"] == results["retrieval/num_texts"] == TEST_IMAGES

    # Independent zero-shot top-1: plain model.apply on one device, argmax in numpy.
    state = ocp.StandardCheckpointer().restore(os.path.join(
        workdir, "checkpoints", str(SIGLIP2_STEPS), "default"))
    test = make_source(parse_source(config.evals.zeroshot.data, "evals.zeroshot.data"))
    data = test.load()
    tokens = resolve_tokenizer(parse(config).tokenizer, make_source(
        parse_source(config.input.data, "input.data"))).encode(
        [f"a large {name}" for name in test.class_names], 18, "sticky")
    model = Model(**to_plain(config.model))
    images = data["image"].astype(np.float32) / 127.5 - 1  # value_range(-1, 1) of uint8.
    zimg, ztxt, _ = jax.jit(model.apply)({"params": state["params"]}, images, tokens)
    predicted = np.argmax(np.asarray(zimg, np.float64) @ np.asarray(ztxt, np.float64).T, 1)
    assert results["zeroshot/top1"] == pytest.approx(np.mean(predicted == data["label"]))


def test_loader_finds_every_layout_and_npz_gives_the_same_results(trained, tmp_path):
    _, data_dir, workdir, summary, _ = trained
    step_dir = os.path.join(workdir, "checkpoints", str(SIGLIP2_STEPS))
    paths = [workdir, step_dir, os.path.join(step_dir, "default")]
    assert [loader.detect_format(p) for p in paths] == ["orbax"] * 3
    loaded = [loader.load_params(p) for p in paths]
    config = _config(data_dir, evals=("zeroshot",))
    for params, model_config in loaded:
        assert list(model_config["out_dim"]) == [None, 32]
        assert model_config["image"]["patch_size"] == 16
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded[0][0]), strict=True):
            np.testing.assert_array_equal(a, b)
    info = loader.checkpoint_info(step_dir)
    assert info["text_len"] == 18 and info["run_config"]["total_steps"] == SIGLIP2_STEPS

    npz = str(tmp_path / "params.npz")
    bv.save_npz(npz, loaded[0][0])
    assert loader.detect_format(npz) == "npz"
    params, model_config = loader.load_params(npz, {"out_dim": 7})
    assert model_config == {"out_dim": 7}  # An .npz carries no config: the given one.
    results = evaluate(config, npz, log=lambda *_: None)
    assert results == {k: summary[k] for k in results}
    assert set(results) == {"zeroshot/top1", "zeroshot/top5", "zeroshot/mean_class_recall",
                            "zeroshot/num_examples"}


def _cli_args(config_json, checkpoint, *extra):
    return ["--config", config_json, "--checkpoint", checkpoint, *extra]


def test_cli_prints_table_and_writes_json(trained, tmp_path, capsys):
    _, _, workdir, summary, zeroshot_json = trained
    out = tmp_path / "results.json"
    assert main(_cli_args(zeroshot_json, workdir, "--json", str(out))) == 0
    printed = capsys.readouterr().out
    results = json.loads(out.read_text())
    assert results == {k: summary[k] for k in results} and len(results) == 4
    assert format_table(results) in printed
    top1 = f"{results['zeroshot/top1']:.4f}".replace(".", r"\.")
    assert re.search(rf"^zeroshot +top1 +{top1}$", printed, re.M)
    assert re.search(rf"^zeroshot +num_examples +{TEST_IMAGES}$", printed, re.M)


def test_missing_or_mismatching_checkpoints_are_one_line_errors(trained, tmp_path, capsys):
    _, _, workdir, _, zeroshot_json = trained
    assert main(_cli_args(zeroshot_json, str(tmp_path / "nope"))) == 1
    err = capsys.readouterr().err
    assert err == f"error: checkpoint '{tmp_path / 'nope'}' does not exist\n"

    (tmp_path / "empty").mkdir()
    assert main(_cli_args(zeroshot_json, str(tmp_path / "empty"))) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a workdir or step directory of ours" in err

    npz = str(tmp_path / "params.npz")
    bv.save_npz(npz, loader.load_params(workdir)[0])
    assert main(_cli_args(zeroshot_json, npz, "--config.model.out_dim=[None, 16]")) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not match the model" in err
    assert "txt/head/kernel: file (32, 32) vs model (32, 16)" in err

    assert main(_cli_args(zeroshot_json, npz, "--config.tokenizer.max_len=19")) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pos_embedding: file (1, 18, 32) vs model (1, 19, 32)" in err

    assert main(_cli_args(zeroshot_json, npz, "--config.evals.zeroshot.typo=1")) == 2
    assert "unknown config key 'evals.zeroshot.typo'" in capsys.readouterr().err


def test_a_nan_checkpoint_scores_nan_and_exits_1(trained, tmp_path, capsys):
    """A diverged model (NaN text head): NaN metrics, a nonfinite count, exit 1 — never the
    perfect score that ties-as-hits used to give."""
    _, _, workdir, _, zeroshot_json = trained
    params = loader.load_params(workdir)[0]
    params["txt"]["head"]["kernel"] = np.full_like(params["txt"]["head"]["kernel"], np.nan)
    npz = str(tmp_path / "nan.npz")
    bv.save_npz(npz, params)
    out = tmp_path / "results.json"
    assert main(_cli_args(zeroshot_json, npz, "--json", str(out))) == 1
    captured = capsys.readouterr()
    assert re.search(r"^zeroshot +top1 +nan$", captured.out, re.M)
    assert re.search(rf"^zeroshot +nonfinite +{TEST_IMAGES}$", captured.out, re.M)
    assert captured.err.count("\n") == 1 and "gives non-finite scores" in captured.err
    results = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(c))
    assert results["zeroshot/top1"] is None and results["zeroshot/nonfinite"] == TEST_IMAGES


def test_cli_without_config_uses_the_workdirs_config_json(trained, tmp_path, capsys):
    _, _, workdir, summary, _ = trained
    out = tmp_path / "results.json"
    assert main(["--checkpoint", workdir, "--json", str(out)]) == 0
    results = json.loads(out.read_text())  # The run's seven evaluators, retrieval among them.
    assert {"zeroshot/top1", "retrieval/img2txt_r1"} <= set(results)
    assert set(results) == {k for k in summary if "/" in k}  # As the trainer's final eval:
    for key, value in results.items():
        if not key.startswith(UNSEEDED) or key.endswith("/num_examples"):
            assert value == pytest.approx(summary[key], abs=1e-9), key
    step_dir = os.path.join(workdir, "checkpoints", sorted(os.listdir(
        os.path.join(workdir, "checkpoints")))[-1])
    assert main(["--checkpoint", step_dir, "--config.evals.retrieval.batch_size=8"]) == 0
    capsys.readouterr()
    npz = str(tmp_path / "params.npz")
    bv.save_npz(npz, loader.load_params(workdir)[0])
    assert main(["--checkpoint", npz]) == 2  # A .npz carries no config: say --config.
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pass --config" in err
