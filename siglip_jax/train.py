"""The trainer: `python -m siglip_jax.train --config configs/x.py --workdir DIR [--config.k=v]`.

`main()` only parses flags and calls `train(config, workdir)`; the pieces live in small modules
(`step.py`: state and step, `optim.py`, `sharding.py`, `data/`, `evaluators/`) with tests.
Rerunning the same command resumes from the newest checkpoint in the workdir; SIGTERM
(preemption) saves a checkpoint and exits with code 143.

Multi-process runs: on a multi-host TPU slice JAX finds its peers; elsewhere pass
`--coordinator HOST:PORT --num_processes N --process_id I` (or SIGLIP_* env variables, see
distributed.py). Each process then emulates `cpu_devices / N` CPU devices.

Top-level config keys read here (sections are documented in the module that reads them):
  seed, total_steps, log_every, time_budget_s (0: none; stop training early so that the run,
  final evaluation included, ends within the budget), cpu_devices (emulated devices in total
  when JAX runs on CPU), mesh, batch_axes, sharding_rules, input, tokenizer, model,
  model_init (dict(img=, txt=, full=) checkpoint paths: ours, big_vision .npz or HF dir),
  loss, optim, lr, wd, grad_clip_norm, schedule, grad_accum_steps, on_nonfinite
  ("stop" | "skip"), peak_flops (per chip; None: a default by device kind), evals, checkpoint
  (every_n_steps, keep, keep_every_n_steps), tensorboard.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

from siglip_jax.config import ConfigError, check_keys, collect_overrides, load_config, to_plain

TRAIN_KEYS = (
    "seed", "total_steps", "log_every", "time_budget_s", "cpu_devices", "mesh", "batch_axes",
    "sharding_rules", "input", "tokenizer", "model", "model_init", "loss", "optim", "lr", "wd",
    "grad_clip_norm", "schedule", "grad_accum_steps", "on_nonfinite", "peak_flops", "evals",
    "checkpoint", "tensorboard",
)
PREEMPTED_EXIT_CODE = 143


class WorkdirError(OSError):
    """The workdir cannot be created or written."""


class NonFiniteError(FloatingPointError):
    """The loss or the gradients became NaN/Inf."""


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """Parses --config, --workdir, the multi-process flags and `--config.a.b=value` overrides."""
    parser = argparse.ArgumentParser(
        prog="python -m siglip_jax.train",
        description="Train a SigLIP model. Extra flags --config.KEY=VALUE override config keys.")
    parser.add_argument("--config", required=True, help="configs/file.py or configs/file.py:arg")
    parser.add_argument("--workdir", required=True, help="where checkpoints and metrics go")
    parser.add_argument("--coordinator", help="HOST:PORT of process 0 (multi-process, not TPU)")
    parser.add_argument("--num_processes", type=int, help="number of processes")
    parser.add_argument("--process_id", type=int, help="this process's index")
    parser.add_argument("--heartbeat_timeout", type=int,
                        help="seconds after which a silent process counts as dead (default 100)")
    args, rest = parser.parse_known_args(argv)
    return args, collect_overrides(rest, parser.error)


def prepare_workdir(workdir: str) -> None:
    """Creates `workdir` and checks it is writable; raises WorkdirError otherwise."""
    import tensorflow as tf

    try:
        tf.io.gfile.makedirs(workdir)
        probe = os.path.join(workdir, f".write_test_{os.getpid()}")
        with tf.io.gfile.GFile(probe, "w") as f:
            f.write("ok")
        tf.io.gfile.remove(probe)
    except (OSError, tf.errors.OpError) as e:
        message = getattr(e, "message", None) or getattr(e, "strerror", None) or str(e)
        raise WorkdirError(f"workdir {workdir!r} is not writable: {message}") from None


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit code."""
    from siglip_jax import distributed

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cluster = distributed.from_flags(args.coordinator, args.num_processes, args.process_id,
                                         args.heartbeat_timeout)
        config = load_config(args.config, overrides)
        check_keys(config, TRAIN_KEYS, "config")
        prepare_workdir(args.workdir)
        setup_jax(config, cluster.num_processes)
    except (ConfigError, WorkdirError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    distributed.initialize(cluster)
    try:
        summary = train(config, args.workdir)
    except (ConfigError, FileNotFoundError, NonFiniteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return PREEMPTED_EXIT_CODE if summary.get("preempted") else 0


def setup_jax(config: Any, num_processes: int = 1) -> None:
    """JAX settings that must be made before the backend starts."""
    import jax

    total = int(config.get("cpu_devices", 8))
    if total % num_processes:
        raise ConfigError(f"cpu_devices={total} does not split over {num_processes} processes")
    jax.config.update("jax_threefry_partitionable", True)
    jax.config.update("jax_num_cpu_devices", total // num_processes)


# ----------------------------------------------------------------------------- the pieces


def build_input(config: Any, mesh: Any, start_step: int) -> tuple[Iterator, Any, Any]:
    """The training batch iterator, the tokenizer and the data source."""
    import jax

    from siglip_jax.data import input as input_lib
    from siglip_jax.data.builder import make_source
    from siglip_jax.data.pp import get_preprocess_fn
    from siglip_jax.sharding import batch_sharding, num_batch_shards

    cfg = config.input
    global_batch = int(cfg.global_batch)
    shards = num_batch_shards(mesh, tuple(config.batch_axes))
    accum = int(config.get("grad_accum_steps", 1) or 1)
    if global_batch % (shards * accum) or global_batch % jax.process_count():
        raise ConfigError(f"input.global_batch={global_batch} must be divisible by the "
                          f"{shards} batch shards × {accum} grad_accum_steps and by the "
                          f"{jax.process_count()} processes")
    source = make_source(cfg.data)
    tokenizer = load_tokenizer(config, source)
    preprocess = get_preprocess_fn(cfg.pp, tokenizer=tokenizer)
    shard_ids = input_lib.local_shard_ids(batch_sharding(mesh, tuple(config.batch_axes)),
                                          global_batch)
    batches = input_lib.train_batches(
        source, preprocess, shard_ids=shard_ids, num_shards=shards,
        shard_batch=global_batch // shards, seed=int(config.seed),
        shuffle_buffer=int(cfg.get("shuffle_buffer", 10_000)),
        start_step=start_step, cache=bool(cfg.get("cache", False)))
    return batches, tokenizer, source


def load_tokenizer(config: Any, source: Any = None, default: str | None = None) -> Any:
    """The sentencepiece tokenizer: config.tokenizer.model, else `default` (e.g. the one a
    checkpoint ships), else the data source's (`source` may be a callable making it)."""
    from siglip_jax.data.tokenizer import Tokenizer

    path = config.tokenizer.get("model") or default
    if not path:
        source = source() if callable(source) else source
        path = getattr(source, "tokenizer_path", None)
    if not path:
        raise ConfigError("config.tokenizer.model is not set and neither a checkpoint nor the "
                          "data source provides a tokenizer; give a sentencepiece .model path")
    if not os.path.exists(path) and "://" not in path:
        raise ConfigError(f"tokenizer file {path!r} does not exist")
    return Tokenizer(path)


def check_vocab(config: Any, tokenizer: Any) -> None:
    """The text tower's embedding table must cover every token id the tokenizer produces."""
    vocab = config.model.text.get("vocab_size") if config.model.get("text") else None
    if vocab is not None and tokenizer.vocab_size > int(vocab):
        raise ConfigError(f"config.model.text.vocab_size={vocab} is smaller than the "
                          f"tokenizer's vocabulary ({tokenizer.vocab_size} ids)")


def make_model(config: Any) -> Any:
    """The two-tower model described by config.model."""
    from siglip_jax.models.two_towers import Model

    return Model(**to_plain(config.model))


def load_model_init(config: Any, abstract: Any) -> dict[str, Any]:
    """Pretrained parts named by config.model_init, fitted to the model: {"img": tree, ...}.

    Each part is converted to the model's block layout (scanned or not) and dtypes, and the
    image position embedding is resampled if the resolution differs (fine-tuning at a higher
    resolution); names and shapes must otherwise match.
    """
    from siglip_jax.checkpoints import big_vision
    from siglip_jax.checkpoints.loader import load_params

    spec = to_plain(config.get("model_init") or {})
    check_keys(spec, ("img", "txt", "full"), "model_init")
    parts: dict[str, Any] = {}
    for part, path in spec.items():
        if not path:
            continue
        if not (os.path.exists(path) or "://" in path):
            raise ConfigError(f"model_init.{part}: no such checkpoint {path!r}")
        params, _ = load_params(path)
        names = sorted(abstract) if part == "full" else [part]
        for name in names:
            if name not in params:
                raise ConfigError(f"model_init.{part}: checkpoint {path!r} has no {name!r} "
                                  f"part (it has {sorted(params)})")
            try:
                parts[name] = big_vision.load_params(params[name], abstract[name],
                                                     source=path, resample_posemb=True)
            except (ValueError, KeyError) as e:
                raise ConfigError(f"model_init.{part}: {e}") from None
    return parts


def make_loss_fn(config: Any, mesh: Any) -> Any:
    """The loss named by config.loss.impl, over the mesh's batch axes."""
    from siglip_jax import losses

    spec = dict(to_plain(config.loss))
    impl = spec.pop("impl", "ring")
    try:
        return losses.make_loss(impl, mesh, tuple(config.batch_axes), **spec)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"config.loss: {e}") from None


@dataclasses.dataclass(frozen=True)
class StepParts:
    """Everything the jitted train step is made of, built from a config (see build_step)."""

    model: Any
    tx: Any
    lr_fn: Any
    frozen: Any
    abstract_state: Any
    shardings: Any
    data_sharding: Any
    step_fn: Any  # jax.jit-wrapped (state, batch) → (state, metrics), state donated.


def build_step(config: Any, mesh: Any, batch_shapes: dict[str, tuple[int, ...]]) -> StepParts:
    """The model, optimizer, shardings and jitted train step of `config`, nothing allocated."""
    import jax

    from siglip_jax import step as step_lib
    from siglip_jax.optim import FROZEN, group_labels, make_optimizer
    from siglip_jax.sharding import batch_sharding

    on_nonfinite = config.get("on_nonfinite", "stop")
    if on_nonfinite not in ("stop", "skip"):
        raise ConfigError(f"on_nonfinite {on_nonfinite!r} is not one of ('stop', 'skip')")
    model = make_model(config)
    abstract_params = step_lib.abstract_params(model, batch_shapes)
    tx, lr_fn = make_optimizer(config, abstract_params, int(config.total_steps))
    frozen = step_lib.frozen_mask(group_labels(config, abstract_params), FROZEN)
    abstract, shardings = step_lib.state_shardings(abstract_params, tx, mesh,
                                                   config.sharding_rules)
    train_step = step_lib.make_train_step(
        model, tx, make_loss_fn(config, mesh), lr_fn, frozen=frozen,
        accum_steps=int(config.get("grad_accum_steps", 1) or 1),
        skip_nonfinite=on_nonfinite == "skip", mesh=mesh, batch_axes=tuple(config.batch_axes))
    data_sharding = {k: batch_sharding(mesh, tuple(config.batch_axes)) for k in batch_shapes}
    step_fn = jax.jit(train_step, in_shardings=(shardings, data_sharding),
                      out_shardings=(shardings, None), donate_argnums=(0,))
    return StepParts(model, tx, lr_fn, frozen, abstract, shardings, data_sharding, step_fn)


class _StopFlag:
    """Set by SIGTERM; the loop saves a checkpoint and stops at the next step boundary."""

    def __init__(self):
        self.raised = False
        self._previous = None

    def install(self) -> None:
        """Catches SIGTERM (only possible in the main thread)."""
        import threading

        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def uninstall(self) -> None:
        """Restores the previous SIGTERM handler."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _handle(self, signum, frame):
        self.raised = True


def _any_process(flag: bool) -> bool:
    """True if `flag` is set on any process (a collective when there are several)."""
    import jax
    import numpy as np

    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.array([flag]))))


# ----------------------------------------------------------------------------- the loop


def train(config: Any, workdir: str) -> dict[str, Any]:
    """Trains (or resumes) the run described by `config` in `workdir`; returns final metrics."""
    import jax

    from siglip_jax import step as step_lib
    from siglip_jax.checkpoints.orbax_io import Checkpointer
    from siglip_jax.evaluators.builder import build_evaluators
    from siglip_jax.metrics import (
        MetricWriter,
        Progress,
        compiled_flops,
        default_peak_flops,
        measure_matmul_flops,
        mfu,
    )
    from siglip_jax.sharding import make_global_batch, make_mesh

    started = time.monotonic()
    is_host0 = jax.process_index() == 0
    log = (lambda *a: print(*a, flush=True)) if is_host0 else (lambda *a: None)
    total_steps = int(config.total_steps)
    on_nonfinite = config.get("on_nonfinite", "stop")
    mesh = make_mesh([tuple(axis) for axis in config.mesh])
    batch_axes = tuple(config.batch_axes)
    device = jax.devices()[0]
    log(f"devices: {jax.device_count()} × {device.platform} ({device.device_kind}) in "
        f"{jax.process_count()} process(es); mesh {dict(mesh.shape)}")
    if is_host0:
        import tensorflow as tf  # gfile: the workdir may be gs://.

        with tf.io.gfile.GFile(os.path.join(workdir, "config.json"), "w") as f:
            f.write(json.dumps(to_plain(config), indent=2, default=str))

    ckpt_cfg = config.checkpoint
    checkpointer = Checkpointer(workdir, int(ckpt_cfg.every_n_steps),
                                keep=int(ckpt_cfg.get("keep", 2)),
                                keep_every_n_steps=ckpt_cfg.get("keep_every_n_steps"))
    start_step = checkpointer.latest_step() or 0
    batches, tokenizer, source = build_input(config, mesh, start_step)
    check_vocab(config, tokenizer)
    first = next(batches)
    shapes = {k: (v.shape[0] * jax.process_count(), *v.shape[1:]) for k, v in first.items()}

    parts = build_step(config, mesh, shapes)
    shardings = parts.shardings
    if start_step:  # Straight into the target shardings: no random init held alongside.
        state = checkpointer.restore(parts.abstract_state, start_step)
        log(f"resumed from checkpoint at step {start_step}")
    else:
        pretrained = load_model_init(config, parts.abstract_state["params"])
        state, _ = step_lib.init_state(parts.model, parts.tx, shapes, mesh,
                                       config.sharding_rules, int(config.seed), pretrained)
        if pretrained:
            log(f"initialised {sorted(pretrained)} from model_init")
    _log_param_counts(log, state["params"], parts.frozen)
    model = parts.model

    global_first = make_global_batch(first, mesh, batch_axes)
    compile_start = time.monotonic()
    step_fn = parts.step_fn.lower(state, global_first).compile()
    flops = compiled_flops(step_fn)
    log(f"compiled the train step in {time.monotonic() - compile_start:.1f}s"
        + (f"; {flops / 1e9:.2f} GFLOPs per device per step" if flops else ""))
    peak = config.get("peak_flops")
    if not peak and device.platform == "cpu":
        peak = measure_matmul_flops()
        log(f"peak for MFU: {peak / 1e9:.0f} GFLOP/s (f32 matmul measured on this host)")
    peak = peak or default_peak_flops(device.device_kind, device.platform)
    chips = jax.process_count() if device.platform == "cpu" else jax.device_count()

    evaluators = build_evaluators(config, model=model, mesh=mesh,
                                  param_shardings=shardings["params"], tokenizer=tokenizer)
    writer = MetricWriter(workdir, enabled=is_host0,
                          tensorboard=bool(config.get("tensorboard", True)))
    budget = float(config.get("time_budget_s", 0) or 0)
    deadline = started + budget if budget else None
    progress = Progress(total_steps, start_step, int(config.input.global_batch),
                        budget_deadline=deadline, enabled=is_host0)
    log_every = int(config.log_every)
    eval_seconds = 0.0
    skipped_steps = 0

    def run_evals(step: int, names: Sequence[str]) -> dict[str, float]:
        nonlocal eval_seconds
        t0 = time.monotonic()
        results = {}
        for name in names:
            for key, value in evaluators[name].run(state["params"]).items():
                results[f"{name}/{key}"] = value
        eval_seconds = time.monotonic() - t0
        if results:
            writer.write(step, results)
            log(f"eval at step {step}: " + ", ".join(
                f"{k} {v:.4f}" if not k.endswith("num_examples") else f"{k} {int(v)}"
                for k, v in results.items()) + f" ({eval_seconds:.1f}s)")
        progress.reset_clock(step)
        return results

    def check(step: int, metrics: dict) -> None:
        nonlocal skipped_steps
        if bool(jax.device_get(metrics["finite"])):
            return
        loss = float(jax.device_get(metrics["loss"]))
        if on_nonfinite == "skip":
            skipped_steps += 1
            log(f"step {step}: non-finite loss or gradients (loss={loss}); update skipped")
            return
        raise NonFiniteError(f"non-finite loss or gradients at step {step} (loss={loss}); "
                             "the last good checkpoint is kept. Lower lr or check the data, "
                             "or set on_nonfinite='skip'.")

    stop_flag = _StopFlag()
    stop_flag.install()
    step, batch, pending = start_step, global_first, None
    stopped_early = preempted = False
    log(f"training from step {start_step} to {total_steps}"
        + (f" within {budget:.0f}s" if budget else ""))
    try:
        while step < total_steps:
            state, metrics = step_fn(state, batch)
            step += 1
            if pending is not None:
                check(*pending)  # Read step N−1's metrics only after step N is dispatched.
            pending = (step, metrics)
            first_step = step == start_step + 1
            if first_step or step % log_every == 0 or step == total_steps:
                values = {k: float(v) for k, v in jax.device_get(metrics).items()
                          if k != "finite"}
                if first_step:
                    progress.reset_clock(step)
                else:
                    values.update(progress.rates(step))
                    values["mfu"] = mfu(flops, jax.device_count(), values["steps_per_s"], peak,
                                        chips)
                if getattr(source, "skips", None) is not None:
                    values.update(source.skips.as_dict())
                if skipped_steps:
                    values["skipped_steps"] = skipped_steps
                writer.write(step, {k: v for k, v in values.items() if v is not None})
                progress.print(step, values)
            if checkpointer.is_due(step):
                check(step, metrics)  # Never save a non-finite state.
                checkpointer.maybe_save(step, state)
            due = [n for n, e in evaluators.items()
                   if e.every_n_steps and step % e.every_n_steps == 0 and step != total_steps]
            if due:
                run_evals(step, due)
            if (jax.process_count() == 1 or step % log_every == 0) and _any_process(
                    stop_flag.raised):
                log(f"SIGTERM: saving a checkpoint at step {step} and stopping")
                preempted = True
                break
            if deadline is not None and step < total_steps:
                reserve = (eval_seconds or 0.1 * budget) + 5.0
                if time.monotonic() + reserve > deadline:
                    log(f"time budget of {budget:.0f}s reached at step {step} "
                        f"(schedule was for {total_steps}); stopping training")
                    stopped_early = True
                    break
            batch = make_global_batch(next(batches), mesh, batch_axes)
        if pending is not None:
            check(*pending)
        checkpointer.maybe_save(step, state, force=True)
        final = {} if preempted else run_evals(step, list(evaluators))
    finally:
        stop_flag.uninstall()
        checkpointer.close()
        writer.close()
    elapsed = time.monotonic() - started
    summary = {"step": step, "stopped_early": stopped_early, "preempted": preempted,
               "skipped_steps": skipped_steps, "seconds": elapsed, **final}
    log(f"done: {step} steps in {elapsed:.0f}s" + "".join(
        f"; {k} = {v:.1%}" for k, v in final.items() if k.endswith("top1")))
    return summary


def _log_param_counts(log, params: Any, frozen: Any) -> None:
    import jax

    total = sum(x.size for x in jax.tree_util.tree_leaves(params))
    parts = ", ".join(f"{name} {sum(x.size for x in jax.tree_util.tree_leaves(p)) / 1e6:.2f} M"
                      for name, p in params.items())
    text = f"model: {total / 1e6:.2f} M parameters ({parts})"
    if frozen is not None:
        n_frozen = sum(x.size for x, f in zip(jax.tree_util.tree_leaves(params),
                                              jax.tree_util.tree_leaves(frozen), strict=True)
                       if f)
        text += f"; {n_frozen / 1e6:.2f} M frozen"
    log(text)


if __name__ == "__main__":
    sys.exit(main())
