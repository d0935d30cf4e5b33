"""Parity with the PyTorch reference: a small random transformers.SiglipModel, saved with
save_pretrained, loaded into our model; embeddings and logits equal to 1e-5 (f32). Round
trips ours -> HF -> ours are bit-exact; HF loads what we save. Needs the `parity` extra
(torch==2.13.0, transformers) ; skipped, naming the extra, when it is missing."""

import copy
import json

import jax
import numpy as np
import pytest
from checks import assert_bit_equal, load_hf_scanned
from extras import require

from siglip_jax.checkpoints import hf
from siglip_jax.models import params as P
from siglip_jax.models import variants
from siglip_jax.models.two_towers import Model

torch = require("torch")
transformers = require("transformers")

# Text width 40 projected to 32 (= image width, as SiglipModel requires): a non-square head.
TEXT = dict(vocab_size=50, hidden_size=40, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=8, projection_size=32,
            bos_token_id=None, eos_token_id=1, pad_token_id=1)  # fmt: skip
VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
              image_size=16, patch_size=4)  # fmt: skip


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random SiglipModel (every param perturbed, so zero-init biases are tested too)."""
    torch.manual_seed(0)
    cfg = transformers.SiglipConfig(text_config=TEXT, vision_config=VISION)
    model = transformers.SiglipModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        model.logit_scale.fill_(np.log(10.0))
        model.logit_bias.fill_(-3.0)
    path = tmp_path_factory.mktemp("hf")
    model.save_pretrained(path)
    return path, model


def _inputs(b=3, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.uniform(-1, 1, (b, 16, 16, 3)).astype(np.float32)
    txt = rng.integers(3, 50, (b, 8)).astype(np.int64)
    txt[:, -3:] = 1  # Sticky EOS padding, as the SigLIP tokenizer produces.
    return img, txt


def _hf_forward(model, img, txt):
    with torch.no_grad():  # No attention mask: SigLIP was trained without one.
        out = model(input_ids=torch.from_numpy(txt),
                    pixel_values=torch.from_numpy(img.transpose(0, 3, 1, 2)))  # fmt: skip
    return out.image_embeds.numpy(), out.text_embeds.numpy(), out.logits_per_image.numpy()


def _ours(params, model_kwargs, img, txt):
    model = Model(**model_kwargs)
    zimg, ztxt, out = jax.jit(model.apply)({"params": params}, img, txt.astype(np.int32))
    logits = out["t"] * np.asarray(zimg) @ np.asarray(ztxt).T + out["b"]
    return np.asarray(zimg), np.asarray(ztxt), np.asarray(logits)


def test_loaded_model_matches_pytorch(hf_dir):
    path, torch_model = hf_dir
    params, spec = hf.load_hf(path)
    assert spec["image_size"] == (16, 16) and spec["text_len"] == 8
    assert spec["model"]["out_dim"] == (None, 32)
    img, txt = _inputs()
    zi_ref, zt_ref, logits_ref = _hf_forward(torch_model, img, txt)
    zi, zt, logits = _ours(params, spec["model"], img, txt)
    np.testing.assert_allclose(zi, zi_ref, atol=1e-5)
    np.testing.assert_allclose(zt, zt_ref, atol=1e-5)
    np.testing.assert_allclose(logits, logits_ref, atol=1e-5)
    assert np.abs(logits_ref).max() > 1.0  # Non-trivial logits were compared.


def test_load_into_scanned_model_matches_pytorch(hf_dir):
    path, torch_model = hf_dir
    img, txt = _inputs(seed=1)
    kw, params = load_hf_scanned(path, img, txt)
    assert params["img"]["Transformer"]["encoderblock"]["LayerNorm_0"]["scale"].shape == (3, 32)
    zi_ref, zt_ref, logits_ref = _hf_forward(torch_model, img, txt)
    zi, zt, logits = _ours(params, kw, img, txt)
    np.testing.assert_allclose(zi, zi_ref, atol=1e-5)
    np.testing.assert_allclose(logits, logits_ref, atol=1e-5)


def test_round_trip_ours_hf_ours_is_bit_exact_and_hf_reads_it(hf_dir, tmp_path):
    path, torch_model = hf_dir
    params, spec = hf.load_hf(path)
    # Make our params differ from the HF ones so the re-read really comes from our file.
    params = {**jax.tree.map(lambda x: (x * 1.5).astype(np.float32), params), "t": params["t"]}
    hf.save_hf(tmp_path, params, spec["model"], spec["image_size"], spec["text_len"])
    back, spec2 = hf.load_hf(tmp_path)
    assert_bit_equal(back, params)
    assert spec2 == spec
    # transformers reads our directory with no missing/unexpected keys and computes our logits.
    reloaded, info = transformers.SiglipModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    img, txt = _inputs(seed=2)
    zi_ref, zt_ref, logits_ref = _hf_forward(reloaded.eval(), img, txt)
    zi, zt, logits = _ours(params, spec["model"], img, txt)
    np.testing.assert_allclose(zi, zi_ref, atol=1e-5)
    np.testing.assert_allclose(logits, logits_ref, atol=1e-5)
    # Saved tensors equal the original HF state dict x 1.5 (same names, same layout).
    ref_sd = {k: v.numpy() for k, v in torch_model.state_dict().items() if "position_ids" not in k}
    ours_sd = hf.read_hf_weights(tmp_path)
    assert sorted(ours_sd) == sorted(ref_sd)
    for k in ref_sd:
        scale = 1.0 if k == "logit_scale" else 1.5
        np.testing.assert_allclose(ours_sd[k], ref_sd[k] * scale, rtol=1e-6, err_msg=k)


def test_bfloat16_safetensors_are_read(hf_dir, tmp_path):
    _, torch_model = hf_dir
    copy.deepcopy(torch_model).to(torch.bfloat16).save_pretrained(tmp_path)
    params, _ = hf.load_hf(tmp_path)
    want = torch_model.vision_model.head.probe.detach().to(torch.bfloat16).float().numpy()
    got = np.asarray(params["img"]["MAPHead_0"]["probe"]).astype(np.float32)
    np.testing.assert_array_equal(got, want)


def test_published_style_config_omits_defaults(tmp_path):
    """Published config.json files list only non-default fields (4.x wrote torch_dtype)."""
    cfg = {"model_type": "siglip", "torch_dtype": "float32", "text_config": {},
           "vision_config": {"image_size": 384}}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    spec = hf.model_config_from_hf(tmp_path)
    assert hf.read_hf_config(tmp_path)["dtype"] == "float32"
    assert spec["image_size"] == (384, 384) and spec["text_len"] == 64
    assert spec["model"]["image"]["width"] == 768 and spec["model"]["out_dim"] == (None, 768)
    seed = variants.SIGLIP_SEEDS["siglip-base-patch16-384"]
    ours = P.count_model_params(seed["image"], seed["text"], seed["out_dim"], 384, 64)
    spec_count = P.count_model_params(**spec["model"], image_size=384, text_len=64)
    assert spec_count == ours


@pytest.mark.parametrize(
    "name", ["siglip-base-patch16-224", "siglip-large-patch16-256", "siglip-so400m-patch14-384"]
)
def test_param_counts_equal_pytorch_model_exactly(name):
    """Our eval_shape count equals transformers' count of the same config (meta device)."""
    seed = variants.SIGLIP_SEEDS[name]
    w, depth, mlp, heads = variants.SIZES[seed["text"]["variant"]]
    patch = int(seed["image"]["variant"].split("/")[1])
    tower = dict(hidden_size=w, intermediate_size=mlp, num_hidden_layers=depth,
                 num_attention_heads=heads)  # fmt: skip
    cfg = transformers.SiglipConfig(
        text_config=dict(tower, vocab_size=seed["text"]["vocab_size"]),
        vision_config=dict(tower, image_size=seed["image_size"], patch_size=patch),
    )
    with torch.device("meta"):
        n_torch = sum(p.numel() for p in transformers.SiglipModel(cfg).parameters())
    counts = P.count_model_params({**seed["image"], "scan": True},
                                  {**seed["text"], "scan": True}, seed["out_dim"],
                                  seed["image_size"], seed["text_len"])  # fmt: skip
    assert counts["total"] == n_torch


def test_unsupported_configs_are_clear_errors(tmp_path):
    with pytest.raises(hf.HFCheckpointError, match="hidden_act='gelu'"):
        hf.model_config_from_hf({"text_config": {"hidden_act": "gelu"}})
    with pytest.raises(hf.HFCheckpointError, match="image pool_type must be 'map'"):
        kw = dict(image=dict(variant="mu/4", pool_type="gap"), text=dict(variant="mu"))
        hf.hf_config_from_model({**kw, "out_dim": (None, 8)}, 16, 8)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        (tmp_path / "config.json").write_text("{}")
        hf.load_hf(tmp_path)


def test_weights_not_matching_config_name_keys(hf_dir, tmp_path):
    path, _ = hf_dir
    cfg = json.loads((path / "config.json").read_text())
    cfg["vision_config"]["num_hidden_layers"] = 4  # File has 3 layers.
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
    with pytest.raises(hf.HFCheckpointError, match=r"missing \['vision_model.encoder.layers.3"):
        hf.load_hf(tmp_path)


def test_readme_recipe_matches_hf_tokenizer_processor_and_model(tmp_path):
    """The README recipe (PIL resize, [-1, 1], our Tokenizer) equals HF's pipeline."""
    from PIL import Image

    from siglip_jax.data.tokenizer import Tokenizer, train_sentencepiece

    sents = [f"a photo of {i} {a}" for i in range(10) for a in ("cats", "dogs", "cars")]
    train_sentencepiece(sents, 40, str(tmp_path / "spiece.model"))
    vocab = Tokenizer(str(tmp_path / "spiece.model")).vocab_size
    text_cfg = {**TEXT, "vocab_size": vocab, "max_position_embeddings": 16}
    vision_cfg = {**VISION, "image_size": 32, "patch_size": 8}
    torch.manual_seed(1)
    model = transformers.SiglipModel(
        transformers.SiglipConfig(text_config=text_cfg, vision_config=vision_cfg)
    ).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    pixels = np.random.default_rng(0).uniform(0, 255, (48, 64, 3)).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "cats.png")
    captions = ["A photo of 2 cats!", "a photo of 2 dogs"]

    # Ours, as in the README.
    params, spec = hf.load_hf(tmp_path)
    image = Image.open(tmp_path / "cats.png").convert("RGB")
    image = image.resize(spec["image_size"][::-1], Image.BICUBIC)
    image = np.asarray(image, np.float32)[None] / 127.5 - 1
    text = Tokenizer(f"{tmp_path}/spiece.model").encode(
        captions, spec["text_len"], canonicalize=True
    )
    zimg, ztxt, out = Model(**spec["model"]).apply({"params": params}, image, text)
    probs = jax.nn.sigmoid(out["t"] * zimg @ ztxt.T + out["b"])

    # Hugging Face pipeline pieces.
    tok = transformers.SiglipTokenizer(str(tmp_path / "spiece.model"))
    ids = tok(captions, padding="max_length", max_length=16, truncation=True).input_ids
    np.testing.assert_array_equal(text, np.asarray(ids))
    proc = transformers.SiglipImageProcessor(size={"height": 32, "width": 32})
    px = proc(Image.open(tmp_path / "cats.png"), return_tensors="pt").pixel_values
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids), pixel_values=px).logits_per_image
    np.testing.assert_allclose(probs, torch.sigmoid(ref).numpy(), atol=1e-5)
