"""Tiny configs for trainer tests: small model, small data, no time budget.

`tiny_config`: configs/demo.py shrunk; `tiny_run_config` the config of the session's shared
tiny run (conftest.py `tiny_run`). `siglip2_config`: configs/demo_siglip2.py with every
objective shrunk, the config of the session's one shared SigLIP 2 run (conftest.py
`siglip2_run`)."""

from pathlib import Path

import ml_collections

from siglip_jax.config import load_config
from siglip_jax.records import to_plain

REPO = Path(__file__).resolve().parents[1]
DEMO = f"{REPO}/configs/demo.py"


def tiny_overrides(data_dir, **extra) -> list[str]:
    """`key=value` overrides shrinking configs/demo.py; `extra` adds or replaces keys."""
    values = {
        "log_every": 5, "time_budget_s": 0, "checkpoint.every_n_steps": 10,
        "input.data.data_dir": str(data_dir), "input.data.train_per_class": 20,
        "input.global_batch": 64, "input.shuffle_buffer": 256,
        "evals.zeroshot.data.data_dir": str(data_dir),
        "evals.zeroshot.data.train_per_class": 20, "evals.zeroshot.data.test_per_class": 2,
        "evals.zeroshot.every_n_steps": 0,
        "model.image.width": 32, "model.image.depth": 1, "model.image.mlp_dim": 64,
        "model.image.num_heads": 2, "model.image.patch_size": 8,
        "model.text.width": 32, "model.text.depth": 1, "model.text.mlp_dim": 64,
        "model.text.num_heads": 2, "model.out_dim": 32, "tensorboard": False,
        # A configured MFU peak: the trainer then skips timing CPU matmuls (~0.7 s per start,
        # 40-odd tiny runs). The measured path: test_metrics.py, test_step.py, and every run
        # without these overrides (the shared SigLIP 2 run, the docs' demo runs).
        "peak_flops": 1e11, **extra}
    return [f"{k}={v}" for k, v in values.items()]


def tiny_config(data_dir, steps: int = 20, **extra):
    """The locked tiny config."""
    return load_config(f"{DEMO}:steps={steps}", tiny_overrides(data_dir, **extra))


# The tiny two-tower model and self-supervised heads of the step-level SigLIP 2 tests
# (test_distillation.py, test_switch_on.py); global_key="image": their batches have no global
# view (tests/test_views.py checks the view routing).
SELFSUP_MODEL = dict(
    image=dict(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=8, pool_type="map"),
    text=dict(vocab_size=32, width=32, depth=1, mlp_dim=64, num_heads=2, pool_type="last"),
    out_dim=16)
SELFSUP_HEAD = dict(head_hidden=24, head_bottleneck=8, head_layers=3, prototypes=12,
                    global_key="image")  # The teacher sees batch["image"].

TINY_STEPS = 20


def tiny_run_config(data_dir):
    """The config of the session's shared tiny run (conftest.py `tiny_run`): 20 steps,
    checkpoints at 10 and 20, TensorBoard on."""
    return tiny_config(data_dir, TINY_STEPS, tensorboard=True)


SIGLIP2 = f"{REPO}/configs/demo_siglip2.py"
SIGLIP2_STEPS = 4
SIGLIP2_EVALS = ("zeroshot", "dense_class", "dense_shape", "captioning", "referring",
                 "grounded_captioning")
# Both self-supervised heads, small; the objectives switch on at step 2 of 4.
SIGLIP2_HEAD = dict(head_hidden=32, head_bottleneck=16, head_layers=2, prototypes=16,
                    start_frac=0.5)


def siglip2_overrides(data_dir) -> list[str]:
    """`key=value` overrides shrinking configs/demo_siglip2.py (objectives=all) to width 32,
    depth 1, a MAP-pooled image tower with patch 16, 1 image per class, batch 16, a checkpoint
    at every step (all kept) and every evaluator on 1 test image per class."""
    values = {
        "log_every": 1, "time_budget_s": 0, "tensorboard": False,
        "checkpoint.every_n_steps": 1, "checkpoint.keep": SIGLIP2_STEPS,
        "input.data.data_dir": data_dir, "input.data.train_per_class": 1,
        "input.data.test_per_class": 1, "input.global_batch": 16, "input.shuffle_buffer": 64,
        "model.image.width": 32, "model.image.depth": 1, "model.image.mlp_dim": 64,
        "model.image.num_heads": 2, "model.image.patch_size": 16,
        "model.image.pool_type": "map", "model.text.width": 32, "model.text.depth": 1,
        "model.text.mlp_dim": 64, "model.text.num_heads": 2, "model.decoder.width": 32,
        "model.decoder.depth": 1, "model.decoder.mlp_dim": 64, "model.decoder.num_heads": 2,
        **{f"loss.{name}.{k}": v for name in ("self_distillation", "masked_prediction")
           for k, v in SIGLIP2_HEAD.items()}}
    for name in SIGLIP2_EVALS:
        values.update({f"evals.{name}.data.data_dir": data_dir,
                       f"evals.{name}.data.train_per_class": 1,
                       f"evals.{name}.data.test_per_class": 1, f"evals.{name}.batch_size": 16})
    return [f"{k}={v}" for k, v in values.items()]


def siglip2_config(data_dir):
    """The session's shared SigLIP 2 run (tests/conftest.py `siglip2_run`): every objective of
    configs/demo_siglip2.py, 4 steps, no image head (out_dim (None, 32): the towers are HF
    representable), and a retrieval evaluator beside the demo's six."""
    c = load_config(f"{SIGLIP2}:objectives=all,steps={SIGLIP2_STEPS}",
                    siglip2_overrides(str(data_dir)))
    with c.unlocked():
        del c.model["out_dim"]
        c.model.out_dim = (None, 32)  # No image head (HF SiglipModel has none), text head 32.
        c.evals.retrieval = ml_collections.ConfigDict(dict(
            type="retrieval", data=to_plain(c.evals.zeroshot.data), batch_size=16,
            every_n_steps=0,
            pp='value_range(-1, 1)|tokenize(max_len=18, eos="sticky", inkey="texts", '
               'outkey="labels")|keep("image", "labels")'))
    return c
