"""SigLIP 2 variants: every named checkpoint's parameter count equals transformers' count of
the same architecture (SiglipModel for FixRes, Siglip2Model for NaFlex, built on the meta
device: nothing allocated), and the tower shapes are the published ones."""

import pytest
from extras import require

from siglip_jax.models import params as P
from siglip_jax.models import variants
from siglip_jax.models.config import image_kwargs, text_kwargs

torch = require("torch")
transformers = require("transformers")

# HF config.json facts of the google/siglip2-* checkpoints (hidden, MLP, layers, heads), the
# same tables as big_vision vit.decode_variant; g-opt's text tower is So400m's projected to
# 1536 (big_vision SigLIP2_demo.ipynb), vocabulary 256000, 64 text positions.
HF_TOWERS = {
    "base": (768, 3072, 12, 12),
    "large": (1024, 4096, 24, 16),
    "so400m": (1152, 4304, 27, 16),
    "giant-opt": (1536, 6144, 40, 16),
}


def _hf_config(name):
    size = name.split("-")[1] if "giant" not in name else "giant-opt"
    patch = int(name.split("patch")[1].split("-")[0])
    res = name.rsplit("-", 1)[1]
    d, mlp, layers, heads = HF_TOWERS[size]
    td, tmlp, tlayers, theads = HF_TOWERS["so400m" if size == "giant-opt" else size]
    text = dict(vocab_size=256000, hidden_size=td, intermediate_size=tmlp,
                num_hidden_layers=tlayers, num_attention_heads=theads, projection_size=d)
    vision = dict(hidden_size=d, intermediate_size=mlp, num_hidden_layers=layers,
                  num_attention_heads=heads, patch_size=patch)
    if res == "naflex":
        return transformers.Siglip2Config(text_config=text,
                                          vision_config=dict(vision, num_patches=256))
    return transformers.SiglipConfig(text_config=text, vision_config=dict(vision,
                                                                          image_size=int(res)))


def _torch_count(cfg):
    cls = transformers.Siglip2Model if isinstance(cfg, transformers.Siglip2Config) else (
        transformers.SiglipModel)
    with torch.device("meta"):
        return sum(p.numel() for p in cls(cfg).parameters())


def test_every_issue_checkpoint_is_named():
    want = [f"siglip2-base-patch16-{r}" for r in (224, 256, 384, 512)] + [
        "siglip2-base-patch32-256"] + [f"siglip2-large-patch16-{r}" for r in (256, 384, 512)] + [
        f"siglip2-so400m-patch14-{r}" for r in (224, 384)] + [
        f"siglip2-so400m-patch16-{r}" for r in (256, 384, 512)] + [
        f"siglip2-giant-opt-patch16-{r}" for r in (256, 384)] + [
        "siglip2-base-patch16-naflex", "siglip2-so400m-patch16-naflex"]
    assert sorted(variants.SIGLIP2_SEEDS) == sorted(want)
    for seed in variants.SIGLIP2_SEEDS.values():
        assert seed["text"]["vocab_size"] == 256000 and seed["text_len"] == 64


@pytest.mark.parametrize("name", list(variants.SIGLIP2_SEEDS))
def test_param_count_equals_transformers(name):
    seed = variants.SIGLIP2_SEEDS[name]
    ours = P.count_model_params({**seed["image"], "scan": True}, {**seed["text"], "scan": True},
                                seed["out_dim"], seed["image_size"] or seed["max_num_patches"],
                                seed["text_len"])  # fmt: skip
    assert ours["total"] == _torch_count(_hf_config(name))


def test_g_opt_shapes():
    seed = variants.SIGLIP2_SEEDS["siglip2-giant-opt-patch16-384"]
    assert image_kwargs(seed["image"]) == dict(
        width=1536, depth=40, mlp_dim=6144, num_heads=16, patch_size=16, pool_type="map")
    assert text_kwargs(seed["text"])["width"] == 1152
    assert seed["out_dim"] == (None, 1536)


def test_table_lists_every_seed():
    rows = [dict(name="x", card_image_m=86, img=93 * 10**6, txt=282 * 10**6,
                 total=375 * 10**6 + 2)]
    assert "| x | 93.0 M | 282.0 M | 375.0 M | 86 M |" in P.siglip2_markdown_table(rows)
