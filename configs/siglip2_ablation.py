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
  steps       total steps (default: STEPS[objectives], about 7 minutes of training on 2
              idle cores, from the rows' measured speeds: docs/siglip2_training.md);
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
features (class and shape label sets; `miou_fg` is the mIoU over the foreground classes;
fitted class-balanced on the training split, scored on the held-out images),
and with a decoder: caption exact match and token accuracy, referring acc@0.5 and mean IoU,
grounded-captioning exact match.
"""

import ml_collections

from siglip_jax.config import ConfigError
from siglip_jax.recipes import parse_args, siglip2_demo_config

ROWS = ("sigmoid", "decoder", "ssl", "all", "random")
STEPS = {"sigmoid": 4400, "decoder": 2600, "ssl": 1330, "all": 1150, "random": 1}
DEC_LEN, BINS, TEXT_LEN = 16, 16, 14
LOCAL_CROPS, LOCAL_SIZE = 4, 24
DATA = dict(name="demo_shapes", objects=True, image_size=48, num_colours=3, num_shapes=4,
            max_objects=3, object_scale=1.4)
ARGS = {"objectives": "all", "steps": 0, "seed": 0, "start_frac": 0.3, "budget": 600.0,
        "eval_every": 0, "data_dir": "~/.cache/siglip_jax", "train_per_class": 400,
        "test_per_class": 40}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The ablation config of one row; see the module docstring for the arguments."""
    args = parse_args(arg, ARGS)
    row = str(args["objectives"])
    if row not in ROWS:
        raise ConfigError(f"objectives={row!r}, expected one of "
                          f"{', '.join(ROWS)}")
    data = dict(DATA, data_dir=str(args["data_dir"]), train_per_class=int(args["train_per_class"]),
                test_per_class=int(args["test_per_class"]))
    return siglip2_demo_config(
        row, data=data, steps=int(args["steps"]) or STEPS[row], seed=int(args["seed"]),
        budget=float(args["budget"]), every=int(args["eval_every"]), batch=64,
        dec_len=DEC_LEN, bins=BINS, text_len=TEXT_LEN, local_crops=LOCAL_CROPS,
        local_size=LOCAL_SIZE, start_frac=float(args["start_frac"]), ema=0.99,
        lr=0.0 if row == "random" else 2e-3, log_every=25,
        checkpoint=dict(every_n_steps=10_000, keep=1, keep_every_n_steps=0), tensorboard=False,
        probe=dict(balanced=True, train_data=dict(split="train", **data)))
