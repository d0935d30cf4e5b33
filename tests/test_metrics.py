"""MFU's denominator (PeakFlops): published on accelerators, a best-so-far estimate on CPU, and
the progress line that marks an estimate."""

import types

import pytest

from siglip_jax import metrics

TPU = types.SimpleNamespace(platform="tpu", device_kind="TPU v4")
CPU = types.SimpleNamespace(platform="cpu", device_kind="cpu")


class FakeMeasure:
    """Returns the given rates in turn and records the arguments of each call."""

    def __init__(self, *rates):
        self.rates, self.calls = list(rates), []

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        return self.rates.pop(0)


def test_accelerator_uses_the_published_peak_and_no_estimate_mark():
    peak = metrics.PeakFlops.for_device(TPU, None, measure=FakeMeasure())
    assert peak.value == 275e12 and not peak.is_estimate
    # 100 TFLOP per device per step, 4 devices, 0.5 steps/s on 4 chips of 275 TFLOP/s.
    out = peak.mfu_metrics(100e12, 4, 0.5, 4)
    assert out == {"mfu": pytest.approx(50 / 275), "mfu_peak_flops": 275e12}
    assert "published" in peak.describe() and "275 TFLOP/s" in peak.describe()


def test_configured_peak_wins_and_is_not_measured():
    measure = FakeMeasure()
    peak = metrics.PeakFlops.for_device(CPU, 50e9, measure=measure)
    assert peak.value == 50e9 and measure.calls == [] and not peak.is_estimate


def test_cpu_estimate_is_the_best_rate_so_far():
    # Start-up reads 80 GFLOP/s (a loaded moment); later re-measurements 120 then 100.
    measure = FakeMeasure(80e9, 120e9, 100e9)
    peak = metrics.PeakFlops.for_device(CPU, None, measure=measure)
    assert peak.value == 80e9 and peak.is_estimate
    first = peak.mfu_metrics(2e9, 8, 3.0, 1)  # 48 GFLOP/s achieved.
    assert first["mfu_peak_flops"] == 120e9 and first["mfu"] == pytest.approx(48 / 120)
    assert first["mfu_estimated"] is True
    second = peak.mfu_metrics(2e9, 8, 3.0, 1)
    assert second["mfu_peak_flops"] == 120e9  # 100 < 120: the best so far stays.
    assert all(c["seconds"] <= 0.05 for c in measure.calls[1:])  # Re-measurements are short.


def test_unknown_peak_gives_no_mfu():
    gpu = types.SimpleNamespace(platform="gpu", device_kind="Some GPU")
    peak = metrics.PeakFlops.for_device(gpu, None)
    assert peak.value is None and peak.mfu_metrics(1e12, 1, 1.0, 1) == {}
    assert "unknown" in peak.describe()


def test_progress_line_marks_an_estimated_mfu():
    progress = metrics.Progress(1000, 0, 128)
    line = progress.line(50, {"loss": 4.0, "mfu": 0.172, "mfu_estimated": True})
    assert "mfu ≈17.2%" in line
    assert "mfu 17.2%" in progress.line(50, {"loss": 4.0, "mfu": 0.172})


def test_measure_matmul_flops_is_a_plausible_rate():
    rate = metrics.measure_matmul_flops(sizes=(128, 256), seconds=0.02)
    assert 1e8 < rate < 1e13  # A real CPU does between 0.1 GFLOP/s and 10 TFLOP/s.
