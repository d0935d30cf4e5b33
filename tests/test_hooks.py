"""The training loop's hooks on fake metrics: cadence, one-step-late NaN checks counted once,
checkpoint and evaluation schedules, the time budget."""

import numpy as np
import pytest

from siglip_jax import hooks


def _metrics(loss=1.0):
    return {"loss": np.float32(loss), "finite": np.bool_(np.isfinite(loss))}


class _Writer:
    def __init__(self):
        self.records = []

    def write(self, step, values):
        self.records.append((step, dict(values)))


class _Progress:
    def __init__(self):
        self.resets, self.printed = [], []

    def reset_clock(self, step):
        self.resets.append(step)

    def rates(self, step):
        return {"steps_per_s": 2.0, "examples_per_s": 64.0, "eta_s": 1.0}

    def print(self, step, values):
        self.printed.append(step)


def test_nonfinite_check_reads_one_step_late_and_counts_a_skip_once():
    lines = []
    check = hooks.NonFiniteCheck("skip", lines.append)
    check(1, None, _metrics(float("nan")))
    assert check.skipped_steps == 0  # Not read yet: step 2 has not been dispatched.
    check(2, None, _metrics())
    assert check.skipped_steps == 1 and "step 1: non-finite" in lines[0]
    check.check(1, _metrics(float("nan")))  # e.g. the checkpoint hook asks again.
    assert check.skipped_steps == 1
    assert check.finish(2, None) == {"skipped_steps": 1}


def test_nonfinite_stop_raises_naming_the_step():
    check = hooks.NonFiniteCheck("stop", print)
    check(7, None, _metrics(float("inf")))
    with pytest.raises(hooks.NonFiniteError, match="at step 7"):
        check.finish(7, None)


def test_log_metrics_logs_first_every_nth_and_last_step():
    writer, progress = _Writer(), _Progress()
    log = hooks.LogMetrics(writer, progress, log_every=5, total_steps=12, start_step=0,
                           mfu=lambda rate: {"mfu": rate / 10},
                           counters=[lambda: {"skipped/corrupt_image": 3}])
    for step in range(1, 13):
        log(step, None, _metrics())
    assert [s for s, _ in writer.records] == [1, 5, 10, 12]
    assert "mfu" not in writer.records[0][1]  # The first step includes compilation.
    assert writer.records[1][1]["mfu"] == pytest.approx(0.2)
    assert writer.records[1][1]["skipped/corrupt_image"] == 3
    assert "finite" not in writer.records[1][1]


class _Checkpointer:
    def __init__(self, every):
        self.every, self.saved = every, []

    def is_due(self, step):
        return step % self.every == 0

    def maybe_save(self, step, state, force=False):
        self.saved.append((step, force))

    def poll(self):
        pass


def test_checkpoints_are_never_saved_from_a_nonfinite_step():
    check = hooks.NonFiniteCheck("stop", print)
    save = hooks.SaveCheckpoints(_Checkpointer(2), check)
    check(1, None, _metrics())
    save(1, None, _metrics())
    check(2, None, _metrics(float("nan")))
    with pytest.raises(hooks.NonFiniteError, match="at step 2"):
        save(2, None, _metrics(float("nan")))
    assert save.checkpointer.saved == []


class _Evaluator:
    def __init__(self, every):
        self.every_n_steps, self.calls = every, []

    def run(self, params):
        self.calls.append(params)
        return {"top1": 0.5}


def test_evaluations_run_at_their_cadence_and_all_at_the_end():
    a, b = _Evaluator(3), _Evaluator(0)
    writer, progress = _Writer(), _Progress()
    evals = hooks.RunEvaluations({"a": a, "b": b}, writer, progress, lambda _: None,
                                 total_steps=6)
    state = {"params": "P"}
    for step in range(1, 7):
        evals(step, state, {})
    assert len(a.calls) == 1 and not b.calls  # Step 3 only; step 6 is left to the end.
    assert evals.finish(6, state) == {"a/top1": 0.5, "b/top1": 0.5}
    assert [s for s, _ in writer.records] == [3, 6]


def test_time_budget_keeps_the_last_evaluation_in_reserve():
    now = [0.0]
    evals = hooks.RunEvaluations({}, _Writer(), _Progress(), lambda _: None, total_steps=100)
    budget = hooks.TimeBudget(100.0, 100.0, lambda _: None, total_steps=100,
                              evaluations=evals, clock=lambda: now[0])
    now[0] = 84.0
    assert budget(10, None, {}) is None  # 84 + 10 (10 % of the budget) + 5 < 100.
    now[0] = 86.0
    assert budget(11, None, {}) == "budget"
    evals.last_seconds = 30.0  # A measured evaluation replaces the 10 % guess.
    now[0] = 70.0
    assert budget(12, None, {}) == "budget"
    assert budget(100, None, {}) is None  # The last step never stops early.
