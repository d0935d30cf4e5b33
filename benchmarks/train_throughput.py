"""Benchmark the training step: our trainer vs a plain JAX step vs PyTorch, MFU, emulation.

    python benchmarks/train_throughput.py                    # everything, ~8 min on 2 cores
    python benchmarks/train_throughput.py --rounds 1 --skip scan_remat,fsdp_4x2   # quicker

A B/16-shaped model cut to depth 2 (224 px, patch 16, width 768, MLP 3072, 12 heads, MAP
pooling; text length 64, vocab 32 000; global batch 32; float32) on random data. Each device
count runs in its own worker process (`jax_num_cpu_devices` = 1 or 8, as `cpu_devices` does
for a user), one after the other, so the 8-device process never shares the machine with the
1-device one. (A 1-device sub-mesh of an 8-device process measured the same plain step time,
3.0 s, so the choice is about isolation and memory, not speed.) Rows:

  trainer        our step as `python -m siglip_jax.train` builds it from a config: the config
                 is `get_config()` below, loaded by `siglip_jax.config.load_config`, the step
                 made by `siglip_jax.train`/`step` (make_model, make_optimizer, init_state,
                 make_loss_fn = ring, make_train_step, jit with shardings and donation);
  plain          a hand-written step of the same flax model: dense sigmoid loss, optax
                 clip-by-global-norm + adamw, `jax.jit` (no siglip_jax machinery);
  torch          transformers.SiglipModel of the same config (return_loss=True: the same
                 sigmoid loss), torch.optim.AdamW, clip_grad_norm_, 2 threads;
  trainer fsdp   8 devices, `sharding_rules=[(".*", "fsdp")]` on a data×fsdp mesh;
  trainer LiT    the image tower frozen by the schedule [("img/.*", None), (".*", {...})];
  scan/remat     depth-12 towers (full B/16), compile only: per-device temp bytes.

Times are per step, the variants of a process interleaved round by round (so load from
other processes hits all alike); best of `--rounds` (median shown too). MFU = model FLOPs ÷
step time ÷ peak, where model FLOPs are XLA's `cost_analysis()` of the 1-device compiled step
of that kind of run (the plain step for full training, the LiT trainer step for LiT) and the
peak is the best rate of a 4096² f32 matmul on one device, measured after every round of the
same run. Memory is XLA's compile-time `memory_analysis()` per device: temp (activations and
other temporaries) and arguments (train state + batch shard).

The file is also the trainer config of the benchmarked model (`get_config(arg)`, args:
depth, fsdp, lit, scan, remat); on the demo data it trains with
`python -m siglip_jax.train --config benchmarks/train_throughput.py --workdir DIR`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import ml_collections

RES, PATCH, TEXT_LEN, VOCAB, BATCH = 224, 16, 64, 32_000, 32
SECTIONS = ("torch", "fsdp_1x8", "fsdp_4x2", "lit", "scan_remat")
MiB = 2**20


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Trainer config of the benchmarked model; arg `depth=2,fsdp=1,lit=0,scan=0,remat=none`."""
    from siglip_jax.config import ConfigError, parse_config_arg

    defaults = dict(depth=2, fsdp=1, lit=0, scan=0, remat="none")
    args = parse_config_arg(arg or "")
    unknown = sorted(set(args) - set(defaults))
    if unknown:
        raise ConfigError(f"unknown config argument {unknown[0]!r}; valid: {sorted(defaults)}")
    args = {**defaults, **args}
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 20
    c.log_every = 5
    c.time_budget_s = 0.0
    c.cpu_devices = 8
    fsdp = int(args["fsdp"])
    if fsdp > 1:
        c.mesh = [("data", -1), ("fsdp", fsdp)]
        c.batch_axes = ("data", "fsdp")
        c.sharding_rules = [(".*", "fsdp")]
    else:
        c.mesh = [("data", -1)]
        c.batch_axes = ("data",)
        c.sharding_rules = [(".*", "replicate")]
    c.input = ml_collections.ConfigDict()
    c.input.data = dict(name="demo_shapes", split="train", data_dir="~/.cache/siglip_jax",
                        image_size=RES, train_per_class=10, test_per_class=2)
    c.input.pp = (f'value_range(-1, 1)|tokenize(max_len={TEXT_LEN}, eos="sticky", '
                  'inkey="texts", outkey="labels")|keep("image", "labels")')
    c.input.global_batch = BATCH
    c.input.shuffle_buffer = 100
    c.input.cache = True
    c.tokenizer = dict(model="", max_len=TEXT_LEN, eos="sticky")
    c.model = ml_collections.ConfigDict()
    tower = dict(width=768, depth=int(args["depth"]), mlp_dim=3072, num_heads=12,
                 scan=bool(args["scan"]), remat_policy=str(args["remat"]), dtype="float32")
    c.model.image = dict(patch_size=PATCH, posemb="learn", pool_type="map", **tower)
    c.model.text = dict(vocab_size=VOCAB, pool_type="last", **tower)
    c.model.out_dim = (None, 768)
    c.model.temperature_init = 10.0
    c.model.bias_init = -10.0
    c.model_init = dict(img="", txt="", full="")
    c.loss = dict(impl="ring")
    c.optim = dict(name="adam", b1=0.9, b2=0.95)
    c.lr = 1e-3
    c.wd = 1e-4
    c.grad_clip_norm = 1.0
    cosine = dict(decay_type="cosine", warmup_steps=2)
    c.schedule = [("img/.*", None), (".*", cosine)] if int(args["lit"]) else cosine
    c.grad_accum_steps = 1
    c.on_nonfinite = "stop"
    c.peak_flops = None
    c.evals = ml_collections.ConfigDict()
    c.checkpoint = dict(every_n_steps=1_000, keep=1, keep_every_n_steps=0)
    c.tensorboard = False
    return c


# ----------------------------------------------------------------------------- variants


class Variant:
    """One compiled step: `run()` executes a step and waits for it."""

    def __init__(self, name: str, devices: int, run: Callable[[], None],
                 compiled: Any = None, opt_bytes: int | None = None, kind: str = "full"):
        self.name, self.devices, self.run = name, devices, run
        self.compiled, self.opt_bytes, self.kind = compiled, opt_bytes, kind
        self.times: list[float] = []
        self.note = ""

    def memory(self) -> tuple[float | None, float | None]:
        """(temp MiB, argument MiB) per device from XLA's memory analysis."""
        if self.compiled is None:
            return None, None
        m = self.compiled.memory_analysis()
        return m.temp_size_in_bytes / MiB, m.argument_size_in_bytes / MiB

    def record(self) -> dict[str, Any]:
        """The measurements as JSON-able values."""
        temp, args = self.memory()
        return {"name": self.name, "kind": self.kind, "times": self.times, "note": self.note,
                "temp_mib": temp, "args_mib": args, "xla_flops": self.flops(),
                "opt_mib": None if self.opt_bytes is None else self.opt_bytes / MiB}

    def flops(self) -> float | None:
        """XLA's FLOPs of one step summed over devices (None for PyTorch)."""
        from siglip_jax.metrics import compiled_flops

        f = compiled_flops(self.compiled) if self.compiled is not None else None
        return f * self.devices if f else None


def _device_bytes(tree: Any) -> int:
    """Bytes of `tree`'s arrays held by the first device of their sharding."""
    import jax

    total = 0
    for leaf in jax.tree_util.tree_leaves(tree):
        shards = leaf.addressable_shards
        total += shards[0].data.nbytes if shards else 0
    return total


def random_batch(seed: int = 0) -> dict[str, Any]:
    """A batch of the benchmark's shape: images in [-1, 1], token ids with sticky EOS."""
    import numpy as np

    rng = np.random.default_rng(seed)
    image = rng.uniform(-1, 1, (BATCH, RES, RES, 3)).astype(np.float32)
    labels = rng.integers(3, VOCAB, (BATCH, TEXT_LEN)).astype(np.int32)
    lengths = rng.integers(4, TEXT_LEN, BATCH)
    labels[np.arange(TEXT_LEN)[None, :] >= lengths[:, None]] = 1
    return {"image": image, "labels": labels}


def _config_spec(arg: str) -> str:
    return f"{os.path.abspath(__file__)}:{arg}" if arg else os.path.abspath(__file__)


def trainer_parts(config: Any, devices: list, batch: dict[str, Any]) -> Any:
    """The trainer's step and its pieces, from `experiment.build_step` as train() uses."""
    from siglip_jax.experiment import build_step
    from siglip_jax.sharding import mesh_of
    mesh = mesh_of(config.mesh, devices)
    return mesh, build_step(config, mesh, {k: v.shape for k, v in batch.items()})


def trainer_variant(name: str, arg: str, devices: list, batch: dict[str, Any],
                    kind: str = "full") -> Variant:
    """Our trainer's compiled step for `get_config(arg)` on `devices`."""
    import jax

    from siglip_jax import experiment
    from siglip_jax.config import load_config
    from siglip_jax.schema import parse

    config = parse(load_config(_config_spec(arg)))
    mesh, parts = trainer_parts(config, devices, batch)
    state = experiment.init_state(config, parts, mesh, {k: v.shape for k, v in batch.items()})
    global_batch = jax.device_put(batch, parts.data_sharding)
    compiled = parts.step_fn.lower(state, global_batch).compile()
    holder = {"state": state}

    def run():
        holder["state"], metrics = compiled(holder["state"], global_batch)
        jax.block_until_ready((holder["state"], metrics))

    return Variant(name, len(devices), run, compiled, _device_bytes(state["opt_state"]), kind)


def dense_sigmoid_loss(zimg_bxd: Any, ztxt_bxd: Any, t: Any, b: Any) -> Any:
    """-Σ_ij log σ(z_ij (t·x_i·y_j + b)) / B, z = +1 on the diagonal, −1 elsewhere."""
    import jax
    import jax.numpy as jnp

    n = zimg_bxd.shape[0]
    logits_bxb = zimg_bxd @ ztxt_bxd.T * t + b
    signs_bxb = 2.0 * jnp.eye(n) - 1.0
    return -jnp.sum(jax.nn.log_sigmoid(signs_bxb * logits_bxb)) / n


def plain_variant(model_kwargs: dict[str, Any], devices: list, batch: dict[str, Any]) -> Variant:
    """A hand-written jitted step: flax apply + dense sigmoid loss + optax adamw."""
    import jax
    import numpy as np
    import optax
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from siglip_jax.models.two_towers import Model

    model = Model(**model_kwargs)
    mesh = Mesh(np.array(devices), ("data",))
    replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(1e-3, b1=0.9, b2=0.95, weight_decay=1e-4))

    def init(rng):
        params = model.init(rng, batch["image"][:1], batch["labels"][:1])["params"]
        return params, tx.init(params)

    params, opt_state = jax.jit(init, out_shardings=replicated)(jax.random.key(0))

    def loss_fn(params, image, labels):
        zimg, ztxt, out = model.apply({"params": params}, image, labels, train=True)
        return dense_sigmoid_loss(zimg, ztxt, out["t"], out["b"])

    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch["image"], batch["labels"])
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    data = {k: sharded for k in batch}
    step_fn = jax.jit(step, in_shardings=(replicated, replicated, data),
                      out_shardings=(replicated, replicated, replicated), donate_argnums=(0, 1))
    global_batch = jax.device_put(batch, data)
    compiled = step_fn.lower(params, opt_state, global_batch).compile()
    holder = {"params": params, "opt_state": opt_state}

    def run():
        holder["params"], holder["opt_state"], loss = compiled(
            holder["params"], holder["opt_state"], global_batch)
        jax.block_until_ready((holder["params"], holder["opt_state"], loss))

    return Variant("plain JAX", len(devices), run, compiled, _device_bytes(opt_state))


def torch_variant(model_kwargs: dict[str, Any], batch: dict[str, Any], threads: int) -> Variant:
    """transformers.SiglipModel of the same config, AdamW, on `threads` CPU threads."""
    import numpy as np
    import torch
    import transformers

    from siglip_jax.checkpoints.hf import hf_config_from_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    hf = hf_config_from_model(model_kwargs, RES, TEXT_LEN)
    cfg = transformers.SiglipConfig(text_config=hf["text_config"],
                                    vision_config=hf["vision_config"])
    model = transformers.SiglipModel(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=1e-4)
    pixels = torch.from_numpy(np.ascontiguousarray(batch["image"].transpose(0, 3, 1, 2)))
    ids = torch.from_numpy(batch["labels"].astype(np.int64))

    def run():
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, pixel_values=pixels, return_loss=True).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    variant = Variant(f"PyTorch ({threads} threads)", 1, run)
    variant.note = f"attention: {model.config._attn_implementation}"
    return variant


def matmul_peak(device: Any, n: int = 4096) -> Callable[[], float]:
    """A function measuring one f32 n×n matmul's FLOP/s on `device`."""
    import jax
    import jax.numpy as jnp

    a = jax.device_put(jnp.ones((n, n), jnp.float32) / n, device)
    b = jax.device_put(jnp.ones((n, n), jnp.float32), device)
    f = jax.jit(jnp.matmul).lower(a, b).compile()
    jax.block_until_ready(f(a, b))

    def measure() -> float:
        t0 = time.perf_counter()
        jax.block_until_ready(f(a, b))
        return 2 * n**3 / (time.perf_counter() - t0)

    return measure


def scan_remat_memory(devices: list, batch: dict[str, Any], depth: int
                      ) -> list[tuple[str, float, float, float]]:
    """Compile-only: (layout, temp MiB, argument MiB, compile s) of the depth-`depth` trainer
    step with and without scan and remat (abstract state: nothing is allocated)."""
    import jax

    from siglip_jax.config import load_config
    from siglip_jax.schema import parse

    rows = []
    for scan, remat in ((0, "none"), (1, "none"), (0, "nothing_saveable"),
                        (1, "nothing_saveable")):
        config = parse(load_config(_config_spec(f"depth={depth},scan={scan},remat={remat}")))
        _, parts = trainer_parts(config, devices, batch)
        global_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=parts.data_sharding[k])
                        for k, v in batch.items()}
        state, step_fn = parts.abstract_state, parts.step_fn
        t0 = time.perf_counter()
        m = step_fn.lower(state, global_batch).compile().memory_analysis()
        seconds = time.perf_counter() - t0
        layout = f"scan={'yes' if scan else 'no'}, remat={remat}"
        rows.append((layout, m.temp_size_in_bytes / MiB, m.argument_size_in_bytes / MiB,
                     seconds))
        print(f"# depth {depth} {layout}: temp {rows[-1][1]:.0f} MiB, compiled in "
              f"{seconds:.0f}s", file=sys.stderr, flush=True)
    return rows


# ----------------------------------------------------------------------------- worker

# Variants timed together (interleaved) per device count. The 8-device groups are split
# because each data-parallel variant keeps 8 replicas of its train state (~6 GB).
GROUPS = {1: [["trainer", "plain", "torch", "lit"]],
          8: [["trainer", "plain"], ["trainer", "fsdp_1x8", "fsdp_4x2"]]}
SECTION_OF = {"torch": "torch", "lit": "lit", "fsdp_1x8": "fsdp_1x8", "fsdp_4x2": "fsdp_4x2"}


def torch_matmul_peak(threads: int, n: int = 4096, repeats: int = 3) -> float:
    """Best FLOP/s of an f32 n×n matmul in PyTorch on `threads` threads."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Times this process's variants (all on `args.worker` devices); returns the results."""
    import jax

    from siglip_jax.config import load_config
    from siglip_jax.schema import parse

    started = time.perf_counter()
    log = lambda msg: print(f"# [{args.worker} dev, {time.perf_counter() - started:4.0f}s] "
                            f"{msg}", file=sys.stderr, flush=True)
    devices = jax.devices()
    batch = random_batch()
    model_kwargs = parse(load_config(_config_spec(""))).model.kwargs()
    skip = set(args.skip.split(","))
    builders = {
        "trainer": lambda: trainer_variant("trainer", "", devices, batch),
        "plain": lambda: plain_variant(model_kwargs, devices, batch),
        "torch": lambda: torch_variant(model_kwargs, batch, args.torch_threads),
        "lit": lambda: trainer_variant("trainer LiT", "lit=1", devices, batch, kind="lit"),
        "fsdp_1x8": lambda: trainer_variant("trainer fsdp 1×8", "fsdp=8", devices, batch),
        "fsdp_4x2": lambda: trainer_variant("trainer fsdp 4×2", "fsdp=2", devices, batch),
    }
    peak = matmul_peak(devices[0])
    peaks = [peak()]
    live: dict[str, Variant] = {}
    results: dict[str, dict[str, Any]] = {}
    for group in GROUPS[args.worker]:
        group = [k for k in group if SECTION_OF.get(k) not in skip]
        for key in [k for k in live if k not in group]:
            del live[key]  # Frees its train state before the next group's are made.
        for key in group:
            if key not in live:
                t0 = time.perf_counter()
                live[key] = builders[key]()
                live[key].run()  # Warm-up: the first run allocates.
                log(f"built {live[key].name} in {time.perf_counter() - t0:.0f}s")
        for r in range(args.rounds):
            for key in group:
                t0 = time.perf_counter()
                live[key].run()
                live[key].times.append(time.perf_counter() - t0)
            peaks.append(peak())
            log(f"round {r + 1}/{args.rounds}: " + ", ".join(
                f"{live[k].name} {live[k].times[-1]:.2f}s" for k in group))
        for key in group:
            results[key] = live[key].record()
    out = {"devices": args.worker, "peaks": peaks, "variants": results, "scan_remat": []}
    if args.worker == 1 and "torch" not in skip:
        out["torch_matmul_peak"] = torch_matmul_peak(args.torch_threads)
    live.clear()
    if args.worker == 1 and "scan_remat" not in skip:
        out["scan_remat"] = scan_remat_memory(devices, batch, args.scan_depth)
    log(f"done in {time.perf_counter() - started:.0f}s")
    return out


# ----------------------------------------------------------------------------- main


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (best reported)")
    p.add_argument("--skip", default="", help=f"comma-separated sections to skip: {SECTIONS}")
    p.add_argument("--devices", default="1,8", help="device counts, one process each")
    p.add_argument("--torch_threads", type=int, default=2)
    p.add_argument("--scan_depth", type=int, default=12, help="depth of the scan/remat rows")
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)  # Internal: N devices.
    return p.parse_args(argv)


def spawn_worker(devices: int, args: argparse.Namespace) -> dict[str, Any]:
    """Runs this file as a worker with `devices` emulated CPU devices; returns its results."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", str(devices),
           "--rounds", str(args.rounds), "--skip", args.skip, "--torch_threads",
           str(args.torch_threads), "--scan_depth", str(args.scan_depth)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode or not lines:
        raise SystemExit(f"error: the {devices}-device worker failed (exit {proc.returncode})")
    return json.loads(lines[-1][len(RESULT_PREFIX):])


RESULT_PREFIX = "RESULT "


def report(runs: list[dict[str, Any]], rounds: int, scan_depth: int) -> None:
    """Prints the markdown table, the ratios and the scan/remat table."""
    peak = max(p for run in runs for p in run["peaks"])
    rows = [dict(v, devices=run["devices"]) for run in runs for v in run["variants"].values()]
    find = lambda name, n: next((r for r in rows if r["name"] == name and r["devices"] == n),
                                None)
    plain1 = find("plain JAX", 1)
    model_flops = {"full": plain1["xla_flops"] if plain1 else None}
    lit = [r for r in rows if r["kind"] == "lit"]
    if lit:
        model_flops["lit"] = lit[0]["xla_flops"]
    best = lambda r: min(r["times"])
    peaks = "; ".join(f"{run['devices']}-device process: " + ", ".join(
        f"{p / 1e9:.0f}" for p in run["peaks"]) for run in runs)
    print(f"\nB/16-shaped, depth 2: {RES} px, patch {PATCH}, width 768, text length {TEXT_LEN}, "
          f"vocab {VOCAB}, global batch {BATCH}, float32; step time best of {rounds} "
          "interleaved rounds (median in brackets).")
    print(f"Peak (MFU denominator) = best XLA 4096² f32 matmul on one device: "
          f"{peak / 1e9:.0f} GFLOP/s (measured GFLOP/s per round, {peaks}).")
    torch_peak = next((run["torch_matmul_peak"] for run in runs if "torch_matmul_peak" in run),
                      None)
    if torch_peak:
        print(f"PyTorch's own 4096² f32 matmul: {torch_peak / 1e9:.0f} GFLOP/s.")
    print("Model FLOPs per step (XLA cost_analysis of the 1-device step): " + ", ".join(
        f"{k} {f / 1e9:.0f} G" for k, f in model_flops.items() if f) + ".\n")
    print("| step | devices | step s | examples/s | MFU | XLA GFLOP/step | temp MiB/dev | "
          "args MiB/dev | opt state MiB/dev |")
    print("|---|---|---|---|---|---|---|---|---|")
    fmt = lambda x, spec: "–" if x is None else format(x, spec)
    for r in rows:
        flops = model_flops.get(r["kind"])
        mfu = flops / best(r) / peak if flops else None
        print("| " + " | ".join([
            r["name"] + (f" [{r['note']}]" if r["note"] else ""), str(r["devices"]),
            f"{best(r):.2f} ({statistics.median(r['times']):.2f})", f"{BATCH / best(r):.2f}",
            fmt(mfu, ".1%"), fmt(r["xla_flops"] and r["xla_flops"] / 1e9, ".0f"),
            fmt(r["temp_mib"], ".0f"), fmt(r["args_mib"], ".0f"), fmt(r["opt_mib"], ".0f"),
        ]) + " |")

    print("\nratios of step times (< 1: the first is faster):")

    def ratio(label, a, b, note=""):
        if a is not None and b is not None:
            print(f"  {label:46s} {best(a) / best(b):.3f}{note}")

    for n in (1, 8):
        ratio(f"trainer / plain JAX, {n} device(s)", find("trainer", n), find("plain JAX", n),
              "   (target <= 1.05)")
    torch_row = next((r for r in rows if r["name"].startswith("PyTorch")), None)
    ratio("plain JAX / PyTorch, 1 device", plain1, torch_row)
    ratio("trainer / PyTorch, 1 device", find("trainer", 1), torch_row)
    ratio("plain JAX, 1 device / 8 devices (= 8-dev speed)", plain1, find("plain JAX", 8))
    ratio("trainer, 1 device / 8 devices (= 8-dev speed)", find("trainer", 1),
          find("trainer", 8))
    for name in ("trainer fsdp 1×8", "trainer fsdp 4×2"):
        ratio(f"{name} / trainer data-parallel, 8 devices", find(name, 8), find("trainer", 8))
    full, frozen = find("trainer", 1), find("trainer LiT", 1)
    ratio("trainer LiT / trainer full, 1 device", frozen, full)
    if full and frozen:
        print(f"  {'optimizer state LiT / full':46s} {frozen['opt_mib'] / full['opt_mib']:.3f}"
              f"   ({frozen['opt_mib']:.0f} vs {full['opt_mib']:.0f} MiB)")
    if full and model_flops["full"]:
        print(f"  {'MFU of the trainer, 1 device':46s} "
              f"{model_flops['full'] / best(full) / peak:.1%}   (target >= 65%)")
    scan_rows = [row for run in runs for row in run["scan_remat"]]
    if scan_rows:
        print(f"\nscan/remat: B/16-wide towers of depth {scan_depth}, batch 32, 1 device; "
              "the trainer step "
              "compiled from abstract state (not run):\n")
        print("| layout | temp MiB/dev | args MiB/dev | compile s |")
        print("|---|---|---|---|")
        for layout, temp, arg_mib, seconds in scan_rows:
            print(f"| {layout} | {temp:.0f} | {arg_mib:.0f} | {seconds:.0f} |")


def main(argv: list[str] | None = None) -> None:
    """Runs one worker process per device count, then prints the table."""
    args = _parse(sys.argv[1:] if argv is None else argv)
    skip = {s for s in args.skip.split(",") if s}
    if skip - set(SECTIONS):
        raise SystemExit(f"error: unknown --skip section(s) {sorted(skip - set(SECTIONS))}; "
                         f"valid: {SECTIONS}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.worker:
        import jax

        jax.config.update("jax_num_cpu_devices", args.worker)
        jax.config.update("jax_threefry_partitionable", True)
        print(RESULT_PREFIX + json.dumps(run_worker(args)), flush=True)
        return
    counts = [int(n) for n in args.devices.split(",")]
    if set(counts) - set(GROUPS):
        raise SystemExit(f"error: --devices must be among {sorted(GROUPS)}, got {counts}")
    started = time.perf_counter()
    runs = [spawn_worker(n, args) for n in counts]
    report(runs, args.rounds, args.scan_depth)
    print(f"\n(total {time.perf_counter() - started:.0f}s)")


if __name__ == "__main__":
    main()
