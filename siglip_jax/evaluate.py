"""Standalone evaluation: run a config's evaluators on a checkpoint and print a table.

    python -m siglip_jax.evaluate --checkpoint PATH [--config configs/x.py[:arg]] \
        [--config.a.b=value ...] [--json results.json]

PATH is our trainer's workdir (newest step) or step directory, a big_vision .npz, or a Hugging
Face SigLIP directory, opened with `checkpoints.open.open_model`. `--config` defaults to the
run's own config (`<workdir>/config.json`) when PATH is one of our runs. The evaluators are
those of `config.evals`, built exactly as during training (evaluators/builder.py) and sharded
on the config's mesh with its sharding rules.

The model is the checkpoint's own (our run's config.json, the HF config.json); a .npz has
none, so it is `config.model`. The tokenizer is `config.tokenizer.model` if set, else the
checkpoint's (HF `spiece.model`, our run's tokenizer), else the config's training data
source's. Prompts are tokenized to `config.tokenizer.max_len`, which must equal the model's
text length. Exit codes: 0 ok, 1 checkpoint problem, 2 bad config or arguments.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from siglip_jax.config import collect_overrides
from siglip_jax.console import add_verbose_flag, quiet_startup
from siglip_jax.shutdown import run_main


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """Parses --config, --checkpoint, --json and the `--config.a.b=value` overrides."""
    parser = argparse.ArgumentParser(
        prog="python -m siglip_jax.evaluate",
        description="Evaluate a checkpoint with the evaluators of a config (config.evals). "
                    "Extra flags --config.KEY=VALUE override config keys.")
    parser.add_argument("--checkpoint", required=True,
                        help="our workdir or step dir, a big_vision .npz, or a HF SigLIP dir")
    parser.add_argument("--config", help="configs/file.py or configs/file.py:arg (default: the "
                                         "run's own config.json when the checkpoint is ours)")
    parser.add_argument("--json", help="write the results to this JSON file")
    add_verbose_flag(parser)
    args, rest = parser.parse_known_args(argv)
    return args, collect_overrides(rest, parser.error)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit code."""
    argv = quiet_startup(argv)
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    # Imported only now, on purpose: evaluation loads TensorFlow and JAX, which read the
    # logging environment quiet_startup has just set, and `--help` stays instant.
    from siglip_jax import evaluation

    return evaluation.run_cli(args, overrides)


if __name__ == "__main__":
    run_main(main)
