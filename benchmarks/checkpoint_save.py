"""Checkpoint save time: replicated arrays split into one part per replica, or not when small.

    python benchmarks/checkpoint_save.py [--repeats 5] [--devices 8]

The train state of a model (params, Adam's two moments and the step), replicated over every
device as data parallelism holds it, saved by our Checkpointer (async, then waited for):

  min 0        orbax's default: every replicated array is split into one part per replica
  min 64 KiB   ours (`checkpoint.min_replica_slice_bytes`): only parts of at least 64 KiB

Rows: two towers of depth 2 at width 32 (every array's part below 64 KiB) and at width 256
(the wide matrices, 128 KiB a part, split in both columns). Saves alternate between the two
settings; the table gives the median of `--repeats` saves each, after one save that compiles,
and the number of device slices (`jax.lax.slice_in_dim`) one save dispatches.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--devices", type=int, default=8)
    return parser.parse_args(argv)


def _model_kwargs(width: int) -> dict:
    tower = dict(width=width, depth=2, mlp_dim=4 * width, num_heads=4)
    return dict(image=dict(**tower, patch_size=8, posemb="learn", pool_type="map"),
                text=dict(**tower, vocab_size=256, pool_type="last"),
                out_dim=(None, width), temperature_init=10.0, bias_init=-10.0)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={args.devices}")
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from siglip_jax.checkpoints.orbax_io import MIN_REPLICA_SLICE_BYTES, Checkpointer
    from siglip_jax.models.two_towers import Model

    replicated = NamedSharding(jax.make_mesh((args.devices,), ("data",)), PartitionSpec())
    print(f"{args.devices} CPU devices, {os.cpu_count()} cores; median of {args.repeats} saves")
    print("| model | arrays | MiB | min 0: slices | s | min 64 KiB: slices | s | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    slice_in_dim = jax.lax.slice_in_dim
    sliced: list[int] = []

    def counting(*a: object, **k: object) -> object:
        sliced.append(1)
        return slice_in_dim(*a, **k)

    jax.lax.slice_in_dim = counting  # orbax looks it up at each call.
    for name, width in (("two towers, width 32, depth 2", 32),
                        ("two towers, width 256, depth 2", 256)):
        params = jax.jit(Model(**_model_kwargs(width)).init)(
            jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 8), jnp.int32))["params"]
        state = jax.device_put({"params": params, "mu": params, "nu": params,
                                "step": jnp.int32(0)}, replicated)
        leaves = jax.tree.leaves(state)
        mib = sum(x.nbytes for x in leaves) / 2**20
        times: dict[int, list[float]] = {0: [], MIN_REPLICA_SLICE_BYTES: []}
        slices: dict[int, int] = {}
        with tempfile.TemporaryDirectory() as root:
            for repeat in range(args.repeats + 1):
                for minimum, seconds in times.items():
                    workdir = os.path.join(root, f"{minimum}_{repeat}")
                    sliced.clear()
                    start = time.perf_counter()
                    with Checkpointer(workdir, 1, min_replica_slice_bytes=minimum) as ckpt:
                        ckpt.maybe_save(1, state)
                    if repeat:  # The first save of each compiles its slices.
                        seconds.append(time.perf_counter() - start)
                    slices[minimum] = len(sliced)
        split, whole = (statistics.median(t) for t in times.values())
        print(f"| {name} | {len(leaves)} | {mib:.2f} | {slices[0]} | {split:.3f} | "
              f"{slices[MIN_REPLICA_SLICE_BYTES]} | {whole:.3f} | {whole / split:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
