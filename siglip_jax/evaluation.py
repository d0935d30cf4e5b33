"""Evaluation of a checkpoint with a config's evaluators: `evaluate(run, checkpoint)`.

The model is the checkpoint's own (our run's config.json, the HF config.json); a .npz has
none, so it is `run.model`. The tokenizer is `run.tokenizer.model` if set, else the
checkpoint's (HF `spiece.model`, our run's tokenizer), else the run's training data source's.
Prompts are tokenized to `run.tokenizer.max_len`, which must equal the model's text length.
The evaluators are those of `run.evals`, built exactly as during training
(evaluators/builder.py) and sharded on the run's mesh with its sharding rules. `run_cli` is
what `python -m siglip_jax.evaluate` runs after parsing its flags (evaluate.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable

import jax
import ml_collections

from siglip_jax.checkpoints import loader
from siglip_jax.checkpoints.hf import HFCheckpointError
from siglip_jax.checkpoints.loader import (
    CheckpointFormatError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
)
from siglip_jax.checkpoints.open import open_model, resolve_path
from siglip_jax.config import load_config
from siglip_jax.data.builder import make_source
from siglip_jax.data.pp import PPError, get_preprocess_fn
from siglip_jax.data.tokenizer import Tokenizer
from siglip_jax.evaluators.builder import build_evaluators
from siglip_jax.experiment import resolve_tokenizer, setup_jax
from siglip_jax.models.build import make_model
from siglip_jax.models.config import model_kwargs
from siglip_jax.models.params import param_shapes
from siglip_jax.records import ConfigError
from siglip_jax.schema import RunConfig, parse
from siglip_jax.sharding import ShardingError, mesh_of, param_shardings

CHECKPOINT_ERRORS = (CheckpointNotFoundError, CheckpointFormatError, CheckpointMismatchError,
                     HFCheckpointError)


def run_config_spec(checkpoint: str) -> str:
    """The config.json of the run a checkpoint of ours belongs to; ConfigError if none."""
    info = loader.checkpoint_info(resolve_path(checkpoint))
    workdir = info.get("workdir")
    if info["run_config"] is None or not workdir:
        raise ConfigError(f"checkpoint {checkpoint!r} ({info['format']}) has no run config; "
                          "pass --config (a config file with evals)")
    return os.path.join(workdir, "config.json")


def eval_image_shape(run: RunConfig, tokenizer: Tokenizer) -> tuple[int, ...]:
    """[H, W, 3] of the images the first evaluator's pp produces (read from one example)."""
    spec = run.evals[0]
    data = make_source(spec.data, f"evals.{spec.name}.data").dataset(0, 1)
    data = data.map(get_preprocess_fn(spec.pp, tokenizer=tokenizer))
    shape = data.element_spec["image"].shape
    if not shape.is_fully_defined():
        shape = next(iter(data.take(1)))["image"].shape
    return tuple(int(d) for d in shape)


def evaluate(config: RunConfig | ml_collections.ConfigDict, checkpoint: str,
             log: Callable[[str], None] = print) -> dict[str, float]:
    """Runs every evaluator of config.evals on the checkpoint; returns {"<name>/<metric>": v}."""
    run = parse(config)
    if not run.evals:
        raise ConfigError("config.evals is empty: there is nothing to evaluate")
    max_len = run.tokenizer.max_len
    opened = open_model(checkpoint, defaults={"model": model_kwargs(run.model),
                                                "text_len": max_len})
    if opened.text_len != max_len:
        raise ConfigError(f"config.tokenizer.max_len={max_len} but the checkpoint's text tower "
                          f"takes {opened.text_len} tokens; pass "
                          f"--config.tokenizer.max_len={opened.text_len}")
    model = make_model(opened.model)
    tokenizer = resolve_tokenizer(run.tokenizer, opened.tokenizer,
                                  lambda: make_source(run.input.data),
                                  vocab_size=opened.model.text.vocab_size)
    image_shape = eval_image_shape(run, tokenizer)
    abstract = param_shapes(model, tuple(image_shape[:2]), max_len)
    mesh = mesh_of(run.mesh)
    shardings = param_shardings(abstract, run.mesh.rules, mesh)
    log(f"checkpoint {opened.path} ({opened.format}); mesh {dict(mesh.shape)}; "
        f"images {image_shape}, text length {max_len}")
    params = opened.fitted_params(abstract)
    params = jax.tree_util.tree_map(
        lambda x, s: jax.make_array_from_callback(x.shape, s, lambda idx, x=x: x[idx]),
        params, shardings)
    evaluators = build_evaluators(run, model=model, mesh=mesh, param_shardings=shardings,
                                  tokenizer=tokenizer, model_config=opened.model)
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
        shown = (str(int(value)) if metric.startswith("num_") or metric == "nonfinite"
                 else f"{value:.4f}")
        rows.append((name, metric, shown))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{a.ljust(widths[0])}  {b.ljust(widths[1])}  {c.rjust(widths[2])}"
                     for a, b, c in rows)


def run_cli(args: argparse.Namespace, overrides: list[str]) -> int:
    """The evaluation CLI after its flags are parsed: load and parse the config, evaluate,
    print the table (and --json); errors are one `error:` line and the exit code."""
    try:
        spec = args.config or run_config_spec(args.checkpoint)
        run = parse(load_config(spec, overrides))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except CHECKPOINT_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    setup_jax(run)
    try:
        results = evaluate(run, args.checkpoint)
    except (ConfigError, ShardingError, PPError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except CHECKPOINT_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({k: v if v == v else None for k, v in results.items()}, f, indent=2)
    nonfinite = [k.rpartition("/")[0] for k, v in results.items() if k.endswith("/nonfinite")]
    if nonfinite:
        print(f"error: checkpoint {args.checkpoint!r} gives non-finite scores (NaN/Inf) in "
              f"{nonfinite}: the model has diverged", file=sys.stderr)
        return 1
    return 0
