"""Builds the evaluators named in `config.evals` (each a dict with a `type`) for the trainer
and the evaluation CLI.

Keys of a `zeroshot` evaluator:
  data           data source section (see data/builder.py) of a labelled image set
  pp             preprocessing string producing "image" (and keeping "label")
  class_names    list of names, or a string: "from_data" = the source's class names
  templates      prompt templates with "{}" for the class name
  every_n_steps  run every N training steps (0: only at the end)
  batch_size     global evaluation batch size (rounded down to a multiple of the shards)
"""

from __future__ import annotations

from typing import Any

import jax

from siglip_jax.config import ConfigError, check_keys
from siglip_jax.data import input as input_lib
from siglip_jax.data.builder import make_source
from siglip_jax.data.pp import get_preprocess_fn
from siglip_jax.evaluators.common import Embedder
from siglip_jax.evaluators.zeroshot import ZeroShotEvaluator

EVALUATOR_TYPES = ("zeroshot",)
ZEROSHOT_KEYS = ("type", "data", "pp", "class_names", "templates", "every_n_steps",
                 "batch_size")


def build_evaluators(config: Any, *, model: Any, mesh: Any, param_shardings: Any,
                     tokenizer: Any) -> dict[str, Any]:
    """Evaluators named in config.evals, each with an `every_n_steps` attribute."""
    evaluators: dict[str, Any] = {}
    embedder = None
    max_len, eos = int(config.tokenizer.max_len), config.tokenizer.eos
    tokenize = lambda texts: tokenizer.encode(texts, max_len, eos)
    for name, cfg in (config.get("evals") or {}).items():
        where = f"evals.{name}"
        if cfg.get("type") not in EVALUATOR_TYPES:
            raise ConfigError(f"{where}.type {cfg.get('type')!r} is not one of {EVALUATOR_TYPES}")
        check_keys(cfg, ZEROSHOT_KEYS, where)
        embedder = embedder or Embedder(model, mesh, tuple(config.batch_axes), param_shardings)
        source = make_source(cfg.data, f"{where}.data")
        if source.num_examples is None:
            raise ConfigError(f"{where}.data: the evaluation source must know its size")
        preprocess = get_preprocess_fn(cfg.pp, tokenizer=tokenizer)
        shards = embedder.num_shards * jax.process_count()
        batch_size = max(shards, int(cfg.get("batch_size", 256)) // shards * shards)
        num_batches = input_lib.num_eval_batches(source.num_examples, batch_size)
        local_batch = batch_size // jax.process_count()

        def batches(source=source, preprocess=preprocess, num_batches=num_batches,
                    local=local_batch):
            data = source.dataset(jax.process_index(), jax.process_count())
            return input_lib.eval_batches(data, preprocess, local_batch=local,
                                          num_batches=num_batches)

        class_names = cfg.class_names
        if isinstance(class_names, str):
            if class_names != "from_data" or not getattr(source, "class_names", None):
                raise ConfigError(f"{where}.class_names must be a list of names, or "
                                  "'from_data' for a source that has class names")
            class_names = source.class_names
        evaluator = ZeroShotEvaluator(
            embedder=embedder, class_names=list(class_names), templates=list(cfg.templates),
            tokenize=tokenize, batches=batches)
        evaluator.every_n_steps = int(cfg.get("every_n_steps", 0))
        evaluators[name] = evaluator
    return evaluators
