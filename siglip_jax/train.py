"""The trainer: `python -m siglip_jax.train --config configs/x.py --workdir DIR [--config.k=v]`.

`main()` parses flags and calls `train(config, workdir)`. `train()` is dispatch plus hooks:
the config is parsed once (schema.py), everything is built by experiment.py, and the
periodic actions (metrics, checkpoints, evaluations, preemption, time budget, NaN check) are
the hooks of hooks.py. Rerunning the same command resumes from the newest checkpoint in the
workdir; SIGTERM (preemption) saves a checkpoint and exits with code 143.

Multi-process runs: on a multi-host TPU slice JAX finds its peers; elsewhere pass
`--coordinator HOST:PORT --num_processes N --process_id I` (or SIGLIP_* env variables, see
distributed.py). Each process then emulates `cpu_devices / N` CPU devices.

Exit codes: 0 done; 2 a bad config, argument or workdir, wherever it is found (also: a
sharding rule or pp string that cannot apply, a checkpoint saved with another model or
optimizer structure); 1 a failure while running (non-finite loss, no readable checkpoint,
no usable data); 143 preempted (SIGTERM) after saving a checkpoint. Every error is one
`error:` line, and the process exits promptly (shutdown.run_main) even with input threads
and an async checkpointer running.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from siglip_jax.config import ConfigError, collect_overrides, load_config
from siglip_jax.console import quiet_startup
from siglip_jax.experiment import setup_jax
from siglip_jax.hooks import NonFiniteError
from siglip_jax.schema import RunConfig, parse
from siglip_jax.sharding import mesh_of

PREEMPTED_EXIT_CODE = 143
CONFIG_EXIT_CODE = 2
RUNTIME_EXIT_CODE = 1

__all__ = ["NonFiniteError", "main", "train"]


class WorkdirError(OSError):
    """The workdir cannot be created or written."""


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
    """Command-line entry point; returns the process exit code (see the module docstring)."""
    argv = quiet_startup(argv)
    from siglip_jax import distributed

    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cluster = distributed.from_flags(args.coordinator, args.num_processes, args.process_id,
                                         args.heartbeat_timeout)
        run = parse(load_config(args.config, overrides))
        prepare_workdir(args.workdir)
        setup_jax(run, cluster.num_processes)
    except (ConfigError, WorkdirError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return CONFIG_EXIT_CODE
    distributed.initialize(cluster)
    from siglip_jax.checkpoints.orbax_io import CheckpointDamagedError, CheckpointStructureError
    from siglip_jax.data.pp import PPError
    from siglip_jax.data.sources import SourceError
    from siglip_jax.sharding import ShardingError

    try:
        summary = train(run, args.workdir)
    except (ConfigError, ShardingError, PPError, CheckpointStructureError) as e:
        print(f"error: {e}", file=sys.stderr)
        return CONFIG_EXIT_CODE
    except (FileNotFoundError, NonFiniteError, SourceError, CheckpointDamagedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return RUNTIME_EXIT_CODE
    return PREEMPTED_EXIT_CODE if summary.get("preempted") else 0


def train(config: Any, workdir: str) -> dict[str, Any]:
    """Trains (or resumes) the run described by `config` in `workdir`; returns final metrics."""
    import jax

    from siglip_jax.sharding import make_global_batch

    started = time.monotonic()
    run = parse(config)
    is_host0 = jax.process_index() == 0
    log = (lambda *a: print(*a, flush=True)) if is_host0 else (lambda *a: None)
    mesh = mesh_of(run.mesh)
    log(f"devices: {jax.device_count()} × {jax.devices()[0].platform} "
        f"({jax.devices()[0].device_kind}) in {jax.process_count()} process(es); "
        f"mesh {dict(mesh.shape)}")
    if is_host0:
        _write_config(run, workdir)
    with _Machinery(run, workdir, is_host0) as machinery:
        setup = _set_up(run, mesh, machinery.checkpointer, log)
        loop, stop = _make_hooks(run, setup, machinery, started, log)
        state, step, batch = setup.state, setup.start_step, setup.first_batch
        reason = None
        log(f"training from step {step} to {run.total_steps}"
            + (f" within {run.time_budget_s:.0f}s" if run.time_budget_s else ""))
        while step < run.total_steps:
            state, metrics = setup.step_fn(state, batch)
            step += 1
            reason = next((r for hook in loop if (r := hook(step, state, metrics))), None)
            if reason:
                break
            batch = make_global_batch(next(setup.batches), mesh, run.mesh.batch_axes)
        final: dict[str, Any] = {}
        for hook in loop:
            final.update(hook.finish(step, state))
        stop.uninstall()
    skipped = final.pop("skipped_steps", 0)
    elapsed = time.monotonic() - started
    summary = {"step": step, "stopped_early": reason == "budget",
               "preempted": reason == "preempted", "skipped_steps": skipped,
               "seconds": elapsed, **final}
    log(f"done: {step} steps in {elapsed:.0f}s" + "".join(
        f"; {k} = {v:.1%}" for k, v in final.items() if k.endswith("top1")))
    return summary


# ----------------------------------------------------------------------------- the set-up


def _write_config(run: RunConfig, workdir: str) -> None:
    import tensorflow as tf  # gfile: the workdir may be gs://.

    with tf.io.gfile.GFile(os.path.join(workdir, "config.json"), "w") as f:
        f.write(json.dumps(run.to_dict(), indent=2, default=str))


class _Machinery:
    """The checkpointer and the metric writer, closed on any exit (error paths included)."""

    def __init__(self, run: RunConfig, workdir: str, is_host0: bool):
        from siglip_jax.checkpoints.orbax_io import Checkpointer
        from siglip_jax.metrics import MetricWriter

        ckpt = run.checkpoint
        self.checkpointer = Checkpointer(workdir, ckpt.every_n_steps, keep=ckpt.keep,
                                         keep_every_n_steps=ckpt.keep_every_n_steps)
        self.writer = MetricWriter(workdir, enabled=is_host0, tensorboard=run.tensorboard)

    def __enter__(self) -> _Machinery:
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self.checkpointer.close()
        finally:
            self.writer.close()


@dataclasses.dataclass
class _Setup:
    """What the loop starts from: state, compiled step, batches and their bookkeeping."""

    state: Any
    start_step: int
    step_fn: Any
    first_batch: Any
    batches: Any
    source: Any
    evaluators: dict[str, Any]
    flops: float | None


def _set_up(run: RunConfig, mesh: Any, checkpointer: Any, log: Any) -> _Setup:
    """Input, model, state (restored or initialised), compiled step and evaluators."""
    import jax

    from siglip_jax import experiment
    from siglip_jax.evaluators.builder import build_evaluators
    from siglip_jax.metrics import compiled_flops
    from siglip_jax.sharding import make_global_batch

    start_step = checkpointer.latest_step() or 0
    batches, tokenizer, source = experiment.build_input(run, mesh, start_step)
    first = next(batches)
    shapes = jax.tree.map(lambda v: (v.shape[0] * jax.process_count(), *v.shape[1:]), first)
    parts = experiment.build_step(run, mesh, shapes)
    # Straight into the target shardings: no random init held alongside. A damaged newest
    # step is moved aside and an earlier one restored; the input then restarts from there.
    restored = checkpointer.restore_latest(parts.abstract_state, log) if start_step else None
    if restored is not None and restored[0] != start_step:
        start_step = restored[0]
        batches, tokenizer, source = experiment.build_input(run, mesh, start_step,
                                                            tokenizer=tokenizer)
        first = next(batches)
    if restored is not None:
        state = restored[1]
        log(f"resumed from checkpoint at step {start_step}")
    else:
        pretrained = experiment.load_model_init(run, parts.abstract_state["params"])
        state = experiment.init_state(run, parts, mesh, shapes, pretrained)
        if pretrained:
            log(f"initialised {sorted(pretrained)} from model_init")
    _log_param_counts(log, state["params"], parts.frozen)
    first_batch = make_global_batch(first, mesh, run.mesh.batch_axes)
    compile_start = time.monotonic()
    step_fn = parts.step_fn.lower(state, first_batch).compile()
    flops = compiled_flops(step_fn)
    log(f"compiled the train step in {time.monotonic() - compile_start:.1f}s"
        + (f"; {flops / 1e9:.2f} GFLOPs per device per step" if flops else ""))
    evaluators = build_evaluators(run, model=parts.model, mesh=mesh,
                                  param_shardings=parts.shardings["params"], tokenizer=tokenizer)
    return _Setup(state, start_step, step_fn, first_batch, batches, source, evaluators, flops)


def _mfu_fn(run: RunConfig, flops: float | None, log: Any) -> Any:
    """steps/s → MFU metrics against the config's peak, the published one or (CPU) a measured
    estimate (metrics.PeakFlops)."""
    import jax

    from siglip_jax.metrics import PeakFlops

    device = jax.devices()[0]
    peak = PeakFlops.for_device(device, run.peak_flops)
    log(peak.describe())
    chips = jax.process_count() if device.platform == "cpu" else jax.device_count()
    return lambda steps_per_s: peak.mfu_metrics(flops, jax.device_count(), steps_per_s, chips)


def _make_hooks(run: RunConfig, setup: _Setup, machinery: _Machinery, started: float,
                log: Any) -> tuple[list[Any], Any]:
    """The loop's hooks in the order they run, and the installed SIGTERM flag."""
    import jax

    from siglip_jax import hooks
    from siglip_jax.metrics import Progress

    deadline = started + run.time_budget_s if run.time_budget_s else None
    progress = Progress(run.total_steps, setup.start_step, run.input.global_batch,
                        budget_deadline=deadline, enabled=jax.process_index() == 0)
    nonfinite = hooks.NonFiniteCheck(run.on_nonfinite, log)
    skips = setup.source.skips
    counters = [skips.as_dict] if skips is not None else []
    counters.append(lambda: {"skipped_steps": nonfinite.skipped_steps}
                    if nonfinite.skipped_steps else {})
    evaluations = hooks.RunEvaluations(setup.evaluators, machinery.writer, progress, log,
                                       total_steps=run.total_steps)
    stop = hooks.StopFlag()
    stop.install()
    loop: list[Any] = [
        nonfinite,
        hooks.LogMetrics(machinery.writer, progress, log_every=run.log_every,
                         total_steps=run.total_steps, start_step=setup.start_step,
                         mfu=_mfu_fn(run, setup.flops, log), counters=counters),
        hooks.SaveCheckpoints(machinery.checkpointer, nonfinite),
        evaluations,
        hooks.StopOnSigterm(stop, log, log_every=run.log_every, evaluations=evaluations),
    ]
    if deadline is not None:
        loop.append(hooks.TimeBudget(run.time_budget_s, deadline, log,
                                     total_steps=run.total_steps, evaluations=evaluations))
    return loop, stop


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
    from siglip_jax.shutdown import run_main

    run_main(main)
