"""SigLIP So400m/14 at 384 px, pretrained from scratch on image-text tar shards (paper recipe).

Launch (v4-512 = 256 chips; plan it first, then train):

    python -m siglip_jax.plan --config configs/siglip_so400m14_384.py:data=gs://B/webli/*.tar \
        --topology v4-512
    launch/tpu.sh run my-tpu --type v4-512 --config configs/siglip_so400m14_384.py:data=gs://B/webli/*.tar

Recipe (SigLIP, Zhai et al. 2023, arXiv:2303.15343; see siglip_jax/recipes.py): shape-optimised
ViT So400m/14 with MAP pooling + So400m text tower (64 tokens, c4_en 32k vocabulary), 878 M
parameters, params and optimizer state sharded (FSDP) over 16 chips; ring sigmoid
loss, t' = log 10, b = -10; batch 32k; Adam (β2 = 0.95), lr 1e-3, wd 1e-4, 20k warmup steps
then cosine; bfloat16 activations, scanned blocks with remat.

On fewer chips the planner reports the memory estimate per chip; `,accum=2` halves the
activation memory (each half-batch is then its own contrastive batch, so every example sees
16k instead of 32k negatives: close to, not exactly, the paper's recipe).

Expected result (paper, released SigLIP So400m/14 at 384 px on WebLI): 83.2 % zero-shot
ImageNet top-1; COCO retrieval recall@1 70.2 % image→text, 52.0 % text→image. WebLI is not public:
other data gives other numbers.

Arguments (`:k=v,...`): data (required), tokenizer, batch, examples | steps, warmup, lr, wd,
imagenet_dir, coco_dir, eval_every, fsdp, accum, remat, dtype (siglip_jax.recipes.ARG_DOCS).
"""

import ml_collections

from siglip_jax.recipes import pretrain_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The So400m/14-384 pretraining recipe."""
    return pretrain_config("So400m/14", 384, arg, defaults=dict(fsdp=16))
