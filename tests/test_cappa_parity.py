"""Our decoder equals big_vision's CapPa decoder: the fixture `bv_cappa_decoder.npz` (made with
big_vision `models/proj/cappa/cappa.py`, see ../shared/fixtures/README.md) holds CapPa's
params, inputs and logits; converted into our `dec/` layout, our decoder reproduces the
teacher-forced autoregressive and the parallel logits to 1e-5, and the conversion round-trips
exactly (un-scanned and scanned)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from siglip_jax.checkpoints import big_vision as bv
from siglip_jax.checkpoints import cappa
from siglip_jax.models.decoder import Decoder, shift_right, training_inputs

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "fixtures",
                       "bv_cappa_decoder.npz")


@pytest.fixture(scope="module")
def fixture():
    with np.load(FIXTURE) as f:
        data = {k: f[k] for k in f.files}
    params = bv.unflatten({k: v for k, v in data.items() if k.startswith("params/")})["params"]
    return params, data


def _assert_same_tree(a, b):
    fa, fb = bv.flatten(a, ""), bv.flatten(b, "")
    assert sorted(fa) == sorted(fb)
    for k in fa:
        assert fa[k].dtype == fb[k].dtype and fa[k].shape == fb[k].shape, k
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def test_both_logits_equal_big_vision_cappa(fixture):
    params, data = fixture
    kw = cappa.decoder_shape(params, data["pos_emb"])
    assert kw == dict(vocab_size=50, width=48, depth=2, mlp_dim=96, num_heads=4, max_len=7)
    dec = cappa.from_cappa(params, data["pos_emb"])
    module = Decoder(**kw)
    assert module.mask_id == 50
    # Our tree has exactly the shapes our module creates.
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 7), jnp.int32),
                            jnp.zeros((1, 5, 48)), parallel=False)["params"]
    assert {k: v.shape for k, v in bv.flatten(shapes, "").items()} == {
        k: v.shape for k, v in bv.flatten(dec, "").items()}
    targets = data["targets"]
    ar_inputs = np.asarray(shift_right(targets))
    np.testing.assert_array_equal(ar_inputs[:, 0], 0)
    np.testing.assert_array_equal(ar_inputs[:, 1:], targets[:, :-1])
    par_inputs = np.full_like(targets, module.mask_id)
    inputs = np.concatenate([ar_inputs, par_inputs])
    encoded = np.concatenate([data["encoded"], data["encoded"]])
    parallel = np.array([False] * 3 + [True] * 3)
    logits = jax.jit(lambda p, x, e, m: module.apply({"params": p}, x, e, parallel=m))(
        dec, inputs, encoded, parallel)
    logits = np.asarray(logits)
    assert logits.shape == (6, 7, 50)
    np.testing.assert_allclose(logits[:3], data["logits_ar"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(logits[3:], data["logits_parallel"], rtol=0, atol=1e-5)
    # training_inputs builds those inputs: AR rows shifted, parallel rows (no prompt: every
    # position a target or padding) all mask tokens; targets are the sequence itself.
    mask = (targets > 0).astype(np.float32)
    got_in, got_tg, _ = training_inputs(np.concatenate([targets, targets]),
                                        np.concatenate([mask, mask]), parallel, 50)
    np.testing.assert_array_equal(got_in, inputs)
    np.testing.assert_array_equal(got_tg[:3], targets)


def test_export_round_trip_is_exact(fixture):
    params, data = fixture
    for scan in (False, True):
        dec = cappa.from_cappa(params, data["pos_emb"], scan=scan)
        assert ("decoderblock" in dec) == scan
        back, pos_emb = cappa.to_cappa(dec)
        _assert_same_tree(back, params)
        np.testing.assert_array_equal(pos_emb, data["pos_emb"])
    scanned = cappa.from_cappa(params, data["pos_emb"], scan=True)
    np.testing.assert_array_equal(scanned["decoderblock"]["self_attn"]["query"]["kernel"][1],
                                  params["EncDecBlock1"]["SelfAttn"]["query"]["kernel"])


def test_conversion_errors_name_the_problem(fixture):
    params, data = fixture
    embedding = params["EmbedTargets"]["embedding"]
    no_mask_row = {**params, "EmbedTargets": {"embedding": embedding[:50]}}
    with pytest.raises(ValueError, match="needs the mask token row"):
        cappa.from_cappa(no_mask_row, data["pos_emb"])
    biased = {**params, "EncDecBlock0": {**params["EncDecBlock0"], "Extra": {}}}
    with pytest.raises(ValueError, match=r"unexpected params \['Extra'\]"):
        cappa.from_cappa(biased, data["pos_emb"])
    dec = cappa.from_cappa(params, data["pos_emb"])
    with pytest.raises(ValueError, match="no image projection"):
        cappa.to_cappa({**dec, "img_proj": {}})
