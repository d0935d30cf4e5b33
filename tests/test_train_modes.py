"""Trainer modes through config: FSDP meshes, LiT from a checkpoint, preemption, resharding."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from tiny import DEMO, REPO, TINY_STEPS, tiny_config, tiny_overrides

from siglip_jax.trainer import train


def losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def restore(workdir, step):
    return ocp.StandardCheckpointer().restore(
        os.path.join(workdir, "checkpoints", str(step), "default"))


def leaves(tree):
    return {jax.tree_util.keystr(p): np.asarray(v)
            for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def run(tmp_path, name, steps=10, **overrides):
    workdir = tmp_path / name
    workdir.mkdir()
    summary = train(tiny_config(tmp_path / "data", steps, **overrides), str(workdir))
    return workdir, summary


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A 10-step data-parallel run: the baseline curve and the checkpoint LiT starts from."""
    tmp = tmp_path_factory.mktemp("modes")
    workdir, _ = run(tmp, "dp")
    return tmp, workdir


@pytest.mark.parametrize("data, fsdp", [(4, 2), (2, 4)])
def test_fsdp_mesh_gives_the_data_parallel_loss_curve(pretrained, data, fsdp):
    tmp, dp = pretrained
    workdir, _ = run(tmp, f"fsdp_{data}x{fsdp}", mesh=[("data", data), ("fsdp", fsdp)],
                     batch_axes=("data", "fsdp"), sharding_rules=[(".*", "fsdp")])
    expected, got = losses(dp), losses(workdir)
    assert sorted(got) == [1, 5, 10]
    for step, value in expected.items():
        np.testing.assert_allclose(got[step], value, rtol=1e-5, err_msg=f"step {step}")


def test_lit_keeps_the_loaded_image_tower_bit_identical(pretrained):
    tmp, dp = pretrained
    lit = [("img/.*", None), (".*", dict(decay_type="cosine", warmup_steps=1))]
    workdir, _ = run(tmp, "lit", steps=5, **{"model_init.img": str(dp), "schedule": lit})
    loaded = leaves(restore(dp, 10)["params"]["img"])
    state = restore(workdir, 5)
    for key, value in leaves(state["params"]["img"]).items():
        np.testing.assert_array_equal(value, loaded[key], err_msg=key)
    random_init = leaves(restore(dp, 10)["params"]["txt"])  # Text tower was not loaded:
    trained = leaves(state["params"]["txt"])
    assert any(not np.array_equal(trained[k], random_init[k]) for k in trained)
    img_state = [k for k in leaves(state["opt_state"]) if "'img'" in k]
    assert img_state == []  # No optimizer buffers for the frozen tower.


def _cli(workdir, steps, *extra, data_dir):
    args = [sys.executable, "-m", "siglip_jax.train", "--config", f"{DEMO}:steps={steps}",
            "--workdir", str(workdir), *[f"--config.{o}" for o in tiny_overrides(data_dir)],
            *extra]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=REPO, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})


def _wait_for_step(workdir, proc, step, timeout=300):
    deadline = time.monotonic() + timeout
    while True:
        if os.path.exists(workdir / "metrics.jsonl") and max(losses(workdir), default=0) >= step:
            return
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline
        time.sleep(0.5)


@pytest.fixture(scope="module")
def preempted_on_four(pretrained):
    """The CLI resumes the pretrained step-10 checkpoint on a mesh of 4 devices for a long run
    (100 000 steps, no periodic checkpoint) and gets SIGTERM once step 13 is logged: (workdir,
    output, exit code). One process for the next two tests (each CLI start costs ~8 s)."""
    tmp, dp = pretrained
    workdir = tmp / "four"
    (workdir / "checkpoints").mkdir(parents=True)
    shutil.copytree(dp / "checkpoints" / "10", workdir / "checkpoints" / "10")
    proc = _cli(workdir, 100_000, "--config.cpu_devices=4", "--config.log_every=1",
                "--config.checkpoint.every_n_steps=100000", data_dir=tmp / "data")
    _wait_for_step(workdir, proc, 13)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    return workdir, out, proc.returncode


def test_sigterm_saves_a_checkpoint_and_exits_143(preempted_on_four):
    workdir, out, code = preempted_on_four
    assert code == 143, out[-2000:]
    saved = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
    assert len(saved) == 2 and saved[0] == 10 and saved[1] >= 13, saved
    assert f"SIGTERM: saving a checkpoint at step {saved[1]}" in out
    assert int(restore(workdir, saved[1])["step"]) == saved[1]


def test_checkpoint_restores_on_a_mesh_of_four_devices(pretrained, preempted_on_four):
    _, dp = pretrained
    workdir, out, _ = preempted_on_four
    assert "devices: 4 × cpu" in out and "resumed from checkpoint at step 10" in out, out[-2000:]
    latest = max(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
    assert latest > 10  # It trained on from the restored state.
    before, after = leaves(restore(dp, 10)["params"]), leaves(restore(workdir, latest)["params"])
    assert before.keys() == after.keys()
    assert int(restore(workdir, latest)["step"]) == latest


# The train CLI that SIGKILLs itself right after logging step 15, once step 10's checkpoint is
# committed: a kill at a known point (an outside kill raced the end of a 20-step run).
_KILLED_AT_15 = """
import os, signal, sys, time
from siglip_jax import metrics, train
from siglip_jax.shutdown import run_main

write = metrics.MetricWriter.write
committed = os.path.join(sys.argv[sys.argv.index("--workdir") + 1], "checkpoints", "10",
                         "commit_success.txt")
def write_then_die(self, step, values):
    write(self, step, values)
    if step == 15:
        while not os.path.exists(committed):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGKILL)
metrics.MetricWriter.write = write_then_die
run_main(train.main)
"""


def test_sigkill_then_rerun_equals_an_uninterrupted_run(tmp_path, tiny_run):
    """A real SIGKILL after a committed checkpoint; the rerun ends bit-identical to the
    uninterrupted run, the session's tiny run (the same config, 20 steps, but TensorBoard)."""
    workdir = tmp_path / "killed"
    killed = subprocess.run(
        [sys.executable, "-c", _KILLED_AT_15, "--config", f"{DEMO}:steps={TINY_STEPS}",
         "--workdir", str(workdir),
         *[f"--config.{o}" for o in tiny_overrides(tiny_run.data_dir, log_every=1)]],
        capture_output=True, text=True, timeout=300, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert max(losses(workdir)) == 15
    assert not (workdir / "checkpoints" / str(TINY_STEPS)).exists()
    proc = _cli(workdir, TINY_STEPS, data_dir=tiny_run.data_dir)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "resumed from checkpoint at step 10" in out, out[-2000:]
    expected = leaves(restore(tiny_run.workdir, TINY_STEPS)["params"])
    got = leaves(restore(workdir, TINY_STEPS)["params"])
    for key, value in expected.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)
