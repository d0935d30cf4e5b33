"""Towers and two-tower model: shapes, big_vision param names, float64 numpy reference,
no text mask, row-major patches, scan == unscanned, remat, dtype, dropout, config errors."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from siglip_jax.models.two_towers import Model
from siglip_jax.models.variants import ConfigKeyError

MU_IMG = dict(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=4)
MU_TXT = dict(vocab_size=50, width=32, depth=2, mlp_dim=64, num_heads=2)
DEMO = dict(
    image=dict(width=64, depth=3, mlp_dim=256, num_heads=4, patch_size=4, pool_type="gap",
               posemb="learn"),
    text=dict(vocab_size=64, width=64, depth=2, mlp_dim=256, num_heads=4, pool_type="last"),
    out_dim=64,
)  # fmt: skip


def _inputs(b=3, hw=16, seq=6, vocab=50, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.uniform(-1, 1, (b, hw, hw, 3)).astype(np.float32)
    txt = rng.integers(3, vocab, (b, seq)).astype(np.int32)
    txt[:, -2:] = 1  # Sticky EOS padding.
    return jnp.asarray(img), jnp.asarray(txt)


def _params(model, img, txt, seed=0):
    """Random params of the model's shapes (numpy; much cheaper than JAX init on CPU)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), img, txt)["params"]
    rng = np.random.default_rng(seed)

    def fill(path, x):
        v = 0.2 * rng.standard_normal(x.shape)
        return (v + 1.0 if path[-1].key == "scale" else v).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def _apply(model, **kw):
    """Jitted `model.apply` taking (params, image, text)."""
    return jax.jit(lambda p, i, t: model.apply({"params": p}, i, t, **kw))


def _flat(params):
    return {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(params).items()}


# ---------------------------------------------------------------- numpy float64 reference.
def _ln(x, p):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-6) * p["scale"] + p["bias"]


def _gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _mha(xq, xkv, p):
    q = np.einsum("bld,dhk->blhk", xq, p["query"]["kernel"]) + p["query"]["bias"]
    k = np.einsum("bld,dhk->blhk", xkv, p["key"]["kernel"]) + p["key"]["bias"]
    v = np.einsum("bld,dhk->blhk", xkv, p["value"]["kernel"]) + p["value"]["bias"]
    s = np.einsum("bqhk,bmhk->bhqm", q, k) / np.sqrt(q.shape[-1])
    a = np.exp(s - s.max(-1, keepdims=True))
    a = a / a.sum(-1, keepdims=True)
    o = np.einsum("bhqm,bmhk->bqhk", a, v)
    return np.einsum("bqhk,hkd->bqd", o, p["out"]["kernel"]) + p["out"]["bias"]


def _mlp(x, p):
    h = _gelu_tanh(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
    return h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]


def _encoder(x, p, depth):
    for i in range(depth):
        blk = p[f"encoderblock_{i}"]
        y = _ln(x, blk["LayerNorm_0"])
        x = x + _mha(y, y, blk["MultiHeadDotProductAttention_0"])
        x = x + _mlp(_ln(x, blk["LayerNorm_1"]), blk["MlpBlock_0"])
    return _ln(x, p["encoder_norm"])


def _map_head(x, p):
    probe = np.tile(p["probe"], [x.shape[0], 1, 1])
    x = _mha(probe, x, p["MultiHeadDotProductAttention_0"])
    x = x + _mlp(_ln(x, p["LayerNorm_0"]), p["MlpBlock_0"])
    return x[:, 0]


def _np_image(img, p, patch, depth, pool):
    b, h, w, c = img.shape
    gh, gw = h // patch, w // patch
    patches = img.reshape(b, gh, patch, gw, patch, c).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(b, gh * gw, patch * patch * c)  # Row-major patch order.
    kernel = p["embedding"]["kernel"].reshape(patch * patch * c, -1)
    x = patches @ kernel + p["embedding"]["bias"] + p["pos_embedding"]
    x = _encoder(x, p["Transformer"], depth)
    x = _map_head(x, p["MAPHead_0"]) if pool == "map" else x.mean(1)
    if "head" in p:
        x = x @ p["head"]["kernel"] + p["head"]["bias"]
    return x


def _np_text(txt, p, depth):
    x = p["Embed_0"]["embedding"][txt] + p["pos_embedding"]
    x = _encoder(x, p["Encoder_0"], depth)[:, -1]
    return x @ p["head"]["kernel"] + p["head"]["bias"]


def _np_normalize(z):
    return z / (np.linalg.norm(z, axis=-1, keepdims=True) + 1e-8)


# ------------------------------------------------------------------------------- tests.
def test_demo_config_shapes_unit_norm_and_scalars():
    model = Model(**DEMO)
    img, txt = _inputs(b=4, hw=32, seq=8, vocab=64)
    params = jax.jit(model.init)(jax.random.key(0), img, txt)["params"]
    assert params["t"].shape == (1,) and params["b"].shape == (1,)
    zimg, ztxt, out = jax.jit(model.apply)({"params": params}, img, txt)
    assert zimg.shape == (4, 64) and ztxt.shape == (4, 64)
    assert zimg.dtype == jnp.float32 and ztxt.dtype == jnp.float32
    np.testing.assert_allclose(np.linalg.norm(zimg, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(ztxt, axis=1), 1.0, atol=1e-5)
    assert out["t_prime"].shape == () and out["b"].shape == ()
    np.testing.assert_allclose(out["t_prime"], np.log(10.0), rtol=1e-6)
    np.testing.assert_allclose(out["t"], 10.0, rtol=1e-6)
    np.testing.assert_allclose(out["b"], -10.0)
    # One tower at a time (e.g. zero-shot classifier building).
    zi_only, zt_none, _ = _apply(model)(params, img, None)
    np.testing.assert_allclose(zi_only, zimg, atol=1e-6)
    assert zt_none is None


def test_no_bias_param_when_bias_init_none():
    model = Model(image=MU_IMG, text=MU_TXT, out_dim=8, bias_init=None, temperature_init=1.0)
    img, txt = _inputs()
    params = _params(model, img, txt)
    assert "b" not in params
    _, _, out = _apply(model)(params, img, txt)
    assert "b" not in out


@pytest.mark.parametrize("scan", [False, True])
def test_param_tree_matches_big_vision_names(scan):
    d, h, mlp, depth = 32, 2, 64, 2
    model = Model(
        image={**MU_IMG, "pool_type": "map", "scan": scan},
        text={**MU_TXT, "scan": scan},
        out_dim=(None, 16),  # SigLIP: no image head, text head to 16.
    )
    img, txt = _inputs(hw=16, seq=6)
    shapes = jax.eval_shape(model.init, jax.random.key(0), img, txt)["params"]
    got = {k: v.shape for k, v in _flat(shapes).items()}

    def block(prefix):
        lead = (depth,) if scan else ()
        names = (
            [f"{prefix}/encoderblock"]
            if scan
            else [f"{prefix}/encoderblock_{i}" for i in range(depth)]
        )
        out = {}
        for n in names:
            for ln in ("LayerNorm_0", "LayerNorm_1"):
                out[f"{n}/{ln}/scale"] = lead + (d,)
                out[f"{n}/{ln}/bias"] = lead + (d,)
            out.update(_attn(f"{n}/MultiHeadDotProductAttention_0", lead))
            out.update(_mlp_shapes(f"{n}/MlpBlock_0", lead))
        out[f"{prefix}/encoder_norm/scale"] = (d,)
        out[f"{prefix}/encoder_norm/bias"] = (d,)
        return out

    def _attn(n, lead=()):
        out = {}
        for qkv in ("query", "key", "value"):
            out[f"{n}/{qkv}/kernel"] = lead + (d, h, d // h)
            out[f"{n}/{qkv}/bias"] = lead + (h, d // h)
        out[f"{n}/out/kernel"] = lead + (h, d // h, d)
        out[f"{n}/out/bias"] = lead + (d,)
        return out

    def _mlp_shapes(n, lead=()):
        return {
            f"{n}/Dense_0/kernel": lead + (d, mlp),
            f"{n}/Dense_0/bias": lead + (mlp,),
            f"{n}/Dense_1/kernel": lead + (mlp, d),
            f"{n}/Dense_1/bias": lead + (d,),
        }

    want = {
        "t": (1,), "b": (1,),
        "img/embedding/kernel": (4, 4, 3, d), "img/embedding/bias": (d,),
        "img/pos_embedding": (1, 16, d),
        "img/MAPHead_0/probe": (1, 1, d),
        "img/MAPHead_0/LayerNorm_0/scale": (d,), "img/MAPHead_0/LayerNorm_0/bias": (d,),
        **_attn("img/MAPHead_0/MultiHeadDotProductAttention_0"),
        **_mlp_shapes("img/MAPHead_0/MlpBlock_0"),
        **block("img/Transformer"),
        "txt/Embed_0/embedding": (50, d), "txt/pos_embedding": (1, 6, d),
        **block("txt/Encoder_0"),
        "txt/head/kernel": (d, 16), "txt/head/bias": (16,),
    }  # fmt: skip
    assert got == want


@pytest.mark.parametrize("pool", ["map", "gap"])
def test_towers_match_numpy_float64_reference(pool):
    model = Model(image={**MU_IMG, "pool_type": pool}, text=MU_TXT, out_dim=(24, 16))
    img, txt = _inputs(hw=16, seq=6)
    params = _params(model, img, txt)  # Random biases too, so every param is exercised.
    zimg, ztxt, _ = _apply(model)(params, img, txt)
    p64 = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    ref_img = _np_normalize(_np_image(np.asarray(img, np.float64), p64["img"], 4, 2, pool))
    ref_txt = _np_normalize(_np_text(np.asarray(txt), p64["txt"], 2))
    np.testing.assert_allclose(zimg, ref_img, atol=2e-5)
    np.testing.assert_allclose(ztxt, ref_txt, atol=2e-5)


def test_text_tower_has_no_attention_mask():
    model = Model(image=None, text=MU_TXT, out_dim=16)
    _, txt = _inputs(seq=6)
    params = _params(model, None, txt)
    apply = jax.jit(lambda t: model.apply({"params": params}, None, t))
    _, base, out = apply(txt)
    # Changing the FIRST token changes the LAST-token embedding (no causal mask blocks it) ...
    _, changed, _ = apply(txt.at[:, 0].set(txt[:, 0] % 40 + 5))
    assert np.all(np.abs(np.asarray(changed - base)).max(axis=1) > 1e-4)
    # ... changing a padding (EOS) token changes it (no padding mask) ...
    _, pad_changed, _ = apply(txt.at[:, -2].set(7))
    assert np.all(np.abs(np.asarray(pad_changed - base)).max(axis=1) > 1e-4)
    # ... and changing the LAST token changes the FIRST position's encoding (not causal).
    _, _, out2 = apply(txt.at[:, -1].set(9))
    diff = np.abs(np.asarray(out2["txt/encoded"][:, 0] - out["txt/encoded"][:, 0]))
    assert np.all(diff.max(axis=1) > 1e-4)


def test_image_patches_are_row_major():
    """Token i*gw + j of the patch embedding is the patch at grid row i, column j."""
    model = Model(image={**MU_IMG, "pool_type": "gap"}, text=None, out_dim=None)
    img, _ = _inputs(b=2, hw=16)
    img = img[:, :12]  # Non-square (12 x 16 -> 3 x 4 grid) so rows and columns differ.
    params = _params(model, img, None)
    _, state = _apply(model, capture_intermediates=True)(params, img, None)
    stem = np.asarray(state["intermediates"]["img"]["embedding"]["__call__"][0])
    assert stem.shape == (2, 3, 4, 32)
    k = np.asarray(params["img"]["embedding"]["kernel"], np.float64)
    bias = np.asarray(params["img"]["embedding"]["bias"], np.float64)
    x = np.asarray(img, np.float64)
    tokens = stem.reshape(2, 12, 32)  # The reshape the tower does after the conv.
    for i in range(3):
        for j in range(4):
            patch = x[:, 4 * i : 4 * i + 4, 4 * j : 4 * j + 4, :]
            ref = np.einsum("bhwc,hwcd->bd", patch, k) + bias
            np.testing.assert_allclose(tokens[:, i * 4 + j], ref, atol=1e-5)


def _stack_blocks(tower_params, enc_name, depth):
    """Independent re-layout: encoderblock_{i} -> encoderblock with a leading depth axis."""
    p = flax.core.unfreeze(tower_params)
    enc = dict(p[enc_name])
    blocks = [enc.pop(f"encoderblock_{i}") for i in range(depth)]
    enc["encoderblock"] = jax.tree.map(lambda *xs: np.stack(xs), *blocks)
    p[enc_name] = enc
    return p


def test_scan_and_unscanned_give_same_outputs():
    img, txt = _inputs()
    kw = dict(out_dim=(8, 8))
    plain = Model(image={**MU_IMG, "pool_type": "map"}, text=MU_TXT, **kw)
    scanned = Model(
        image={**MU_IMG, "pool_type": "map", "scan": True}, text={**MU_TXT, "scan": True}, **kw
    )
    params = _params(plain, img, txt)
    sparams = dict(params)
    sparams["img"] = _stack_blocks(params["img"], "Transformer", 2)
    sparams["txt"] = _stack_blocks(params["txt"], "Encoder_0", 2)
    # The stacked tree has exactly the structure the scanned model initialises.
    sshape = jax.eval_shape(scanned.init, jax.random.key(0), img, txt)["params"]
    assert jax.tree.map(lambda x: x.shape, sshape) == jax.tree.map(np.shape, sparams)
    zi, zt, _ = _apply(plain)(params, img, txt)
    szi, szt, _ = _apply(scanned)(sparams, img, txt)
    np.testing.assert_allclose(szi, zi, atol=1e-6)
    np.testing.assert_allclose(szt, zt, atol=1e-6)


def test_remat_keeps_values_and_gradients():
    img, txt = _inputs()  # Scanned image tower, unscanned text tower: both remat paths.
    base = Model(image={**MU_IMG, "scan": True}, text=MU_TXT, out_dim=8)
    remat = Model(
        image={**MU_IMG, "scan": True, "remat_policy": "nothing_saveable"},
        text={**MU_TXT, "remat_policy": "dots_saveable"},
        out_dim=8,
    )
    params = _params(base, img, txt)

    def loss(m):
        def f(p):
            zi, zt, _ = m.apply({"params": p}, img, txt)
            return jnp.sum(zi @ zt.T * jnp.arange(3.0)[:, None])

        return jax.value_and_grad(f)

    v0, g0 = jax.jit(loss(base))(params)
    v1, g1 = jax.jit(loss(remat))(params)
    np.testing.assert_allclose(v1, v0, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g1, g0)


def test_bfloat16_compute_keeps_float32_params_and_embeddings():
    img, txt = _inputs()
    model = Model(
        image={**MU_IMG, "dtype": "bfloat16"}, text={**MU_TXT, "dtype": "bfloat16"}, out_dim=8
    )
    shapes = jax.eval_shape(model.init, jax.random.key(0), img, txt)["params"]
    assert {x.dtype for x in jax.tree.leaves(shapes)} == {jnp.dtype("float32")}
    params = _params(model, img, txt)
    zi, zt, out = _apply(model)(params, img, txt)
    assert zi.dtype == jnp.float32 and zt.dtype == jnp.float32
    assert out["img/encoded"].dtype == jnp.float32  # Matmuls in bf16, residual stream f32.
    ref = Model(image=MU_IMG, text=MU_TXT, out_dim=8)
    rzi, rzt, _ = _apply(ref)(params, img, txt)
    assert 0 < np.abs(np.asarray(zi - rzi)).max() < 0.1  # Close, but really computed in bf16.


def test_dropout_only_in_training():
    img, txt = _inputs()
    model = Model(image={**MU_IMG, "dropout": 0.5}, text={**MU_TXT, "dropout": 0.5}, out_dim=8)
    params = _params(model, img, txt)
    train = jax.jit(
        lambda p, key, train: model.apply(
            {"params": p}, img, txt, train=train, rngs={"dropout": key}
        )[0],
        static_argnames="train",
    )
    # Evaluation ignores the dropout key; training uses it.
    np.testing.assert_array_equal(train(params, jax.random.key(1), False),
                                  train(params, jax.random.key(2), False))  # fmt: skip
    a, b = train(params, jax.random.key(1), True), train(params, jax.random.key(2), True)
    assert np.abs(np.asarray(a - b)).max() > 1e-3


def test_tok_pool_and_sincos_posemb():
    img, _ = _inputs()
    model = Model(image={**MU_IMG, "pool_type": "tok", "posemb": "sincos2d"}, text=None, out_dim=8)
    params = _params(model, img, None)
    assert "pos_embedding" not in params["img"] and params["img"]["cls"].shape == (1, 1, 32)
    zi, _, out = _apply(model)(params, img, None)
    assert zi.shape == (3, 8) and out["img/encoded"].shape == (3, 17, 32)  # 16 patches + cls.


def test_sincos2d_values():
    from siglip_jax.models.vit import posemb_sincos_2d

    pe = np.asarray(posemb_sincos_2d(2, 3, 8))  # 4 blocks of width//4 = 2 frequencies.
    assert pe.shape == (1, 6, 8)
    omega = 1.0 / 10_000.0 ** np.array([0.0, 1.0])
    # Position index 5 = row 1, column 2: [sin(x w), cos(x w), sin(y w), cos(y w)].
    want = np.concatenate([np.sin(2 * omega), np.cos(2 * omega), np.sin(omega), np.cos(omega)])
    np.testing.assert_allclose(pe[0, 5], want, atol=1e-6)


def test_pool_none_keeps_tokens():
    img, _ = _inputs()
    model = Model(image={**MU_IMG, "pool_type": "none"}, text=None, out_dim=None)
    params = _params(model, img, None)
    zi, _, _ = _apply(model)(params, img, None)
    assert zi.shape == (3, 16, 32)


def test_variant_fills_defaults_and_keys_override():
    from siglip_jax.models.config import image_kwargs, text_kwargs
    from siglip_jax.models.variants import decode_variant

    assert decode_variant("So400m/14") == dict(
        width=1152, depth=27, mlp_dim=4304, num_heads=16, patch_size=14
    )
    assert image_kwargs({"variant": "B/16", "depth": 3, "mlp_dim": None})["depth"] == 3
    assert image_kwargs({"variant": "B/16", "mlp_dim": None})["mlp_dim"] == 3072
    assert text_kwargs({"variant": "L"})["width"] == 1024
    with pytest.raises(ConfigKeyError, match="must not have a /patch"):
        text_kwargs({"variant": "B/16"})
    with pytest.raises(ConfigKeyError, match="unknown model variant 'Q/16'"):
        image_kwargs({"variant": "Q/16"})


def test_unknown_config_key_lists_valid_keys():
    img, txt = _inputs()
    model = Model(image={**MU_IMG, "widht": 3}, text=MU_TXT, out_dim=8)
    with pytest.raises(
        ConfigKeyError,
        match=r"unknown image config key\(s\) \['widht'\]; "
        r"valid keys: \['variant', 'width'",
    ):
        jax.eval_shape(model.init, jax.random.key(0), img, txt)
    with pytest.raises(ConfigKeyError, match="remat"):
        _params(Model(image=MU_IMG, text={**MU_TXT, "remat": 1}, out_dim=8), img, txt)
    with pytest.raises(ValueError, match="unknown remat_policy 'bogus'"):
        _params(Model(image={**MU_IMG, "remat_policy": "bogus"}, text=MU_TXT, out_dim=8), img, txt)


def test_accepts_config_dict():
    import ml_collections

    img, txt = _inputs()
    cfg = ml_collections.ConfigDict(dict(image=MU_IMG, text=MU_TXT))
    model = Model(image=cfg.image, text=cfg.text, out_dim=8)
    params = _params(model, img, txt)
    assert params["img"]["embedding"]["kernel"].shape == (4, 4, 3, 32)
