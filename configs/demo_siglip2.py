"""The SigLIP 2 recipe on the CPU demo: sigmoid loss + LocCa decoder + self-distillation and
masked prediction, on the multi-object shapes data, in minutes on 2 cores.

    python -m siglip_jax.train --config configs/demo_siglip2.py --workdir /tmp/siglip2_demo
    python -m siglip_jax.train --config configs/demo_siglip2.py:objectives=decoder --workdir …

Data: 9 000 generated 64×64 images with 2–4 coloured shapes each (docs/siglip2_training.md,
"Multi-object demo data"): a caption naming every shape, the main (largest) shape's class as
the zero-shot label, a box and a phrase per shape, a per-pixel segmentation map. Model: ViT
patch 8 (8×8 tokens), width 64, depth 3, average pooling; text width 64, depth 2, 18 tokens;
64-d embeddings; ring sigmoid loss over 8 emulated CPU devices, batch 128, AdamW (β2 0.95),
cosine with 5 % warmup.

Argument `objectives=` picks the objectives (the ablation uses configs/siglip2_ablation.py):
  sigmoid   the sigmoid loss only;
  decoder   + a 2-layer LocCa decoder (width 64) trained on all three tasks of every image:
            captioning, referring expressions (phrase → box as 4 location tokens, 32 bins)
            and grounded captioning (box → phrase), half of the captions predicted in
            parallel (docs/siglip2_training.md);
  all       (default) + self-distillation (4 local 32 px crops vs the EMA teacher's
            global view, both colour-augmented as DINO's) and masked prediction (half of
            the global view's patches masked), switched on for the last 20 % of steps as in
            SigLIP 2 (docs/siglip2_training.md "Augmented views").
Each row's default `steps` fills about five minutes on a 2-core machine; `time_budget_s`
stops a slower machine in time. `steps=N` overrides; `eval_every=N` runs the evaluators
every N steps (default: only at the end).

Evaluations at the end: zero-shot top-1 of the main shape (36 classes, prompt "a large {}"),
the dense probe (a ridge probe on frozen patch features: per-patch accuracy and mIoU over the
37 shape-colour-background labels and the 7 shape labels), and with a decoder: caption exact
match and token accuracy (greedy decoding), referring accuracy at IoU ≥ 0.5 and grounded-
captioning exact match on the 720 held-out images.
"""

import ml_collections

from siglip_jax.config import ConfigError
from siglip_jax.recipes import parse_args

ROWS = ("sigmoid", "decoder", "all")
STEPS = {"sigmoid": 1500, "decoder": 600, "all": 270}  # ~280 s each on 2 idle cores.
DEC_LEN, BINS, TEXT_LEN = 20, 32, 18
LOCAL_CROPS, LOCAL_SIZE = 4, 32


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The SigLIP 2 demo config; `arg` may set objectives=sigmoid|decoder|all, steps=N,
    eval_every=N."""
    args = parse_args(arg, {"objectives": "all", "steps": 0, "eval_every": 0})
    row = str(args["objectives"])
    if row not in ROWS:
        raise ConfigError(f"configs/demo_siglip2.py: objectives={row!r}, expected one of "
                          f"{', '.join(ROWS)}")
    decoder, selfsup = row in ("decoder", "all"), row == "all"

    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = int(args["steps"]) or STEPS[row]
    c.log_every = 50
    c.time_budget_s = 360.0
    c.cpu_devices = 8

    c.mesh = [("data", -1)]
    c.batch_axes = ("data",)
    c.sharding_rules = [(".*", "replicate")]

    data = dict(name="demo_shapes", data_dir="~/.cache/siglip_jax", objects=True,
                image_size=64, train_per_class=250, test_per_class=20)
    task_op = f"locca_task(max_len={DEC_LEN}, num_bins={BINS}, all_tasks=True)"  # [3, L]
    crops_op = f"local_crops({LOCAL_CROPS}, {LOCAL_SIZE})"
    keep = ["image", "labels"]
    pp = ["value_range(-1, 1)"]
    if decoder:
        pp.append(task_op)
        keep += ["dec_tokens", "dec_target_mask", "dec_parallel"]
    if selfsup:  # The teacher's and masked student's view, the local views (SigLIP 2 §2.3).
        pp += ["global_view", crops_op]
        keep += ["global_view", "local_views"]
    pp.append(f'tokenize(max_len={TEXT_LEN}, eos="sticky", inkey="texts", outkey="labels")')
    pp.append("keep(" + ", ".join(f'"{k}"' for k in keep) + ")")

    c.input = ml_collections.ConfigDict()
    c.input.data = dict(split="train", **data)
    c.input.pp = "|".join(pp)
    c.input.global_batch = 128
    c.input.shuffle_buffer = 2_000
    c.input.cache = True
    c.tokenizer = dict(model="", max_len=TEXT_LEN, eos="sticky")

    c.model = ml_collections.ConfigDict()
    c.model.image = dict(width=64, depth=3, mlp_dim=256, num_heads=4, patch_size=8,
                         posemb="learn", pool_type="gap")
    c.model.text = dict(vocab_size=64, width=64, depth=2, mlp_dim=256, num_heads=4,
                        pool_type="last")
    c.model.out_dim = 64
    c.model.temperature_init = 10.0
    c.model.bias_init = -10.0
    if decoder:
        c.model.decoder = dict(width=64, depth=2, mlp_dim=256, num_heads=4, num_bins=BINS,
                               max_len=DEC_LEN)
    c.model_init = dict(img="", txt="", full="")

    c.loss = dict(impl="ring")
    if decoder:
        c.loss.decoder = dict(weight=1.0, tasks_per_example=3)  # All 3 tasks per image.
    if selfsup:
        head = dict(head_hidden=256, head_bottleneck=64, head_layers=3, prototypes=256,
                    start_frac=0.8, ema=0.996)  # On for the last 20 % (SigLIP 2 §2.3).
        c.loss.self_distillation = dict(weight=1.0, n_local=LOCAL_CROPS,
                                        local_size=LOCAL_SIZE, **head)
        c.loss.masked_prediction = dict(weight=0.25, mask_ratio=0.5, **head)

    c.optim = dict(name="adam", b1=0.9, b2=0.95)
    c.lr = 2e-3
    c.wd = 1e-4
    c.grad_clip_norm = 1.0
    c.schedule = dict(decay_type="cosine", warmup_frac=0.05)
    c.grad_accum_steps = 1
    c.on_nonfinite = "stop"

    every = int(args["eval_every"])
    test = dict(split="test", **data)
    c.evals = ml_collections.ConfigDict()
    c.evals.zeroshot = dict(
        type="zeroshot", data=test, pp='value_range(-1, 1)|keep("image", "label")',
        class_names="from_data", templates=["a large {}"], every_n_steps=every,
        batch_size=240)
    for name, label_set in (("dense_class", "class"), ("dense_shape", "shape")):
        c.evals[name] = dict(
            type="dense_probe", data=test, label_set=label_set, every_n_steps=every,
            pp='value_range(-1, 1)|keep("image", "segmentation")', batch_size=240)
    if decoder:
        one = f"locca_task(max_len={DEC_LEN}, num_bins={BINS}, parallel_frac=0, tasks="
        keys = '"image", "dec_tokens", "dec_target_mask"'
        c.evals.captioning = dict(
            type="captioning", data=test, every_n_steps=every, batch_size=240,
            pp=f'value_range(-1, 1)|{one}("cap",))|keep({keys})')
        c.evals.referring = dict(
            type="referring", data=test, every_n_steps=every, batch_size=240,
            pp=f'value_range(-1, 1)|{one}("aref",), box_key="dec_box")|keep({keys}, '
               '"dec_box")')
        c.evals.grounded_captioning = dict(
            type="grounded_captioning", data=test, every_n_steps=every, batch_size=240,
            pp=f'value_range(-1, 1)|{one}("gcap",))|keep({keys})')

    c.checkpoint = dict(every_n_steps=500, keep=2, keep_every_n_steps=0)
    c.tensorboard = True
    c.peak_flops = None
    return c
