"""LiT / SigLiT: lock a published image tower, train a text tower against it (sigmoid loss).

Launch (v4-32 = 16 chips; plan it first, then train):

    python -m siglip_jax.plan --config configs/lit_b16.py:data=gs://B/webli/*.tar \
        --topology v4-32
    launch/tpu.sh run my-tpu --type v4-32 --config configs/lit_b16.py:data=gs://B/webli/*.tar

The image tower comes from `img=` — our orbax step directory, a big_vision `.npz` or a
Hugging Face SigLIP directory (default: the released SigLIP B/16-224 big_vision checkpoint,
gs://big_vision/siglip/webli_en_b16_224_63724782.npz) — and is frozen by the schedule
`[("img/.*", None), (".*", cosine)]`: no update, no optimizer state, no image-tower
gradients. The text tower (`txt=`, default B) starts from random init; its head maps to the
image tower's width. Other image towers: `variant=L/16,res=256,img=...`, `pool=tok` for
classification ViTs with a class token. Ring sigmoid loss, t' = log 10, b = -10; Adam
(β2 = 0.95), lr 1e-3, wd 1e-4; batch 16k, 60k steps (≈ 1B examples).

Expected result (paper, Table 1): SigLiT reaches 79.8 % zero-shot ImageNet top-1 with a ViT-B/8
image tower on 4 TPUv4 chips in one day, and 84.5 % with ViT-g/14 in two days. With the
(already contrastively trained) SigLIP B/16 image tower the ceiling is that model's own
76.2 %; the paper reports no number for this combination.

Arguments (`:k=v,...`): data (required), img, variant, res, pool, txt, tokenizer, batch,
examples | steps, warmup, lr, wd, imagenet_dir, coco_dir, eval_every, fsdp, accum, remat,
dtype (siglip_jax.recipes.ARG_DOCS).
"""

import ml_collections

from siglip_jax.recipes import lit_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The LiT recipe with a frozen, loaded image tower."""
    return lit_config(arg)
