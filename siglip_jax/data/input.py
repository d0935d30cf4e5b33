"""The tf.data pipeline: per-process shards → preprocess → shuffle/repeat/batch → numpy batches.

Training iterators are infinite, deterministic given the seed, and resumable: `start_step`
skips the examples already consumed (before preprocessing, which is the expensive part), so a
resumed run sees exactly the next unseen batch. Evaluation
iterators are finite; the last batch is padded and carries a boolean `_mask` so no example is
dropped or counted twice, and every process yields the same number of batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import jax
import numpy as np
import tensorflow as tf

from siglip_jax.data.registry import add_example_seeds
from siglip_jax.data.sources import Source, SourceError
from siglip_jax.records import ConfigError

PreprocessFn = Callable[[dict[str, tf.Tensor]], dict[str, tf.Tensor]]
Batch = dict[str, np.ndarray]
MASK_KEY = "_mask"


def _options(threads: int | None) -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    if threads:
        options.threading.private_threadpool_size = threads
    return options


def cast_entries(preprocess: PreprocessFn, keys: Sequence[str], dtype: str) -> PreprocessFn:
    """`preprocess` followed by a cast of the float entries `keys` (those present) to `dtype`."""
    target = tf.as_dtype(dtype)

    def cast(example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        out = dict(preprocess(example))
        for key in keys:
            if key in out and out[key].dtype.is_floating:
                out[key] = tf.cast(out[key], target)
        return out

    return cast


def train_batches(source: Source, preprocess: PreprocessFn, *, shard_ids: Sequence[int],
                  num_shards: int, shard_batch: int, seed: int, shuffle_buffer: int = 10_000,
                  start_step: int = 0, prefetch: int = 2, threads: int | None = None,
                  cache: bool = False) -> Iterator[Batch]:
    """Infinite iterator of this process's batches (dicts of numpy arrays).

    The data is split into `num_shards` virtual shards, one per batch shard (device) of the
    global batch; `source.dataset(shard, num_shards, ...)` gives shard `shard` (by files where
    the source can). Each shard is shuffled with its own seed, repeated, and batched into
    `shard_batch` examples; this process's batch is its shards' batches side by side, in
    `shard_ids` order. So the global batch does not depend on how many processes read it, and a
    run on 2 processes × 4 devices sees the same batches as 1 process × 8 devices.
    `shuffle_buffer` is per shard: a process buffers `shuffle_buffer × len(shard_ids)` examples.

    Random pp ops get a per-example seed `[seed·65537 + shard, position]`, so augmentations are
    reproducible too. `start_step` skips the examples already consumed (before preprocessing,
    the expensive part): a resumed run sees exactly the next unseen batch.

    A shard that yields nothing (an unreadable tar file, all its examples bad) reads the whole
    source instead (its own seed, so still reproducible and process-count invariant): training
    never ends while any data remains. A source with fewer examples than `num_shards` is a
    ConfigError; one that yields no example at all raises SourceError at the first batch.
    """
    if shard_batch <= 0:
        raise ValueError(f"per-shard batch size must be positive, got {shard_batch}")
    size = getattr(source, "num_examples", None)
    if size is not None and size < num_shards:
        raise ConfigError(f"the training data has {size} examples, fewer than the "
                          f"{num_shards} batch shards (devices on the batch axes) that each "
                          "need their own share; use more data or fewer devices")
    # Read by a shard only if its own data is empty (its repeat then ends at once). One
    # dataset object for all shards: its tensors exist once, each shard shuffles its way.
    everything = source.dataset(0, 1, shuffle_files=True, seed=seed)
    shards = []
    for shard in shard_ids:
        def repeated(dataset, shard=shard):
            if cache:
                dataset = dataset.cache()
            return dataset.shuffle(shuffle_buffer, seed=seed * 7919 + shard,
                                   reshuffle_each_iteration=True).repeat()

        own = repeated(source.dataset(shard, num_shards, shuffle_files=True, seed=seed + shard))
        dataset = add_example_seeds(own.concatenate(repeated(everything)),
                                    seed * 65_537 + shard)
        if start_step:
            dataset = dataset.skip(start_step * shard_batch)
        shards.append(dataset)
    # The shards' raw examples in batch order (shard_batch from each shard in turn), then one
    # map for all: a pp graph with random views costs seconds to build per map (8 maps of the
    # SigLIP 2 demo's pp took 9 s to start, one takes 2.5 s), and a TPU host reads 4–8 shards.
    dataset = shards[0] if len(shards) == 1 else tf.data.Dataset.choose_from_datasets(
        shards, tf.data.Dataset.range(len(shards) * shard_batch, output_type=tf.int64).map(
            lambda i: i // shard_batch).repeat())
    dataset = dataset.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    dataset = dataset.batch(shard_batch * len(shards), drop_remainder=True)
    dataset = dataset.prefetch(prefetch).with_options(_options(threads))
    return _endless(dataset.as_numpy_iterator())


def _endless(batches: Iterator[Batch]) -> Iterator[Batch]:
    """The infinite training batches; a clear error instead of StopIteration if they end."""
    yield from batches
    raise SourceError("the training data yields no usable example (every file unreadable or "
                      "every example skipped as bad); check input.data and the skip counts")


def local_shard_ids(sharding: jax.sharding.Sharding, global_batch: int) -> list[int]:
    """Which batch shards this process's devices hold, in the order of its local rows."""
    starts = sorted({index[0].start or 0 for device, index in
                     sharding.addressable_devices_indices_map((global_batch,)).items()
                     if device.process_index == jax.process_index()})
    num_shards = len({index[0].start or 0 for index in
                      sharding.devices_indices_map((global_batch,)).values()})
    shard_batch = global_batch // num_shards
    return [start // shard_batch for start in starts]


def num_eval_batches(num_examples: int, global_batch: int) -> int:
    """Batches needed to cover `num_examples` once with `global_batch` examples per batch."""
    return max(1, math.ceil(num_examples / global_batch))


def eval_batches(dataset: tf.data.Dataset, preprocess: PreprocessFn, *, local_batch: int,
                 num_batches: int, threads: int | None = None, seed: int = 0
                 ) -> Iterator[Batch]:
    """Exactly `num_batches` batches of this process's data, padded, with a `_mask` key.
    Every example gets a "_seed" from `seed` and its position, so random pp ops (e.g. the
    object `locca_task` picks) are the same at every evaluation of the same data."""
    dataset = add_example_seeds(dataset, seed)
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
        yield _pad(tf.nest.map_structure(lambda v: v[:0], template), local_batch)
        produced += 1


def _pad(batch: Batch, size: int) -> Batch:
    """Zero-pad every array (nested dicts too, e.g. NaFlex images) to `size` rows + a mask."""
    n = len(tf.nest.flatten(batch)[0])

    def pad(value: np.ndarray) -> np.ndarray:
        value = np.asarray(value)
        zeros = np.zeros((size - n, *value.shape[1:]), value.dtype)
        return np.concatenate([value, zeros]) if n < size else value

    out = tf.nest.map_structure(pad, dict(batch))
    out[MASK_KEY] = np.arange(size) < n
    return out
