"""A SigLIP 2 resolution variant (arXiv:2502.14786 §2.4): continue a full-recipe run from its
~95 % checkpoint at the target resolution and patch size, with all losses.

Launch (plan it first, then train; the source run is configs/siglip2_full_b16_256.py):

    ARG='resume=gs://B/full_b16_256/checkpoints/1160000,data=gs://B/w/*.tar,tokenizer=gs://B/gemma.model'
    python -m siglip_jax.plan --config "configs/siglip2_res.py:$ARG" --topology v4-1024 --compile
    launch/tpu.sh run my-tpu --type v4-1024 --config "configs/siglip2_res.py:$ARG"

(B/16 at 384 px by default; `variant=So400m/14,res=224` with the resume of a So400m/16 run
makes a /14 variant.) The planner's analytic estimate for B/16-384 is 32.2 GiB per chip on
v4-512 (over its 32 GiB; the estimate is conservative by ~2x for this recipe, see
configs/siglip2_full_b16_256.py), so v4-1024 is the slice it plans cleanly on. Compiled for
v4-512 (TPU compiler, libtpu 0.0.52, batch 32k, 128 images per chip, all losses): arguments
3.17 GiB, temporaries 15.29 GiB, total 18.67 GiB per chip (58 %): it fits v4-512 — plan it
there with `--compile`.

What the paper does (as issue 24 quotes it; docs/siglip2_training.md "Resolution variants and
NaFlex (§2.4)"): the fixed-resolution variants "resume" the run "at 95 %" of training at the
target resolution, "with all losses"; the /14 variants get their patch embedding resized
16 -> 14 by pseudo-inverse (FlexiViT). Here `model_init.resume` continues the source's whole
train state (checkpoints/resume.py): params, the EMA teacher, Adam's moments and count and the
step, so the schedule (the full recipe's: same `examples`, `batch`, `warmup`) goes on from
that step to its end. The patch kernel (student and teacher) is PI-resized
(models/patch_resize.py), the position embedding resampled bilinearly to the new grid
(e.g. 16x16 -> 24x24 for /16 at 384 px, 16x16 -> 16x16 for /14 at 224 px), and the Adam
moments of those two parameters restart at zero (the paper does not say; their old moments
belong to the old shapes). Self-distillation and masked prediction are on (the source switched
them on at 80 %); local views are 96 px for /16 and 98 px for /14 (our choice: whole patches).

`resume` is a step directory of the source run near 95 %: the full recipe keeps every 50 000th
step (1 150 000 = 94.2 % of its 1 220 703); for 95.0 % train the source with
`--config.checkpoint.keep_every_n_steps=10000` and resume 1 160 000. The source must be a run
of the full recipe with the same model size (only the patch size and grid may change).
Arguments: those of configs/siglip2_full_b16_256.py plus variant (default B/16), res (default
384) and resume (required).
Expected result: the released SigLIP 2 variants' ImageNet zero-shot numbers (paper Table 1),
e.g. So400m/16 at 384 px 84.1 % (as a third-party model page quotes the table; unconfirmed
here); not reproduced: it needs the full 40B-example source run.
"""

import ml_collections

from siglip_jax.recipes import parse_args, parse_config_arg, siglip2_res_config

DEFAULTS = {"variant": "B/16", "res": 384}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The SigLIP 2 resolution-variant recipe."""
    given = parse_config_arg(arg or "")
    own = parse_args(",".join(f"{k}={given[k]}" for k in DEFAULTS if k in given), DEFAULTS)
    rest = ",".join(f"{k}={v}" for k, v in given.items() if k not in DEFAULTS)
    return siglip2_res_config(str(own["variant"]), int(own["res"]), rest)
