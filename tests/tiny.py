"""A tiny demo config for trainer tests: small model, small data, no time budget."""

from pathlib import Path

from siglip_jax.config import load_config

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
        "model.text.num_heads": 2, "model.out_dim": 32, "tensorboard": False, **extra}
    return [f"{k}={v}" for k, v in values.items()]


def tiny_config(data_dir, steps: int = 20, **extra):
    """The locked tiny config."""
    return load_config(f"{DEMO}:steps={steps}", tiny_overrides(data_dir, **extra))
