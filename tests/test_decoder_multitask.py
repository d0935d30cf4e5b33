"""The LocCa decoder with all three tasks per example (loss.decoder.tasks_per_example = T):
the loss on [B, T, L] rows equals the numpy reference on the flattened rows (each row seeing
its own example's image tokens), per-task accuracies, shape-mismatch errors, one train step
with T = 3 on the 8-device mesh (batch sharding kept: no extra collectives), and the
planner's decoder cost scaling with T."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_decoder import (
    BINS,
    DEMO,
    PARALLEL,
    TARGET_MASK,
    TEXT_VOCAB,
    TOKENS,
    VOCAB,
    L,
    _init,
    _objective_inputs,
    _randomise_head,
    _run,
    reference_loss,
)
from tiny import tiny_overrides

from siglip_jax import experiment
from siglip_jax.config import ConfigError, load_config
from siglip_jax.objectives import decoder as dec_objective
from siglip_jax.schema import parse
from siglip_jax.sharding import make_global_batch

# Two examples x three rows (cap, aref, gcap order as locca_task(all_tasks=True)); example 1's
# cap row is parallel, its aref row has a zero target mask (an example without boxes).
ROWS = np.array([[0, 1, 2], [3, 1, 2]])
MT_TOKENS, MT_MASK, MT_PAR = TOKENS[ROWS], TARGET_MASK[ROWS].copy(), PARALLEL[ROWS]
MT_MASK[1, 1] = 0.0


def _objective(tasks, weight=1.0):
    run = _run(loss=dict(weight=weight, tasks_per_example=tasks))
    return run, dec_objective.make(run, dict(run.loss.objectives["decoder"]), None)


def test_t_rows_loss_equals_the_reference_on_flattened_rows():
    model, params = _init()
    params = _randomise_head(params)
    image_tokens = jax.random.normal(jax.random.key(3), (2, 5, 32))
    batch = {"image": np.zeros((2, 16, 16, 3), np.float32), "dec_tokens": MT_TOKENS,
             "dec_target_mask": MT_MASK, "dec_parallel": MT_PAR}
    run, objective = _objective(3, weight=0.5)
    shapes = dec_objective.batch_shapes(run, dict(run.loss.objectives["decoder"]), 2)
    assert shapes["dec_tokens"] == ((2, 3, L), np.int32)
    assert shapes["dec_parallel"] == ((2, 3), np.bool_)
    loss, metrics = jax.jit(lambda p, b, i: objective(_objective_inputs(model, p, b, i)))(
        params, batch, image_tokens)
    # Reference: row (b, t) decodes against example b's image tokens.
    flat_img = np.asarray(image_tokens)[[0, 0, 0, 1, 1, 1]]
    flat = (MT_TOKENS.reshape(6, L), MT_MASK.reshape(6, L), MT_PAR.reshape(6))
    ref_loss, ref_acc = reference_loss(model, params, flat_img, *flat)
    np.testing.assert_allclose(metrics["decoder/loss"], ref_loss, rtol=1e-5)
    np.testing.assert_allclose(loss, 0.5 * ref_loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["decoder/token_acc"], ref_acc, atol=1e-6)
    for task, first in (("cap", 15), ("aref", 16), ("gcap", 17)):
        keep = [r for r in range(6) if flat[0][r, 0] == first and flat[1][r].sum() > 0]
        _, acc = reference_loss(model, params, flat_img[keep], *(a[keep] for a in flat))
        np.testing.assert_allclose(metrics[f"decoder/{task}_token_acc"], acc, atol=1e-6,
                                   err_msg=task)
    # The zero-mask row contributes nothing: dropping it leaves the loss unchanged.
    keep = [0, 1, 2, 3, 5]
    np.testing.assert_allclose(
        metrics["decoder/loss"],
        reference_loss(model, params, flat_img[keep], *(a[keep] for a in flat))[0], rtol=1e-5)


def test_mismatched_rows_are_one_line_errors():
    model, params = _init()
    image_tokens = jnp.zeros((2, 5, 32))
    single = {"image": np.zeros((2, 16, 16, 3), np.float32), "dec_tokens": TOKENS[:2],
              "dec_target_mask": TARGET_MASK[:2], "dec_parallel": PARALLEL[:2]}
    multi = {**single, "dec_tokens": MT_TOKENS, "dec_target_mask": MT_MASK,
             "dec_parallel": MT_PAR}
    for tasks, batch, want in ((3, single, r"\[B, 3, L\], got \(2, 8\)"),
                               (1, multi, r"\[B, L\], got \(2, 3, 8\)"),
                               (2, multi, r"\[B, 2, L\], got \(2, 3, 8\)")):
        _, objective = _objective(tasks)
        with pytest.raises(ValueError, match=f"tasks_per_example={tasks} expects .*{want}"):
            objective(_objective_inputs(model, params, batch, image_tokens))
    for bad in (0, 4, 1.5, True):
        with pytest.raises(ConfigError, match="config.loss.decoder: tasks_per_example must"):
            _run(loss=dict(tasks_per_example=bad))


def _collectives(parts, run, shapes):
    text = parts.step_fn.lower(
        parts.abstract_state,
        experiment.abstract_batch(parts, shapes, run)).compile().as_text()
    return {op: len(re.findall(rf"\b{op}(-start)?\(", text))
            for op in ("all-gather", "all-to-all", "all-reduce", "collective-permute")}


def _multitask_run(tasks):
    c = load_config(DEMO, tiny_overrides("/nonexistent", **{"input.global_batch": 16}))
    with c.unlocked():
        c.model.decoder = dict(max_len=L, num_bins=BINS, width=24, num_heads=2)
        c.model.text.vocab_size = TEXT_VOCAB
        c.loss.decoder = dict(weight=1.0, tasks_per_example=tasks)
    return parse(c)


def test_train_step_with_three_tasks_per_example_on_8_devices():
    run = _multitask_run(3)
    assert len(jax.devices()) == 8
    mesh = run.mesh.make()
    shapes = experiment.input_shapes(run)
    assert shapes["dec_tokens"] == (16, 3, L) and shapes["dec_parallel"] == (16, 3)
    parts = experiment.build_step(run, mesh, shapes)
    state = experiment.init_state(run, parts, mesh, shapes)
    rng = np.random.default_rng(2)
    ex = np.arange(16) % 2
    local = {"image": rng.uniform(-1, 1, shapes["image"]).astype(np.float32),
             "labels": rng.integers(2, TEXT_VOCAB, shapes["labels"]).astype(np.int32),
             "dec_tokens": MT_TOKENS[ex], "dec_target_mask": MT_MASK[ex],
             "dec_parallel": MT_PAR[ex]}
    batch = make_global_batch(local, mesh, run.mesh.batch_axes)
    state, metrics = parts.step_fn(state, batch)
    assert bool(metrics["finite"])
    np.testing.assert_allclose(metrics["decoder/loss"], np.log(VOCAB.size), rtol=1e-5)
    params1 = jax.device_get(state["params"])
    state, metrics = parts.step_fn(state, batch)
    model = parts.model
    _, _, out = jax.jit(model.apply)({"params": params1}, local["image"], local["labels"])
    flat_img = np.repeat(np.asarray(out["img/encoded"]), 3, axis=0)
    ref, _ = reference_loss(model, params1, flat_img, local["dec_tokens"].reshape(-1, L),
                            local["dec_target_mask"].reshape(-1, L),
                            local["dec_parallel"].reshape(-1))
    np.testing.assert_allclose(metrics["decoder/loss"], ref, rtol=1e-4)
    assert metrics["decoder/loss"] < np.log(VOCAB.size)
    # The repeated rows stay batch-sharded: the step has the same collectives as with T = 1.
    run1 = _multitask_run(1)
    shapes1 = experiment.input_shapes(run1)
    parts1 = experiment.build_step(run1, mesh, shapes1)
    assert _collectives(parts, run, shapes) == _collectives(parts1, run1, shapes1)


def test_planner_decoder_cost_scales_with_tasks_per_example():
    from siglip_jax import plan

    topology = plan.parse_topology("v4-8")
    configs = []
    for tasks in (1, 3):
        c = load_config(DEMO, tiny_overrides("/nonexistent"))
        with c.unlocked():
            c.model.decoder = dict(max_len=L, num_bins=BINS, width=24, num_heads=2)
            c.model.text.vocab_size = TEXT_VOCAB
            c.loss.decoder = dict(tasks_per_example=tasks)
        configs.append(plan.make_plan(c, topology))
    p1, p3 = configs
    assert (p1.decoder.rows, p3.decoder.rows) == (1, 3)
    per_row = 3 * plan.decoder_forward_flops(p1.decoder) * p1.global_batch
    np.testing.assert_allclose(p3.flops["model"] - p1.flops["model"], 2 * per_row, rtol=1e-9)
    np.testing.assert_allclose(p3.bytes["decoder activations"],
                               3 * p1.bytes["decoder activations"], rtol=1e-9)
