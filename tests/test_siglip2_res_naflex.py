"""SigLIP 2 §2.4 NaFlex continuation: a patch budget drawn per step from input.seq_lens (its
own global batch each), one compiled step per length, the stretched schedule, and an exact
resume; on the tiny NaFlex demo with two lengths."""

import math
import os
from pathlib import Path

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tiny

from siglip_jax import experiment
from siglip_jax.config import load_config
from siglip_jax.optim import ScheduleConfig, make_schedule
from siglip_jax.records import ConfigError
from siglip_jax.schema import parse
from siglip_jax.sharding import mesh_of
from siglip_jax.trainer import train

NAFLEX = str(Path(__file__).resolve().parents[1] / "configs" / "demo_naflex.py")
LENGTHS = ((16, 64), (64, 32))  # (patch budget, global batch): the longest at half the batch.
STEPS = 6


def _config(data_dir):
    overrides = [o for o in tiny.tiny_overrides(data_dir) if not o.startswith("model.image.")]
    overrides += ["model.image.width=32", "model.image.depth=1", "model.image.mlp_dim=64",
                  "model.image.num_heads=2", "checkpoint.every_n_steps=3", "log_every=1",
                  "input.data.train_per_class=4", "input.shuffle_buffer=32"]
    c = load_config(f"{NAFLEX}:steps={STEPS}", overrides)
    with c.unlocked():
        c.input.seq_lens = LENGTHS
        c.evals = ml_collections.ConfigDict()
    return c


def test_stretched_schedule_is_the_base_schedule_slowed_down():
    """stretch_from a, stretch s, total T': the base schedule over a + (T' - a)/s steps,
    evaluated at a + (t - a)/s after a (cosine with warmup written out here)."""
    spec = ScheduleConfig(decay_type="cosine", warmup_steps=10, stretch_from=92, stretch=3.75)
    total = 92 + 30  # A 100-step schedule whose last 8 steps are stretched 3.75x.
    lr = make_schedule(spec, total)
    base_total = 100.0

    def base(t):
        warm = min(1.0, (t + 1) / 10)
        progress = min(max((t - 10) / (base_total - 10), 0.0), 1.0)
        return warm * 0.5 * (1 + math.cos(math.pi * progress))

    for t in (0, 5, 50, 91, 92, 93, 100, 120, total - 1, total):
        want = base(t if t < 92 else 92 + (t - 92) / 3.75)
        assert float(lr(t)) == pytest.approx(want, rel=1e-5, abs=1e-7), t
    with pytest.raises(ConfigError, match="stretch_from"):
        make_schedule(ScheduleConfig(stretch_from=200, stretch=2.0), 100)


def test_seq_lens_input_follows_the_draw_and_resumes_exactly(tmp_path):
    """The merged input gives each step the batch of its drawn length (its own batch size), and
    rebuilt at step 3 gives exactly the batches 3.. of an uninterrupted run."""
    run = parse(_config(tmp_path / "data"))
    mesh = mesh_of(run.mesh)
    choices = experiment.length_choices(run)
    assert set(choices.tolist()) == {0, 1}, choices  # Both lengths drawn in 6 steps (seed 0).
    batches, _, _ = experiment.build_train_input(run, mesh, 0)
    straight = [next(batches) for _ in range(STEPS)]
    assert [b["image"]["patches"].shape[:2] for b in straight] == [
        (LENGTHS[i][1], LENGTHS[i][0]) for i in choices]  # Single process: the global batch.
    again, _, _ = experiment.build_train_input(run, mesh, 3)
    for want in straight[3:]:
        got = next(again)
        for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
            np.testing.assert_array_equal(a, b)


def test_compiled_steps_compile_once_per_shape():
    steps = experiment.CompiledSteps(jax.jit(lambda s, b: (s + b["x"].sum(), {})))
    for n in (4, 8, 4, 8, 4):
        steps(np.float32(0), {"x": np.ones((2, n), np.float32)})
    assert len(steps.compiled) == 2


@pytest.mark.slow  # Cheaper twins: the two tests above (input draw + resume, compile once).
def test_seq_lens_steps_compile_once_per_length_and_resume_exactly(tmp_path, monkeypatch):
    made = []

    class Recording(experiment.CompiledSteps):
        def __init__(self, jitted):
            super().__init__(jitted)
            made.append(self)

    seen = []
    real_call = experiment.CompiledSteps.__call__

    def call(self, state, batch):
        seen.append(batch["image"]["patches"].shape[:2])
        return real_call(self, state, batch)

    monkeypatch.setattr(experiment, "CompiledSteps", Recording)
    monkeypatch.setattr(Recording, "__call__", call)
    data = tmp_path / "data"
    config = _config(data)
    run = parse(config)
    choices = experiment.length_choices(run)
    assert set(choices.tolist()) == {0, 1}, choices  # Both lengths drawn in 6 steps (seed 0).
    workdir = str(tmp_path / "run")
    os.makedirs(workdir)
    assert train(config, workdir)["step"] == STEPS
    want = [(LENGTHS[i][1], LENGTHS[i][0]) for i in choices]  # [batch, patches] per step.
    assert seen == want
    assert len(made) == 1 and len(made[0].compiled) == 2  # One compiled step per length.

    # Resume from step 3 in a fresh workdir: the rest of the lengths, the data and the params
    # come out bit-identical.
    resumed = str(tmp_path / "resumed")
    os.makedirs(os.path.join(resumed, "checkpoints"))
    os.symlink(os.path.join(workdir, "checkpoints", "3"),
               os.path.join(resumed, "checkpoints", "3"))
    seen.clear()
    assert train(config, resumed)["step"] == STEPS
    assert seen == want[3:]
    restore = lambda path: ocp.StandardCheckpointer().restore(
        os.path.join(path, "checkpoints", str(STEPS), "default"))["params"]
    for a, b in zip(jax.tree.leaves(restore(workdir)), jax.tree.leaves(restore(resumed)),
                    strict=True):
        np.testing.assert_array_equal(a, b)


def test_pp_at_budget_and_bad_seq_lens():
    pp = 'resize_to_patches(16, 256)|value_range(-1, 1)|patchify(16, 256)|keep("image")'
    assert experiment.pp_at_budget(pp, 1024) == (
        'resize_to_patches(16, 1024)|value_range(-1, 1)|patchify(16, 1024)|keep("image")')
    with pytest.raises(ConfigError, match="NaFlex input.pp"):
        experiment.pp_at_budget('decode|resize(224)|value_range(-1, 1)', 256)
    config = _config("/nonexistent")
    with config.unlocked():
        config.input.seq_lens = ((16, 64), (16, 32))
    with pytest.raises(ConfigError, match="at most once"):
        parse(config)
