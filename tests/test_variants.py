"""Variant names and parameter counts: model-card counts, a hand formula, no allocation."""

import jax
import pytest

from siglip_jax.config import ConfigError
from siglip_jax.data.locca import DecoderVocab
from siglip_jax.models import params as P
from siglip_jax.models import variants
from siglip_jax.models.build import make_model
from siglip_jax.models.config import ModelConfig, decoder_vocab, model_kwargs, text_kwargs
from siglip_jax.models.two_towers import Model


def test_every_size_decodes_and_big_vision_values():
    # Values from big_vision vit.decode_variant / Table 2 of arXiv:2106.04560.
    want = {
        "Ti": (192, 12, 768, 3), "S": (384, 12, 1536, 6), "M": (512, 12, 2048, 8),
        "B": (768, 12, 3072, 12), "L": (1024, 24, 4096, 16), "So400m": (1152, 27, 4304, 16),
        "H": (1280, 32, 5120, 16), "g": (1408, 40, 6144, 16),
    }  # fmt: skip
    for size, (w, d, m, h) in want.items():
        got = variants.decode_variant(f"{size}/14")
        assert got == dict(width=w, depth=d, mlp_dim=m, num_heads=h, patch_size=14)
        assert text_kwargs({"variant": size})["width"] == w


@pytest.mark.parametrize("name", list(variants.SIGLIP_SEEDS))
def test_seed_counts_match_model_cards_within_1_percent(name):
    seed = variants.SIGLIP_SEEDS[name]
    counts = P.count_model_params(
        {**seed["image"], "scan": True}, {**seed["text"], "scan": True},
        seed["out_dim"], seed["image_size"], seed["text_len"],
    )  # fmt: skip
    assert counts["total"] == counts["img"] + counts["txt"] + 2  # + t and b.
    assert abs(counts["total"] / (seed["card_params_m"] * 1e6) - 1) < 0.01, counts


def _vit_formula(d, depth, mlp, patch, res, vocab, text_len):
    """Hand count of SigLIP (MAP image head, no image projection, text head d -> d)."""
    attn = 4 * (d * d + d)
    mlp_p = d * mlp + mlp + mlp * d + d
    block = 2 * 2 * d + attn + mlp_p
    img = (patch * patch * 3 * d + d) + (res // patch) ** 2 * d + depth * block + 2 * d
    img += d + attn + 2 * d + mlp_p  # MAP head: probe, attention, LayerNorm, MLP.
    txt = vocab * d + text_len * d + depth * block + 2 * d + (d * d + d)
    return img, txt


@pytest.mark.parametrize("name", ["siglip-base-patch16-224", "siglip-so400m-patch14-384"])
def test_counts_equal_hand_formula(name):
    seed = variants.SIGLIP_SEEDS[name]
    w, depth, mlp, _ = variants.SIZES[seed["image"]["variant"].split("/")[0]]
    patch = int(seed["image"]["variant"].split("/")[1])
    img, txt = _vit_formula(w, depth, mlp, patch, seed["image_size"],
                            seed["text"]["vocab_size"], seed["text_len"])  # fmt: skip
    counts = P.count_model_params(
        seed["image"], seed["text"], seed["out_dim"], seed["image_size"], seed["text_len"]
    )
    assert (counts["img"], counts["txt"]) == (img, txt)


def test_counting_does_not_allocate():
    seed = variants.SIGLIP_SEEDS["siglip-so400m-patch14-384"]
    model = Model(image={**seed["image"], "scan": True}, text={**seed["text"], "scan": True},
                  out_dim=seed["out_dim"])  # fmt: skip
    shapes = P.param_shapes(model, 384, 64)
    leaves = jax.tree.leaves(shapes)
    assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    assert shapes["img"]["Transformer"]["encoderblock"]["MlpBlock_0"]["Dense_0"][
        "kernel"].shape == (27, 1152, 4304)  # fmt: skip


def test_markdown_table_lists_every_seed():
    rows = [dict(name="x", card_params_m=1, img=10**6, txt=2 * 10**6, total=3 * 10**6 + 2)]
    table = P.markdown_table(rows)
    assert "| x | 1.0 M | 2.0 M | 3.0 M | 1 M |" in table


# ----------------------------------------------------------------------------- the record


def test_model_record_resolves_towers_and_round_trips():
    raw = dict(image=dict(variant="mu/8", pool_type="map"),
               text=dict(variant="mu", vocab_size=50, width=None), out_dim=[None, 32])
    model = ModelConfig.parse(raw)
    assert (model.image.kind, model.image.variant, model.image.patch_size) == ("vit", "mu/8",
                                                                               (8, 8))
    assert model.image.width == 32 and dict(model.image.overrides) == {"pool_type": "map"}
    assert (model.text.variant, model.text.vocab_size, model.text.width) == ("mu", 50, 32)
    assert model.out_dim == (None, 32) and model.decoder is None
    kwargs = model_kwargs(model)
    assert kwargs["image"] == raw["image"] and kwargs["text"] == raw["text"]
    assert kwargs["out_dim"] == [None, 32]
    assert ModelConfig.parse(kwargs) == model  # The record's dict form parses back to it.
    net = make_model(model)
    assert isinstance(net, Model) and dict(net.image) == raw["image"]
    naflex = ModelConfig.parse(dict(image=dict(kind="naflex", variant="mu/16", patch_size=(4, 2))))
    assert naflex.image.kind == "naflex" and naflex.image.patch_size == (4, 2)
    assert model_kwargs(naflex)["image"] == {"variant": "mu/16", "kind": "naflex",
                                             "patch_size": [4, 2]}
    assert ModelConfig.parse({}).text.vocab_size == 32_000  # TextTransformer's default.


def test_decoder_record_follows_the_text_tower_and_gives_the_vocabulary():
    model = ModelConfig.parse(dict(text=dict(variant="mu", vocab_size=50, dtype="bfloat16"),
                                   decoder=dict(max_len=8, num_bins=7)))
    dec = model.decoder
    assert (dec.width, dec.depth, dec.mlp_dim, dec.num_heads) == (32, 1, 128, 2)
    assert (dec.max_len, dec.num_bins, dec.dtype, dec.scan) == (8, 7, "bfloat16", False)
    assert decoder_vocab(model) == DecoderVocab(50, 7)
    assert ModelConfig.parse(model_kwargs(model)).decoder == dec
    assert decoder_vocab(ModelConfig.parse({})) is None


@pytest.mark.parametrize("raw, message", [
    (dict(colour=1), "unknown config key model.colour"),
    (dict(image=dict(variant="mu/8", colour=1)), "config.model: unknown image config key"),
    (dict(text=dict(variant="Q")), "config.model: unknown model variant 'Q'"),
    (dict(decoder=dict(layers=2)), r"config.model: unknown model.decoder key\(s\) \['layers'\]"),
    (dict(decoder=3), "config key model.decoder expects a dict"),
    (dict(temperature_init="hot"), "config key model.temperature_init expects a finite number"),
])
def test_model_record_errors_name_the_key(raw, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.parse(raw)
