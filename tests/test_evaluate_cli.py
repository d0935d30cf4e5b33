"""The evaluation CLI and the checkpoint loader on a checkpoint written by the trainer: results
equal the trainer's own final evaluation and a plain numpy zero-shot computation; the same
params as .npz give the same numbers; missing or mismatching checkpoints are one-line errors."""

import json
import os
import re
from pathlib import Path

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from siglip_jax.checkpoints import big_vision as bv
from siglip_jax.checkpoints import loader
from siglip_jax.config import load_config
from siglip_jax.evaluate import main
from siglip_jax.evaluation import evaluate, format_table
from siglip_jax.records import to_plain

DEMO = str(Path(__file__).resolve().parents[1] / "configs" / "demo.py")


def _overrides(data_dir):
    return {
        "log_every": 1, "time_budget_s": 0, "checkpoint.every_n_steps": 0,
        "input.data.data_dir": data_dir, "input.data.train_per_class": 4,
        "input.global_batch": 32, "input.shuffle_buffer": 64,
        "evals.zeroshot.data.data_dir": data_dir, "evals.zeroshot.data.train_per_class": 4,
        "evals.zeroshot.data.test_per_class": 2, "evals.zeroshot.every_n_steps": 0,
        "evals.zeroshot.batch_size": 40,
        "model.image.width": 32, "model.image.depth": 1, "model.image.mlp_dim": 64,
        "model.image.num_heads": 2, "model.image.patch_size": 8,
        "model.text.width": 32, "model.text.depth": 1, "model.text.mlp_dim": 64,
        "model.text.num_heads": 2, "model.out_dim": 32}


def _config(data_dir, retrieval=True, **extra):
    config = load_config(f"{DEMO}:steps=2", [f"{k}={v}" for k, v in
                                             {**_overrides(data_dir), **extra}.items()])
    if retrieval:
        zs = to_plain(config.evals.zeroshot)
        with config.unlocked():
            config.evals.retrieval = ml_collections.ConfigDict(dict(
                type="retrieval", data=zs["data"], batch_size=40, every_n_steps=0,
                pp='value_range(-1, 1)|tokenize(max_len=8, eos="sticky", inkey="texts", '
                   'outkey="labels")|keep("image", "labels")'))
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from siglip_jax.trainer import train

    tmp = tmp_path_factory.mktemp("evalrun")
    data_dir = str(tmp / "data")
    workdir = str(tmp / "workdir")
    os.makedirs(workdir)
    summary = train(_config(data_dir), workdir)
    return tmp, data_dir, workdir, summary


def test_results_equal_training_evaluation_and_numpy(trained):
    _, data_dir, workdir, summary = trained
    config = _config(data_dir)
    results = evaluate(config, workdir, log=lambda *_: None)
    assert set(results) == {k for k in summary if "/" in k}
    for key, value in results.items():
        assert value == pytest.approx(summary[key], abs=1e-9), key
    assert results["retrieval/num_images"] == results["retrieval/num_texts"] == 72.0

    # Independent zero-shot top-1: plain model.apply on one device, argmax in numpy.
    from siglip_jax.data.builder import make_source
    from siglip_jax.data.config import parse_source
    from siglip_jax.experiment import resolve_tokenizer
    from siglip_jax.models.two_towers import Model
    from siglip_jax.schema import parse

    state = ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", "2",
                                                            "default"))
    test = make_source(parse_source(config.evals.zeroshot.data, "evals.zeroshot.data"))
    data = test.load()
    tokens = resolve_tokenizer(parse(config).tokenizer, make_source(
        parse_source(config.input.data, "input.data"))).encode(
        [f"a photo of a {name}" for name in test.class_names], 8, "sticky")
    model = Model(**to_plain(config.model))
    images = data["image"].astype(np.float32) / 127.5 - 1  # value_range(-1, 1) of uint8.
    zimg, ztxt, _ = jax.jit(model.apply)({"params": state["params"]}, images, tokens)
    predicted = np.argmax(np.asarray(zimg, np.float64) @ np.asarray(ztxt, np.float64).T, 1)
    assert results["zeroshot/top1"] == pytest.approx(np.mean(predicted == data["label"]))


def test_loader_finds_every_layout_and_npz_gives_the_same_results(trained, tmp_path):
    _, data_dir, workdir, summary = trained
    step_dir = os.path.join(workdir, "checkpoints", "2")
    paths = [workdir, step_dir, os.path.join(step_dir, "default")]
    assert [loader.detect_format(p) for p in paths] == ["orbax"] * 3
    loaded = [loader.load_params(p) for p in paths]
    config = _config(data_dir, retrieval=False)
    for params, model_config in loaded:
        assert model_config["out_dim"] == 32 and model_config["image"]["patch_size"] == 8
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded[0][0]), strict=True):
            np.testing.assert_array_equal(a, b)
    info = loader.checkpoint_info(step_dir)
    assert info["text_len"] == 8 and info["run_config"]["total_steps"] == 2

    npz = str(tmp_path / "params.npz")
    bv.save_npz(npz, loaded[0][0])
    assert loader.detect_format(npz) == "npz"
    params, model_config = loader.load_params(npz, {"out_dim": 7})
    assert model_config == {"out_dim": 7}  # An .npz carries no config: the given one.
    results = evaluate(config, npz, log=lambda *_: None)
    assert results == {k: summary[k] for k in results}
    assert set(results) == {"zeroshot/top1", "zeroshot/top5", "zeroshot/mean_class_recall",
                            "zeroshot/num_examples"}


def _cli_args(data_dir, checkpoint, *extra):
    args = ["--config", f"{DEMO}:steps=2", "--checkpoint", checkpoint]
    for key, value in _overrides(data_dir).items():
        args.append(f"--config.{key}={value}")
    return args + list(extra)


def test_cli_prints_table_and_writes_json(trained, tmp_path, capsys):
    _, data_dir, workdir, summary = trained
    out = tmp_path / "results.json"
    assert main(_cli_args(data_dir, workdir, "--json", str(out))) == 0
    printed = capsys.readouterr().out
    results = json.loads(out.read_text())
    assert results == {k: summary[k] for k in results} and len(results) == 4
    assert format_table(results) in printed
    top1 = f"{results['zeroshot/top1']:.4f}".replace(".", r"\.")
    assert re.search(rf"^zeroshot +top1 +{top1}$", printed, re.M)
    assert re.search(r"^zeroshot +num_examples +72$", printed, re.M)


def test_missing_or_mismatching_checkpoints_are_one_line_errors(trained, tmp_path, capsys):
    _, data_dir, workdir, _ = trained
    assert main(_cli_args(data_dir, str(tmp_path / "nope"))) == 1
    err = capsys.readouterr().err
    assert err == f"error: checkpoint '{tmp_path / 'nope'}' does not exist\n"

    (tmp_path / "empty").mkdir()
    assert main(_cli_args(data_dir, str(tmp_path / "empty"))) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a workdir or step directory of ours" in err

    npz = str(tmp_path / "params.npz")
    bv.save_npz(npz, loader.load_params(workdir)[0])
    assert main(_cli_args(data_dir, npz, "--config.model.out_dim=16")) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not match the model" in err
    assert "txt/head/kernel: file (32, 32) vs model (32, 16)" in err

    assert main(_cli_args(data_dir, npz, "--config.tokenizer.max_len=9")) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pos_embedding: file (1, 8, 32) vs model (1, 9, 32)" in err

    assert main(_cli_args(data_dir, npz, "--config.evals.zeroshot.typo=1")) == 2
    assert "unknown config key 'evals.zeroshot.typo'" in capsys.readouterr().err


def test_a_nan_checkpoint_scores_nan_and_exits_1(trained, tmp_path, capsys):
    """A diverged model (NaN image head): NaN metrics, a nonfinite count, exit 1 — never the
    perfect score that ties-as-hits used to give."""
    _, data_dir, workdir, _ = trained
    params = loader.load_params(workdir)[0]
    params["img"]["head"]["kernel"] = np.full_like(params["img"]["head"]["kernel"], np.nan)
    npz = str(tmp_path / "nan.npz")
    bv.save_npz(npz, params)
    out = tmp_path / "results.json"
    assert main(_cli_args(data_dir, npz, "--json", str(out))) == 1
    captured = capsys.readouterr()
    assert re.search(r"^zeroshot +top1 +nan$", captured.out, re.M)
    assert re.search(r"^zeroshot +nonfinite +72$", captured.out, re.M)
    assert captured.err.count("\n") == 1 and "gives non-finite scores" in captured.err
    results = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(c))
    assert results["zeroshot/top1"] is None and results["zeroshot/nonfinite"] == 72.0


def test_cli_without_config_uses_the_workdirs_config_json(trained, tmp_path, capsys):
    _, _, workdir, summary = trained
    out = tmp_path / "results.json"
    assert main(["--checkpoint", workdir, "--json", str(out)]) == 0
    results = json.loads(out.read_text())  # The run's evaluators: zero-shot and retrieval.
    assert {"zeroshot/top1", "retrieval/img2txt_r1"} <= set(results)
    assert results == {k: summary[k] for k in results}
    step_dir = os.path.join(workdir, "checkpoints", sorted(os.listdir(
        os.path.join(workdir, "checkpoints")))[-1])
    assert main(["--checkpoint", step_dir, "--config.evals.retrieval.batch_size=8"]) == 0
    capsys.readouterr()
    npz = str(tmp_path / "params.npz")
    bv.save_npz(npz, loader.load_params(workdir)[0])
    assert main(["--checkpoint", npz]) == 2  # A .npz carries no config: say --config.
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pass --config" in err
