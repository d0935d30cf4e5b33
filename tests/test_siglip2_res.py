"""SigLIP 2 §2.4 resolution variants: a run continued from another run's checkpoint with its
patch size and position grid changed (`model_init.resume`, checkpoints/resume.py).

Checked against the source checkpoint read independently (loader.load_state_entry) and the
FlexiViT resize (models/patch_resize.py, itself tested against tf.image.resize)."""

import json
import os

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tiny

from siglip_jax import experiment
from siglip_jax.checkpoints import loader, resume
from siglip_jax.models import naflex
from siglip_jax.models.patch_resize import pi_resize_kernel, posemb_to_grid
from siglip_jax.records import ConfigError
from siglip_jax.schema import parse
from siglip_jax.sharding import mesh_of


def _flat(tree):
    return {"/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                     for k in p): np.asarray(v)
            for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def _with_resume(config, path):
    with config.unlocked():
        config.model_init.resume = path
    return config


def _abstract(run):
    mesh = mesh_of(run.mesh)
    shapes = experiment.input_shapes(run)
    return experiment.build_step(run, mesh, shapes).abstract_state, mesh


def test_siglip2_state_continues_with_patch_and_grid_resized(siglip2_run):
    """Every objective on (teacher, decoder, heads): the step-3 state of the shared run, in a
    run with patch 8 instead of 16 (image 64 px: 4x4 -> 8x8 grid)."""
    config = tiny.siglip2_config(siglip2_run.data_dir)
    with config.unlocked():
        config.model.image.patch_size = 8
    step_dir = os.path.join(siglip2_run.workdir, "checkpoints", "3")
    run = parse(config)
    abstract, mesh = _abstract(run)
    state, notes = resume.restore_resized(step_dir, abstract, mesh)
    assert int(state["step"]) == 3

    params = loader.load_state_entry(step_dir, "params")
    teacher = loader.load_state_entry(step_dir, "teacher")
    new = jax.device_get(state)
    for tree, old in (("params", params), ("teacher", teacher)):
        kernel = np.asarray(old["img"]["embedding"]["kernel"])
        assert kernel.shape[:2] == (16, 16)
        np.testing.assert_allclose(new[tree]["img"]["embedding"]["kernel"],
                                   pi_resize_kernel(kernel, (8, 8)), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(new[tree]["img"]["pos_embedding"],
                                   posemb_to_grid(old["img"]["pos_embedding"], (1, 64, 32)),
                                   rtol=1e-5, atol=1e-6)
        same = {k: v for k, v in _flat(old).items() if "embedding/kernel" not in k
                and "pos_embedding" not in k}
        got = _flat(new[tree])
        for k, v in same.items():
            np.testing.assert_array_equal(got[k], v, err_msg=k)
    # Adam: the moments of the resized leaves restart at zero; every other moment and the
    # count are the checkpoint's.
    opt_new = _flat(new["opt_state"])
    restarted = [k for k in opt_new if k.endswith(("img/embedding/kernel", "img/pos_embedding"))]
    assert restarted and all(not opt_new[k].any() for k in restarted)
    counts = [k for k in opt_new if k.endswith("count")]
    assert counts and all(int(opt_new[k]) == 3 for k in counts)
    moved = [k for k in opt_new if k.endswith("txt/Embed_0/embedding")]
    assert moved and all(opt_new[k].any() for k in moved)
    assert any("resized params/img/embedding/kernel" in n for n in notes)


@pytest.mark.slow  # Its cheaper twin: the test above (the continued state, step included).
def test_trainer_continues_a_run_with_a_new_patch_size(tiny_run, tmp_path):
    """The shared tiny run's step-10 checkpoint continued to its end (step 20) with patch 4
    instead of 8 (a new compiled step); the learning rate follows the source's schedule."""
    from siglip_jax.trainer import train  # Delayed as in conftest: the trainer loads TF.

    step_dir = os.path.join(tiny_run.workdir, "checkpoints", "10")
    config = _with_resume(tiny.tiny_config(tiny_run.data_dir, tiny.TINY_STEPS,
                                           **{"model.image.patch_size": 4}), step_dir)
    with config.unlocked():
        config.evals = ml_collections.ConfigDict()  # The final evaluation is not the point.
    workdir = str(tmp_path / "res")
    os.makedirs(workdir)
    summary = train(config, workdir)
    assert summary["step"] == tiny.TINY_STEPS
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    lr_new = {r["step"]: r["lr"] for r in records if "lr" in r}
    lr_src = {r["step"]: r["lr"] for r in tiny_run.records if "lr" in r}
    assert min(lr_new) == 11  # The first step of the continued run is the source's 11th.
    common = sorted(set(lr_new) & set(lr_src))
    assert common == [15, 20]
    for step in common:
        assert lr_new[step] == pytest.approx(lr_src[step], rel=1e-6)
    kernel = loader.load_state_entry(workdir, "params")["img"]["embedding"]["kernel"]
    assert kernel.shape == (4, 4, 3, 32)
    assert loader.saved_steps(workdir) == [tiny.TINY_STEPS]  # Its own, for a later resume.


def test_resume_errors_name_the_problem(tiny_run):
    config = tiny.tiny_config(tiny_run.data_dir, tiny.TINY_STEPS, **{"model.image.width": 48})
    run = parse(_with_resume(config, tiny_run.workdir))
    abstract, mesh = _abstract(run)
    with pytest.raises(resume.ResumeError, match="img/.*has shape"):
        resume.restore_resized(tiny_run.workdir, abstract, mesh)
    with pytest.raises(ConfigError, match="leave model_init.img"):
        parse(_with_resume(tiny.tiny_config(tiny_run.data_dir, 2, **{
            "model_init.full": tiny_run.workdir}), tiny_run.workdir))


def test_fixres_state_continues_as_naflex(tiny_run):
    """The NaFlex continuation's fitting: the tiny FixRes run's step-10 state in a NaFlex tower
    of the same patch and grid equals the tested FixRes -> NaFlex re-layout
    (models/naflex.image_params_from_fixres) and keeps every Adam moment of the source."""
    config = tiny.tiny_config(tiny_run.data_dir, tiny.TINY_STEPS)
    with config.unlocked():
        config.model.image = dict(config.model.image, kind="naflex", posemb_grid=4)
        config.input.pp = config.input.pp.replace(
            "value_range(-1, 1)", "resize_to_patches(8, 16)|value_range(-1, 1)|patchify(8, 16)")
    run = parse(config)
    abstract, mesh = _abstract(run)
    step_dir = os.path.join(tiny_run.workdir, "checkpoints", "10")
    state, _ = resume.restore_resized(step_dir, abstract, mesh)
    want = naflex.image_params_from_fixres(loader.load_state_entry(step_dir, "params")["img"])
    got = _flat(jax.device_get(state)["params"]["img"])
    assert got.keys() == _flat(want).keys()
    for k, v in _flat(want).items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)
    opt = _flat(jax.device_get(state)["opt_state"])
    source = ocp.StandardCheckpointer().restore(os.path.join(step_dir, "default"))
    source_opt = _flat(source["opt_state"])
    kernels = [k for k in opt if k.endswith("img/embedding/kernel")]
    assert kernels and all(opt[k].shape == (192, 32) and opt[k].any() for k in kernels)
    for k in kernels:  # The moments re-laid out like the kernel.
        np.testing.assert_array_equal(opt[k], source_opt[k].reshape(192, 32))
