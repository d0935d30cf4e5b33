"""A NaFlex (SigLIP 2) model trained by the trainer on mixed-aspect-ratio demo data through the
real pipeline (resize_to_patches|patchify, ring loss on 8 devices): the loss falls, the
zero-shot evaluator runs on NaFlex batches, and a rerun resumes to bit-identical params."""

import json
import os
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tiny

from siglip_jax.config import load_config
from siglip_jax.trainer import train

NAFLEX = str(Path(__file__).resolve().parents[1] / "configs" / "demo_naflex.py")


def _config(data_dir):
    overrides = [o for o in tiny.tiny_overrides(data_dir) if not o.startswith("model.image.")]
    overrides += ["model.image.width=32", "model.image.depth=1", "model.image.mlp_dim=64",
                  "model.image.num_heads=2"]
    return load_config(f"{NAFLEX}:steps=20", overrides)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("naflex")
    workdir = str(tmp / "workdir")
    os.makedirs(workdir)
    return tmp, workdir, train(_config(tmp / "data"), workdir)


def test_naflex_run_learns_and_evaluates(trained):
    _, workdir, summary = trained
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        losses = [r["loss"] for r in map(json.loads, f) if "loss" in r]
    assert losses[-1] < 0.7 * losses[0], losses
    assert summary["step"] == 20 and summary["zeroshot/num_examples"] == 72.0
    assert 0.0 <= summary["zeroshot/top1"] <= summary["zeroshot/top5"] <= 1.0


def test_naflex_run_resumes_exactly(trained):
    tmp, workdir, _ = trained
    resumed = str(tmp / "resumed")
    os.makedirs(os.path.join(resumed, "checkpoints"))
    os.symlink(os.path.join(workdir, "checkpoints", "10"),
               os.path.join(resumed, "checkpoints", "10"))
    assert train(_config(tmp / "data"), resumed)["step"] == 20
    restore = lambda run: ocp.StandardCheckpointer().restore(
        os.path.join(run, "checkpoints", "20", "default"))["params"]
    for a, b in zip(jax.tree.leaves(restore(workdir)), jax.tree.leaves(restore(resumed)),
                    strict=True):
        np.testing.assert_array_equal(a, b)
