"""Fine-tune a SigLIP checkpoint at a higher resolution (e.g. B/16 224 px -> 384 px).

Launch (v4-256 = 128 chips for B/16 at 384 px; plan it first, then train):

    ARG='init=gs://B/siglip_b16_224/checkpoints/1220000,variant=B/16,res=384,data=gs://B/w/*.tar'
    python -m siglip_jax.plan --config "configs/siglip_finetune_res.py:$ARG" --topology v4-256
    launch/tpu.sh run my-tpu --type v4-256 --config "configs/siglip_finetune_res.py:$ARG"

`init=` is the lower-resolution checkpoint (our orbax step directory, a big_vision `.npz` or a
Hugging Face SigLIP directory), loaded whole (`model_init.full`). The image tower's learned
position embedding has one entry per patch, so its grid is resampled (bilinear, as big_vision
`vit.resample_posemb`) from the checkpoint's grid to the new one, e.g. 14×14 -> 24×24 for
B/16 224 -> 384. Everything else is the pretraining recipe (siglip_jax/recipes.py) at the new
resolution, with a short schedule of our choosing (the paper gives no fine-tuning schedule):
20k steps, 1k warmup, peak lr 1e-4, cosine.

What SigLIP 2 found (arXiv:2502.14786 §2.4, as issue 24 quotes it; not confirmed against a
stored copy of the paper): fine-tuning the final checkpoint at a small learning rate to a new
resolution "did not lead to good results", so its resolution variants instead resume the run
at 95 % of training at the target resolution with all losses (configs/siglip2_res.py,
docs/siglip2_training.md "Resolution variants and NaFlex (§2.4)"). This recipe is kept for
continuing a SigLIP (1) checkpoint or any finished checkpoint you hold without its run's
train state; expect it to do worse than a resumed run.

Expected result: at least the source checkpoint's zero-shot accuracy; the released SigLIP
B/16 checkpoints gain from resolution (paper: 76.2 % at 224 px, 78.6 % at 384 px zero-shot
ImageNet top-1), L/16 from 80.5 % (256 px) to 82.1 % (384 px).

Arguments (`:k=v,...`): init (required), variant, res, data (required), tokenizer, batch,
steps, warmup, lr, wd, imagenet_dir, coco_dir, eval_every, fsdp, accum, remat, dtype.
"""

import ml_collections

from siglip_jax.recipes import finetune_res_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The higher-resolution fine-tuning recipe."""
    return finetune_res_config(arg)
