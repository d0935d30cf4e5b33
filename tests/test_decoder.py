"""The LocCa caption decoder and its loss: inputs/targets of both modes on a hand-made example,
the loss against a numpy re-implementation, attention masks as properties, one SGD step of the
train step equal to params - lr · jax.grad of a jnp reference loss (frozen image tower or
not), the ring loss + accumulation + FSDP step on 8 devices against the numpy reference,
config errors."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from tiny import DEMO, tiny_overrides

from siglip_jax import experiment
from siglip_jax.checkpoints.open import load_model_init
from siglip_jax.config import ConfigError, load_config
from siglip_jax.data.locca import DecoderVocab
from siglip_jax.models.build import make_model
from siglip_jax.models.config import model_kwargs
from siglip_jax.models.decoder import training_inputs
from siglip_jax.models.two_towers import Model
from siglip_jax.objectives import decoder as dec_objective
from siglip_jax.objectives.base import ObjectiveInputs
from siglip_jax.optim import FROZEN, OptimConfig, group_labels, make_optimizer
from siglip_jax.schema import parse
from siglip_jax.sharding import make_global_batch, make_mesh, mesh_of
from siglip_jax.step import abstract_params, frozen_mask, init_state, make_train_step

TEXT_VOCAB, BINS, L = 10, 5, 8
VOCAB = DecoderVocab(TEXT_VOCAB, BINS)  # loc 10..14, cap 15, aref 16, gcap 17, mask 18.
MODEL = dict(image=dict(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=8,
                        pool_type="gap"),
             text=dict(vocab_size=TEXT_VOCAB, width=16, depth=2, mlp_dim=32, num_heads=2),
             out_dim=16, decoder=dict(max_len=L, num_bins=BINS))
SHAPES = {"image": (4, 16, 16, 3), "labels": (4, 6)}

# Hand-made rows: [task, prefix..., target..., eos(1), 0-pad] and which rows are parallel.
TOKENS = np.array([
    [15, 3, 4, 1, 0, 0, 0, 0],          # cap, autoregressive: target "3 4" + eos
    [16, 5, 11, 12, 13, 14, 1, 0],      # aref, parallel: phrase "5" -> box 11..14 + eos
    [17, 10, 11, 12, 13, 6, 7, 1],      # gcap, autoregressive: box -> "6 7" + eos
    [15, 2, 9, 8, 1, 0, 0, 0],          # cap, parallel: "2 9 8" + eos
], np.int32)
TARGET_MASK = np.array([
    [0, 1, 1, 1, 0, 0, 0, 0],
    [0, 0, 1, 1, 1, 1, 1, 0],
    [0, 0, 0, 0, 0, 1, 1, 1],
    [0, 1, 1, 1, 1, 0, 0, 0],
], np.float32)
PARALLEL = np.array([False, True, False, True])


def _init(model=None, seed=0):
    model = model or Model(**MODEL)
    params = jax.jit(model.init)(jax.random.key(seed), jnp.zeros(SHAPES["image"]),
                                 jnp.zeros(SHAPES["labels"], jnp.int32))["params"]
    return model, params


def test_training_inputs_of_both_modes_on_a_hand_made_example():
    inputs, targets, weights = (np.asarray(a) for a in training_inputs(
        TOKENS, TARGET_MASK, PARALLEL, VOCAB.mask_id))
    m = 18
    assert VOCAB.mask_id == m
    # Autoregressive (big_vision CapPa): the input is the sequence shifted right with id 0
    # first; position i predicts token i.
    np.testing.assert_array_equal(inputs[0], [0, 15, 3, 4, 1, 0, 0, 0])
    np.testing.assert_array_equal(targets[0], TOKENS[0])
    np.testing.assert_array_equal(weights[0], [0, 1, 1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(inputs[2], [0, 17, 10, 11, 12, 13, 6, 7])
    np.testing.assert_array_equal(weights[2], [0, 0, 0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(targets[2], TOKENS[2])
    # Parallel: targets and padding become the mask id; each target position predicts itself.
    np.testing.assert_array_equal(inputs[1], [16, 5, m, m, m, m, m, m])
    np.testing.assert_array_equal(targets[1], TOKENS[1])
    np.testing.assert_array_equal(weights[1], TARGET_MASK[1])
    np.testing.assert_array_equal(inputs[3], [15, m, m, m, m, m, m, m])
    np.testing.assert_array_equal(weights[3], [0, 1, 1, 1, 1, 0, 0, 0])


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def reference_loss(model, params, image_tokens, tokens, target_mask, parallel, image_mask=None):
    """(mean CE, accuracy): autoregressive rows feed [0, tokens[:, :-1]] and predict tokens
    (big_vision CapPa's shift); parallel rows feed the sequence with targets and padding set
    to the mask id."""
    total = hits = count = 0.0
    for mode in (False, True):
        rows = np.flatnonzero(np.asarray(parallel) == mode)
        if not len(rows):
            continue
        if mode:
            t = tokens[rows]
            x = np.where((target_mask[rows] > 0) | (t == 0), VOCAB.mask_id, t)
            y, w = t, target_mask[rows]
        else:
            t = tokens[rows]
            x = np.concatenate([np.zeros_like(t[:, :1]), t[:, :-1]], axis=1)
            y, w = t, target_mask[rows]
        m = None if image_mask is None else image_mask[rows]
        logits = jax.jit(lambda p, i, x, m, mode=mode: model.apply(
            {"params": p}, i, x, parallel=mode, image_mask=m, method="decode"))(
                params, image_tokens[rows], x, m)
        logp = _log_softmax(logits)
        for r, i in zip(*np.nonzero(w), strict=True):
            total -= logp[r, i, y[r, i]]
            hits += float(np.argmax(logp[r, i]) == y[r, i])
            count += 1
    return total / count, hits / count


def _objective_inputs(model, params, batch, image_tokens):
    return ObjectiveInputs(model, params, batch, None, None, {"img/encoded": image_tokens},
                           jnp.zeros((), jnp.int32), None, jax.random.key(0))


def _randomise_head(params, seed=1):
    """The output layer is zero-initialised (uniform logits); give it random weights."""
    params = jax.tree.map(lambda x: x, params)
    head = params["dec"]["head"]
    params["dec"]["head"] = {"kernel": jax.random.normal(jax.random.key(seed),
                                                         head["kernel"].shape),
                             "bias": head["bias"]}
    return params


def _run(model_config=MODEL, loss=None, full=""):
    c = load_config(DEMO, tiny_overrides("/nonexistent", **{"model_init.full": full}))
    with c.unlocked():
        c.model.decoder = dict(model_config["decoder"]) if "decoder" in model_config else None
        c.model.text.vocab_size = model_config["text"]["vocab_size"]
        c.loss.decoder = loss
    return parse(c)


def test_loss_equals_a_numpy_reference_of_the_masked_cross_entropy():
    model, params = _init()
    params = _randomise_head(params)
    image_tokens = jax.random.normal(jax.random.key(2), (4, 5, 32))
    batch = {"image": np.zeros(SHAPES["image"], np.float32), "dec_tokens": TOKENS,
             "dec_target_mask": TARGET_MASK, "dec_parallel": PARALLEL}
    run = _run(loss=dict(weight=0.25))
    objective = dec_objective.make(run.model, run.total_steps,
                                   dict(run.loss.objectives["decoder"]), None)
    loss, metrics = jax.jit(lambda p, b, i: objective(_objective_inputs(model, p, b, i)))(
        params, batch, image_tokens)
    ref_loss, ref_acc = reference_loss(model, params, np.asarray(image_tokens), TOKENS,
                                       TARGET_MASK, PARALLEL)
    assert ref_loss > 0.5  # A random head: far from a solved task.
    np.testing.assert_allclose(metrics["decoder/loss"], ref_loss, rtol=1e-5)
    np.testing.assert_allclose(loss, 0.25 * ref_loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["decoder/token_acc"], ref_acc, atol=1e-6)
    # A NaFlex batch: the objective passes the patch mask, so padded tokens do not count.
    mask = np.arange(5)[None, :] < np.array([[5], [3], [4], [2]])
    noisy = jnp.where(mask[..., None], image_tokens, 50.0)
    naflex = {**batch, "image": {"patches": np.zeros((4, 5, 12), np.float32), "mask": mask,
                                 "spatial_shapes": np.ones((4, 2), np.int32)}}
    _, metrics = jax.jit(lambda p, b, i: objective(_objective_inputs(model, p, b, i)))(
        params, naflex, noisy)
    ref_masked, _ = reference_loss(model, params, np.asarray(image_tokens), TOKENS,
                                   TARGET_MASK, PARALLEL, image_mask=mask)
    np.testing.assert_allclose(metrics["decoder/loss"], ref_masked, rtol=1e-5)
    assert abs(ref_masked - ref_loss) > 1e-4  # The mask changes what the decoder sees.


def test_zero_initialised_head_gives_the_uniform_loss_log_v():
    model, params = _init()
    batch = {"image": np.zeros(SHAPES["image"], np.float32), "dec_tokens": TOKENS,
             "dec_target_mask": TARGET_MASK, "dec_parallel": PARALLEL}
    run = _run(loss=dict(weight=1.0))
    objective = dec_objective.make(run.model, run.total_steps,
                                   dict(run.loss.objectives["decoder"]), None)
    loss, _ = jax.jit(lambda p, b, i: objective(_objective_inputs(model, p, b, i)))(
        params, batch, jnp.ones((4, 5, 32)))
    # V = the output vocabulary: every id but the mask id (an input only, as in CapPa).
    np.testing.assert_allclose(loss, np.log(VOCAB.mask_id), rtol=1e-6)


def test_self_attention_is_causal_unless_parallel_and_padding_patches_are_ignored():
    model, params = _init()
    params = _randomise_head(params)
    image = jax.random.normal(jax.random.key(3), (1, 6, 32))
    x = jnp.asarray(TOKENS[2:3])
    x_late = x.at[0, 6].set(9)  # Change position 6 only.

    def logits(tokens, parallel, img=image, mask=None):
        return np.asarray(model.apply({"params": params}, img, tokens, parallel=parallel,
                                      image_mask=mask, method="decode"))
    causal, causal_late = logits(x, False), logits(x_late, False)
    np.testing.assert_allclose(causal[0, :6], causal_late[0, :6], atol=1e-6)  # Past unchanged.
    assert np.abs(causal[0, 6:] - causal_late[0, 6:]).max() > 1e-4
    full, full_late = logits(x, True), logits(x_late, True)
    assert np.abs(full[0, :6] - full_late[0, :6]).max() > 1e-4  # Everyone sees position 6.
    # A bool [B] `parallel` picks the mask per row.
    mixed = logits(jnp.concatenate([x, x]), jnp.array([False, True]),
                   jnp.concatenate([image, image]))
    np.testing.assert_allclose(mixed[0], causal[0], atol=1e-5)
    np.testing.assert_allclose(mixed[1], full[0], atol=1e-5)
    # Cross-attention key mask: padded image tokens (mask False) do not matter.
    mask = jnp.array([[True, True, True, True, False, False]])
    noisy = image.at[0, 4:].set(100.0)
    np.testing.assert_allclose(logits(x, False, image, mask), logits(x, False, noisy, mask),
                               atol=1e-5)
    assert np.abs(logits(x, False, image) - logits(x, False, noisy)).max() > 1e-3


def _sgd(schedule_groups=None):
    cfg = ml_collections.ConfigDict(dict(optim=dict(name="sgd", momentum=0.0), lr=0.5, wd=0.0,
                                         grad_clip_norm=0.0,
                                         schedule=schedule_groups or dict(
                                             decay_type="constant")))
    return OptimConfig.from_config(cfg)


def _zero_contrastive(zimg, ztxt, t_prime, b):
    return 0.0 * (jnp.sum(zimg) + jnp.sum(ztxt) + t_prime + b), {}


def reference_loss_jnp(model, params, batch):
    """The decoder loss of `batch` written out in jnp (differentiable), independently of
    objectives/decoder.py and models/decoder.training_inputs: the image tower's un-pooled
    tokens, then per mode one `decode` call; autoregressive rows feed [0, tokens[:-1]] and
    predict tokens, parallel rows feed the tokens with targets and padding set to the mask id
    and predict them in place; the mean CE over all target positions of the batch."""
    _, _, out = model.apply({"params": params}, batch["image"], batch["labels"], train=True)
    image_tokens = out["img/encoded"]
    tokens, weights = jnp.asarray(batch["dec_tokens"]), jnp.asarray(batch["dec_target_mask"])
    total = 0.0
    for mode in (False, True):
        rows = np.flatnonzero(np.asarray(batch["dec_parallel"]) == mode)
        t, w = tokens[rows], weights[rows]
        if mode:
            x = jnp.where((w > 0) | (t == 0), VOCAB.mask_id, t)
        else:
            x = jnp.concatenate([jnp.zeros_like(t[:, :1]), t[:, :-1]], axis=1)
        logits = model.apply({"params": params}, image_tokens[rows], x, parallel=mode,
                             train=True, method="decode")
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        total = total - jnp.sum(w * jnp.take_along_axis(logp, t[..., None], axis=-1)[..., 0])
    return total / jnp.sum(weights)


@pytest.mark.parametrize("freeze_img", [False, True])
def test_one_sgd_step_is_params_minus_lr_times_the_reference_gradient(freeze_img):
    """Plain SGD (lr 0.5, no momentum, no decay), the contrastive loss zeroed: the train
    step's update of every parameter equals -lr · jax.grad of the jnp reference decoder loss
    (img/ zero when frozen, txt/ zero: the decoder does not read the text tower). Two steps:
    the zero-initialised output layer first gets the only gradient, the second step reaches
    every decoder parameter and, through cross-attention, the image tower."""
    mesh = make_mesh([("data", -1)])
    model = Model(**MODEL)
    abstract = abstract_params(model, SHAPES)
    groups = [("img/.*", None), (".*", dict(decay_type="constant"))] if freeze_img else None
    optim = _sgd(groups)
    tx, lr_fn = make_optimizer(optim, abstract, total_steps=10)
    frozen = frozen_mask(group_labels(optim, abstract), FROZEN)
    assert (frozen is not None) == freeze_img
    state, _ = init_state(model, tx, SHAPES, mesh, [(".*", "replicate")], seed=0)
    run = _run(loss=dict(weight=1.0))
    objective = dec_objective.make(run.model, run.total_steps,
                                   dict(run.loss.objectives["decoder"]), mesh)
    rng = np.random.default_rng(0)
    batch = {"image": rng.uniform(-1, 1, SHAPES["image"]).astype(np.float32),
             "labels": rng.integers(2, TEXT_VOCAB, SHAPES["labels"]).astype(np.int32),
             "dec_tokens": TOKENS, "dec_target_mask": TARGET_MASK, "dec_parallel": PARALLEL}
    step = jax.jit(make_train_step(model, tx, _zero_contrastive, lr_fn, frozen=frozen,
                                   objectives=[objective]))
    ref_grad = jax.jit(jax.value_and_grad(lambda p: reference_loss_jnp(model, p, batch)))
    lr = 0.5
    for i in range(2):
        before = jax.device_get(state["params"])
        want_loss, grads = jax.device_get(ref_grad(before))
        state, metrics = step(state, batch)
        after = jax.device_get(state["params"])
        assert float(metrics["lr"]) == lr
        np.testing.assert_allclose(metrics["decoder/loss"], want_loss, rtol=1e-6)
        if i == 0:  # Zero output layer: uniform over the V output ids.
            np.testing.assert_allclose(want_loss, np.log(VOCAB.mask_id), rtol=1e-6)
        for path, new in jax.tree_util.tree_flatten_with_path(after)[0]:
            name = jax.tree_util.keystr(path)
            old = _at(before, path)
            g = np.zeros_like(old) if freeze_img and name.startswith("['img']") else _at(
                grads, path)
            np.testing.assert_allclose(new, old - lr * g, rtol=1e-5,
                                       atol=1e-6 * max(1.0, float(np.abs(old).max())),
                                       err_msg=f"step {i}: {name}")
        moved = {part: max(float(np.abs(a - b).max()) for a, b in zip(
            jax.tree.leaves(after[part]), jax.tree.leaves(before[part]), strict=True))
            for part in ("dec", "img", "txt")}
        assert moved["txt"] == 0.0
        if i == 1:  # The reference gradient is not trivially zero where it matters.
            assert moved["dec"] > 1e-4
            assert (moved["img"] == 0.0) if freeze_img else (moved["img"] > 1e-6)


def _at(tree, path):
    for key in path:
        tree = tree[key.key]
    return np.asarray(tree)


def test_train_step_with_decoder_ring_loss_accumulation_and_fsdp_on_8_devices():
    # The FSDP recipes' rules (recipes._mesh): dec/ params fall under (".*", "fsdp").
    c = load_config(DEMO, tiny_overrides(
        "/nonexistent", grad_accum_steps=2, mesh="[('data', 4), ('fsdp', 2)]",
        batch_axes="('data', 'fsdp')", **{"input.global_batch": 16}, sharding_rules=(
            "[('txt/Embed_0/.*', 'replicate'), ('.*', 'fsdp')]")))
    with c.unlocked():
        c.model.decoder = dict(max_len=L, num_bins=BINS, width=24, num_heads=2, scan=True,
                               remat_policy="nothing_saveable")
        c.model.text.vocab_size = TEXT_VOCAB
        c.loss.decoder = dict(weight=0.5)
    run = parse(c)
    assert run.loss.impl == "ring" and len(jax.devices()) == 8
    mesh = mesh_of(run.mesh)
    shapes = experiment.input_shapes(run)
    assert shapes["dec_tokens"] == (16, L) and shapes["dec_parallel"] == (16,)
    parts = experiment.build_step(run, mesh, shapes)
    kernel = parts.shardings["params"]["dec"]["decoderblock"]["mlp"]["Dense_0"]["kernel"]
    assert kernel.spec != jax.sharding.PartitionSpec() and "fsdp" in str(kernel.spec)
    state = experiment.init_state(run, parts, mesh, shapes)
    rng = np.random.default_rng(1)
    rows = np.arange(16) % 4
    local = {"image": rng.uniform(-1, 1, shapes["image"]).astype(np.float32),
             "labels": rng.integers(2, TEXT_VOCAB, shapes["labels"]).astype(np.int32),
             "dec_tokens": TOKENS[rows], "dec_target_mask": TARGET_MASK[rows],
             "dec_parallel": PARALLEL[rows]}
    params0 = jax.device_get(state["params"])
    batch = make_global_batch(local, mesh, run.mesh.batch_axes)
    state, metrics = parts.step_fn(state, batch)
    metrics = jax.device_get(metrics)
    assert bool(metrics["finite"]) and np.isfinite(metrics["loss"])
    # Zero-init head: every micro-batch's decoder loss is log V exactly at step 0.
    np.testing.assert_allclose(metrics["decoder/loss"], np.log(VOCAB.mask_id), rtol=1e-5)
    np.testing.assert_allclose(metrics["loss"], metrics["sigmoid/loss"]
                               + 0.5 * metrics["decoder/loss"], rtol=1e-5)
    params1 = jax.device_get(state["params"])
    dec_change = [float(np.abs(a - b).max()) for a, b in zip(
        jax.tree.leaves(params1["dec"]), jax.tree.leaves(params0["dec"]), strict=True)]
    assert max(dec_change) > 0
    state, metrics = parts.step_fn(state, batch)
    assert bool(metrics["finite"])
    # Step 1's decoder loss against the numpy reference on the two micro-batches
    # (micro-batch m = rows m, m + 2, ...), with the image tokens of the step-1 params.
    model = parts.model
    ref = []
    for m in range(2):
        sl = slice(m, None, 2)
        _, _, out = jax.jit(model.apply)({"params": params1}, local["image"][sl],
                                         local["labels"][sl])
        ref.append(reference_loss(model, params1, np.asarray(out["img/encoded"]),
                                  local["dec_tokens"][sl], local["dec_target_mask"][sl],
                                  local["dec_parallel"][sl])[0])
    np.testing.assert_allclose(metrics["decoder/loss"], np.mean(ref), rtol=1e-4)
    assert metrics["decoder/loss"] < np.log(VOCAB.mask_id)


def test_config_errors_are_one_line_and_name_the_key():
    with pytest.raises(ConfigError, match=r"config.loss.decoder needs config.model.decoder"):
        _run(model_config={k: v for k, v in MODEL.items() if k != "decoder"},
             loss=dict(weight=1.0))
    with pytest.raises(ConfigError, match=r"config.loss.decoder: unknown option.*\['wieght'\]"):
        _run(loss=dict(wieght=1.0))
    with pytest.raises(ConfigError, match=r"config.loss.decoder: weight must be"):
        _run(loss=dict(weight=-1.0))
    bad_model = {**MODEL, "decoder": dict(max_len=L, num_heads=3)}
    with pytest.raises(ConfigError, match=r"model.decoder.width 32 is not divisible by "
                                          r"num_heads 3"):
        _run(model_config=bad_model)
    with pytest.raises(ConfigError, match=r"unknown model.decoder key\(s\) \['layers'\]"):
        _run(model_config={**MODEL, "decoder": dict(layers=2)})
    with pytest.raises(ConfigError, match=r"model.decoder.max_len must be an int >= 2"):
        _run(model_config={**MODEL, "decoder": dict(max_len=1)})
    # Defaults follow the text tower: same width/heads/MLP, half the depth.
    model, params = _init()
    dec = params["dec"]
    assert dec["embed"]["embedding"].shape == (VOCAB.size, 16)  # The last row: the mask id.
    assert dec["head"]["kernel"].shape == (16, VOCAB.mask_id)
    assert set(dec["decoderblock_0"]["self_attn"]["query"]) == {"kernel"}  # No bias (CapPa).
    assert dec["decoderblock_0"]["mlp"]["Dense_0"]["kernel"].shape == (16, 32)
    assert "decoderblock_1" not in dec and "img_proj" in dec  # Image width 32 -> 16.
    with pytest.raises(ValueError, match="length 9 > model.decoder.max_len 8"):
        model.apply({"params": params}, jnp.zeros((1, 2, 32)), jnp.zeros((1, 9), jnp.int32),
                    parallel=False, method="decode")


def test_planner_decoder_flops_and_activations_match_xla():
    """Analytic decoder FLOPs within 90-100 % of XLA's count of the forward pass (XLA counts
    elementwise ops too); kept activations within -25 % / +35 % of XLA:CPU's temp memory for
    the gradient (float32, no remat)."""
    from siglip_jax import cost_model
    from siglip_jax.objectives.decoder import token_loss

    model = Model(image=dict(width=96, depth=1, mlp_dim=192, num_heads=2, patch_size=8),
                  text=dict(vocab_size=1000, width=128, depth=4, mlp_dim=512, num_heads=4),
                  out_dim=16, decoder=dict(max_len=32))
    b, n = 16, 64
    params = jax.eval_shape(model.init, jax.random.key(0),
                            jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32),
                            jax.ShapeDtypeStruct((2, 8), jnp.int32))["params"]
    image = jax.ShapeDtypeStruct((b, n, 96), jnp.float32)
    tokens = jax.ShapeDtypeStruct((b, 32), jnp.int32)
    shape = cost_model.decoder_shape(model, n)
    assert (shape.depth, shape.width, shape.vocab_size) == (2, 128, 1000 + 100 + 3)
    fwd = jax.jit(lambda p, i, t: model.apply({"params": p}, i, t, parallel=False,
                                              method="decode")).lower(params, image, tokens)
    analytic = b * cost_model.decoder_forward_flops(shape)
    assert 0.9 * fwd.cost_analysis()["flops"] <= analytic <= fwd.cost_analysis()["flops"]

    def loss(p, i, t):
        logits = model.apply({"params": p}, i, t, parallel=False, train=True, method="decode")
        return token_loss(logits, t, jnp.ones(t.shape))[0]
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, image, tokens).compile()
    measured = compiled.memory_analysis().temp_size_in_bytes
    assert 0.75 * measured <= cost_model.decoder_activation_bytes(shape, b) <= 1.35 * measured


def test_full_model_init_from_a_checkpoint_without_decoder_keeps_a_fresh_decoder(tmp_path):
    from siglip_jax.checkpoints import big_vision as bv

    run = _run()
    kwargs = {**model_kwargs(run.model), "decoder": None}
    shapes = experiment.input_shapes(run, batch=2)
    plain = jax.jit(Model(**kwargs).init)(jax.random.key(5), jnp.zeros(shapes["image"]),
                                          jnp.zeros(shapes["labels"], jnp.int32))["params"]
    bv.save_npz(tmp_path / "siglip.npz", jax.device_get(plain))
    run = _run(full=str(tmp_path / "siglip.npz"))
    abstract = abstract_params(make_model(run.model), shapes)
    assert "dec" in abstract
    loaded = load_model_init(run.model_init.parts(), abstract)
    assert sorted(loaded) == ["b", "img", "t", "txt"]
    np.testing.assert_array_equal(loaded["img"]["embedding"]["kernel"],
                                  plain["img"]["embedding"]["kernel"])


def test_scanned_remat_decoder_computes_the_same_as_the_unscanned_one():
    from siglip_jax.models.decoder import Decoder

    kw = dict(vocab_size=VOCAB.mask_id, width=16, depth=2, mlp_dim=32, num_heads=2, max_len=L)
    plain, scanned = Decoder(**kw), Decoder(**kw, scan=True, remat_policy="nothing_saveable")
    image = jax.random.normal(jax.random.key(4), (2, 3, 16))
    tokens, parallel = jnp.asarray(TOKENS[:2]), jnp.array([False, True])
    params = jax.jit(plain.init, static_argnames="parallel")(
        jax.random.key(0), tokens, image, parallel=True)["params"]
    params = {**params, "head": {"kernel": jax.random.normal(jax.random.key(1),
                                                             (16, VOCAB.mask_id)),
                                 "bias": params["head"]["bias"]}}
    blocks = [params.pop(f"decoderblock_{i}") for i in range(2)]
    stacked = {**params, "decoderblock": jax.tree.map(lambda *x: jnp.stack(x), *blocks)}
    params.update({f"decoderblock_{i}": b for i, b in enumerate(blocks)})

    def run(module, p):
        return jax.jit(lambda p: module.apply({"params": p}, tokens, image, parallel=parallel))(p)
    np.testing.assert_allclose(run(scanned, stacked), run(plain, params), rtol=1e-5, atol=1e-5)
    grads = [jax.jit(jax.grad(lambda p, m=m: jnp.sum(m.apply(
        {"params": p}, tokens, image, parallel=parallel) ** 2)))(q)
             for m, q in ((plain, params), (scanned, stacked))]
    want = np.asarray(grads[0]["decoderblock_1"]["mlp"]["Dense_0"]["kernel"])
    np.testing.assert_allclose(grads[1]["decoderblock"]["mlp"]["Dense_0"]["kernel"][1], want,
                               rtol=1e-4, atol=1e-5 * np.abs(want).max())
