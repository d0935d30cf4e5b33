"""The chunked decoder cross-entropy (objectives/chunked_xent.py, loss.decoder.vocab_chunk):
on random inputs its CE, argmax and gradients (hidden states, output kernel and bias) equal
the full-logits ones to 1e-6 relative for every way the chunk can split the vocabulary; through
the real decoder objective the loss, metrics and the gradient of every parameter equal the
unchunked objective's; the traced gradient never holds a [rows, L, V] array; option errors;
the planner counts one block of logits instead of the whole [L, V]."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_decoder import MODEL, PARALLEL, SHAPES, TARGET_MASK, TOKENS, _init, _run
from test_decoder_multitask import MT_MASK, MT_PAR, MT_TOKENS

from siglip_jax import cost_model
from siglip_jax.objectives import decoder as dec_objective
from siglip_jax.objectives.base import ObjectiveInputs
from siglip_jax.objectives.chunked_xent import chunked_cross_entropy, dense_cross_entropy
from siglip_jax.objectives.options import DEFAULTS, check_options

N, D, V = 13, 6, 37


def _random(seed=0, bias=True):
    r = np.random.default_rng(seed)
    hidden = jnp.asarray(r.normal(size=(N, D)), jnp.float32)
    kernel = jnp.asarray(r.normal(size=(D, V)), jnp.float32)
    b = jnp.asarray(r.normal(size=(V,)), jnp.float32) if bias else None
    targets = jnp.asarray(r.integers(0, V, N), jnp.int32)
    g = jnp.asarray(r.normal(size=N), jnp.float32)  # A random cotangent of the CE.
    return hidden, kernel, b, targets, g


def _rel(a, b):
    """max |a - b| / max |b| (max |a| when b is all zero)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = np.max(np.abs(b))
    return float(np.max(np.abs(a - b)) / scale) if scale > 0 else float(np.max(np.abs(a)))


@pytest.mark.parametrize("chunk, bias", [(1, True), (5, True), (37, True), (64, True),
                                         (8, False)])  # One column, ragged, V, > V.
def test_ce_argmax_and_gradients_equal_the_full_logits(chunk, bias):
    hidden, kernel, b, targets, g = _random(bias=bias)
    ce, idx = jax.jit(lambda *a: chunked_cross_entropy(*a, chunk=chunk))(
        hidden, kernel, b, targets)
    ce_ref, idx_ref = dense_cross_entropy(hidden, kernel, b, targets)
    # A float64 numpy reference too, so the dense twin is not the only judge.
    logits = np.asarray(hidden, np.float64) @ np.asarray(kernel, np.float64)
    logits += 0 if b is None else np.asarray(b, np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    np.testing.assert_allclose(ce, lse - logits[np.arange(N), targets], rtol=1e-6)
    assert _rel(ce, ce_ref) < 1e-6
    np.testing.assert_array_equal(idx, idx_ref)
    np.testing.assert_array_equal(idx, logits.argmax(-1))

    def weighted(fn, **kw):
        return lambda h, k, bb: jnp.sum(g * fn(h, k, bb, targets, **kw)[0])

    argnums = (0, 1, 2) if bias else (0, 1)
    grads = jax.jit(jax.grad(weighted(chunked_cross_entropy, chunk=chunk), argnums))(
        hidden, kernel, b)
    refs = jax.grad(weighted(dense_cross_entropy), argnums)(hidden, kernel, b)
    for got, want in zip(grads, refs, strict=True):
        assert got.shape == want.shape
        assert _rel(got, want) < 1e-6


def test_leading_dims_ties_and_a_zero_head():
    """[rows, L, D] inputs; a zero kernel and bias (the decoder's init) give log V and the
    first index as argmax, as jnp.argmax does; the gradient of the argmax output is zero."""
    hidden, _, _, targets, _ = _random()
    h3, t3 = hidden[:12].reshape(3, 4, D), targets[:12].reshape(3, 4)
    zero_k, zero_b = jnp.zeros((D, V)), jnp.zeros((V,))
    xent = jax.jit(lambda h, k, b, t: chunked_cross_entropy(h, k, b, t, chunk=8))
    ce, idx = xent(h3, zero_k, zero_b, t3)
    assert ce.shape == idx.shape == (3, 4)
    np.testing.assert_allclose(ce, np.full((3, 4), np.log(V)), rtol=1e-6)
    np.testing.assert_array_equal(idx, 0)
    tied = zero_b.at[20].set(1.0).at[9].set(1.0)  # Equal maxima in blocks 1 and 2.
    _, idx = xent(h3, zero_k, tied, t3)
    np.testing.assert_array_equal(idx, 9)
    grad = jax.jit(jax.grad(lambda h: jnp.sum(xent(h, zero_k, tied, t3)[1]
                                              .astype(jnp.float32))))(h3)
    np.testing.assert_array_equal(grad, 0.0)


def test_bfloat16_compute_follows_the_dense_layer():
    """dtype=bfloat16: logits as Dense(dtype=bf16) then float32. XLA may round the bf16 dot
    and bias add differently for a [N, 5] block than for [N, V], so the CE agrees with the
    dense bf16 twin to the bf16 rounding of the logits (|logit| < 16: one ulp is 1/16), and
    it is not the float32 result."""
    hidden, kernel, b, targets, _ = _random(seed=3)
    ce, idx = jax.jit(lambda *a: chunked_cross_entropy(*a, chunk=5, dtype="bfloat16"))(
        hidden, kernel, b, targets)
    ce_ref, _ = dense_cross_entropy(hidden, kernel, b, targets, dtype="bfloat16")
    logits = np.asarray(hidden) @ np.asarray(kernel) + np.asarray(b)
    assert np.max(np.abs(logits)) < 16
    np.testing.assert_allclose(ce, ce_ref, atol=2 / 16)
    ce32, _ = dense_cross_entropy(hidden, kernel, b, targets)
    assert _rel(ce, ce32) > 1e-4  # bf16 really was used.
    # The argmax is a maximum of the bf16 logits, to their rounding.
    assert np.all(logits[np.arange(N), idx] >= logits.max(-1) - 2 / 16)


def _inputs(model, params, batch, image_tokens):
    return ObjectiveInputs(model, params, batch, None, None, {"img/encoded": image_tokens},
                           jnp.zeros((), jnp.int32), None, jax.random.key(0))


def _random_params(params, seed=4):
    """Every parameter random (the head is zero-initialised), so every gradient is non-zero."""
    rng = np.random.default_rng(seed)  # numpy: no per-shape compile of jax.random.
    return jax.tree.map(lambda x: (0.5 * rng.standard_normal(x.shape)).astype(x.dtype), params)


@pytest.mark.parametrize("tasks", [3])  # [B, 3, L] rows (the recipe's); T = 1 as cheap.
def test_the_objective_with_chunks_equals_the_full_logits(tasks):
    """loss.decoder.vocab_chunk=5 (V = 18 or 19 output ids: three full blocks and a ragged
    tail) against vocab_chunk=0 through the real objective: loss, every metric and the
    gradient of every parameter and of the image tokens to 1e-6 relative."""
    model, params = _init()
    assert params["dec"]["head"]["kernel"].shape[1] % 5 > 0
    params = _random_params(params)
    if tasks == 1:
        batch = {"image": np.zeros(SHAPES["image"], np.float32), "dec_tokens": TOKENS,
                 "dec_target_mask": TARGET_MASK, "dec_parallel": PARALLEL}
    else:
        batch = {"image": np.zeros((2, 16, 16, 3), np.float32), "dec_tokens": MT_TOKENS,
                 "dec_target_mask": MT_MASK, "dec_parallel": MT_PAR}
    image_tokens = jax.random.normal(jax.random.key(5), (len(batch["dec_tokens"]), 5, 32))
    results = []
    for chunk in (0, 5):
        run = _run(loss=dict(weight=0.5, tasks_per_example=tasks, vocab_chunk=chunk))
        options = dict(run.loss.objectives["decoder"])
        assert options["vocab_chunk"] == chunk
        objective = dec_objective.make(run.model, run.total_steps, options, None)
        fn = jax.jit(jax.value_and_grad(
            lambda p, i, o=objective: o(_inputs(model, p, batch, i)), argnums=(0, 1),
            has_aux=True))
        results.append(fn(params, image_tokens))
    (loss0, metrics0), grads0 = results[0]
    (loss1, metrics1), grads1 = results[1]
    assert float(metrics0["decoder/loss"]) > 1.0  # Random params: far from solved.
    assert _rel(loss1, loss0) < 1e-6
    for key in metrics0:
        np.testing.assert_allclose(metrics1[key], metrics0[key], rtol=1e-6, atol=1e-7,
                                   err_msg=key)
    paths = jax.tree_util.tree_leaves_with_path(grads0)
    scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(grads0))
    for (path, g0), g1 in zip(paths, jax.tree.leaves(grads1), strict=True):
        name = jax.tree_util.keystr(path)
        size = float(np.max(np.abs(g0)))
        if "dec" in name or path[0].idx == 1:  # The image tokens' gradient too.
            assert size > 0, name
        if size > 1e-4 * scale:
            assert _rel(g1, g0) < 1e-6, name
        else:  # Attention key biases: zero up to rounding (softmax ignores a constant).
            assert float(np.max(np.abs(np.asarray(g1) - g0))) < 1e-6 * scale, name
    head = grads1[0]["dec"]["head"]
    assert np.max(np.abs(head["kernel"])) > 0 and np.max(np.abs(head["bias"])) > 0


def _shapes_in(jaxpr):
    """Every array shape of a jaxpr, its sub-jaxprs (scan, custom_vjp, pjit) included."""
    shapes = []
    for eqn in jaxpr.eqns:
        shapes += [tuple(v.aval.shape) for v in (*eqn.invars, *eqn.outvars)
                   if hasattr(v.aval, "shape")]
        for param in eqn.params.values():
            for p in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(p, "jaxpr", p)  # A ClosedJaxpr holds its Jaxpr.
                if hasattr(inner, "eqns"):
                    shapes += _shapes_in(inner)
    return shapes


def test_the_traced_gradient_never_holds_full_logits():
    """The value-and-gradient of the chunked objective (4 rows of L = 8, blocks of 5) has no
    array with a vocabulary axis beyond the [D, V] kernel and its gradient; the unchunked
    objective has the [rows, L, V] logits (so the check can fail)."""
    model, params = _init()
    vocab = params["dec"]["head"]["kernel"].shape[1]
    batch = {"image": np.zeros(SHAPES["image"], np.float32), "dec_tokens": TOKENS,
             "dec_target_mask": TARGET_MASK, "dec_parallel": PARALLEL}
    image_tokens = jnp.ones((4, 5, 32))
    found = {}
    for chunk in (0, 5):
        run = _run(loss=dict(weight=1.0, vocab_chunk=chunk))
        objective = dec_objective.make(run.model, run.total_steps,
                                       dict(run.loss.objectives["decoder"]), None)
        jaxpr = jax.make_jaxpr(jax.value_and_grad(
            lambda p, o=objective: o(_inputs(model, p, batch, image_tokens)), has_aux=True))(
                params)
        found[chunk] = {s for s in _shapes_in(jaxpr.jaxpr) if len(s) >= 2 and s[-1] == vocab}
    assert (4, 8, vocab) in found[0]
    width = MODEL["text"]["width"]
    assert found[5] <= {(width, vocab)}, found[5]


def test_vocab_chunk_option_errors():
    ok = check_options("decoder", {"vocab_chunk": 0})
    assert ok["vocab_chunk"] == 0
    assert check_options("decoder", {})["vocab_chunk"] == DEFAULTS["decoder"]["vocab_chunk"]
    for bad in (-1, 2.5, True, "8"):
        with pytest.raises(ValueError, match="vocab_chunk"):
            check_options("decoder", {"vocab_chunk": bad})
    with pytest.raises(ValueError, match="chunk"):
        chunked_cross_entropy(jnp.zeros((2, 3)), jnp.zeros((3, 4)), None, jnp.zeros(2, int),
                              chunk=0)


def test_planner_counts_one_block_of_logits():
    shape = cost_model.DecoderShape(tokens=64, image_tokens=256, image_width=768, width=768,
                                    depth=6, mlp_dim=3072, heads=12, vocab_size=256_104,
                                    act_bytes=2, remat="nothing_saveable", rows=3)
    full = cost_model.decoder_activation_bytes(shape, 128 * 3)
    chunked = cost_model.decoder_activation_bytes(
        dataclasses.replace(shape, vocab_chunk=8192), 128 * 3)
    logits_full = 3 * 4 * 128 * 3 * 64 * 256_104
    # The full logits, log-probabilities and their gradient dominate the unchunked estimate;
    # chunked, a few [rows·L, 8192] float32 blocks replace them.
    assert full - chunked > 0.9 * logits_full
    assert chunked < full / 5
