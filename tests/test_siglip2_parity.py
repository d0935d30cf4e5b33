"""SigLIP 2 parity with transformers on tiny random-weight models (no downloads).

NaFlex: a random `Siglip2Model` saved with save_pretrained, loaded into our NaFlex two-tower
model; inputs are built by transformers' own `Siglip2ImageProcessorPil` from a batch mixing a
square, a wide, a tall and a tiny image padded to the patch budget (independent of our pp
ops). Image/text embeddings equal to 1e-5, logits to 1e-4. FixRes SigLIP 2 = `SiglipModel`
with a (small, here) Gemma-like vocabulary. Round trips ours -> HF -> ours and ours -> .npz
-> ours are bit-exact; transformers reads what we write.
"""

import json

import jax
import numpy as np
import pytest
from checks import assert_bit_equal, load_hf_scanned, perturbed_hf_model
from extras import require
from PIL import Image

from siglip_jax.checkpoints import big_vision as bv
from siglip_jax.checkpoints import hf, loader
from siglip_jax.models import naflex
from siglip_jax.models.two_towers import Model

torch = require("torch")
F = require("torch.nn.functional")
transformers = require("transformers")
convert_image_to_patches = require(
    "transformers.models.siglip2.image_processing_pil_siglip2").convert_image_to_patches

TEXT = dict(vocab_size=300, hidden_size=40, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=10, projection_size=32,
            bos_token_id=None, eos_token_id=1, pad_token_id=1)  # fmt: skip
VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
              patch_size=4, num_patches=16)  # fmt: skip
SIZES_HW = [(32, 32), (16, 64), (64, 16), (3, 5)]  # Square, wide, tall, tiny.
MAX_PATCHES = 24


@pytest.fixture(scope="module")
def naflex_dir(tmp_path_factory):
    cfg = transformers.Siglip2Config(text_config=TEXT, vision_config=VISION)
    torch.manual_seed(0)
    model = perturbed_hf_model(transformers.Siglip2Model(cfg), seed=0, noise=0.05, bias=-3.0)
    path = tmp_path_factory.mktemp("siglip2")
    model.save_pretrained(path)
    return path, model


@pytest.fixture(scope="module")
def naflex_batch():
    """HF processor outputs for mixed aspect ratios + texts with sticky-EOS padding."""
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
              for h, w in SIZES_HW]  # fmt: skip
    proc = transformers.Siglip2ImageProcessorPil(patch_size=4, max_num_patches=MAX_PATCHES)
    feats = proc(images, return_tensors="np")
    txt = rng.integers(3, 300, (len(SIZES_HW), 10)).astype(np.int64)
    txt[:, -4:] = 1
    return feats, txt


def _ours_image(feats):
    return {"patches": np.asarray(feats["pixel_values"], np.float32),
            "mask": np.asarray(feats["pixel_attention_mask"]).astype(bool),
            "spatial_shapes": np.asarray(feats["spatial_shapes"], np.int32)}  # fmt: skip


def _hf_naflex(model, feats, txt):
    t = {k: torch.from_numpy(np.asarray(v)) for k, v in feats.items()}
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(txt), pixel_values=t["pixel_values"],
                    pixel_attention_mask=t["pixel_attention_mask"],
                    spatial_shapes=t["spatial_shapes"])  # fmt: skip
    return out.image_embeds.numpy(), out.text_embeds.numpy(), out.logits_per_image.numpy()


def _ours(params, model_kwargs, image, txt):
    zimg, ztxt, out = jax.jit(Model(**model_kwargs).apply)(
        {"params": params}, image, txt.astype(np.int32))
    logits = out["t"] * np.asarray(zimg) @ np.asarray(ztxt).T + out["b"]
    return np.asarray(zimg), np.asarray(ztxt), np.asarray(logits)


def test_batch_mixes_aspect_ratios_with_padding(naflex_batch):
    feats, _ = naflex_batch
    shapes = [tuple(s) for s in feats["spatial_shapes"]]
    assert shapes == [(4, 4), (2, 8), (8, 2), (4, 6)]  # Grid 4x4 resized down, up and across.
    assert list(feats["pixel_attention_mask"].sum(1)) == [16, 16, 16, 24]  # 3 of 4 padded.


def test_posemb_resize_equals_torch_interpolate_antialias():
    """Our per-image resize equals F.interpolate(bilinear, antialias) of the grid, per image."""
    rng = np.random.default_rng(1)
    grid = rng.normal(size=(4, 4, 6)).astype(np.float32)
    shapes = np.array([[4, 4], [2, 8], [8, 2], [1, 3], [3, 7]], np.int32)
    # Jitted: outside jit, every jnp call with new shapes compiles a program of its own.
    got = np.asarray(jax.jit(naflex.resize_posemb, static_argnums=2)(grid, shapes, 25))
    scale_and_translate = jax.jit(jax.image.scale_and_translate,
                                  static_argnames=("shape", "spatial_dims", "method", "antialias"))
    src = torch.from_numpy(grid).permute(2, 0, 1)[None]
    for b, (h, w) in enumerate(shapes):
        ref = F.interpolate(src, size=(int(h), int(w)), mode="bilinear", align_corners=False,
                            antialias=True)[0].permute(1, 2, 0).reshape(h * w, -1).numpy()
        np.testing.assert_allclose(got[b, : h * w], ref, atol=1e-6)
        # big_vision naflex_vit.py resizes with jax.image.scale_and_translate: same numbers.
        bv_ref = scale_and_translate(
            grid, shape=(int(h), int(w), 6), spatial_dims=(0, 1),
            scale=np.array([h / 4, w / 4], np.float32), translation=np.zeros(2, np.float32),
            method="bilinear", antialias=True)
        np.testing.assert_allclose(got[b, : h * w], np.asarray(bv_ref).reshape(h * w, 6),
                                   atol=1e-6)
        # Padding tokens take the first position's embedding (as HF; they are masked anyway).
        np.testing.assert_allclose(got[b, h * w:], np.broadcast_to(ref[:1], (25 - h * w, 6)),
                                   atol=1e-6)


def test_naflex_matches_pytorch_on_mixed_aspect_ratios(naflex_dir, naflex_batch):
    path, torch_model = naflex_dir
    feats, txt = naflex_batch
    params, spec = hf.load_hf(path)
    assert spec["model"]["image"]["kind"] == "naflex" and spec["image_size"] is None
    assert spec["max_num_patches"] == 16 and spec["model"]["image"]["posemb_grid"] == 4
    zi_ref, zt_ref, logits_ref = _hf_naflex(torch_model, feats, txt)
    zi, zt, logits = _ours(params, spec["model"], _ours_image(feats), txt)
    np.testing.assert_allclose(zi, zi_ref, atol=1e-5)
    np.testing.assert_allclose(zt, zt_ref, atol=1e-5)
    np.testing.assert_allclose(logits, logits_ref, atol=1e-4)
    assert np.abs(logits_ref).max() > 1.0


def test_padding_content_is_ignored(naflex_dir, naflex_batch):
    """Garbage in the padded patches changes nothing (attention and MAP head are masked)."""
    path, _ = naflex_dir
    feats, txt = naflex_batch
    params, spec = hf.load_hf(path)
    image = _ours_image(feats)
    noisy = dict(image, patches=np.where(image["mask"][..., None], image["patches"],
                                         np.float32(50.0)))  # fmt: skip
    zi, _, _ = _ours(params, spec["model"], image, txt)
    zi_noisy, _, _ = _ours(params, spec["model"], noisy, txt)
    np.testing.assert_allclose(zi_noisy, zi, atol=1e-6)
    assert not np.allclose(noisy["patches"], image["patches"])


def test_naflex_scanned_model_matches_pytorch(naflex_dir, naflex_batch):
    path, torch_model = naflex_dir
    feats, txt = naflex_batch
    image = _ours_image(feats)
    kw, params = load_hf_scanned(path, image, txt)
    assert params["img"]["Transformer"]["encoderblock"]["LayerNorm_0"]["scale"].shape == (3, 32)
    zi_ref, _, logits_ref = _hf_naflex(torch_model, feats, txt)
    zi, _, logits = _ours(params, kw, image, txt)
    np.testing.assert_allclose(zi, zi_ref, atol=1e-5)
    np.testing.assert_allclose(logits, logits_ref, atol=1e-4)


def test_naflex_round_trip_hf_and_npz_bit_exact(naflex_dir, naflex_batch, tmp_path):
    path, torch_model = naflex_dir
    feats, txt = naflex_batch
    params, spec = hf.load_hf(path)
    params = {**jax.tree.map(lambda x: (x * 1.5).astype(np.float32), params), "t": params["t"]}
    out = tmp_path / "hf"
    hf.save_hf(out, params, spec["model"], None, spec["text_len"])
    back, spec2 = hf.load_hf(out)
    assert_bit_equal(back, params)
    assert spec2 == spec
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Siglip2Model"]
    reloaded, info = transformers.Siglip2Model.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    zi_ref, _, logits_ref = _hf_naflex(reloaded.eval(), feats, txt)
    zi, _, logits = _ours(params, spec["model"], _ours_image(feats), txt)
    np.testing.assert_allclose(zi, zi_ref, atol=1e-5)
    np.testing.assert_allclose(logits, logits_ref, atol=1e-4)
    ref_sd = {k: v.numpy() for k, v in torch_model.state_dict().items() if "position_ids" not in k}
    assert sorted(hf.read_hf_weights(out)) == sorted(ref_sd)
    # big_vision .npz, scanned layout (as released), back into an unscanned tree: bit-exact.
    bv.save_npz(tmp_path / "naflex.npz", params, scanned=True)
    npz, model_cfg = loader.load_params(tmp_path / "naflex.npz", spec["model"])
    stacked = npz["img"]["Transformer"]["encoderblock"]["MlpBlock_0"]["Dense_0"]["kernel"]
    assert stacked.shape[0] == 3  # Depth axis first, as big_vision's scanned checkpoints.
    assert_bit_equal(bv.to_layout(npz, scanned=False), params)
    assert model_cfg == spec["model"]


def test_big_vision_naflex_param_names_and_shapes():
    """Our NaFlex tree has big_vision naflex_vit.py's names and shapes (read from its code):
    Dense `embedding` [p·p·3, D], `pos_embedding` [G, G, D], encoder, MAPHead_0."""
    kw = dict(image=dict(kind="naflex", variant="mu/4", posemb_grid=4, pool_type="map"),
              text=dict(variant="mu", vocab_size=50), out_dim=(None, 32))  # fmt: skip
    image = naflex.example_input(2, 24, 4)
    shapes = jax.eval_shape(Model(**kw).init, jax.random.key(0), image,
                            jax.ShapeDtypeStruct((2, 8), np.int32))["params"]["img"]
    flat = {k: tuple(v.shape) for k, v in bv.flatten(shapes, "").items()}
    want = {"embedding/kernel": (48, 32), "embedding/bias": (32,), "pos_embedding": (4, 4, 32),
            "MAPHead_0/probe": (1, 1, 32), "Transformer/encoder_norm/scale": (32,),
            "Transformer/encoderblock_1/MultiHeadDotProductAttention_0/query/kernel": (32, 2, 16),
            "Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel": (32, 128)}  # fmt: skip
    for k, shape in want.items():
        assert flat[k] == shape, k
    assert "head" not in shapes


def test_conv_and_dense_patch_kernels_are_one_reshape():
    """A FixRes conv patch embedding equals the NaFlex Dense on HF-flattened patches."""
    rng = np.random.default_rng(2)
    conv = rng.normal(size=(4, 4, 3, 5)).astype(np.float32)
    image = torch.from_numpy(rng.normal(size=(3, 8, 12)).astype(np.float32))
    patches = convert_image_to_patches(image.numpy(), 4)  # HF's own patch flattening.
    assert patches.shape == (6, 48)
    dense = naflex.conv_to_dense_kernel(conv)
    ref = F.conv2d(image[None], torch.from_numpy(conv).permute(3, 2, 0, 1), stride=4)
    ref = ref[0].permute(1, 2, 0).reshape(6, 5).numpy()  # Row-major patch order.
    np.testing.assert_allclose(np.asarray(patches) @ dense, ref, atol=1e-5)
    np.testing.assert_array_equal(naflex.dense_to_conv_kernel(dense, 4), conv)


@pytest.fixture(scope="module")
def fixres_dir(tmp_path_factory):
    """SigLIP 2 FixRes = SiglipModel with a Gemma-like vocabulary (small here, same logic)."""
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, image_size=16, patch_size=4)  # fmt: skip
    cfg = transformers.SiglipConfig(text_config=TEXT, vision_config=vision)
    torch.manual_seed(1)
    model = perturbed_hf_model(transformers.SiglipModel(cfg), seed=1, noise=0.05, bias=-3.0)
    path = tmp_path_factory.mktemp("siglip2_fixres")
    model.save_pretrained(path)
    return path, model


def test_fixres_siglip2_matches_pytorch_and_round_trips(fixres_dir, tmp_path):
    path, torch_model = fixres_dir
    info = loader.checkpoint_info(path)
    assert info["image_size"] == (16, 16) and info["max_num_patches"] is None
    assert info["model"]["text"]["vocab_size"] == 300 and info["text_len"] == 10
    params, kw = loader.load_params(path)
    rng = np.random.default_rng(3)
    img = rng.uniform(-1, 1, (3, 16, 16, 3)).astype(np.float32)
    txt = rng.integers(2, 300, (3, 10)).astype(np.int64)
    txt[:, -2:] = 1
    with torch.no_grad():
        ref = torch_model(input_ids=torch.from_numpy(txt),
                          pixel_values=torch.from_numpy(img.transpose(0, 3, 1, 2)))  # fmt: skip
    zi, zt, logits = _ours(params, kw, img, txt)
    np.testing.assert_allclose(zi, ref.image_embeds.numpy(), atol=1e-5)
    np.testing.assert_allclose(zt, ref.text_embeds.numpy(), atol=1e-5)
    np.testing.assert_allclose(logits, ref.logits_per_image.numpy(), atol=1e-4)
    hf.save_hf(tmp_path / "hf", params, kw, 16, 10)
    assert_bit_equal(hf.load_hf(tmp_path / "hf")[0], params)
    bv.save_npz(tmp_path / "f.npz", params, scanned=True)
    assert_bit_equal(bv.to_layout(bv.read_npz(tmp_path / "f.npz"), scanned=False), params)


def test_loader_opens_siglip2_dir(naflex_dir, tmp_path):
    path, _ = naflex_dir
    (tmp_path / "d").mkdir()
    for f in ("config.json", "model.safetensors"):
        (tmp_path / "d" / f).write_bytes((path / f).read_bytes())
    (tmp_path / "d" / "tokenizer.model").write_bytes(b"x")
    info = loader.checkpoint_info(tmp_path / "d")
    assert info["format"] == "hf" and info["image_size"] is None
    assert info["max_num_patches"] == 16 and info["text_len"] == 10
    assert info["tokenizer"] == str(tmp_path / "d" / "tokenizer.model")
    assert info["model"]["image"]["kind"] == "naflex"


def test_bad_naflex_inputs_are_one_line_errors():
    kw = dict(image=dict(kind="naflex", variant="mu/4", posemb_grid=4),
              text=dict(variant="mu", vocab_size=50), out_dim=(None, 32))  # fmt: skip
    model = Model(**kw)
    with pytest.raises(ValueError, match="needs a dict with keys"):
        jax.eval_shape(model.init, jax.random.key(0),
                       jax.ShapeDtypeStruct((2, 16, 16, 3), np.float32), None)
    with pytest.raises(ValueError, match="expected 4\\*4\\*3 = 48"):
        jax.eval_shape(model.init, jax.random.key(0), naflex.example_input(2, 8, 5), None)
    with pytest.raises(KeyError, match="need kind='naflex'"):
        Model(image=dict(variant="mu/4", posemb_grid=4), text=dict(variant="mu")).init(
            jax.random.key(0), np.zeros((1, 8, 8, 3), np.float32), None)


def test_docs_loading_recipe_runs_and_matches_pytorch(naflex_dir, tmp_path):
    """docs/siglip2_models.md's NaFlex recipe, run as written on a random-weight transformers
    dir (its tokenizer, which the directory lacks, replaced by fixed ids)."""
    import pathlib
    import re

    path, torch_model = naflex_dir
    doc = (pathlib.Path(__file__).parents[1] / "docs" / "siglip2_models.md").read_text()
    code = re.search(r"<!-- recipe:naflex -->\n```python\n(.*?)```", doc, re.S).group(1)
    rng = np.random.default_rng(4)
    for name, hw in (("cat.png", (40, 36)), ("panorama.png", (20, 90))):
        Image.fromarray(rng.integers(0, 256, (*hw, 3), dtype=np.uint8)).save(tmp_path / name)
    code = code.replace('"siglip2-base-patch16-naflex"', repr(str(path)))
    code = code.replace('"cat.png"', repr(str(tmp_path / "cat.png")))
    code = code.replace('"panorama.png"', repr(str(tmp_path / "panorama.png")))
    ids = rng.integers(3, 300, (2, 10)).astype(np.int32)
    ids[:, -3:] = 1
    assert 'Tokenizer(info["tokenizer"])' in code
    code = code.replace('Tokenizer(info["tokenizer"])', "FixedIds()")

    class FixedIds:
        def encode_as(self, texts, convention):
            assert convention == "siglip2"
            return ids[: len(texts)]

    scope = {"FixedIds": FixedIds}
    exec(compile(code, "docs/siglip2_models.md", "exec"), scope)
    feats = scope["feats"]
    assert [tuple(s) for s in feats["spatial_shapes"]] != [(4, 4), (4, 4)]  # Not square.
    _, _, logits_ref = _hf_naflex(torch_model, feats, ids.astype(np.int64))
    want = torch.sigmoid(torch.from_numpy(logits_ref)).numpy()
    np.testing.assert_allclose(np.asarray(scope["probs"]), want, atol=1e-5)


def test_naflex_equals_fixres_vit_on_a_full_square_grid():
    """FixRes ViT params re-laid out (image_params_from_fixres) give the NaFlex tower the same
    function on a g×g-patch image: conv == Dense on HF-flattened patches, the g×g resize is
    the identity, and extra padded tokens change nothing."""
    fix = dict(image=dict(variant="mu/4", pool_type="map"), text=dict(variant="mu"),
               out_dim=(None, 32))  # fmt: skip
    nf = dict(fix, image=dict(fix["image"], kind="naflex", posemb_grid=4))
    rng = np.random.default_rng(5)
    img = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    params = Model(**fix).init(jax.random.key(0), img, None)["params"]
    params = jax.tree.map(lambda x: x + 0.05 * rng.normal(size=x.shape).astype(x.dtype), params)
    zi_fix, _, _ = Model(**fix).apply({"params": params}, img, None)
    patches = np.stack([convert_image_to_patches(x.transpose(2, 0, 1), 4) for x in img])
    n = 20  # 16 real patches + 4 padding.
    image = {"patches": np.pad(patches, ((0, 0), (0, n - 16), (0, 0)), constant_values=7.0),
             "mask": np.arange(n)[None].repeat(2, 0) < 16,
             "spatial_shapes": np.full((2, 2), 4, np.int32)}
    nf_params = {**params, "img": naflex.image_params_from_fixres(params["img"])}
    zi_nf, _, _ = Model(**nf).apply({"params": nf_params}, image, None)
    np.testing.assert_allclose(np.asarray(zi_nf), np.asarray(zi_fix), atol=1e-5)


def test_predict_on_a_siglip2_directory_matches_pytorch(naflex_dir, tmp_path):
    """predict() on a Siglip2Model directory with a Gemma-layout tokenizer.model: NaFlex
    preprocessing from preprocessor_config.json and siglip2 text rules, equal to HF's
    processor + Siglip2Model."""
    import shutil

    from siglip_jax.data.tokenizer import Tokenizer, train_sentencepiece
    from siglip_jax.predict import Predictor

    src, model = naflex_dir
    path = tmp_path / "siglip2"
    shutil.copytree(src, path)
    words = [f"w{i}" for i in range(120)] + ["cat", "dog", "a", "photo", "of"]
    train_sentencepiece([" ".join(words[i:i + 7]) for i in range(len(words))], 299,
                        str(path / "tokenizer.model"), layout="gemma")
    proc = transformers.Siglip2ImageProcessorPil(patch_size=4, max_num_patches=MAX_PATCHES)
    proc.save_pretrained(path)
    rng = np.random.default_rng(5)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in SIZES_HW]
    result = Predictor(str(path))(images, ["cat", "dog"], template="a photo of a {}.")

    feats = proc([Image.fromarray(x) for x in images], return_tensors="np")
    ids = Tokenizer(str(path / "tokenizer.model")).encode_as(
        ["a photo of a cat.", "a photo of a dog."], "siglip2", TEXT["max_position_embeddings"])
    want = _hf_naflex(model, feats, ids.astype(np.int64))
    np.testing.assert_allclose(result["logits"], want[2], atol=1e-4)
