"""The tf.data pipeline: per-process shards → preprocess → shuffle/repeat/batch → numpy batches.

Training iterators are infinite, deterministic given the seed, and resumable: `start_step`
skips the examples already consumed (before preprocessing, which is the expensive part), so a
resumed run sees exactly the next unseen batch. Evaluation
iterators are finite; the last batch is padded and carries a boolean `_mask` so no example is
dropped or counted twice, and every process yields the same number of batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import tensorflow as tf

PreprocessFn = Callable[[dict[str, tf.Tensor]], dict[str, tf.Tensor]]
MASK_KEY = "_mask"


def _options(threads: int | None) -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    if threads:
        options.threading.private_threadpool_size = threads
    return options


def train_batches(dataset: tf.data.Dataset, preprocess: PreprocessFn, *, local_batch: int,
                  seed: int, example_seed: int | None = None,
                  shuffle_buffer: int = 10_000, start_step: int = 0,
                  prefetch: int = 2, threads: int | None = None,
                  cache: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """Infinite iterator of this process's batches (dicts of numpy arrays).

    `example_seed` (default: `seed`; give each process its own) seeds the random pp ops: each
    example occurrence gets `[example_seed, position]`, so augmentations are reproducible.
    """
    from siglip_jax.data.pp import add_example_seeds

    if local_batch <= 0:
        raise ValueError(f"local batch size must be positive, got {local_batch}")
    if cache:
        dataset = dataset.cache()
    dataset = dataset.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.repeat()
    dataset = add_example_seeds(dataset, seed if example_seed is None else example_seed)
    if start_step:  # Skip consumed examples before preprocessing them: resuming stays cheap.
        dataset = dataset.skip(start_step * local_batch)
    dataset = dataset.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    dataset = dataset.batch(local_batch, drop_remainder=True)
    dataset = dataset.prefetch(prefetch).with_options(_options(threads))
    return dataset.as_numpy_iterator()


def num_eval_batches(num_examples: int, global_batch: int) -> int:
    """Batches needed to cover `num_examples` once with `global_batch` examples per batch."""
    return max(1, math.ceil(num_examples / global_batch))


def eval_batches(dataset: tf.data.Dataset, preprocess: PreprocessFn, *, local_batch: int,
                 num_batches: int, threads: int | None = None
                 ) -> Iterator[dict[str, np.ndarray]]:
    """Exactly `num_batches` batches of this process's data, padded, with a `_mask` key."""
    dataset = dataset.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    dataset = dataset.batch(local_batch).prefetch(2).with_options(_options(threads))
    template: dict[str, np.ndarray] | None = None
    produced = 0
    for batch in dataset.as_numpy_iterator():
        if produced == num_batches:
            raise ValueError(f"this process has more than {num_batches} eval batches of "
                             f"{local_batch}; the example count given was too small")
        yield _pad(batch, local_batch)
        template = batch
        produced += 1
    while produced < num_batches:  # Processes with fewer examples send empty, masked batches.
        if template is None:
            raise ValueError("this process's share of the evaluation data is empty")
        yield _pad({k: v[:0] for k, v in template.items()}, local_batch)
        produced += 1


def _pad(batch: dict[str, Any], size: int) -> dict[str, np.ndarray]:
    n = len(next(iter(batch.values())))
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        pad = np.zeros((size - n, *value.shape[1:]), value.dtype)
        out[key] = np.concatenate([value, pad]) if n < size else value
    out[MASK_KEY] = np.arange(size) < n
    return out
