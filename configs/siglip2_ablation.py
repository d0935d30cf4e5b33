"""The SigLIP 2 objectives ablation (benchmarks/siglip2_ablation.py): one row per run.

    python -m siglip_jax.train --config configs/siglip2_ablation.py:objectives=decoder,seed=1 \
        --workdir /tmp/abl_decoder_1

A task small enough for each objective's effect to show within minutes on 2 CPU cores:

- Data: the multi-object demo (docs/demo_objects.md) at 48×48 px with 3 colours × 4 shapes
  (12 classes), 2–3 shapes per image drawn 1.4× larger than the demo's (shapes cover ~19 %
  of the pixels instead of 12 %); 400 train and 40 held-out images per main class (4 800 /
  480). Its cache folder is separate from the demo's.
- Model: ViT patch 8 (6×6 tokens), width 64, depth 3, average pooling; text width 64,
  depth 2, 14 tokens; 64-d embeddings; ring sigmoid loss over 8 emulated CPU devices,
  batch 64, AdamW (β2 0.95), lr 2e-3, cosine with 5 % warmup.

Arguments (`:k=v,k=v`):
  objectives  sigmoid | decoder (+ LocCa decoder, all 3 tasks per image) | ssl (+ self-
              distillation and masked prediction, no decoder) | all (both) | random (no
              training: lr 0, for the randomly initialised tower's dense-probe baseline);
  steps       total steps (default: STEPS[objectives], about 150 s on 2 idle cores);
  seed        the run's seed (init, data order, crops, masks);
  start_frac  where self-distillation and masked prediction switch on (default 0.3): SigLIP 2
              adds them for the last 20 %, but on a run of a few hundred steps that leaves
              them ~50 steps, fewer than the EMA teacher (momentum 0.99, ~100-step memory)
              needs to become a teacher at all; so here they run for the last 70 %;
  budget      time_budget_s (default 600, a guard; 0: none): the run stops when the next
              step would not fit (the budget counts from start-up, compilation included);
  data_dir, train_per_class, test_per_class   the data's cache folder and size.

Final evaluations on the held-out images: zero-shot top-1 of the main shape (prompt
"a large {}", 36 candidate names of which 12 occur), the dense probe on frozen patch
features (class and shape label sets; `miou_fg` is the mIoU over the foreground classes),
and with a decoder: caption exact match and token accuracy, referring acc@0.5 and mean IoU,
grounded-captioning exact match.
"""

import ml_collections

from siglip_jax.config import ConfigError, parse_config_arg

ROWS = ("sigmoid", "decoder", "ssl", "all", "random")
STEPS = {"sigmoid": 1000, "decoder": 300, "ssl": 140, "all": 90, "random": 1}
DEC_LEN, BINS, TEXT_LEN = 16, 16, 14
LOCAL_CROPS, LOCAL_SIZE = 4, 24
DATA = dict(name="demo_shapes", objects=True, image_size=48, num_colours=3, num_shapes=4,
            max_objects=3, object_scale=1.4)
ARGS = {"objectives": "all", "steps": 0, "seed": 0, "start_frac": 0.3, "budget": 600.0,
        "eval_every": 0, "data_dir": "~/.cache/siglip_jax", "train_per_class": 400,
        "test_per_class": 40}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The ablation config of one row; see the module docstring for the arguments."""
    args = {**ARGS, **parse_config_arg(arg or "")}
    unknown = sorted(set(args) - set(ARGS))
    if unknown:
        raise ConfigError(f"configs/siglip2_ablation.py: unknown argument {unknown[0]!r} "
                          f"(valid: {', '.join(ARGS)})")
    row = str(args["objectives"])
    if row not in ROWS:
        raise ConfigError(f"configs/siglip2_ablation.py: objectives={row!r}, expected one of "
                          f"{', '.join(ROWS)}")
    decoder, selfsup = row in ("decoder", "all"), row in ("ssl", "all")
    data = dict(DATA, data_dir=str(args["data_dir"]), train_per_class=int(args["train_per_class"]),
                test_per_class=int(args["test_per_class"]))

    c = ml_collections.ConfigDict()
    c.seed = int(args["seed"])
    c.total_steps = int(args["steps"]) or STEPS[row]
    c.log_every = 25
    c.time_budget_s = float(args["budget"])
    c.cpu_devices = 8

    c.mesh = [("data", -1)]
    c.batch_axes = ("data",)
    c.sharding_rules = [(".*", "replicate")]

    task_op = f"locca_task(max_len={DEC_LEN}, num_bins={BINS}, all_tasks=True)"
    keep = ["image", "labels"]
    pp = ["value_range(-1, 1)"]
    if decoder:
        pp.append(task_op)
        keep += ["dec_tokens", "dec_target_mask", "dec_parallel"]
    if selfsup:  # The teacher's and masked student's view, the local views (SigLIP 2 §2.3).
        pp += ["global_view", f"local_crops({LOCAL_CROPS}, {LOCAL_SIZE})"]
        keep += ["global_view", "local_views"]
    pp.append(f'tokenize(max_len={TEXT_LEN}, eos="sticky", inkey="texts", outkey="labels")')
    pp.append("keep(" + ", ".join(f'"{k}"' for k in keep) + ")")

    c.input = ml_collections.ConfigDict()
    c.input.data = dict(split="train", **data)
    c.input.pp = "|".join(pp)
    c.input.global_batch = 64
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
        c.loss.decoder = dict(weight=1.0, tasks_per_example=3)
    if selfsup:
        head = dict(head_hidden=256, head_bottleneck=64, head_layers=3, prototypes=256,
                    start_frac=float(args["start_frac"]), ema=0.99)
        c.loss.self_distillation = dict(weight=1.0, n_local=LOCAL_CROPS,
                                        local_size=LOCAL_SIZE, **head)
        c.loss.masked_prediction = dict(weight=0.25, mask_ratio=0.5, **head)

    c.optim = dict(name="adam", b1=0.9, b2=0.95)
    c.lr = 0.0 if row == "random" else 2e-3
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

    c.checkpoint = dict(every_n_steps=10_000, keep=1, keep_every_n_steps=0)
    c.tensorboard = False
    c.peak_flops = None
    return c
