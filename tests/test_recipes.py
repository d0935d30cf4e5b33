"""The paper recipes in configs/: each plans cleanly on its intended slice, has the paper's
hyper-parameters, the variant table's parameter count, and a docstring that says how to
launch it and what to expect."""

from __future__ import annotations

import math
import pathlib
import re

import pytest

from siglip_jax import plan, planner, recipes
from siglip_jax.config import ConfigError, load_config
from siglip_jax.models import variants
from siglip_jax.schema import parse

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"
DATA = "data=/tmp"  # Any existing local path stands in for the shards.

# config -> (argument, intended slice). Every file in configs/ must be listed here.
INTENDED = {
    "demo.py": ("", "cpu-8"),
    "siglip_b16_224.py": (DATA, "v4-64"),
    "siglip_b16_256.py": (DATA, "v4-128"),
    "siglip_b16_384.py": (DATA, "v4-256"),
    "siglip_l16_256.py": (DATA, "v4-128"),
    "siglip_so400m14_384.py": (DATA, "v4-512"),
    "lit_b16.py": (DATA, "v4-32"),
    "siglip_finetune_res.py": (f"{DATA},init=/tmp,res=384", "v4-256"),
    "demo_naflex.py": ("", "cpu-8"),
    "siglip2_b16_256.py": (f"{DATA},tokenizer=gs://b/gemma.model", "v4-128"),
    "siglip2_naflex_b16.py": (f"{DATA},init=/tmp,tokenizer=gs://b/gemma.model", "v4-32"),
    "siglip2_full_b16_256.py": (f"{DATA},tokenizer=gs://b/gemma.model", "v4-512"),
    "demo_siglip2.py": ("", "cpu-8"),
    "siglip2_ablation.py": ("", "cpu-8"),
    "siglip2_res.py": (f"{DATA},tokenizer=gs://b/gemma.model,resume=/tmp", "v4-1024"),
    "siglip2_naflex_continue_b16.py": (f"{DATA},tokenizer=gs://b/gemma.model,resume=/tmp",
                                       "v4-512"),
}
# Configs that read a real checkpoint when loaded: planned in tests/test_docs.py instead.
NEEDS_CHECKPOINT = {"finetune_csv.py"}
# Published checkpoint each pretraining recipe reproduces (variants.SIGLIP_SEEDS; model cards).
PRETRAIN = {
    "siglip_b16_224.py": ("siglip-base-patch16-224", "B/16", 224),
    "siglip_b16_256.py": ("siglip-base-patch16-256", "B/16", 256),
    "siglip_b16_384.py": ("siglip-base-patch16-384", "B/16", 384),
    "siglip_l16_256.py": ("siglip-large-patch16-256", "L/16", 256),
    "siglip_so400m14_384.py": ("siglip-so400m-patch14-384", "So400m/14", 384),
}


def _spec(name: str, arg: str) -> str:
    return f"{CONFIGS / name}:{arg}" if arg else str(CONFIGS / name)


def test_every_config_is_listed():
    assert sorted(p.name for p in CONFIGS.glob("*.py")) == sorted({*INTENDED, *NEEDS_CHECKPOINT})


@pytest.mark.parametrize("name", sorted(INTENDED))
def test_config_plans_without_error_on_its_intended_slice(name):
    arg, topology = INTENDED[name]
    config = load_config(_spec(name, arg))
    p = planner.make_plan(config, planner.parse_topology(topology), config_name=name)
    assert p.errors == []
    assert p.memory_total <= p.topology.hbm_bytes
    assert "ok: no problem found" in plan.format_plan(p)


@pytest.mark.parametrize("name", sorted(PRETRAIN))
def test_parameter_counts_match_the_model_cards(name):
    seed, _, res = PRETRAIN[name]
    p = planner.make_plan(load_config(_spec(name, DATA)), planner.parse_topology("v4-512"))
    card_m = variants.SIGLIP_SEEDS[seed]["card_params_m"]  # 203 / 652 / 878 M
    assert round(p.params["total"] / 1e6) == card_m
    assert p.image_hw == (res, res) and p.text_len == 64


@pytest.mark.parametrize("name", sorted(PRETRAIN))
def test_pretraining_recipes_follow_the_paper(name):
    seed, variant, res = PRETRAIN[name]
    c = load_config(_spec(name, DATA))
    card = variants.SIGLIP_SEEDS[seed]
    assert c.model.image.variant == variant and c.model.image.pool_type == "map"
    assert c.model.text.variant == card["text"]["variant"]
    assert c.model.text.vocab_size == 32_000 and c.tokenizer.max_len == 64
    assert tuple(c.model.out_dim) == tuple(card["out_dim"])
    assert math.isclose(math.log(c.model.temperature_init), math.log(10))  # t' = log 10
    assert c.model.bias_init == -10.0
    assert c.loss.impl == "ring"
    assert c.input.global_batch == 32 * 1024
    assert c.optim.name == "adam" and c.optim.b2 == 0.95
    assert (c.lr, c.wd) == (1e-3, 1e-4)
    assert c.schedule.decay_type == "cosine" and c.schedule.warmup_steps > 0
    assert c.input.data.name == "tar" and c.input.data.pattern == "/tmp"
    assert f"resize({res})|value_range(-1, 1)" in c.input.pp
    assert 'tokenize(max_len=64, eos="sticky"' in c.input.pp
    assert c.tokenizer.model == "gs://t5-data/vocabs/cc_en.32000/sentencepiece.model"
    assert c.evals.imagenet.type == "zeroshot"
    assert c.evals.imagenet.data.tfds_name == "imagenet2012"
    assert c.evals.imagenet.data.split == "validation"
    assert (c.evals.imagenet.class_names, c.evals.imagenet.templates) == ("imagenet", "clip80")
    assert c.evals.coco.type == "retrieval" and c.evals.coco.data.tfds_name == "coco_captions"
    assert all(f"resize({res})" in e.pp for e in c.evals.values())
    assert c.model_init.full == c.model_init.img == c.model_init.txt == ""


def test_large_models_shard_params_and_optimizer_state():
    for name in ("siglip_l16_256.py", "siglip_so400m14_384.py"):
        c = load_config(_spec(name, DATA))
        rules = [tuple(r) for r in c.sharding_rules]
        # Everything FSDP but the small MAP head and token embedding (kept whole: sharded,
        # they made the TPU compiler run them on the global batch; docs/contributing.md, "The
        # FSDP recipes did not fit").
        assert rules == [("img/MAPHead_0/.*", "replicate"), ("txt/Embed_0/.*", "replicate"),
                         (".*", "fsdp")]
        p = planner.make_plan(c, planner.parse_topology(INTENDED[name][1]))
        # Adam keeps 2 float32 buffers per parameter; FSDP over 16 divides them by ~16, but
        # the replicated head and embedding (< 8 % of the parameters) stay whole.
        full = 8 * p.params["total"]
        assert full / 17 < p.bytes["optimizer state"] < full / 16 + 0.08 * full


@pytest.mark.parametrize("name", sorted(set(INTENDED) - {"demo.py", "demo_naflex.py",
                                                         "demo_siglip2.py",
                                                         "siglip2_ablation.py"}))
def test_docstrings_say_how_to_launch_and_what_to_expect(name):
    doc = load_module_doc(CONFIGS / name)
    topology = INTENDED[name][1]
    assert f"python -m siglip_jax.plan --config configs/{name}" in doc or \
        f"configs/{name}:" in doc
    assert f"launch/tpu.sh run my-tpu --type {topology}" in doc
    assert "--topology " + topology in doc
    assert re.search(r"Expected result.*?\d+\.\d %", doc, re.S)


def load_module_doc(path: pathlib.Path) -> str:
    import ast

    return ast.get_docstring(ast.parse(path.read_text())) or ""


def test_unknown_config_argument_is_an_error():
    with pytest.raises(ConfigError, match="unknown config argument 'btach'.*valid arguments:"):
        load_config(_spec("siglip_b16_224.py", "btach=1024"))


def test_batch_and_schedule_length_come_from_the_arguments():
    c = load_config(_spec("siglip_b16_224.py", f"{DATA},batch=4096,examples=8192000"))
    assert c.input.global_batch == 4096 and c.total_steps == 2000
    c = load_config(_spec("siglip_b16_224.py", f"{DATA},steps=7"))
    assert c.total_steps == 7


def test_lit_freezes_the_loaded_image_tower_and_keeps_no_state_for_it():
    c = load_config(_spec("lit_b16.py", f"{DATA},img=/tmp"))
    assert c.model_init.img == "/tmp"
    assert c.schedule[0] == ("img/.*", None)
    p = planner.make_plan(c, planner.parse_topology("v4-32"))
    assert p.errors == [] and p.frozen == ("img",)
    trained = p.params["txt"] + p.params["other"]
    assert p.bytes["optimizer state"] - 8 * trained < 1024  # mu, nu of text + t, b (+ counts)
    assert p.bytes["gradients"] == 4 * trained
    full = planner.make_plan(load_config(_spec("siglip_b16_224.py", DATA)),
                          planner.parse_topology("v4-32"))
    assert p.flops["model"] < full.flops["model"]


def test_finetune_loads_the_whole_checkpoint_at_the_new_resolution():
    c = load_config(_spec("siglip_finetune_res.py", f"{DATA},init=/tmp/ckpt,variant=L/16,res=384"))
    assert c.model_init.full == "/tmp/ckpt" and c.model.image.variant == "L/16"
    p = planner.make_plan(c, planner.parse_topology("v4-512"))
    assert p.towers[0].tokens == (384 // 16) ** 2
    assert p.errors == ["model_init.full checkpoint: not found: '/tmp/ckpt'"]


@pytest.mark.parametrize("image, text, factor", [
    ("B/16", "B", 0.25), ("L/16", "L", 0.5), ("So400m/14", "So400m", 1.0),
    ("g-opt/16", "So400m", 0.5)])
def test_full_siglip2_recipe_builds_for_every_released_size(image, text, factor):
    """The four SigLIP 2 sizes (g-opt's text tower is So400m, its embedding 1536 wide); the
    self-supervised weights 1 and 0.25 scaled per size (SigLIP 2 §2.3)."""
    run = parse(recipes.siglip2_full_config(image, 256, DATA))
    assert run.model.image.variant == image and run.model.text.variant == text
    assert run.model.text.width == variants.decode_variant(text, allow_patch=False)["width"]
    assert run.model.out_dim[1] == variants.decode_variant(image)["width"]
    objectives = run.loss.objectives
    assert objectives["self_distillation"]["weight"] == factor
    assert objectives["masked_prediction"]["weight"] == 0.25 * factor
    assert "decoder" in objectives
