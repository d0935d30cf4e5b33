"""Shared builders for the paper-recipe config files (`configs/siglip_*.py`, `lit_b16.py`,
`siglip_finetune_res.py`): one function per kind of run, so the recipes cannot drift apart.

The SigLIP recipe (Zhai et al. 2023, arXiv:2303.15343; big_vision `proj/image_text`):
  * two towers: ViT `variant` with MAP pooling and no image projection (`out_dim=(None, D)`),
    text transformer of the matching size, 64 tokens, c4_en 32k sentencepiece vocabulary;
  * sigmoid loss with t' = log 10 (`temperature_init=10`) and b = -10, computed with the ring
    implementation (memory flat in the number of devices);
  * batch 32k (32 768), Adam with β2 = 0.95 (the paper's fix for large-batch gradient spikes),
    decoupled weight decay 1e-4, peak lr 1e-3, linear warmup then cosine decay, clip 1.0;
  * pp: `decode|resize(res)|value_range(-1, 1)` and `tokenize(max_len=64, eos="sticky")` (the
    model cards: resize to the resolution, mean = std = 0.5, pad to 64 tokens);
  * evaluation hooks: zero-shot ImageNet (tfds `imagenet2012` validation, class names
    "imagenet", the 80 CLIP templates "clip80") and COCO image<->text retrieval.

Config arguments (`configs/x.py:k=v,k2=v2`) are documented in ARG_DOCS and checked: an unknown
argument is an error. Paths are arguments because nothing here can be downloaded at run time.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_collections

from siglip_jax.config import parse_config_arg
from siglip_jax.models import variants
from siglip_jax.records import ConfigError

C4_EN_TOKENIZER = "gs://t5-data/vocabs/cc_en.32000/sentencepiece.model"  # big_vision "c4_en".
PLACEHOLDER_DATA = "gs://YOUR_BUCKET/webli/*.tar"
PLACEHOLDER_INIT = "gs://YOUR_BUCKET/siglip_b16_224/checkpoints/STEP"
PLACEHOLDER = "YOUR_BUCKET"  # The planner rejects any path containing it.
PAPER_BATCH = 32_768  # "32k" in the paper (big_vision writes 32 * 1024).
# Examples seen. The SigLIP text we could check does not state the schedule length of the
# released checkpoints; SigLIP 2 (which keeps this recipe: batch 32k, lr 1e-3, wd 1e-4, cosine,
# 20k warmup) trains on 40B examples, and the paper's batch-size study used 9B.
DEFAULT_EXAMPLES = 40_000_000_000
DEFAULT_WARMUP = 20_000

ARG_DOCS: dict[str, str] = {
    "data": "image-text tar shards (glob, local or gs://), e.g. gs://bucket/webli/*.tar",
    "tokenizer": "sentencepiece model (default: big_vision's c4_en 32k vocabulary on gs://)",
    "batch": "global batch size (default 32768)",
    "examples": "examples seen; total_steps = examples // batch (default 40e9)",
    "steps": "total steps (overrides examples)",
    "warmup": "linear warmup steps (default 20000)",
    "lr": "peak learning rate (default 1e-3)",
    "wd": "decoupled weight decay (default 1e-4)",
    "imagenet_dir": "tfds data_dir holding imagenet2012 (default: tfds' own default)",
    "coco_dir": "tfds data_dir holding coco_captions (default: tfds' own default)",
    "eval_every": "run the evaluators every N steps (default 10000; 0: only at the end)",
    "fsdp": "size of the mesh's fsdp axis over which params and optimizer state are sharded",
    "accum": "gradient accumulation steps (>1 splits the batch: the loss sees batch/accum "
             "negatives per example)",
    "remat": "remat policy of both towers ('none', 'nothing_saveable', ...)",
    "dtype": "activation/matmul dtype of both towers (default bfloat16)",
    "attn_chunk": "image tower attention in blocks of this many query rows (0: whole; "
                  "less memory, a little more compute: docs/tpu.md)",
    "init": "checkpoint to start from (fine-tune: our orbax step dir, big_vision .npz or HF dir)",
    "img": "image-tower checkpoint (LiT)",
    "variant": "image variant, e.g. B/16",
    "txt": "text variant, e.g. B",
    "res": "image resolution",
    "pool": "image pooling (map, gap, tok)",
}


def parse_args(arg: str | None, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """Parses `k=v,...` over `defaults`; unknown keys are a ConfigError naming the valid ones."""
    given = parse_config_arg(arg or "")
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ConfigError(f"unknown config argument {unknown[0]!r}; valid arguments: "
                          f"{', '.join(sorted(defaults))}")
    return {**defaults, **given}


def _text_size(image_variant: str) -> str:
    """The text tower size paired with an image variant in the released SigLIP models: the
    image tower's, except SigLIP 2's g-opt, paired with a So400m text tower
    (variants.SIGLIP2_SEEDS)."""
    size = image_variant.partition("/")[0]
    return "So400m" if size == "g-opt" else size


def image_pp(res: int) -> str:
    """Image preprocessing of the SigLIP model cards: resize, then mean = std = 0.5."""
    return f"decode|resize({res})|value_range(-1, 1)"


def text_pp(max_len: int = 64, inkey: str = "texts") -> str:
    """Text preprocessing: sentencepiece ids with sticky EOS padding (big_vision SigLIP)."""
    return f'tokenize(max_len={max_len}, eos="sticky", inkey="{inkey}", outkey="labels")'


def tower_configs(image_variant: str, text_variant: str, *, dtype: str, remat: str,
                  scan: bool = True, pool: str = "map", attn_chunk: int = 0
                  ) -> tuple[dict, dict, tuple]:
    """(image config, text config, out_dim) of a released-SigLIP-shaped two-tower model.

    The image tower has no projection head; the text head maps to the image tower's width.
    """
    variants.decode_variant(text_variant, allow_patch=False)  # Validates the name.
    width = variants.decode_variant(image_variant)["width"]
    image = dict(variant=image_variant, pool_type=pool, scan=scan, remat_policy=remat,
                 dtype=dtype, attention_chunk=int(attn_chunk))
    text = dict(variant=text_variant, vocab_size=32_000, pool_type="last", scan=scan,
                remat_policy=remat, dtype=dtype)
    return image, text, (None, width)


def evals(res: int, *, imagenet_dir: str, coco_dir: str, every: int,
          max_len: int = 64) -> ml_collections.ConfigDict:
    """Zero-shot ImageNet (val, 80 CLIP prompts) and COCO retrieval (val) evaluators."""
    c = ml_collections.ConfigDict()
    c.imagenet = dict(
        type="zeroshot",
        data=dict(name="tfds", tfds_name="imagenet2012", split="validation",
                  data_dir=imagenet_dir or None),
        pp=f'{image_pp(res)}|keep("image", "label")',
        class_names="imagenet", templates="clip80", every_n_steps=every, batch_size=1024)
    # COCO 5k (Karpathy test split: 5000 images, first 5 of their captions). tfds nests the
    # captions as {"captions": {"text": [N]}}; the pp reads them as "captions/text".
    c.coco = dict(
        type="retrieval",
        data=dict(name="tfds", tfds_name="coco_captions", split="test",
                  data_dir=coco_dir or None),
        pp=f'{image_pp(res)}|{text_pp(max_len, inkey="captions/text")}|keep("image", "labels")',
        max_captions=5, every_n_steps=every, batch_size=1024)
    return c


def _base(args: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """Keys shared by every recipe: seed, logging, checkpoints, loss, optimizer, safety."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.log_every = 50
    c.time_budget_s = 0.0
    c.cpu_devices = 8
    c.loss = dict(impl="ring")
    c.optim = dict(name="adam", b1=0.9, b2=0.95)
    c.lr = float(args["lr"])
    c.wd = float(args["wd"])
    c.grad_clip_norm = 1.0
    c.grad_accum_steps = int(args["accum"])
    c.on_nonfinite = "stop"
    c.peak_flops = None
    c.checkpoint = dict(every_n_steps=2_000, keep=2, keep_every_n_steps=50_000,
                        min_replica_slice_bytes=64 * 1024)
    c.tpu_compiler_options = {}
    return c


# XLA's collective matmuls (windowed einsums) turn each FSDP weight all-gather and gradient
# reduce-scatter into a loop of partial matmuls; compiled for B/16-224 with fsdp=32 on v4-64
# they need 15.9 GiB per chip against 11.0 GiB without (docs/tpu.md), for weights small next
# to the activations. Off in the recipes' FSDP layouts.
FSDP_COMPILER_OPTIONS = {"xla_tpu_enable_windowed_einsum_for_all_gather": False,
                         "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False}


def _mesh(c: ml_collections.ConfigDict, fsdp: int, map_head: bool = True) -> None:
    """Data parallel over all chips; params and optimizer state sharded over `fsdp` of them.

    Under FSDP the image MAP head and the text token embedding stay replicated (small: 12 M
    and 33 M parameters for L): sharded, they lead XLA's partitioner to compute the head and
    the lookup on the whole global batch on every chip (measured with the TPU compiler:
    L/16-256 on v4-128 needed 49 GiB of temporaries per chip, 13.2 GiB with these rules).
    """
    fsdp = int(fsdp)
    if fsdp < 1:
        raise ConfigError(f"config argument fsdp={fsdp} must be >= 1")
    if fsdp == 1:
        c.mesh = [("data", -1)]
        c.batch_axes = ("data",)
        c.sharding_rules = [(".*", "replicate")]
    else:
        c.mesh = [("data", -1), ("fsdp", fsdp)]
        c.batch_axes = ("data", "fsdp")  # The batch is split over every chip.
        c.sharding_rules = ([("img/MAPHead_0/.*", "replicate")] if map_head else []) + [
            ("txt/Embed_0/.*", "replicate"), (".*", "fsdp")]
        c.tpu_compiler_options = FSDP_COMPILER_OPTIONS


def _input(c: ml_collections.ConfigDict, args: Mapping[str, Any], res: int) -> None:
    c.input = ml_collections.ConfigDict()
    c.input.data = dict(name="tar", pattern=args["data"])
    c.input.pp = f'{image_pp(res)}|{text_pp()}|keep("image", "labels")'
    c.input.global_batch = int(args["batch"])
    c.input.shuffle_buffer = 250_000
    c.input.cache = False
    c.tokenizer = dict(model=args["tokenizer"], max_len=64, eos="sticky")


def _total_steps(args: Mapping[str, Any]) -> int:
    if args.get("steps"):
        return int(args["steps"])
    return max(1, int(float(args["examples"])) // int(args["batch"]))


PRETRAIN_DEFAULTS: dict[str, Any] = dict(
    data=PLACEHOLDER_DATA, tokenizer=C4_EN_TOKENIZER, batch=PAPER_BATCH,
    examples=DEFAULT_EXAMPLES, steps=0, warmup=DEFAULT_WARMUP, lr=1e-3, wd=1e-4,
    imagenet_dir="", coco_dir="", eval_every=10_000, fsdp=1, accum=1,
    remat="nothing_saveable", dtype="bfloat16", attn_chunk=0,
)


def pretrain_config(image_variant: str, res: int, arg: str | None, *,
                    defaults: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
    """A SigLIP pretraining recipe: `image_variant` at `res` px from random init on tar shards."""
    args = parse_args(arg, {**PRETRAIN_DEFAULTS, **(defaults or {})})
    c = _base(args)
    c.total_steps = _total_steps(args)
    _mesh(c, args["fsdp"])
    _input(c, args, res)
    c.model = ml_collections.ConfigDict()
    image, text, out_dim = tower_configs(image_variant, _text_size(image_variant),
                                         dtype=args["dtype"], remat=args["remat"],
                                         attn_chunk=args["attn_chunk"])
    c.model.image, c.model.text, c.model.out_dim = image, text, out_dim
    c.model.temperature_init = 10.0  # t' = log 10
    c.model.bias_init = -10.0
    c.model_init = dict(img="", txt="", full="")
    c.schedule = dict(decay_type="cosine", warmup_steps=int(args["warmup"]))
    c.evals = evals(res, imagenet_dir=args["imagenet_dir"], coco_dir=args["coco_dir"],
                    every=int(args["eval_every"]))
    return c


FINETUNE_DEFAULTS: dict[str, Any] = dict(
    PRETRAIN_DEFAULTS, init=PLACEHOLDER_INIT, variant="B/16", res=384, examples=0, steps=20_000,
    warmup=1_000, lr=1e-4, wd=1e-4, eval_every=2_000,
)


def finetune_res_config(arg: str | None) -> ml_collections.ConfigDict:
    """Continue training a SigLIP checkpoint at a higher resolution (posemb interpolated)."""
    args = parse_args(arg, FINETUNE_DEFAULTS)
    res = int(args["res"])
    c = pretrain_config(args["variant"], res, None, defaults={
        k: v for k, v in args.items() if k in PRETRAIN_DEFAULTS})
    c.model_init = dict(img="", txt="", full=str(args["init"]))
    return c


LIT_DEFAULTS: dict[str, Any] = dict(
    PRETRAIN_DEFAULTS, img="gs://big_vision/siglip/webli_en_b16_224_63724782.npz",
    variant="B/16", txt="B", res=224, pool="map", batch=16_384, examples=0, steps=60_000,
    warmup=6_000, lr=1e-3, wd=1e-4, eval_every=5_000,
)


def lit_config(arg: str | None) -> ml_collections.ConfigDict:
    """LiT ("locked-image tuning"): a published image tower, frozen; a text tower trained."""
    args = parse_args(arg, LIT_DEFAULTS)
    res = int(args["res"])
    c = _base(args)
    c.total_steps = _total_steps(args)
    _mesh(c, args["fsdp"], map_head=args["pool"] == "map")
    _input(c, args, res)
    c.model = ml_collections.ConfigDict()
    image, text, out_dim = tower_configs(args["variant"], args["txt"], dtype=args["dtype"],
                                         remat=args["remat"], pool=args["pool"])
    c.model.image, c.model.text, c.model.out_dim = image, text, out_dim
    c.model.temperature_init = 10.0
    c.model.bias_init = -10.0
    c.model_init = dict(img=str(args["img"]), txt="", full="")
    c.schedule = [
        ("img/.*", None),  # Frozen: no update, no optimizer state, no image-tower gradients.
        (".*", dict(decay_type="cosine", warmup_steps=int(args["warmup"]))),
    ]
    c.evals = evals(res, imagenet_dir=args["imagenet_dir"], coco_dir=args["coco_dir"],
                    every=int(args["eval_every"]))
    return c


# SigLIP 2 (Tschannen et al. 2025, arXiv:2502.14786; big_vision README_siglip2.md): SigLIP's
# towers and sigmoid loss with the Gemma tokenizer (256k vocabulary, lower-cased, 64 tokens:
# the "siglip2" text convention). The decoder, self-distillation and masked-prediction
# objectives of the paper are not part of these recipes.
GEMMA_VOCAB = 256_000
PLACEHOLDER_GEMMA = "gs://YOUR_BUCKET/gemma/tokenizer.model"


def _siglip2_text(c: ml_collections.ConfigDict) -> None:
    """Switches a SigLIP recipe to SigLIP 2's text side: Gemma tokenizer and conventions."""
    c.model.text = {**c.model.text, "vocab_size": GEMMA_VOCAB}
    c.tokenizer = dict(c.tokenizer, convention="siglip2")
    c.input.pp = c.input.pp.replace('eos="sticky", ', 'convention="siglip2", ')
    for name in c.evals:
        c.evals[name].pp = c.evals[name].pp.replace('eos="sticky", ', 'convention="siglip2", ')


def siglip2_pretrain_config(image_variant: str, res: int, arg: str | None
                            ) -> ml_collections.ConfigDict:
    """A SigLIP 2 FixRes pretraining recipe (sigmoid loss only): SigLIP's recipe with the
    Gemma tokenizer (`tokenizer=` a local or gs:// Gemma sentencepiece model)."""
    args = parse_args(arg, {**PRETRAIN_DEFAULTS, "tokenizer": PLACEHOLDER_GEMMA})
    c = pretrain_config(image_variant, res, None, defaults=args)
    _siglip2_text(c)
    return c


NAFLEX_DEFAULTS: dict[str, Any] = dict(
    PRETRAIN_DEFAULTS, init="gs://YOUR_BUCKET/siglip2-base-patch16-naflex", patches=256, batch=8192,
    variant="B/16", examples=0, steps=20_000, warmup=1_000, lr=1e-4, wd=1e-4, eval_every=2_000,
    tokenizer=PLACEHOLDER_GEMMA,
)


def siglip2_naflex_finetune_config(arg: str | None) -> ml_collections.ConfigDict:
    """Fine-tune a SigLIP 2 NaFlex checkpoint (our run, big_vision .npz or HF Siglip2Model
    directory as `init=`) on image-text tar shards, aspect ratios kept, `patches` per image."""
    args = parse_args(arg, NAFLEX_DEFAULTS)
    patch = int(args["variant"].partition("/")[2])
    c = pretrain_config(args["variant"], patch * 16, None, defaults={
        k: v for k, v in args.items() if k in PRETRAIN_DEFAULTS})
    budget = int(args["patches"])
    image = (f"decode|resize_to_patches({patch}, {budget})|value_range(-1, 1)|"
             f"patchify({patch}, {budget})")
    c.model.image = {**c.model.image, "kind": "naflex", "posemb_grid": 16}
    c.input.pp = c.input.pp.replace(image_pp(patch * 16), image)
    for name in c.evals:
        c.evals[name].pp = c.evals[name].pp.replace(image_pp(patch * 16), image)
    c.model_init = dict(img="", txt="", full=str(args["init"]))
    _siglip2_text(c)
    return c


# SigLIP 2 §2.3: the self-distillation and masked-prediction weights (1 and 0.25) are scaled
# per model size to balance global and dense quality (docs/siglip2_training.md). Keyed by
# the image variant's size as `variants` names it (SigLIP 2's giant is "g-opt").
SELFSUP_SIZE_FACTOR = {"B": 0.25, "L": 0.5, "So400m": 1.0, "g-opt": 0.5}
FULL_DEFAULTS: dict[str, Any] = dict(
    PRETRAIN_DEFAULTS, tokenizer=PLACEHOLDER_GEMMA, decoder=1, selfsup=1, local_crops=8,
    local_size=96, fsdp=16, vocab_chunk=8192,
)
ARG_DOCS.update({
    "decoder": "1: add the LocCa caption decoder and its loss (0: off)",
    "selfsup": "1: add self-distillation and masked prediction for the last 20 % (0: off)",
    "local_crops": "local views per image for self-distillation (default 8)",
    "local_size": "side of the local views in pixels, a multiple of the patch (default 96)",
    "vocab_chunk": "decoder loss over vocabulary blocks of this many columns (default 8192; "
                   "0: full [L, V] float32 logits, docs/siglip2_training.md)",
})


def siglip2_full_config(image_variant: str, res: int, arg: str | None
                        ) -> ml_collections.ConfigDict:
    """The whole SigLIP 2 recipe (arXiv:2502.14786 §2): the FixRes SigLIP 2 recipe plus the
    LocCa decoder (captioning, referring expressions, grounded captioning; loss weight 1) and,
    for the last 20 % of steps, self-distillation and masked prediction against an EMA
    teacher, their weights scaled by SELFSUP_SIZE_FACTOR."""
    args = parse_args(arg, FULL_DEFAULTS)
    c = pretrain_config(image_variant, res, None, defaults={
        k: v for k, v in args.items() if k in PRETRAIN_DEFAULTS})
    _siglip2_text(c)
    keep = ["image", "labels"]
    ops = [image_pp(res)]
    if int(args["decoder"]):
        c.model.decoder = dict(max_len=64)  # Width, heads from the text tower; half its depth.
        c.loss.decoder = dict(weight=1.0, tasks_per_example=3,  # §2.2: all three per image,
                              vocab_chunk=int(args["vocab_chunk"]))  # "a chunked version".
        ops.append("locca_task(max_len=64, all_tasks=True)")
        keep += ["dec_tokens", "dec_target_mask", "dec_parallel"]
    if int(args["selfsup"]):
        n, size = int(args["local_crops"]), int(args["local_size"])
        factor = SELFSUP_SIZE_FACTOR[image_variant.partition("/")[0]]
        c.loss.self_distillation = dict(weight=1.0 * factor, n_local=n, local_size=size)
        c.loss.masked_prediction = dict(weight=0.25 * factor, mask_ratio=0.5)
        ops += ["global_view", f"local_crops({n}, {size})"]  # §2.3: augmented views
        keep += ["global_view", "local_views"]  # for the teacher and the students.
    text = text_pp().replace('eos="sticky", ', 'convention="siglip2", ')
    c.input.pp = "|".join([*ops, text, "keep(" + ", ".join(f'"{k}"' for k in keep) + ")"])
    return c


# SigLIP 2 §2.4 (arXiv:2502.14786): variants made by continuing a run of the full recipe.
# Numbers from the paper as issue 24 quotes it (the stored copy of the paper we could search
# shows only its opening; see docs/siglip2_training.md): resolution variants resume at 95 %
# "with all losses", the patch embedding resized 16 -> 14 by pseudo-inverse (FlexiViT); NaFlex
# continues from the 90 % checkpoint, sequence lengths drawn per mini-batch from {128, 256,
# 576, 784, 1024}, the last 10 % of the schedule stretched 3.75x, the batch halved at the
# longest length, no self-distillation or masked prediction.
PLACEHOLDER_RESUME = "gs://YOUR_BUCKET/siglip2_full_b16_256/checkpoints/STEP"
RES_RESUME_FRAC = 0.95
NAFLEX_RESUME_FRAC = 0.90
NAFLEX_STRETCH = 3.75
NAFLEX_LENGTHS = (128, 256, 576, 784, 1024)
ARG_DOCS.update({
    "resume": "step directory of the full-recipe run to continue (its 95 % checkpoint for a "
              "resolution variant, 90 % for NaFlex): params, optimizer state, step, teacher",
})


def _local_size(patch: int) -> int:
    """Local views of ~96 px: 96 for /16 (DINO's size), 98 for /14 (DINOv2's 7x7-patch crop;
    SigLIP 2 does not say), else 6 patches."""
    return {16: 96, 14: 98}.get(patch, 6 * patch)


def siglip2_res_config(image_variant: str, res: int, arg: str | None
                       ) -> ml_collections.ConfigDict:
    """A SigLIP 2 resolution variant (§2.4): the full recipe (siglip2_full_config, all losses)
    at `res` px with `image_variant` (e.g. So400m/14 from a /16 run), continuing a full-recipe
    run's train state from `resume=` (its ~95 % checkpoint): same schedule, so the run ends
    where the source would have; patch kernel PI-resized, posemb resampled, their Adam moments
    restarted (checkpoints/resume.py)."""
    patch = int(image_variant.partition("/")[2])
    args = parse_args(arg, {**FULL_DEFAULTS, "local_size": _local_size(patch),
                            "resume": PLACEHOLDER_RESUME})
    full_arg = ",".join(f"{k}={v}" for k, v in args.items() if k != "resume")
    c = siglip2_full_config(image_variant, res, full_arg)
    c.model_init = dict(img="", txt="", full="", resume=str(args["resume"]))
    return c


def naflex_image_pp(patch: int, budget: int) -> str:
    """NaFlex image preprocessing: aspect-preserving resize to at most `budget` patches, then
    patches + mask + spatial shapes (data/ops_naflex.py)."""
    return (f"decode|resize_to_patches({patch}, {budget})|value_range(-1, 1)|"
            f"patchify({patch}, {budget})")


def siglip2_naflex_continue_config(image_variant: str, arg: str | None
                                   ) -> ml_collections.ConfigDict:
    """SigLIP 2 NaFlex (§2.4): a full-recipe run continued from `resume=` (its ~90 %
    checkpoint) with a NaFlex image tower (posemb grid = the run's grid), a patch budget drawn
    per step from NAFLEX_LENGTHS (batch halved at the longest), the last 10 % of the schedule
    stretched 3.75x, the decoder kept and no self-distillation or masked prediction."""
    patch = int(image_variant.partition("/")[2])
    args = parse_args(arg, {**FULL_DEFAULTS, "selfsup": 0, "resume": PLACEHOLDER_RESUME,
                            "res": 256})
    if int(args["selfsup"]):
        raise ConfigError("config argument selfsup: the NaFlex continuation has no "
                          "self-distillation or masked prediction (SigLIP 2 §2.4)")
    res = int(args["res"])
    full_arg = ",".join(f"{k}={v}" for k, v in args.items() if k not in ("resume", "res"))
    c = siglip2_full_config(image_variant, res, full_arg)
    base_steps = c.total_steps  # The source run's schedule length.
    start = int(round(NAFLEX_RESUME_FRAC * base_steps))
    c.total_steps = start + int(round(NAFLEX_STRETCH * (base_steps - start)))
    c.schedule = dict(c.schedule, stretch_from=start, stretch=NAFLEX_STRETCH)
    batch = int(args["batch"])
    lengths = [(n, batch if n < max(NAFLEX_LENGTHS) else batch // 2) for n in NAFLEX_LENGTHS]
    c.input.seq_lens = lengths
    # The pp and batch of the length with the most tokens per step (784 at the full batch):
    # what `plan` and the shape-only tools read; the trainer substitutes each drawn length.
    n, b = max(lengths, key=lambda nb: nb[0] * nb[1])
    c.input.pp = c.input.pp.replace(image_pp(res), naflex_image_pp(patch, n))
    c.input.global_batch = b
    c.model.image = {**c.model.image, "kind": "naflex", "posemb_grid": res // patch}
    for name in c.evals:
        c.evals[name].pp = c.evals[name].pp.replace(image_pp(res), naflex_image_pp(patch, 256))
    c.model_init = dict(img="", txt="", full="", resume=str(args["resume"]))
    return c


def demo_model(patch_size: int) -> ml_collections.ConfigDict:
    """The CPU demos' two towers (ViT width 64, depth 3; text width 64, depth 2, vocabulary
    64; 64-d embeddings), `t' = log 10` and `b = -10` at init."""
    model = ml_collections.ConfigDict()
    model.image = dict(width=64, depth=3, mlp_dim=256, num_heads=4, patch_size=patch_size,
                       posemb="learn", pool_type="gap")
    model.text = dict(vocab_size=64, width=64, depth=2, mlp_dim=256, num_heads=4,
                      pool_type="last")
    model.out_dim = 64
    model.temperature_init = 10.0
    model.bias_init = -10.0
    return model


def siglip2_demo_config(row: str, *, data: Mapping[str, Any], steps: int, seed: int,
                        budget: float, every: int, batch: int, dec_len: int, bins: int,
                        text_len: int, local_crops: int, local_size: int, start_frac: float,
                        ema: float, lr: float, log_every: int, checkpoint: Mapping[str, int],
                        tensorboard: bool, probe: Mapping[str, Any] | None = None
                        ) -> ml_collections.ConfigDict:
    """The CPU SigLIP 2 demo on the multi-object shapes (configs/demo_siglip2.py and the
    ablation's configs/siglip2_ablation.py): the tiny towers, and per `row` the objectives
    (`decoder` and `all` add the LocCa decoder on all 3 tasks per image; `ssl` and `all` add
    self-distillation and masked prediction on the global and local views), with the final
    zero-shot, dense-probe and decoder-task evaluations on the held-out split (`probe`: more
    options of both dense probes)."""
    decoder, selfsup = row in ("decoder", "all"), row in ("ssl", "all")
    c = ml_collections.ConfigDict()
    c.seed = seed
    c.total_steps = steps
    c.log_every = log_every
    c.time_budget_s = budget
    c.cpu_devices = 8
    c.mesh = [("data", -1)]
    c.batch_axes = ("data",)
    c.sharding_rules = [(".*", "replicate")]

    keep = ["image", "labels"]
    pp = ["value_range(-1, 1)"]
    if decoder:  # All three tasks per image: dec_tokens [3, L].
        pp.append(f"locca_task(max_len={dec_len}, num_bins={bins}, all_tasks=True)")
        keep += ["dec_tokens", "dec_target_mask", "dec_parallel"]
    if selfsup:  # The teacher's and masked student's view, the local views (SigLIP 2 §2.3).
        pp += ["global_view", f"local_crops({local_crops}, {local_size})"]
        keep += ["global_view", "local_views"]
    pp.append(f'tokenize(max_len={text_len}, eos="sticky", inkey="texts", outkey="labels")')
    pp.append("keep(" + ", ".join(f'"{k}"' for k in keep) + ")")
    c.input = ml_collections.ConfigDict()
    c.input.data = dict(split="train", **data)
    c.input.pp = "|".join(pp)
    c.input.global_batch = batch
    c.input.shuffle_buffer = 2_000
    c.input.cache = True
    c.tokenizer = dict(model="", max_len=text_len, eos="sticky")

    c.model = demo_model(patch_size=8)
    if decoder:
        c.model.decoder = dict(width=64, depth=2, mlp_dim=256, num_heads=4, num_bins=bins,
                               max_len=dec_len)
    c.model_init = dict(img="", txt="", full="")

    c.loss = dict(impl="ring")
    if decoder:
        c.loss.decoder = dict(weight=1.0, tasks_per_example=3)
    if selfsup:
        head = dict(head_hidden=256, head_bottleneck=64, head_layers=3, prototypes=256,
                    start_frac=start_frac, ema=ema)
        c.loss.self_distillation = dict(weight=1.0, n_local=local_crops,
                                        local_size=local_size, **head)
        c.loss.masked_prediction = dict(weight=0.25, mask_ratio=0.5, **head)

    c.optim = dict(name="adam", b1=0.9, b2=0.95)
    c.lr = lr
    c.wd = 1e-4
    c.grad_clip_norm = 1.0
    c.schedule = dict(decay_type="cosine", warmup_frac=0.05)
    c.grad_accum_steps = 1
    c.on_nonfinite = "stop"
    c.evals = _siglip2_demo_evals(dict(split="test", **data), every, decoder, dec_len, bins,
                                  probe or {})
    c.checkpoint = dict(checkpoint)
    c.tensorboard = tensorboard
    c.peak_flops = None
    return c


def _siglip2_demo_evals(test: Mapping[str, Any], every: int, decoder: bool, dec_len: int,
                        bins: int, probe: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """Zero-shot on the main shape, dense probes on the class and shape maps, and with a
    decoder the three decoder tasks (teacher-forced one task per example)."""
    evals = ml_collections.ConfigDict()
    evals.zeroshot = dict(
        type="zeroshot", data=test, pp='value_range(-1, 1)|keep("image", "label")',
        class_names="from_data", templates=["a large {}"], every_n_steps=every,
        batch_size=240)
    for name, label_set in (("dense_class", "class"), ("dense_shape", "shape")):
        evals[name] = dict(
            type="dense_probe", data=test, label_set=label_set, every_n_steps=every,
            pp='value_range(-1, 1)|keep("image", "segmentation")', batch_size=240, **probe)
    if decoder:
        one = f"locca_task(max_len={dec_len}, num_bins={bins}, parallel_frac=0, tasks="
        keys = '"image", "dec_tokens", "dec_target_mask"'
        evals.captioning = dict(
            type="captioning", data=test, every_n_steps=every, batch_size=240,
            pp=f'value_range(-1, 1)|{one}("cap",))|keep({keys})')
        evals.referring = dict(
            type="referring", data=test, every_n_steps=every, batch_size=240,
            pp=f'value_range(-1, 1)|{one}("aref",), box_key="dec_box")|keep({keys}, '
               '"dec_box")')
        evals.grounded_captioning = dict(
            type="grounded_captioning", data=test, every_n_steps=every, batch_size=240,
            pp=f'value_range(-1, 1)|{one}("gcap",))|keep({keys})')
    return evals
