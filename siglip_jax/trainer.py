"""The training loop: `train(run, workdir)` trains (or resumes) a run in a workdir.

`train()` is dispatch plus hooks: everything is built by experiment.py from the parsed
`RunConfig`, and the periodic actions (metrics, checkpoints, evaluations, preemption, time
budget, NaN check) are the hooks of hooks.py. Training again in the same workdir resumes from
the newest checkpoint; SIGTERM (preemption) saves a checkpoint and stops. `run_cli` is what
`python -m siglip_jax.train` runs after parsing its flags (train.py): it maps every error to one
`error:` line and an exit code.

Exit codes: 0 done; 2 a bad config, argument or workdir, wherever it is found (also: a
sharding rule or pp string that cannot apply, a checkpoint saved with another model or
optimizer structure); 1 a failure while running (non-finite loss, no readable checkpoint,
no usable data); 143 preempted (SIGTERM) after saving a checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Iterator

import jax
import ml_collections
import numpy as np
import optax
import tensorflow as tf
from jax.sharding import Mesh

from siglip_jax import distributed, experiment, hooks
from siglip_jax.checkpoints import resume
from siglip_jax.checkpoints.open import absolute_run_paths, load_model_init
from siglip_jax.checkpoints.orbax_io import (
    CheckpointDamagedError,
    Checkpointer,
    CheckpointStructureError,
)
from siglip_jax.config import load_config
from siglip_jax.data.pp import PPError
from siglip_jax.data.sources import Source, SourceError
from siglip_jax.evaluators.builder import build_evaluators
from siglip_jax.evaluators.common import Evaluator
from siglip_jax.hooks import Log, NonFiniteError, TrainState
from siglip_jax.metrics import MetricWriter, PeakFlops, Progress, compiled_flops
from siglip_jax.records import ConfigError
from siglip_jax.schema import RunConfig, parse
from siglip_jax.sharding import ShardingError, make_global_batch, mesh_of

PREEMPTED_EXIT_CODE = 143
CONFIG_EXIT_CODE = 2
RUNTIME_EXIT_CODE = 1

# Errors that mean "the config, the flags or the workdir are wrong" (exit 2) and "the run
# failed" (exit 1).
CONFIG_ERRORS = (ConfigError, ShardingError, PPError, CheckpointStructureError)
RUNTIME_ERRORS = (FileNotFoundError, NonFiniteError, SourceError, CheckpointDamagedError)


class WorkdirError(OSError):
    """The workdir cannot be created or written."""


def prepare_workdir(workdir: str) -> None:
    """Creates `workdir` and checks it is writable; raises WorkdirError otherwise."""
    try:
        tf.io.gfile.makedirs(workdir)
        probe = os.path.join(workdir, f".write_test_{os.getpid()}")
        with tf.io.gfile.GFile(probe, "w") as f:
            f.write("ok")
        tf.io.gfile.remove(probe)
    except (OSError, tf.errors.OpError) as e:
        message = getattr(e, "message", None) or getattr(e, "strerror", None) or str(e)
        raise WorkdirError(f"workdir {workdir!r} is not writable: {message}") from None


def run_cli(args: argparse.Namespace, overrides: list[str]) -> int:
    """The trainer CLI after its flags are parsed: set up (processes, config, workdir, JAX),
    train, and map errors to one `error:` line and the exit code (see the module docstring)."""
    try:
        cluster = distributed.from_flags(args.coordinator, args.num_processes, args.process_id,
                                         args.heartbeat_timeout)
        run = parse(load_config(args.config, overrides))
        prepare_workdir(args.workdir)
        experiment.setup_jax(run, cluster.num_processes)
    except (ConfigError, WorkdirError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return CONFIG_EXIT_CODE
    watchdog = distributed.initialize(cluster)
    try:
        summary = train(run, args.workdir)
    except CONFIG_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return CONFIG_EXIT_CODE
    except RUNTIME_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return RUNTIME_EXIT_CODE
    except jax.errors.JaxRuntimeError as e:
        # Several processes joined by address: a peer lost mid-collective gets one line. One
        # process, a TPU slice, or another runtime error: JAX's own message is the story.
        line = watchdog.explain_collective_failure(e) if watchdog is not None else None
        if line is None:
            raise
        print(line, file=sys.stderr)
        return RUNTIME_EXIT_CODE
    return PREEMPTED_EXIT_CODE if summary.get("preempted") else 0


def train(config: RunConfig | ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains (or resumes) the run described by `config` in `workdir`; returns final metrics.
    `config` is the parsed RunConfig (a loaded ConfigDict is parsed here, once)."""
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
        final: dict[str, float] = {}
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
    with tf.io.gfile.GFile(os.path.join(workdir, "config.json"), "w") as f:
        f.write(json.dumps(absolute_run_paths(run.to_dict()), indent=2, default=str))


class _Machinery:
    """The checkpointer and the metric writer, closed on any exit (error paths included)."""

    def __init__(self, run: RunConfig, workdir: str, is_host0: bool):
        ckpt = run.checkpoint
        self.checkpointer = Checkpointer(workdir, ckpt.every_n_steps, keep=ckpt.keep,
                                         keep_every_n_steps=ckpt.keep_every_n_steps,
                                         min_replica_slice_bytes=ckpt.min_replica_slice_bytes)
        self.writer = MetricWriter(workdir, enabled=is_host0, tensorboard=run.tensorboard)

    def __enter__(self) -> _Machinery:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.checkpointer.close()
        finally:
            self.writer.close()


@dataclasses.dataclass
class _Setup:
    """What the loop starts from: state, compiled step, batches and their bookkeeping."""

    state: TrainState
    start_step: int
    step_fn: experiment.CompiledSteps  # Compiled once per batch shape (input.seq_lens).
    first_batch: dict[str, jax.Array]
    batches: Iterator[dict[str, np.ndarray]]
    source: Source
    evaluators: dict[str, Evaluator]
    flops: float | None


def _set_up(run: RunConfig, mesh: Mesh, checkpointer: Checkpointer, log: Log) -> _Setup:
    """Input, model, state (restored or initialised), compiled step and evaluators."""
    input_step = checkpointer.latest_step() or 0
    batches, tokenizer, source = experiment.build_train_input(run, mesh, input_step)
    first = next(batches)
    shapes = jax.tree.map(lambda v: (v.shape[0] * jax.process_count(), *v.shape[1:]), first)
    parts = experiment.build_step(run, mesh, shapes)
    # Straight into the target shardings: no random init held alongside. A damaged newest
    # step is moved aside and an earlier one restored; the input then restarts from there.
    restored = checkpointer.restore_latest(parts.abstract_state, log) if input_step else None
    if restored is not None:
        start_step, state = restored
        log(f"resumed from checkpoint at step {start_step}")
    elif run.model_init.resume:  # Another run's state, continued here (SigLIP 2 §2.4).
        state, start_step = _continue_run(run, parts, mesh, log)
    else:
        start_step = 0
        pretrained = load_model_init(run.model_init.parts(), parts.abstract_state["params"])
        state = experiment.init_state(run, parts, mesh, shapes, pretrained)
        if pretrained:
            log(f"initialised {sorted(pretrained)} from model_init")
    if start_step != input_step:  # The input restarts where the state is.
        batches, tokenizer, source = experiment.build_train_input(run, mesh, start_step,
                                                                  tokenizer=tokenizer)
        first = next(batches)
    _log_param_counts(log, state["params"], parts.frozen)
    first_batch = make_global_batch(first, mesh, run.mesh.batch_axes)
    compile_start = time.monotonic()
    step_fn = experiment.CompiledSteps(parts.step_fn)
    flops = compiled_flops(step_fn.get(state, first_batch))
    log(f"compiled the train step in {time.monotonic() - compile_start:.1f}s"
        + (f"; {flops / 1e9:.2f} GFLOPs per device per step" if flops else ""))
    evaluators = build_evaluators(run, model=parts.model, mesh=mesh,
                                  param_shardings=parts.shardings["params"], tokenizer=tokenizer)
    return _Setup(state, start_step, step_fn, first_batch, batches, source, evaluators, flops)


def _continue_run(run: RunConfig, parts: experiment.StepParts, mesh: Mesh, log: Log
                  ) -> tuple[TrainState, int]:
    """The train state of `model_init.resume` fitted to this run, and its step."""
    try:
        state, notes = resume.restore_resized(run.model_init.resume, parts.abstract_state, mesh)
    except resume.ResumeError as e:
        raise ConfigError(str(e)) from None
    step = int(resume.local_value(state["step"]))
    log(f"continuing {run.model_init.resume} at step {step}"
        + "".join(f"; {note}" for note in notes))
    return state, step


def _mfu_fn(run: RunConfig, flops: float | None, log: Log
            ) -> Callable[[float], dict[str, float]]:
    """steps/s → MFU metrics against the config's peak, the published one or (CPU) a measured
    estimate (metrics.PeakFlops)."""
    device = jax.devices()[0]
    peak = PeakFlops.for_device(device, run.peak_flops)
    log(peak.describe())
    chips = jax.process_count() if device.platform == "cpu" else jax.device_count()
    return lambda steps_per_s: peak.mfu_metrics(flops, jax.device_count(), steps_per_s, chips)


def _make_hooks(run: RunConfig, setup: _Setup, machinery: _Machinery, started: float,
                log: Log) -> tuple[list[hooks.Hook], hooks.StopFlag]:
    """The loop's hooks in the order they run, and the installed SIGTERM flag."""
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
    loop: list[hooks.Hook] = [
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


def _log_param_counts(log: Log, params: optax.Params, frozen: optax.Params | None) -> None:
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
