"""The trainer end to end on the demo data with a tiny model: learning, exact resume, NaN stop."""

import json
import os

import numpy as np
import pytest
import tiny

from siglip_jax.trainer import NonFiniteError, train


def read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def trained(tiny_run, tmp_path_factory):
    """(a folder for more runs, the session's tiny run's workdir and summary, its data)."""
    return (tmp_path_factory.mktemp("run"), tiny_run.workdir, tiny_run.summary,
            tiny_run.data_dir)


def test_loss_falls_and_metrics_are_logged(trained):
    _, workdir, summary, _ = trained
    records = read_metrics(workdir)
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [1, 5, 10, 15, 20]
    first, last = train_records[0]["loss"], train_records[-1]["loss"]
    assert last < 0.7 * first, (first, last)
    for key in ("lr", "t", "b", "steps_per_s", "examples_per_s", "eta_s", "grad_norm",
                "pos_logit_mean", "neg_logit_mean"):
        assert key in train_records[-1]
    assert summary["step"] == 20
    assert summary["zeroshot/num_examples"] == 72.0  # 36 classes × 2 held-out images.
    assert 0.0 <= summary["zeroshot/top1"] <= summary["zeroshot/top5"] <= 1.0


def test_rerun_resumes_from_checkpoint_exactly(trained, capsys):
    """A damaged final checkpoint is moved aside and the rerun continues from step 10 to the
    same params (the input restarts at step 10 too)."""
    import glob
    import shutil

    import orbax.checkpoint as ocp

    tmp, workdir, _, data_dir = trained
    restore = lambda run: ocp.StandardCheckpointer().restore(
        os.path.join(run, "checkpoints", "20", "default"))
    final = restore(workdir)
    resumed_dir = str(tmp / "resumed")
    os.makedirs(os.path.join(resumed_dir, "checkpoints"))
    os.symlink(os.path.join(workdir, "checkpoints", "10"),
               os.path.join(resumed_dir, "checkpoints", "10"))
    damaged = os.path.join(resumed_dir, "checkpoints", "20")
    shutil.copytree(os.path.join(workdir, "checkpoints", "20"), damaged)
    for path in glob.glob(os.path.join(damaged, "default", "d", "*")):
        with open(path, "r+b") as f:  # Truncated data file: a save cut short.
            f.truncate(os.path.getsize(path) // 2)
    capsys.readouterr()
    summary = train(tiny.tiny_run_config(data_dir), resumed_dir)
    assert summary["step"] == 20
    out = capsys.readouterr().out
    assert "checkpoint step 20 is damaged (" in out and "resumed from checkpoint at step 10" in out
    assert os.listdir(os.path.join(resumed_dir, "checkpoints_damaged")) == ["20"]
    resumed = restore(resumed_dir)
    leaves = zip(_leaves(final["params"]), _leaves(resumed["params"]), strict=True)
    for (path, a), (_, b) in leaves:
        np.testing.assert_array_equal(a, b, err_msg=path)
    steps = [r["step"] for r in read_metrics(resumed_dir) if "loss" in r]
    assert steps == [11, 15, 20]


def _leaves(tree):
    import jax

    return [(jax.tree_util.keystr(p), np.asarray(v))
            for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]]


def test_non_finite_loss_stops_with_the_step(trained, tmp_path):
    """A run resumed from a checkpoint whose params are NaN stops at its first step, naming it.
    (The same config as `trained`: its compiled step is reused, nothing is compiled again.)"""
    import jax
    import orbax.checkpoint as ocp

    from siglip_jax.checkpoints.orbax_io import Checkpointer

    _, workdir, _, data_dir = trained
    state = ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", "10",
                                                            "default"))
    state["params"] = jax.tree.map(lambda x: np.full_like(x, np.nan), state["params"])
    nan_dir = str(tmp_path / "nan")
    checkpointer = Checkpointer(nan_dir, 0, use_async=False)
    checkpointer.maybe_save(10, state, force=True)
    checkpointer.close()
    with pytest.raises(NonFiniteError, match=r"non-finite loss or gradients at step 11 "):
        train(tiny.tiny_run_config(data_dir), nan_dir)
    assert os.listdir(os.path.join(nan_dir, "checkpoints")) == ["10"]  # Nothing saved after.
