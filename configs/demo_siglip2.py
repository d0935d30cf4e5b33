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
from siglip_jax.recipes import parse_args, siglip2_demo_config

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
        raise ConfigError(f"objectives={row!r}, expected one of "
                          f"{', '.join(ROWS)}")
    data = dict(name="demo_shapes", data_dir="~/.cache/siglip_jax", objects=True,
                image_size=64, train_per_class=250, test_per_class=20)
    return siglip2_demo_config(
        row, data=data, steps=int(args["steps"]) or STEPS[row], seed=0, budget=360.0,
        every=int(args["eval_every"]), batch=128, dec_len=DEC_LEN, bins=BINS,
        text_len=TEXT_LEN, local_crops=LOCAL_CROPS, local_size=LOCAL_SIZE,
        start_frac=0.8,  # On for the last 20 % (SigLIP 2 §2.3).
        ema=0.996, lr=2e-3, log_every=50,
        checkpoint=dict(every_n_steps=500, keep=2, keep_every_n_steps=0), tensorboard=True)
