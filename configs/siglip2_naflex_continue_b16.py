"""SigLIP 2 NaFlex B/16 (arXiv:2502.14786 §2.4): continue a full-recipe B/16-256 run from its
~90 % checkpoint with a NaFlex image tower and a sequence length drawn per mini-batch.

Launch (plan it first, then train; the source run is configs/siglip2_full_b16_256.py):

    ARG='resume=gs://B/full_b16_256/checkpoints/1100000,data=gs://B/w/*.tar,tokenizer=gs://B/gemma.model'
    python -m siglip_jax.plan --config "configs/siglip2_naflex_continue_b16.py:$ARG" \
        --topology v4-512 --compile
    launch/tpu.sh run my-tpu --type v4-512 --config "configs/siglip2_naflex_continue_b16.py:$ARG"

As the paper describes it (quoted by issue 24; docs/siglip2_training.md "Resolution variants
and NaFlex (§2.4)"): from the 90 % checkpoint, each mini-batch's sequence length (patch
budget) is drawn from {128, 256, 576, 784, 1024}; the last 10 % of the schedule is stretched
3.75x; the batch is halved at the longest length; no self-distillation or masked prediction
(the decoder stays). Here:
  * `model_init.resume` continues the source's train state (checkpoints/resume.py): the conv
    patch kernel [16, 16, 3, D] becomes the NaFlex Dense kernel [768, D], the learned
    [1, 256, D] position embedding the NaFlex [16, 16, D] grid; the teacher, the heads and
    their Adam moments are left behind; everything else continues, the step included;
  * `input.seq_lens` = ((128, B), (256, B), (576, B), (784, B), (1024, B/2)): each step draws
    one pair (uniform, seeded by `seed` and the step, so a resume draws the same); each length
    has its own input pipeline and its own compiled train step (5 programs, compiled on first
    use). `input.pp` / `input.global_batch` hold the 784-patch, full-batch pair, the one with
    the most tokens per step, which `plan` reads;
  * schedule: the full recipe's cosine (20k warmup) over its T = 1 220 703 steps, run 3.75x
    slower from 0.9 T: total_steps = 0.9 T + 3.75 · 0.1 T = 1 556 395.
`resume` should be the source's step nearest 90 % (1 100 000 = 90.1 % is kept by the full
recipe's keep_every_n_steps=50000). Evaluations use 256 patches. Arguments: those of
configs/siglip2_full_b16_256.py (selfsup must stay 0) plus resume (required) and res (the
source's resolution, default 256: the NaFlex posemb grid is res/16).
Compiled for v4-512 (TPU compiler, libtpu 0.0.52, the 784-patch step at batch 32k, 128
images per chip): arguments 3.06 GiB, temporaries 10.84 GiB, total 14.00 GiB per chip (44 %);
the planner's analytic estimate says 29.26 GiB (it is ~2x conservative here).
Expected result: the released SigLIP 2 NaFlex B/16: 78.5 % ImageNet zero-shot at 256 patches
(paper Table 1, recalled as in configs/siglip2_naflex_b16.py — check it); not reproduced here.
"""

import ml_collections

from siglip_jax.recipes import siglip2_naflex_continue_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The SigLIP 2 NaFlex continuation recipe for B/16."""
    return siglip2_naflex_continue_config("B/16", arg)
