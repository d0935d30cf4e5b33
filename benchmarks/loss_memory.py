"""Benchmark the loss variants: per-device peak temporary memory and value+grad step time
versus the number of devices N, at a fixed local batch.

    python benchmarks/loss_memory.py                       # b=512, d=768, N=1,2,4,8
    python benchmarks/loss_memory.py --local_batch 128 --dim 64 --steps 2   # quick

    python benchmarks/loss_memory.py --tpu v4 --devices 4,8,16,32,64,128,256 \
        --impls ring,bidirectional,all_gather,softmax      # TPU compiler, no TPU needed

With --tpu GEN the programs are compiled for compile-only TPU slices of N chips (libtpu) and
not run: per-chip temp bytes come from the TPU compiler; times are ESTIMATES (roofline of
the compiled program's FLOPs, HBM bytes and collective bytes, siglip_jax.compiled_step).

Memory is XLA's compile-time `memory_analysis().temp_size_in_bytes` of the jitted
value_and_grad (per device: the program is SPMD). Times are the best of --steps rounds, the
variants interleaved within each round; emulated CPU devices share the host's cores, so
compare ratios between variants, not absolutes.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _parse(argv: list[str]) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--local_batch", type=int, default=512, help="rows per device (b)")
    p.add_argument("--dim", type=int, default=768, help="embedding width (d)")
    p.add_argument("--devices", default="1,2,4,8", help="comma-separated device counts N")
    p.add_argument("--impls", default="all_gather,ring,bidirectional,chunked,softmax")
    p.add_argument("--chunk_size", type=int, default=128, help="rows per chunk (chunked)")
    p.add_argument("--steps", type=int, default=5, help="timed rounds (best reported)")
    p.add_argument("--no_time", action="store_true", help="memory only, skip timing")
    p.add_argument("--tpu", default="", help="TPU generation (v4, v5e, v5p, v6e): compile for "
                   "compile-only slices of N chips and estimate times instead of running")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print a markdown table."""
    args = _parse(sys.argv[1:] if argv is None else argv)
    counts = [int(n) for n in args.devices.split(",")]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.tpu:
        tpu_table(args, counts)
        return
    import jax

    jax.config.update("jax_num_cpu_devices", max(counts))
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from siglip_jax import losses

    impls = args.impls.split(",")
    rows = {}
    for n in counts:
        mesh = Mesh(np.array(jax.devices()[:n]), ("data",))
        sharding = NamedSharding(mesh, P("data"))
        shape = (n * args.local_batch, args.dim)
        rng = np.random.default_rng(0)
        x = rng.normal(size=shape).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        x = jax.device_put(x, sharding)
        y = jax.device_put(jnp.roll(x, 1, axis=1), sharding)
        t_prime, bias = jnp.float32(np.log(10.0)), jnp.float32(-10.0)
        compiled = {}
        for impl in impls:
            opts = {"chunk_size": args.chunk_size} if impl == "chunked" else {}
            loss_fn = losses.make_loss(impl, mesh, **opts)
            step = jax.jit(jax.value_and_grad(lambda *a, f=loss_fn: f(*a)[0],
                                              argnums=(0, 1, 2, 3)))
            compiled[impl] = step.lower(x, y, t_prime, bias).compile()
            if not args.no_time:  # warm up
                jax.block_until_ready(compiled[impl](x, y, t_prime, bias))
        # Interleave the variants round by round so load from other processes hits all alike.
        times = {impl: [] for impl in impls}
        for _ in range(0 if args.no_time else args.steps):
            for impl in impls:
                t0 = time.perf_counter()
                jax.block_until_ready(compiled[impl](x, y, t_prime, bias))
                times[impl].append(time.perf_counter() - t0)
        for impl in impls:
            temp = compiled[impl].memory_analysis().temp_size_in_bytes
            secs = float(np.min(times[impl])) if times[impl] else float("nan")
            rows[(impl, n)] = (temp, secs)
            print(f"# {impl:14s} N={n}: {temp / 2**20:8.2f} MiB  {secs * 1e3:9.1f} ms",
                  file=sys.stderr, flush=True)

    mib = 2**20
    timed = not args.no_time
    what = f"value+grad ms (best of {args.steps}, interleaved)" if timed else "(timing skipped)"
    print(f"\nlocal batch b={args.local_batch}, dim d={args.dim}, float32; "
          f"peak temp MiB per device | {what}\n")

    def cells(mem, ms, ms_fmt=".1f"):
        return f"{mem:.2f} | {ms:{ms_fmt}}" if timed else f"{mem:.2f}"

    head = [f"N={n} MiB | N={n} ms" if timed else f"N={n} MiB" for n in counts]
    print("| impl | " + " | ".join(head) + " |")
    print("|---|" + ("---|---|" if timed else "---|") * len(counts))
    for impl in impls:
        row = [cells(rows[impl, n][0] / mib, rows[impl, n][1] * 1e3) for n in counts]
        print(f"| {impl} | " + " | ".join(row) + " |")
    if "ring" in impls and "all_gather" in impls:
        row = [cells(rows["ring", n][0] / rows["all_gather", n][0],
                     rows["ring", n][1] / rows["all_gather", n][1], ".2f") for n in counts]
        print("| ring / all_gather | " + " | ".join(row) + " |")
    lo, hi = min(c for c in counts if c > 1), max(counts)
    if lo < hi:
        print(f"\ngrowth of peak memory N={lo} -> N={hi}:")
        for impl in impls:
            print(f"  {impl:14s} x{rows[impl, hi][0] / rows[impl, lo][0]:.2f}")


def tpu_table(args: argparse.Namespace, counts: list[int]) -> None:
    """Per-chip temp bytes and roofline step estimate of each loss on compile-only TPU slices."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from siglip_jax import losses
    from siglip_jax.compiled_step import analyse
    from siglip_jax.tpu_slices import CHIPS, compile_only_devices, parse_slice

    chip = CHIPS[args.tpu]
    impls = args.impls.split(",")
    rows = {}
    for n in counts:
        spec = parse_slice(f"{args.tpu}-{n * chip.cores_per_chip}")
        mesh = Mesh(np.array(compile_only_devices(spec)), ("data",))
        z = jax.ShapeDtypeStruct((n * args.local_batch, args.dim), jnp.float32,
                                 sharding=NamedSharding(mesh, P("data")))
        scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))
        for impl in impls:
            opts = {"chunk_size": args.chunk_size} if impl == "chunked" else {}
            loss_fn = losses.make_loss(impl, mesh, **opts)
            step = jax.jit(jax.value_and_grad(lambda *a, f=loss_fn: f(*a)[0],
                                              argnums=(0, 1, 2, 3)))
            t0 = time.perf_counter()
            compiled = step.lower(z, z, scalar, scalar).compile()
            report = analyse(compiled, chip, slice_name=spec.name, chips=n,
                             examples_per_step=n * args.local_batch,
                             compile_seconds=time.perf_counter() - t0)
            rows[(impl, n)] = (report.temp_bytes, report.step_seconds or float("nan"))
            print(f"# {impl:14s} {spec.name} ({n} chips): {report.temp_bytes / 2**20:8.2f} MiB "
                  f"{rows[impl, n][1] * 1e3:8.3f} ms est. ({report.bound}-bound), compiled in "
                  f"{report.compile_seconds:.1f} s", file=sys.stderr, flush=True)
    print(f"\n{chip.label}, local batch b={args.local_batch} per chip, dim d={args.dim}, "
          "float32; per-chip temp MiB (TPU compiler) | value+grad ms (roofline ESTIMATE)\n")
    print("| impl | " + " | ".join(f"N={n} MiB | N={n} ms" for n in counts) + " |")
    print("|---|" + "---|---|" * len(counts))
    for impl in impls:
        cells = [f"{rows[impl, n][0] / 2**20:.2f} | {rows[impl, n][1] * 1e3:.3f}" for n in counts]
        print(f"| {impl} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
