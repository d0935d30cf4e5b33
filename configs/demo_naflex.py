"""The CPU demo with a SigLIP 2 NaFlex image tower: coloured shapes at mixed aspect ratios.

    python -m siglip_jax.train --config configs/demo_naflex.py --workdir /tmp/siglip_naflex

Same task, text tower, loss and optimizer as configs/demo.py, but the images keep their aspect
ratio (1:2 … 2:1, longer side 32 px): each is resized so that its 4×4-patch grid fits a budget
of 64 patches (`resize_to_patches`), patchified and padded to 64 patches with a mask
(`patchify`), so one batch mixes aspect ratios. The NaFlex tower resizes its learned 8×8
position grid to each image's patch grid and ignores the padding (masked attention, masked
average pooling). Evaluation: zero-shot over the 36 classes on held-out images, same
preprocessing.

Argument (optional): `steps=N`.
"""

import os

import ml_collections

from siglip_jax.config import load_config

PATCH, BUDGET = 4, 64
PP_IMAGE = (f"resize_to_patches({PATCH}, {BUDGET})|value_range(-1, 1)|"
            f"patchify({PATCH}, {BUDGET})")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The NaFlex demo config; `arg` may set steps=N (as configs/demo.py)."""
    demo = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.py")
    c = load_config(f"{demo}:{arg}" if arg else demo)
    c.unlock()
    c.input.data.aspect = True
    c.input.pp = (f'{PP_IMAGE}|tokenize(max_len=8, eos="sticky", inkey="texts", '
                  'outkey="labels")|keep("image", "labels")')
    c.model.image = dict(kind="naflex", width=64, depth=3, mlp_dim=256, num_heads=4,
                         patch_size=PATCH, posemb_grid=8, pool_type="gap")
    c.evals.zeroshot.data.aspect = True
    c.evals.zeroshot.pp = f'{PP_IMAGE}|keep("image", "label")'
    return c
