"""Periodic actions of the training loop, each a small object called after every step.

A hook is called as `hook(step, state, metrics)` right after step `step` was dispatched (the
metrics are still on the device) and may return a stop reason (a string) to end training;
`finish(step, state)` runs once after the loop and may return final results. The trainer's
loop is dispatch + hooks (train.py); the order of the hooks is the order they run in:

  NonFiniteCheck   delayed NaN/Inf check: step N−1's metrics are read only after step N is
                   dispatched, so the host never stalls the device; stop or count a skip
  LogMetrics       every `log_every` steps: metrics.jsonl / TensorBoard, the progress line
                   with ETA, throughput and MFU, the data source's skip counters
  SaveCheckpoints  every `checkpoint.every_n_steps` (never a non-finite state), and at the end
  RunEvaluations   each evaluator at its own cadence, and all of them at the end
  StopOnSigterm    preemption: SIGTERM on any process → save and stop (exit code 143)
  TimeBudget       stop early so that the run, final evaluation included, fits the budget
"""

from __future__ import annotations

import signal
import threading
import time
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import jax
import numpy as np
import optax

from siglip_jax.checkpoints.orbax_io import Checkpointer
from siglip_jax.console import format_eval
from siglip_jax.evaluators.common import Evaluator
from siglip_jax.metrics import MetricWriter, Progress

Log = Callable[[str], None]
TrainState = dict[str, optax.Params]  # params, opt_state, step (+ teacher)
StepMetrics = Mapping[str, jax.Array]  # one step's metrics, still on device


class NonFiniteError(FloatingPointError):
    """The loss or the gradients became NaN/Inf."""


class Hook(Protocol):
    """A periodic action of the training loop."""

    def __call__(self, step: int, state: TrainState, metrics: StepMetrics) -> str | None:
        """Runs after step `step`; a returned string stops training (the reason)."""

    def finish(self, step: int, state: TrainState) -> dict[str, float]:
        """Runs once after the loop; returns final results to report (may be empty)."""


class NonFiniteCheck:
    """Reads each step's `finite` flag one step late; stops or counts skipped steps."""

    def __init__(self, on_nonfinite: str, log: Log):
        self.on_nonfinite = on_nonfinite
        self.log = log
        self.skipped_steps = 0
        self._pending: tuple[int, StepMetrics] | None = None
        self._checked = -1

    def check(self, step: int, metrics: StepMetrics) -> None:
        """Blocks on step `step`'s metrics; raises NonFiniteError or counts a skip (once)."""
        if step <= self._checked:
            return
        self._checked = step
        if bool(jax.device_get(metrics["finite"])):
            return
        loss = float(jax.device_get(metrics["loss"]))
        if self.on_nonfinite == "skip":
            self.skipped_steps += 1
            self.log(f"step {step}: non-finite loss or gradients (loss={loss}); update skipped")
            return
        raise NonFiniteError(f"non-finite loss or gradients at step {step} (loss={loss}); "
                             "the last good checkpoint is kept. Lower lr or check the data, "
                             "or set on_nonfinite='skip'.")

    def __call__(self, step: int, state: TrainState, metrics: StepMetrics) -> None:
        if self._pending is not None:
            self.check(*self._pending)
        self._pending = (step, metrics)

    def finish(self, step: int, state: TrainState) -> dict[str, float]:
        if self._pending is not None:
            self.check(*self._pending)
        return {"skipped_steps": self.skipped_steps}


class LogMetrics:
    """Writes scalar metrics and prints the progress line every `log_every` steps."""

    def __init__(self, writer: MetricWriter, progress: Progress, *, log_every: int,
                 total_steps: int, start_step: int, mfu: Callable[[float], Mapping[str, float]],
                 counters: Sequence[Callable[[], Mapping[str, float]]] = ()):
        self.writer, self.progress = writer, progress
        self.log_every, self.total_steps, self.start_step = log_every, total_steps, start_step
        self.mfu = mfu
        self.counters = counters

    def __call__(self, step: int, state: TrainState, metrics: StepMetrics) -> None:
        first = step == self.start_step + 1
        if not (first or step % self.log_every == 0 or step == self.total_steps):
            return
        values = {k: float(v) for k, v in jax.device_get(dict(metrics)).items()
                  if k != "finite"}
        if first:  # The first step includes compilation: no rate from it.
            self.progress.reset_clock(step)
        else:
            values.update(self.progress.rates(step))
            values.update(self.mfu(values["steps_per_s"]))  # mfu and how it was measured.
        for counter in self.counters:
            values.update(counter())
        self.writer.write(step, {k: v for k, v in values.items() if v is not None})
        self.progress.print(step, values)

    def finish(self, step: int, state: TrainState) -> dict[str, float]:
        return {}


class SaveCheckpoints:
    """Saves the state when the checkpointer's schedule says so, and always at the end."""

    def __init__(self, checkpointer: Checkpointer, nonfinite: NonFiniteCheck):
        self.checkpointer = checkpointer
        self.nonfinite = nonfinite
        self._last: tuple[int, StepMetrics] | None = None

    def __call__(self, step: int, state: TrainState, metrics: StepMetrics) -> None:
        self._last = (step, metrics)
        self.checkpointer.poll()  # The integrity manifest of a save that has just committed.
        if self.checkpointer.is_due(step):
            self.nonfinite.check(step, metrics)  # Never save a non-finite state.
            self.checkpointer.maybe_save(step, state)

    def finish(self, step: int, state: TrainState) -> dict[str, float]:
        if self._last is not None:
            self.nonfinite.check(*self._last)
        self.checkpointer.maybe_save(step, state, force=True)
        return {}


class RunEvaluations:
    """Runs each evaluator every `evaluator.every_n_steps` steps, and all at the end."""

    def __init__(self, evaluators: Mapping[str, Evaluator], writer: MetricWriter,
                 progress: Progress, log: Log, *,
                 total_steps: int):
        self.evaluators = evaluators
        self.writer, self.progress, self.log = writer, progress, log
        self.total_steps = total_steps
        self.last_seconds = 0.0  # Duration of the latest evaluation (for the time budget).
        self.skip_final = False  # Set when the run is preempted.

    def run(self, step: int, state: TrainState, names: Sequence[str]) -> dict[str, float]:
        """Runs the named evaluators on the state's params; logs and writes the results."""
        start = time.monotonic()
        results: dict[str, float] = {}
        for name in names:
            for key, value in self.evaluators[name].run(state["params"]).items():
                results[f"{name}/{key}"] = value
        self.last_seconds = time.monotonic() - start
        if results:
            self.writer.write(step, results)
            self.log(format_eval(step, results, self.last_seconds))
        self.progress.reset_clock(step)
        return results

    def __call__(self, step: int, state: TrainState, metrics: StepMetrics) -> None:
        due = [name for name, e in self.evaluators.items()
               if e.every_n_steps and step % e.every_n_steps == 0 and step != self.total_steps]
        if due:
            self.run(step, state, due)

    def finish(self, step: int, state: TrainState) -> dict[str, float]:
        return {} if self.skip_final else self.run(step, state, list(self.evaluators))


class StopFlag:
    """Set by SIGTERM (preemption); install() in the main thread, uninstall() afterwards."""

    def __init__(self) -> None:
        self.raised = False
        self._previous: signal.Handlers | Callable[..., object] | int | None = None

    def install(self) -> None:
        """Catches SIGTERM (only possible in the main thread)."""
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def uninstall(self) -> None:
        """Restores the previous SIGTERM handler."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        self.raised = True


def any_process(flag: bool) -> bool:
    """True if `flag` is set on any process (a collective when there are several)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.array([flag]))))


class StopOnSigterm:
    """Stops (reason "preempted") when any process got SIGTERM; on several processes it asks
    the others only at log steps, since asking is a collective."""

    def __init__(self, flag: StopFlag, log: Log, *, log_every: int, evaluations: RunEvaluations):
        self.flag, self.log, self.log_every = flag, log, log_every
        self.evaluations = evaluations

    def __call__(self, step: int, state: TrainState, metrics: StepMetrics) -> str | None:
        if jax.process_count() > 1 and step % self.log_every:
            return None
        if any_process(self.flag.raised):
            self.log(f"SIGTERM: saving a checkpoint at step {step} and stopping")
            self.evaluations.skip_final = True
            return "preempted"
        return None

    def finish(self, step: int, state: TrainState) -> dict[str, float]:
        return {}


class TimeBudget:
    """Stops (reason "budget") when the rest of the budget is needed for the final evaluation
    (the latest evaluation's duration, else 10 % of the budget) plus 5 s for the last save."""

    def __init__(self, budget_s: float, deadline: float, log: Log, *, total_steps: int,
                 evaluations: RunEvaluations, clock: Callable[[], float] = time.monotonic):
        self.budget_s, self.deadline, self.log = budget_s, deadline, log
        self.total_steps, self.evaluations, self.clock = total_steps, evaluations, clock

    def __call__(self, step: int, state: TrainState, metrics: StepMetrics) -> str | None:
        if step >= self.total_steps:
            return None
        reserve = (self.evaluations.last_seconds or 0.1 * self.budget_s) + 5.0
        if self.clock() + reserve > self.deadline:
            self.log(f"time budget of {self.budget_s:.0f}s reached at step {step} (schedule "
                     f"was for {self.total_steps}); stopping training")
            return "budget"
        return None

    def finish(self, step: int, state: TrainState) -> dict[str, float]:
        return {}
