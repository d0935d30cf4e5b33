"""The whole SigLIP 2 recipe for B/16 at 256 px: sigmoid loss + LocCa decoder, then
self-distillation and masked prediction for the last 20 % of training.

Launch (plan it first, then train):

    python -m siglip_jax.plan --topology v4-512 --compile \
        --config 'configs/siglip2_full_b16_256.py:data=gs://B/w/*.tar,tokenizer=gs://B/gemma.model'
    launch/tpu.sh run my-tpu --type v4-512 \
        --config 'configs/siglip2_full_b16_256.py:data=gs://B/w/*.tar,tokenizer=gs://B/gemma.model'

The FixRes SigLIP 2 recipe (configs/siglip2_b16_256.py: ring sigmoid loss, batch 32k, Adam
β2 0.95, lr 1e-3, wd 1e-4, cosine with 20k warmup, Gemma tokenizer) with, as in SigLIP 2
(arXiv:2502.14786 §2.2–2.3):
  * a LocCa decoder (docs/siglip2_training.md) on the un-pooled image tokens: text-tower width and
    heads, half its depth, 64 tokens, loss weight 1; all three tasks for every image:
    captioning, referring expressions and grounded captioning (docs/siglip2_training.md).
    Referring and grounded captioning need region boxes and phrases in the data ("boxes",
    "box_texts", "num_boxes"; LocCa takes them from an open-vocabulary detector run over
    WebLI); examples without boxes train captioning only;
  * self-distillation (8 local 96 px views vs an EMA teacher's full image) and masked
    prediction (half of the patches), weights 1 and 0.25 times 0.25 for B, switched on for
    the last 20 % of steps (docs/siglip2_training.md).
Parameters and optimizer state are sharded over 16 chips (`fsdp=16`; the decoder's 256k
embedding and output layer alone hold 393 M parameters). The decoder loss runs over blocks of
8192 vocabulary columns (`vocab_chunk`, docs/siglip2_training.md "The chunked loss"): the float32
[3·B, 64, 256k] logits are never materialised. Compiled per chip at batch 32k (TPU compiler,
libtpu 0.0.52; args / temporaries / total; the chunked column with the recipes' FSDP compiler
options and bfloat16 images, docs/tpu.md "Step memory against big_vision's"):

    slice (chips)     full logits (vocab_chunk=0)            chunked (vocab_chunk=8192)
    v4-1024 (512)     2.97 / 18.54 / 21.69 GiB               (not compiled)
    v4-512  (256)     CompileTimeHbmOom (39.6 GiB temps)     3.06 / 5.91 / 9.15 GiB
    v4-256  (128)     CompileTimeHbmOom (76.0 GiB temps)     3.26 / 11.18 / 14.63 GiB
    v5litepod-256     CompileTimeHbmOom (39.9 GiB temps)     3.06 / 6.86 / 10.14 GiB (of 14.9)

v4-512 (256 chips, 128 images per chip) fits by both the compiler and the planner's analytic
estimate (19.1 GiB); v4-256 (256 images per chip) compiles at 14.6 GiB but the analytic
estimate, conservative by ~2x, says 34.5 GiB: plan it with `--compile`. A v5litepod-256
(16 GB chips; SigLIP 2 trained on up to 2048 TPUv5e chips, model card) fits too. On fewer
chips raise `accum` (each micro-batch then sees fewer negatives). Arguments: the SigLIP recipes'
(siglip_jax.recipes.ARG_DOCS) plus decoder=0|1, selfsup=0|1, local_crops, local_size,
vocab_chunk.
Expected result: the released SigLIP 2 B/16-256 reaches 79.1 % ImageNet zero-shot (paper,
Table 1; recalled, check it) after 40B examples with this recipe plus the paper's data
curation, which this recipe does not reproduce.
"""

import ml_collections

from siglip_jax.recipes import siglip2_full_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The full SigLIP 2 B/16-256 recipe."""
    return siglip2_full_config("B/16", 256, arg)
