"""Input pipeline throughput: examples/s of tf.data pipelines built as the trainer builds them.

    python benchmarks/input_throughput.py [--examples 2000] [--shards 4]

Rows (one run, same machine):
  tar read           webdataset tar shards of 256×256 JPEGs (from skimage.data), no pp
  tar + pp @224      decode|resize(224)|value_range(-1, 1)|tokenize(max_len=64)
  demo pipeline      the embedded demo's own pipeline (configs/demo.py pp, 8 virtual shards)
The last column compares the demo pipeline with what the demo's training consumes
(global batch 128 × steps/s of the train step, measured here with the demo model).
"""

from __future__ import annotations

import argparse
import io
import os
import tarfile
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402


def make_shards(root: str, num_examples: int, num_shards: int) -> str:
    """Tar shards of real photos (skimage.data) resized to 256×256 JPEG, with captions."""
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    per_shard = num_examples // num_shards
    for shard in range(num_shards):
        with tarfile.open(os.path.join(root, f"shard_{shard:03d}.tar"), "w") as tar:
            for i in range(per_shard):
                image = Image.fromarray(photos[i % len(photos)]).resize((256, 256))
                buffer = io.BytesIO()
                image.save(buffer, format="JPEG", quality=90)
                for name, payload in ((f"{shard}_{i:06d}.jpg", buffer.getvalue()),
                                      (f"{shard}_{i:06d}.txt", f"a photo number {i}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return os.path.join(root, "shard_*.tar")


def rate(iterator, examples_per_item: int, seconds: float = 8.0, warmup: int = 3) -> float:
    """Examples per second drawn from `iterator` over about `seconds`."""
    for _ in range(warmup):
        next(iterator)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        next(iterator)
        count += examples_per_item
    return count / (time.perf_counter() - start)


def demo_step_rate(steps: int = 20) -> float:
    """Steps/s of the demo's compiled train step (8 emulated devices), without input."""
    import jax

    jax.config.update("jax_num_cpu_devices", 8)
    from siglip_jax import experiment
    from siglip_jax.config import load_config
    from siglip_jax.schema import parse
    from siglip_jax.sharding import make_global_batch, mesh_of

    config = parse(load_config("configs/demo.py"))
    mesh = mesh_of(config.mesh)
    shapes = {"image": (128, 32, 32, 3), "labels": (128, 8)}
    parts = experiment.build_step(config, mesh, shapes)
    state = experiment.init_state(config, parts, mesh, shapes)
    fn = parts.step_fn
    batch = make_global_batch({"image": np.zeros(shapes["image"], np.float32),
                               "labels": np.ones(shapes["labels"], np.int32)}, mesh, ("data",))
    for _ in range(3):
        state, metrics = fn(state, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = fn(state, batch)
    jax.block_until_ready(metrics)
    return steps / (time.perf_counter() - start)


def main() -> None:
    """Builds the data, measures every row and prints the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args()

    from siglip_jax.config import load_config
    from siglip_jax.data import input as input_lib
    from siglip_jax.data.builder import make_source
    from siglip_jax.data.config import parse_source
    from siglip_jax.data.pp import get_preprocess_fn
    from siglip_jax.data.sources import TarShardSource
    from siglip_jax.data.tokenizer import Tokenizer
    from siglip_jax.data.tokenizer_training import train_sentencepiece

    with tempfile.TemporaryDirectory() as root:
        pattern = make_shards(root, args.examples, args.shards)
        spm = train_sentencepiece([f"a photo number {i}" for i in range(200)], 64,
                                  os.path.join(root, "spm.model"))
        tokenizer = Tokenizer(spm)
        full_pp = get_preprocess_fn(
            'decode|resize(224)|value_range(-1, 1)|tokenize(max_len=64, inkey="texts")|'
            'keep("image", "labels")', tokenizer=tokenizer)
        rows = []
        for check in (True, False):
            source = TarShardSource(pattern, check_images=check)
            raw = source.dataset().repeat().batch(32).prefetch(2).as_numpy_iterator()
            rows.append((f"tar read, check_images={check}", rate(raw, 32, args.seconds)))
            piped = input_lib.train_batches(source, full_pp, shard_ids=[0], num_shards=1,
                                            shard_batch=32, seed=0, shuffle_buffer=256)
            rows.append((f"tar + pp @224, check_images={check}", rate(piped, 32, args.seconds)))

        config = load_config("configs/demo.py")
        demo_source = make_source(parse_source(config.input.data, "input.data"))
        demo_pp = get_preprocess_fn(config.input.pp, tokenizer=Tokenizer(
            demo_source.tokenizer_path))
        demo = input_lib.train_batches(demo_source, demo_pp, shard_ids=list(range(8)),
                                       num_shards=8, shard_batch=16, seed=0,
                                       shuffle_buffer=int(config.input.shuffle_buffer),
                                       cache=True)
        demo_rate = rate(demo, 128, args.seconds)
        rows.append(("demo pipeline (32 px, 8 shards)", demo_rate))

    steps_per_s = demo_step_rate()
    needed = 128 * steps_per_s
    print(f"\n{'pipeline':<40} {'examples/s':>11}")
    for name, value in rows:
        print(f"{name:<40} {value:>11.0f}")
    print(f"\ndemo training consumes {needed:.0f} examples/s ({steps_per_s:.2f} steps/s × 128); "
          f"demo pipeline / consumption = {demo_rate / needed:.1f}×")


if __name__ == "__main__":
    main()
