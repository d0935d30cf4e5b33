"""The embedded CPU demo: a small SigLIP learns coloured shapes in a few minutes on 2 cores.

    python -m siglip_jax.train --config configs/demo.py --workdir /tmp/siglip_demo

Data: 9 000 generated 32×32 images of 36 colour×shape classes with captions ("a small red
circle"), cached in ~/.cache/siglip_jax; a word-level sentencepiece model trained on the
caption vocabulary. Model: ViT patch 4, width 64, depth 3, global-average pooling; text width
64, depth 2, length 8, last-token pooling; 64-d embeddings. Ring sigmoid loss over 8
emulated CPU devices, global batch 128, AdamW (β2 0.95) with 5 % warmup and cosine decay.
Expected: zero-shot top-1 ≥ 80 % on 720 held-out images (see README for measured numbers).
`time_budget_s` stops training early on a busy machine so the run still ends in time.

Argument (optional): `steps=N` — e.g. `configs/demo.py:steps=20` for a smoke test.
"""

import ml_collections

from siglip_jax.recipes import demo_model, parse_args


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The demo config; `arg` may set steps=N."""
    args = parse_args(arg, {"steps": 1000})
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = int(args["steps"])
    c.log_every = 50
    c.time_budget_s = 270.0
    c.cpu_devices = 8

    c.mesh = [("data", -1)]
    c.batch_axes = ("data",)
    c.sharding_rules = [(".*", "replicate")]

    data_dir = "~/.cache/siglip_jax"
    c.input = ml_collections.ConfigDict()
    data = dict(name="demo_shapes", data_dir=data_dir, image_size=32, train_per_class=250,
                test_per_class=20)
    c.input.data = dict(split="train", **data)
    c.input.pp = 'value_range(-1, 1)|tokenize(max_len=8, eos="sticky", inkey="texts", outkey="labels")|keep("image", "labels")'  # noqa: E501
    c.input.global_batch = 128
    c.input.shuffle_buffer = 2_000  # Examples buffered per batch shard (device).
    c.input.cache = True
    c.tokenizer = dict(model="", max_len=8, eos="sticky")  # "": the data source's tokenizer.

    c.model = demo_model(patch_size=4)
    c.model_init = dict(img="", txt="", full="")  # Checkpoint paths; "" = random init.

    c.loss = dict(impl="ring")

    c.optim = dict(name="adam", b1=0.9, b2=0.95)
    c.lr = 2e-3
    c.wd = 1e-4
    c.grad_clip_norm = 1.0
    c.schedule = dict(decay_type="cosine", warmup_frac=0.05)
    c.grad_accum_steps = 1
    c.on_nonfinite = "stop"  # Or "skip": drop the update and go on.

    c.evals = ml_collections.ConfigDict()
    c.evals.zeroshot = dict(
        type="zeroshot", data=dict(split="test", **data),
        pp='value_range(-1, 1)|keep("image", "label")', class_names="from_data",
        templates=["a photo of a {}"], every_n_steps=500, batch_size=240)

    c.checkpoint = dict(every_n_steps=500, keep=2, keep_every_n_steps=0,
                        min_replica_slice_bytes=64 * 1024)
    c.tensorboard = True
    c.peak_flops = None  # Per chip, for MFU; None = the default for the device kind.
    return c
