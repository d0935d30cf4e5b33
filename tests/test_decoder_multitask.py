"""The LocCa decoder with all three tasks per example (loss.decoder.tasks_per_example = T):
the loss on [B, T, L] rows equals the numpy reference on the flattened rows (each row seeing
its own example's image tokens), per-task accuracies, shape-mismatch errors, the train step
with T = 3 and 2 micro-batches on the 8-device mesh against the numpy reference computed
outside the step (batch sharding kept: the collectives of T = 1), and the planner's decoder
cost scaling with T."""

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
    _log_softmax,
    _objective_inputs,
    _randomise_head,
    _run,
)
from tiny import tiny_overrides

from siglip_jax import experiment
from siglip_jax.config import ConfigError, load_config
from siglip_jax.objectives import decoder as dec_objective
from siglip_jax.schema import parse
from siglip_jax.sharding import make_global_batch, mesh_of

# Two examples x three rows (cap, aref, gcap order as locca_task(all_tasks=True)); example 1's
# cap row is parallel, its aref row has a zero target mask (an example without boxes).
ROWS = np.array([[0, 1, 2], [3, 1, 2]])
MT_TOKENS, MT_MASK, MT_PAR = TOKENS[ROWS], TARGET_MASK[ROWS].copy(), PARALLEL[ROWS]
MT_MASK[1, 1] = 0.0


def _objective(tasks, weight=1.0):
    run = _run(loss=dict(weight=weight, tasks_per_example=tasks))
    return run, dec_objective.make(run.model, run.total_steps,
                                   dict(run.loss.objectives["decoder"]), None)


def row_terms(model, params, image_tokens, tokens, target_mask, parallel):
    """Per row, the (CE, hit) of each target position: autoregressive rows feed
    [0, tokens[:-1]] and predict tokens (CapPa's shift); parallel rows feed targets and
    padding as the mask id (numpy, float64 log-softmax)."""
    dec = jax.jit(lambda p, i, x, mode: model.apply({"params": p}, i, x, parallel=mode,
                                                    method="decode"), static_argnums=3)
    shifted = np.concatenate([np.zeros_like(tokens[:, :1]), tokens[:, :-1]], axis=1)
    logp_ar = _log_softmax(dec(params, image_tokens, shifted, False))
    masked = np.where((target_mask > 0) | (tokens == 0), VOCAB.mask_id, tokens)
    logp_par = _log_softmax(dec(params, image_tokens, masked, True))
    terms = []
    for r in range(len(tokens)):
        if parallel[r]:
            lp, y, w = logp_par[r], tokens[r], target_mask[r]
        else:
            lp, y, w = logp_ar[r], tokens[r], target_mask[r]
        terms.append([(-lp[i, y[i]], float(np.argmax(lp[i]) == y[i])) for i in np.nonzero(w)[0]])
    return terms


def _mean(terms, rows, k):
    values = [t[k] for r in rows for t in terms[r]]
    return sum(values) / len(values)


def test_t_rows_loss_equals_the_reference_on_flattened_rows():
    model, params = _init()
    params = _randomise_head(params)
    image_tokens = jax.random.normal(jax.random.key(3), (2, 5, 32))
    batch = {"image": np.zeros((2, 16, 16, 3), np.float32), "dec_tokens": MT_TOKENS,
             "dec_target_mask": MT_MASK, "dec_parallel": MT_PAR}
    run, objective = _objective(3, weight=0.5)
    shapes = dec_objective.batch_shapes(run.model, dict(run.loss.objectives["decoder"]), 2)
    assert shapes["dec_tokens"] == ((2, 3, L), np.int32)
    assert shapes["dec_parallel"] == ((2, 3), np.bool_)
    loss, metrics = jax.jit(lambda p, b, i: objective(_objective_inputs(model, p, b, i)))(
        params, batch, image_tokens)
    # Reference: row (b, t) decodes against example b's image tokens.
    flat_img = np.asarray(image_tokens)[[0, 0, 0, 1, 1, 1]]
    flat = (MT_TOKENS.reshape(6, L), MT_MASK.reshape(6, L), MT_PAR.reshape(6))
    terms = row_terms(model, params, flat_img, *flat)
    assert terms[4] == []  # The zero-mask row has no target positions.
    ref_loss = _mean(terms, range(6), 0)
    assert ref_loss > 0.5  # A random head: far from a solved task.
    np.testing.assert_allclose(metrics["decoder/loss"], ref_loss, rtol=1e-5)
    np.testing.assert_allclose(loss, 0.5 * ref_loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["decoder/token_acc"], _mean(terms, range(6), 1),
                               atol=1e-6)
    for task, rows in (("cap", [0, 3]), ("aref", [1, 4]), ("gcap", [2, 5])):
        np.testing.assert_allclose(metrics[f"decoder/{task}_token_acc"],
                                   _mean(terms, rows, 1), atol=1e-6, err_msg=task)
    # Rows paired with the wrong example's image give another loss: the pairing is tested.
    wrong = row_terms(model, params, np.asarray(image_tokens)[[0, 1, 0, 1, 0, 1]], *flat)
    assert abs(_mean(wrong, range(6), 0) - ref_loss) > 1e-4


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


def _collectives(compiled):
    text = compiled.as_text()
    return {op: len(re.findall(rf"\b{op}(-start)?\(", text))
            for op in ("all-gather", "all-to-all", "all-reduce", "collective-permute")}


def _multitask_run(tasks, accum=2):
    c = load_config(DEMO, tiny_overrides("/nonexistent", grad_accum_steps=accum,
                                         **{"input.global_batch": 16}))
    with c.unlocked():
        c.model.decoder = dict(max_len=L, num_bins=BINS, width=24, num_heads=2)
        c.model.text.vocab_size = TEXT_VOCAB
        c.loss.decoder = dict(weight=0.5, tasks_per_example=tasks)
    return parse(c)


def test_train_step_with_three_tasks_per_example_accumulation_on_8_devices():
    """T = 3 rows per example, 2 micro-batches, the ring sigmoid loss, batch 16 sharded over
    8 devices: step 0's decoder loss is log V (zero output layer), step 1's equals the numpy
    reference computed outside the step from the step-1 params (micro-batch m = examples
    m, m + 2, …, each of its 3 rows decoding against its own example's image tokens), and the
    step has the collectives of the T = 1 step (the repeated rows stay batch-sharded)."""
    run = _multitask_run(3)
    assert run.loss.impl == "ring" and run.grad_accum_steps == 2
    assert len(jax.devices()) == 8
    mesh = mesh_of(run.mesh)
    shapes = experiment.input_shapes(run)
    assert shapes["dec_tokens"] == (16, 3, L) and shapes["dec_parallel"] == (16, 3)
    parts = experiment.build_step(run, mesh, shapes)
    state = experiment.init_state(run, parts, mesh, shapes)
    compiled = parts.step_fn.lower(state, experiment.abstract_batch(parts, shapes, run)
                                   ).compile()
    rng = np.random.default_rng(2)
    ex = np.arange(16) % 2
    local = {"image": rng.uniform(-1, 1, shapes["image"]).astype(np.float32),
             "labels": rng.integers(2, TEXT_VOCAB, shapes["labels"]).astype(np.int32),
             "dec_tokens": MT_TOKENS[ex], "dec_target_mask": MT_MASK[ex],
             "dec_parallel": MT_PAR[ex]}
    batch = make_global_batch(local, mesh, run.mesh.batch_axes)
    state, metrics = compiled(state, batch)
    assert bool(metrics["finite"])
    np.testing.assert_allclose(metrics["decoder/loss"], np.log(VOCAB.mask_id), rtol=1e-5)
    params1 = jax.device_get(state["params"])
    state, metrics = compiled(state, batch)
    metrics = jax.device_get(metrics)
    model = parts.model
    encode = jax.jit(lambda p, i, t: model.apply({"params": p}, i, t, train=True)[2][
        "img/encoded"])
    micro = []
    for m in range(2):
        rows = slice(m, None, 2)
        img = np.repeat(np.asarray(encode(params1, local["image"][rows],
                                          local["labels"][rows])), 3, axis=0)
        micro.append(row_terms(model, params1, img, local["dec_tokens"][rows].reshape(-1, L),
                               local["dec_target_mask"][rows].reshape(-1, L),
                               local["dec_parallel"][rows].reshape(-1)))
    ref = np.mean([_mean(t, range(len(t)), 0) for t in micro])
    np.testing.assert_allclose(metrics["decoder/loss"], ref, rtol=1e-5)
    np.testing.assert_allclose(metrics["decoder/token_acc"],
                               np.mean([_mean(t, range(len(t)), 1) for t in micro]), atol=1e-6)
    np.testing.assert_allclose(metrics["loss"], metrics["sigmoid/loss"]
                               + 0.5 * metrics["decoder/loss"], rtol=1e-6)
    assert metrics["decoder/loss"] < np.log(VOCAB.mask_id)
    # The repeated rows stay batch-sharded: the step has the same collectives as with T = 1.
    run1 = _multitask_run(1)
    shapes1 = experiment.input_shapes(run1)
    parts1 = experiment.build_step(run1, mesh, shapes1)
    assert _collectives(compiled) == _collectives(
        parts1.step_fn.lower(parts1.abstract_state,
                             experiment.abstract_batch(parts1, shapes1, run1)).compile())


def test_planner_decoder_cost_scales_with_tasks_per_example():
    from siglip_jax import cost_model, planner

    topology = planner.parse_topology("v4-8")
    configs = []
    for tasks in (1, 3):
        c = load_config(DEMO, tiny_overrides("/nonexistent"))
        with c.unlocked():
            c.model.decoder = dict(max_len=L, num_bins=BINS, width=24, num_heads=2)
            c.model.text.vocab_size = TEXT_VOCAB
            c.loss.decoder = dict(tasks_per_example=tasks)
        configs.append(planner.make_plan(c, topology))
    p1, p3 = configs
    assert (p1.decoder.rows, p3.decoder.rows) == (1, 3)
    per_row = 3 * cost_model.decoder_forward_flops(p1.decoder) * p1.global_batch
    np.testing.assert_allclose(p3.flops["model"] - p1.flops["model"], 2 * per_row, rtol=1e-9)
    np.testing.assert_allclose(p3.bytes["decoder activations"],
                               3 * p1.bytes["decoder activations"], rtol=1e-9)
