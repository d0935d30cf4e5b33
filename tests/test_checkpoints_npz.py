"""big_vision .npz import/export: key layout, scanned <-> unscanned bit-exact round trips,
mismatch errors, no pickle, posemb resampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from checks import assert_bit_equal

from siglip_jax.checkpoints import big_vision as bv
from siglip_jax.models.two_towers import Model

IMG = dict(width=32, depth=3, mlp_dim=64, num_heads=2, patch_size=4, pool_type="map")
TXT = dict(vocab_size=40, width=32, depth=2, mlp_dim=64, num_heads=2)


def _model(scan_img=False, scan_txt=False, **kw):
    return Model(image={**IMG, "scan": scan_img, **kw}, text={**TXT, "scan": scan_txt},
                 out_dim=(None, 16))  # fmt: skip


def _inputs(hw=16):
    rng = np.random.default_rng(0)
    img = jnp.asarray(rng.uniform(-1, 1, (2, hw, hw, 3)), jnp.float32)
    txt = jnp.asarray(rng.integers(2, 40, (2, 5)), jnp.int32)
    return img, txt


def _init(model, hw=16):
    """Random numpy params of the model's shapes (cheaper than JAX init on CPU)."""
    img, txt = _inputs(hw)
    shapes = jax.eval_shape(model.init, jax.random.key(0), img, txt)["params"]
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), shapes)


def test_saved_keys_follow_big_vision_layout(tmp_path):
    params = _init(_model())
    bv.save_npz(tmp_path / "u.npz", params)
    bv.save_npz(tmp_path / "s.npz", params, scanned=True)
    with np.load(tmp_path / "u.npz", allow_pickle=False) as f:
        ukeys = {k: f[k].shape for k in f.files}
    with np.load(tmp_path / "s.npz", allow_pickle=False) as f:
        skeys = {k: f[k].shape for k in f.files}
    q = "MultiHeadDotProductAttention_0/query/kernel"
    assert ukeys[f"params/img/Transformer/encoderblock_2/{q}"] == (32, 2, 16)
    assert ukeys["params/txt/Encoder_0/encoderblock_1/MlpBlock_0/Dense_0/kernel"] == (32, 64)
    assert skeys[f"params/img/Transformer/encoderblock/{q}"] == (3, 32, 2, 16)
    assert skeys["params/txt/Encoder_0/encoderblock/MlpBlock_0/Dense_0/kernel"] == (2, 32, 64)
    assert ukeys["params/t"] == skeys["params/t"] == (1,)
    assert ukeys["params/img/MAPHead_0/probe"] == (1, 1, 32)
    assert not any("encoderblock_" in k for k in skeys)
    # Every leaf is saved once: same element count in both layouts.
    assert sum(map(np.prod, ukeys.values())) == sum(map(np.prod, skeys.values()))


def test_round_trips_scanned_unscanned_are_bit_exact(tmp_path):
    plain, scanned, mixed = _model(), _model(True, True), _model(True, False)
    params = _init(plain)
    bv.save_npz(tmp_path / "a.npz", params)  # Unscanned file.
    p_scan = bv.load_npz(tmp_path / "a.npz", jax.eval_shape(lambda: _init(scanned)))
    # Stacking really happened (independent re-layout with np.stack).
    want = np.stack([params["img"]["Transformer"][f"encoderblock_{i}"]["LayerNorm_0"]["scale"]
                     for i in range(3)])  # fmt: skip
    np.testing.assert_array_equal(
        p_scan["img"]["Transformer"]["encoderblock"]["LayerNorm_0"]["scale"], want
    )
    bv.save_npz(tmp_path / "b.npz", p_scan)  # Scanned file.
    back = bv.load_npz(tmp_path / "b.npz", params)
    assert_bit_equal(back, params)
    # A mixed target (image scanned, text not) takes each encoder's own layout.
    p_mixed = bv.load_npz(tmp_path / "b.npz", _init(mixed))
    assert "encoderblock" in p_mixed["img"]["Transformer"]
    assert "encoderblock_1" in p_mixed["txt"]["Encoder_0"]
    assert_bit_equal(bv.to_layout(p_mixed, scanned=False), params)
    # The loaded scanned params give the unscanned model's embeddings.
    img, txt = _inputs()
    z0 = jax.jit(plain.apply)({"params": params}, img, txt)
    z1 = jax.jit(scanned.apply)({"params": p_scan}, img, txt)
    np.testing.assert_allclose(z1[0], z0[0], atol=1e-6)
    np.testing.assert_allclose(z1[1], z0[1], atol=1e-6)


def test_without_target_returns_stored_tree(tmp_path):
    params = _init(_model())
    bv.save_npz(tmp_path / "a.npz", params, scanned=True)
    raw = bv.load_npz(tmp_path / "a.npz")
    assert raw["img"]["Transformer"]["encoderblock"]["LayerNorm_0"]["bias"].shape == (3, 32)
    np.testing.assert_array_equal(raw["t"], params["t"])


def test_bfloat16_params_round_trip_exactly(tmp_path):
    params = jax.tree.map(lambda x: np.asarray(x).astype(jnp.bfloat16), _init(_model()))
    bv.save_npz(tmp_path / "a.npz", params)
    with np.load(tmp_path / "a.npz", allow_pickle=False) as f:
        assert f["params/t"].dtype == np.float32
    assert_bit_equal(bv.load_npz(tmp_path / "a.npz", params), params)


def test_shape_mismatch_lists_keys_and_both_shapes(tmp_path):
    bv.save_npz(tmp_path / "a.npz", _init(_model()))
    wider = Model(image={**IMG, "width": 48}, text=TXT, out_dim=(None, 16))
    with pytest.raises(bv.CheckpointMismatchError) as e:
        bv.load_npz(tmp_path / "a.npz", jax.eval_shape(lambda: _init(wider)))
    msg = str(e.value)
    assert "a.npz does not match the model" in msg
    assert "img/MAPHead_0/LayerNorm_0/bias: file (32,) vs model (48,)" in msg
    assert "(+" in msg  # Only the first few are listed.


def test_missing_and_unexpected_keys_are_named(tmp_path):
    params = _init(_model())
    bv.save_npz(tmp_path / "a.npz", params)
    no_bias = Model(image=IMG, text=TXT, out_dim=(None, 16), bias_init=None)
    with pytest.raises(bv.CheckpointMismatchError, match=r"b: not in model \(file \(1,\)\)"):
        bv.load_npz(tmp_path / "a.npz", _init(no_bias))
    del params["txt"]["head"]
    bv.save_npz(tmp_path / "c.npz", params)
    with pytest.raises(bv.CheckpointMismatchError,
                       match=r"txt/head/bias: missing in file \(model \(16,\)\)"):  # fmt: skip
        bv.load_npz(tmp_path / "c.npz", _init(_model()))


def test_refuses_pickled_object_arrays(tmp_path):
    np.savez(tmp_path / "evil.npz", **{"params/t": np.array([{"a": 1}], dtype=object)})
    with pytest.raises(ValueError, match="allow_pickle=False"):
        bv.load_npz(tmp_path / "evil.npz")


def test_no_params_prefix_is_a_clear_error(tmp_path):
    np.savez(tmp_path / "x.npz", **{"opt/mu": np.zeros(3)})
    with pytest.raises(bv.CheckpointMismatchError, match=r"no keys under 'params'/"):
        bv.load_npz(tmp_path / "x.npz")


def test_resample_posemb_to_new_resolution(tmp_path):
    params = _init(_model(), hw=16)  # 4x4 grid.
    grid = np.arange(16, dtype=np.float32).reshape(4, 4)  # Linear ramp in rows+cols.
    params["img"]["pos_embedding"] = np.broadcast_to(
        (grid.reshape(1, 16, 1) * np.ones(32, np.float32)), (1, 16, 32)).copy()  # fmt: skip
    bv.save_npz(tmp_path / "a.npz", params)
    target = jax.eval_shape(lambda: _init(_model(), hw=32))  # 8x8 grid.
    with pytest.raises(bv.CheckpointMismatchError, match=r"file \(1, 16, 32\) vs model"):
        bv.load_npz(tmp_path / "a.npz", target)
    got = bv.load_npz(tmp_path / "a.npz", target, resample_posemb=True)["img"]["pos_embedding"]
    assert got.shape == (1, 64, 32)
    g = got[0, :, 0].reshape(8, 8)
    # Linear interpolation keeps a linear ramp linear, with the corner values kept.
    assert g[0, 0] == 0 and g[-1, -1] == 15
    np.testing.assert_allclose(np.diff(g, 2, axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(np.diff(g, 2, axis=1), 0, atol=1e-5)
