"""Fine-tune a published SigLIP checkpoint on your own image-caption CSV.

    python -m siglip_jax.train --workdir /tmp/siglip_ft \\
        --config 'configs/finetune_csv.py:init=siglip-base-patch16-224,csv=my_data/train.csv'

`init` is a local Hugging Face SigLIP directory (config.json, model.safetensors and
spiece.model, e.g. a download of google/siglip-base-patch16-224). The model, image size, text
length and tokenizer are read from it; all weights start from it. `csv` has a header row with
an image column (a path, relative to the CSV's folder or absolute) and a caption column.
Images are resized to the checkpoint's resolution (`decode|resize(R)|value_range(-1, 1)`, the
SigLIP recipe), captions canonicalised and tokenized as SigLIP was trained.

Parameters and optimizer state are sharded over all devices (fsdp), so a B/16 fits the 8
emulated CPU devices of a 24 GiB machine; on a TPU slice the same config runs as is.

Arguments (`:k=v,...`): init and csv (required); image_col (default image), caption_col
(default caption), eval_csv (a held-out CSV for image<->text retrieval at the end; default
none), steps (default 100), batch (default 32, a multiple of the device count), lr (default
1e-5), wd (default 1e-4), warmup (fraction of steps, default 0.1), tokenizer (default the
checkpoint's spiece.model).
"""

import os

import ml_collections

from siglip_jax.config import ConfigError
from siglip_jax.recipes import parse_args

DEFAULTS = dict(init="", csv="", image_col="image", caption_col="caption", eval_csv="",
                steps=100, batch=32, lr=1e-5, wd=1e-4, warmup=0.1, tokenizer="")
PATH_ARGS = ("init", "csv", "eval_csv", "tokenizer")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Fine-tuning config for `init` (a HF SigLIP directory) on the CSV `csv`."""
    from siglip_jax.checkpoints.loader import checkpoint_info

    args = parse_args(arg, DEFAULTS)
    for key in ("init", "csv"):
        if not args[key]:
            raise ConfigError(f"needs {key}=..., e.g. "
                              "':init=siglip-base-patch16-224,csv=my_data/train.csv'")
    # Absolute paths: the run's config.json must still name them from another directory.
    for key in PATH_ARGS:
        if args[key] and "://" not in str(args[key]):
            args[key] = os.path.abspath(os.path.expanduser(str(args[key])))
            if not os.path.exists(args[key]):
                raise ConfigError(f"{key}={args[key]!r} does not "
                                  "exist")
    info = checkpoint_info(str(args["init"]))
    if info["format"] != "hf":
        raise ConfigError(f"init={args['init']!r} is a {info['format']} checkpoint; this config "
                          "takes a Hugging Face SigLIP directory (config.json + "
                          "model.safetensors + spiece.model)")
    height, width = info["image_size"]
    text_len = int(info["text_len"])
    tokenizer = str(args["tokenizer"] or info["tokenizer"] or "")
    if not tokenizer:
        raise ConfigError(f"{args['init']!r} has no spiece.model: pass tokenizer=PATH")

    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = int(args["steps"])
    c.log_every = max(1, min(50, c.total_steps // 10))
    c.time_budget_s = 0.0
    c.cpu_devices = 8
    c.mesh = [("data", 1), ("fsdp", -1)]
    c.batch_axes = ("data", "fsdp")
    c.sharding_rules = [(".*", "fsdp")]

    tokenize = (f'tokenize(max_len={text_len}, eos="sticky", inkey="texts", outkey="labels", '
                "canonicalize=True)")
    image_pp = f"decode|resize(({height}, {width}))|value_range(-1, 1)"

    def csv_source(path: str) -> dict:
        return dict(name="csv", path=str(path), image_col=str(args["image_col"]),
                    caption_col=str(args["caption_col"]))

    c.input = ml_collections.ConfigDict()
    c.input.data = csv_source(args["csv"])
    c.input.pp = f'{image_pp}|{tokenize}|keep("image", "labels")'
    c.input.global_batch = int(args["batch"])
    c.input.shuffle_buffer = 1_000
    c.input.cache = False
    c.tokenizer = dict(model=tokenizer, max_len=text_len, eos="sticky")

    c.model = ml_collections.ConfigDict(info["model"])
    c.model_init = dict(img="", txt="", full=str(args["init"]))
    c.loss = dict(impl="ring")
    c.optim = dict(name="adam", b1=0.9, b2=0.95)
    c.lr = float(args["lr"])
    c.wd = float(args["wd"])
    c.grad_clip_norm = 1.0
    c.schedule = dict(decay_type="cosine", warmup_frac=float(args["warmup"]))
    c.grad_accum_steps = 1
    c.on_nonfinite = "stop"

    c.evals = ml_collections.ConfigDict()
    if args["eval_csv"]:
        c.evals.retrieval = dict(
            type="retrieval", data=csv_source(args["eval_csv"]),
            pp=f'{image_pp}|{tokenize}|keep("image", "labels")', every_n_steps=0,
            batch_size=int(args["batch"]))
    c.checkpoint = dict(every_n_steps=c.total_steps, keep=1, keep_every_n_steps=0)
    c.tensorboard = True
    c.peak_flops = None
    return c
