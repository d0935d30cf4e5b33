"""SigLIP B/16 at 384 px, pretrained from scratch on image-text tar shards (paper recipe).

Launch (v4-256 = 128 chips; plan it first, then train):

    python -m siglip_jax.plan --config configs/siglip_b16_384.py:data=gs://B/webli/*.tar \
        --topology v4-256
    launch/tpu.sh run my-tpu --type v4-256 --config configs/siglip_b16_384.py:data=gs://B/webli/*.tar

Recipe (SigLIP, Zhai et al. 2023, arXiv:2303.15343; see siglip_jax/recipes.py): ViT-B/16 with
MAP pooling + B text tower (64 tokens, c4_en 32k vocabulary), 203 M parameters; ring sigmoid
loss, t' = log 10, b = -10; batch 32k; Adam (β2 = 0.95), lr 1e-3, wd 1e-4, 20k warmup steps
then cosine; bfloat16 activations, scanned blocks with remat.

On fewer chips the planner reports the memory estimate per chip; `,accum=2` halves the
activation memory (each half-batch is then its own contrastive batch, so every example sees
16k instead of 32k negatives: close to, not exactly, the paper's recipe).

Expected result (paper, released SigLIP B/16 at 384 px on WebLI): 78.6 % zero-shot ImageNet
top-1. WebLI is not public:
other data gives other numbers.

Arguments (`:k=v,...`): data (required), tokenizer, batch, examples | steps, warmup, lr, wd,
imagenet_dir, coco_dir, eval_every, fsdp, accum, remat, dtype (siglip_jax.recipes.ARG_DOCS).
"""

import ml_collections

from siglip_jax.recipes import pretrain_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The B/16-384 pretraining recipe."""
    return pretrain_config("B/16", 384, arg)
