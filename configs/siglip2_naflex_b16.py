"""Fine-tune a SigLIP 2 NaFlex B/16 checkpoint on image-text tar shards (aspect ratio kept).

Launch (v4-32 = 16 chips; plan it first, then train):

    python -m siglip_jax.plan --topology v4-32 --config \
        'configs/siglip2_naflex_b16.py:init=/ckpt/naflex,data=gs://B/w/*.tar,tokenizer=/ckpt/t.model'
    launch/tpu.sh run my-tpu --type v4-32 --config \
        'configs/siglip2_naflex_b16.py:init=/ckpt/naflex,data=gs://B/w/*.tar,tokenizer=/ckpt/t.model'

Each image is resized so that its 16×16-patch grid fits `patches` (default 256, the released
processors' budget) with its aspect ratio kept, patchified and padded with a mask
(`resize_to_patches|patchify`); the NaFlex tower resizes its 16×16 position grid per image.
Texts: the Gemma tokenizer with the "siglip2" convention. `init` is our run, a big_vision
NaFlex .npz or a Hugging Face Siglip2Model directory (model_init.full). Defaults: 20k steps,
lr 1e-4, 1k warmup, batch 8192; other arguments as the SigLIP recipes (recipes.ARG_DOCS).
Expected result: the starting checkpoint's own zero-shot accuracy (the released NaFlex B/16
at 256 patches: 78.5 % ImageNet zero-shot in the paper's Table 1, recalled — check it) moves
toward your data's domain; there is no published number for a fine-tune.
"""

import ml_collections

from siglip_jax.recipes import siglip2_naflex_finetune_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The SigLIP 2 NaFlex B/16 fine-tuning recipe."""
    return siglip2_naflex_finetune_config(arg)
