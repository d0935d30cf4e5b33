"""Standalone evaluation: run a config's evaluators on a checkpoint and print a table.

    python -m siglip_jax.evaluate [--config configs/x.py[:arg]] --checkpoint PATH \\
        [--config.a.b=value ...] [--json results.json]

PATH is our trainer's workdir (newest step) or step directory, a big_vision .npz, or a Hugging
Face SigLIP directory (format auto-detected, see checkpoints/loader.py). The evaluators are
those of `config.evals`, built exactly as during training (evaluators/builder.py) and sharded
on the mesh of `config.mesh` / `config.batch_axes` with `config.sharding_rules`.

The model is the checkpoint's own (our run's config.json, the HF config.json) when it has one,
else `config.model` (a .npz). The tokenizer is `config.tokenizer.model` if set, else the
checkpoint's (HF `spiece.model`, our run's tokenizer), else the config's training data
source's. Prompts are tokenized to `config.tokenizer.max_len`, which must equal the model's
text length. Exit codes: 0 ok, 1 checkpoint problem, 2 bad config or arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from siglip_jax.config import ConfigError, collect_overrides, load_config, to_plain
from siglip_jax.console import quiet_startup


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """Parses --config, --checkpoint, --json and the `--config.a.b=value` overrides."""
    parser = argparse.ArgumentParser(
        prog="python -m siglip_jax.evaluate",
        description="Evaluate a checkpoint with the evaluators of a config (config.evals). "
                    "Extra flags --config.KEY=VALUE override config keys.")
    parser.add_argument("--config", help="configs/file.py or configs/file.py:arg (default: the "
                        "config.json of the training workdir given as --checkpoint)")
    parser.add_argument("--checkpoint", required=True,
                        help="our workdir or step dir, a big_vision .npz, or a HF SigLIP dir")
    parser.add_argument("--json", help="write the results to this JSON file")
    args, rest = parser.parse_known_args(argv)
    return args, collect_overrides(rest, parser.error)


def run_config(checkpoint: str, overrides: Sequence[str] = ()) -> Any:
    """The config a training workdir saved (config.json), with overrides applied, locked."""
    import ml_collections

    from siglip_jax.checkpoints.loader import checkpoint_info
    from siglip_jax.config import apply_override

    run = checkpoint_info(checkpoint)["run_config"]
    if run is None:
        raise ConfigError(f"pass --config: {checkpoint!r} is not a training workdir with a "
                          "config.json")
    config = ml_collections.ConfigDict(run)
    for override in overrides:
        apply_override(config, override)
    config.lock()
    return config


def _tokenizer(config: Any, info: dict[str, Any]) -> Any:
    from siglip_jax.data.builder import make_source
    from siglip_jax.train import load_tokenizer

    source = (lambda: make_source(config.input.data)) if config.get("input") else None
    return load_tokenizer(config, source, info["tokenizer"])


def eval_image_shape(config: Any, tokenizer: Any) -> tuple[int, ...]:
    """[H, W, 3] of the images the first evaluator's pp produces (read from one example)."""
    from siglip_jax.data.builder import make_source
    from siglip_jax.data.pp import get_preprocess_fn
    from siglip_jax.evaluators.builder import check_evaluator_config

    name, cfg = next(iter(config.evals.items()))
    check_evaluator_config(cfg, f"evals.{name}")
    data = make_source(cfg.data, f"evals.{name}.data").dataset(0, 1)
    data = data.map(get_preprocess_fn(cfg.pp, tokenizer=tokenizer))
    shape = data.element_spec["image"].shape
    if not shape.is_fully_defined():
        shape = next(iter(data.take(1)))["image"].shape
    return tuple(int(d) for d in shape)


def evaluate(config: Any, checkpoint: str, log: Callable[[str], None] = print
             ) -> dict[str, float]:
    """Runs every evaluator of config.evals on the checkpoint; returns {"<name>/<metric>": v}."""
    import jax
    import jax.numpy as jnp

    from siglip_jax.checkpoints.loader import checkpoint_info, load_params
    from siglip_jax.evaluators.builder import build_evaluators
    from siglip_jax.models.two_towers import Model
    from siglip_jax.sharding import make_mesh, param_shardings

    if not config.get("evals"):
        raise ConfigError("config.evals is empty: there is nothing to evaluate")
    info = checkpoint_info(checkpoint)
    model_config = info["model"] or to_plain(config.model)
    tokenizer = _tokenizer(config, info)
    max_len = int(config.tokenizer.max_len)
    if info["text_len"] and int(info["text_len"]) != max_len:
        raise ConfigError(f"config.tokenizer.max_len={max_len} but the checkpoint's text tower "
                          f"takes {info['text_len']} tokens; pass "
                          f"--config.tokenizer.max_len={info['text_len']}")
    vocab = (model_config.get("text") or {}).get("vocab_size")
    if vocab is not None and tokenizer.vocab_size > int(vocab):
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} ids but the model's "
                          f"vocab_size is {vocab}")
    model = Model(**model_config)
    image_shape = eval_image_shape(config, tokenizer)
    abstract = jax.eval_shape(lambda: model.init(
        jax.random.key(0), jnp.zeros((1, *image_shape)), jnp.zeros((1, max_len), jnp.int32)
    )["params"])
    mesh = make_mesh([tuple(axis) for axis in config.mesh])
    shardings = param_shardings(abstract, [tuple(r) for r in config.sharding_rules], mesh)
    log(f"checkpoint {checkpoint} ({info['format']}); mesh {dict(mesh.shape)}; "
        f"images {image_shape}, text length {max_len}")
    params, _ = load_params(checkpoint, target=abstract)
    params = jax.tree_util.tree_map(
        lambda x, s: jax.make_array_from_callback(x.shape, s, lambda idx, x=x: x[idx]),
        params, shardings)
    evaluators = build_evaluators(config, model=model, mesh=mesh, param_shardings=shardings,
                                  tokenizer=tokenizer)
    results: dict[str, float] = {}
    for name, evaluator in evaluators.items():
        for key, value in evaluator.run(params).items():
            results[f"{name}/{key}"] = float(value)
    return results


def format_table(results: dict[str, float]) -> str:
    """Results as an aligned text table: evaluator, metric, value."""
    rows = [("evaluator", "metric", "value")]
    for key, value in results.items():
        name, _, metric = key.rpartition("/")
        shown = str(int(value)) if metric.startswith("num_") else f"{value:.4f}"
        rows.append((name, metric, shown))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{a.ljust(widths[0])}  {b.ljust(widths[1])}  {c.rjust(widths[2])}"
                     for a, b, c in rows)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit code."""
    argv = quiet_startup(argv)
    from siglip_jax.checkpoints.hf import HFCheckpointError
    from siglip_jax.checkpoints.loader import (
        CheckpointFormatError,
        CheckpointMismatchError,
        CheckpointNotFoundError,
    )
    from siglip_jax.train import setup_jax

    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        config = (load_config(args.config, overrides) if args.config
                  else run_config(args.checkpoint, overrides))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (CheckpointNotFoundError, CheckpointFormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    setup_jax(config)
    try:
        results = evaluate(config, args.checkpoint)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (CheckpointNotFoundError, CheckpointFormatError, CheckpointMismatchError,
            HFCheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
