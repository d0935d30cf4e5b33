"""`python -m siglip_jax.plot`: PNGs from a hand-written metrics.jsonl, and clear errors."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from siglip_jax import plot

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What the trainer writes: training records at log steps, eval records, a data-skip counter.
# Steps 20 and 30 appear twice: the run was resumed from a checkpoint at step 10 and redid them.
RECORDS = [
    {"step": 1, "loss": 10.7, "lr": 1e-4, "t": 10.0, "b": -10.0, "grad_norm": 32.0,
     "pos_logit_mean": -10.7, "neg_logit_mean": -10.8, "finite": True},
    {"step": 10, "loss": 4.2, "lr": 1e-3, "t": 9.9, "b": -10.01, "grad_norm": 2.3,
     "pos_logit_mean": -3.0, "neg_logit_mean": -9.8, "steps_per_s": 6.0,
     "examples_per_s": 768.0, "eta_s": 40.0, "mfu": 0.35, "skipped/corrupt_image": 0},
    {"step": 20, "loss": 3.9, "lr": 8e-4, "t": 9.8, "b": -10.02, "mfu": 0.36},
    {"step": 20, "zeroshot/top1": 0.4, "zeroshot/top5": 0.9, "zeroshot/num_examples": 720.0},
    {"step": 20, "loss": 3.8, "lr": 8e-4, "t": 9.8, "b": -10.02, "mfu": 0.37},  # Redone.
    {"step": 30, "loss": 3.5, "lr": 1e-5, "t": 9.7, "b": -10.03, "mfu": 0.38,
     "skipped/corrupt_image": 2},
    {"step": 30, "zeroshot/top1": 0.8, "zeroshot/top5": 1.0, "zeroshot/num_examples": 720.0},
    {"step": 30, "coco/img2txt/recall@1": 0.3, "coco/txt2img/recall@1": 0.2},
]


def _write(workdir, records, tail=""):
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records) + tail)


def _run(*args):
    return subprocess.run([sys.executable, "-m", "siglip_jax.plot", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_cli_writes_valid_pngs(tmp_path):
    workdir, out = str(tmp_path / "run"), str(tmp_path / "plots")
    _write(workdir, RECORDS)
    result = _run(workdir, "--out", out)
    assert result.returncode == 0, result.stderr
    expected = {"loss", "lr", "t", "b", "grad_norm", "examples_per_s", "mfu", "logit_means",
                "zeroshot", "coco", "skipped", "overview"}
    assert set(os.listdir(out)) == {f"{name}.png" for name in expected}
    for name in expected:
        path = os.path.join(out, f"{name}.png")
        assert os.path.getsize(path) > 1000
        with Image.open(path) as image:
            assert image.format == "PNG"
            image.verify()
        with Image.open(path) as image:  # A panel is 600×400 at 100 dpi; the grid is larger.
            width, height = image.size
            assert (width, height) == (600, 400) or name == "overview"
            colours = image.convert("L").getextrema()
            assert colours[0] < 100 < colours[1]  # Something dark was drawn on white.
    with Image.open(os.path.join(out, "overview.png")) as image:
        assert image.size == (1500, 1400)  # 11 panels: 3 columns × 4 rows of 500×350.


def test_default_out_is_workdir_plots(tmp_path):
    workdir = str(tmp_path / "run")
    _write(workdir, RECORDS[:3])
    assert plot.main([workdir]) == 0
    assert "loss.png" in os.listdir(os.path.join(workdir, "plots"))


def test_series_later_record_wins_and_counts_are_dropped():
    series = plot.collect_series(RECORDS)
    assert series["loss"] == ([1, 10, 20, 30], [10.7, 4.2, 3.8, 3.5])
    assert series["zeroshot/top1"] == ([20, 30], [0.4, 0.8])
    assert "zeroshot/num_examples" not in series
    assert "finite" not in series and "eta_s" not in series and "steps_per_s" not in series


def test_panels_group_eval_metrics_by_evaluator():
    panels = plot.group_panels(plot.collect_series(RECORDS))
    assert list(panels)[:4] == ["loss", "lr", "t", "b"]
    assert panels["zeroshot"] == ["zeroshot/top1", "zeroshot/top5"]
    assert panels["coco"] == ["coco/img2txt/recall@1", "coco/txt2img/recall@1"]
    assert panels["logit_means"] == ["neg_logit_mean", "pos_logit_mean"]
    assert list(panels).index("mfu") < list(panels).index("coco")  # Training, then evals.


def test_missing_workdir_is_a_one_line_error(tmp_path):
    missing = str(tmp_path / "nope")
    result = _run(missing)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no metrics file")
    assert missing in lines[0]


@pytest.mark.parametrize("content", ["", "\n\n"])
def test_empty_metrics_file_is_an_error(tmp_path, capsys, content):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "metrics.jsonl").write_text(content)
    assert plot.main([str(workdir)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds no records" in err


def test_truncated_last_line_is_ignored_but_a_bad_middle_line_is_an_error(tmp_path, capsys):
    workdir = str(tmp_path / "run")
    _write(workdir, RECORDS[:2], tail='{"step": 20, "loss": 3.')  # Killed mid-write.
    records = plot.read_metrics(os.path.join(workdir, "metrics.jsonl"))
    assert [r["step"] for r in records] == [1, 10]
    assert "truncated last line" in capsys.readouterr().err
    _write(workdir, RECORDS[:1], tail="not json\n" + json.dumps(RECORDS[1]) + "\n")
    with pytest.raises(plot.MetricsFileError, match=r"metrics.jsonl:2: not a JSON object"):
        plot.read_metrics(os.path.join(workdir, "metrics.jsonl"))


def _demo_like_series():
    """A loss that starts at 10.7 then falls from 4.2 to 2.5; top-1 equal to mean-class recall."""
    steps = [1] + list(range(50, 1001, 50))
    loss = [10.7] + [4.2 - 1.7 * i / 19 for i in range(20)]
    evals = [500, 1000]
    return {"loss": (steps, loss),
            "zeroshot/top1": (evals, [0.88, 0.95]),
            "zeroshot/mean_class_recall": (evals, [0.88, 0.95]),
            "zeroshot/top5": (evals, [0.99, 1.0])}, (1, 1000)


def _axes():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    return fig, ax


def test_identical_curves_get_distinct_styles_and_markers():
    series, xlim = _demo_like_series()
    fig, ax = _axes()
    keys = plot.group_panels(series)["zeroshot"]
    plot.draw_panel(ax, "zeroshot", keys, series, xlim)
    lines = ax.get_lines()
    assert [line.get_label() for line in lines] == [k.split("/")[1] for k in keys]
    top1 = lines[[line.get_label() for line in lines].index("top1")]
    recall = lines[[line.get_label() for line in lines].index("mean_class_recall")]
    assert list(top1.get_ydata()) == list(recall.get_ydata())  # Same data, drawn apart:
    assert len({line.get_linestyle() for line in lines}) == len(lines)
    assert len({line.get_marker() for line in lines}) == len(lines)
    assert all(line.get_marker() not in (None, "None", "") for line in lines)


def test_loss_y_range_ignores_the_first_step():
    series, xlim = _demo_like_series()
    fig, ax = _axes()
    plot.draw_panel(ax, "loss", ["loss"], series, xlim)
    low, high = ax.get_ylim()
    rest = series["loss"][1][1:]
    assert low <= min(rest) and high >= max(rest)  # Every later point is visible ...
    assert high < 10.7  # ... and the step-1 loss is off the scale, which the title says.
    assert (high - low) < 1.2 * (max(rest) - min(rest))
    assert "step 1: 10.7" in ax.get_title()


def test_robust_ylim_keeps_the_range_when_the_start_is_inside():
    assert plot.robust_ylim([3.0, 4.0, 2.0, 1.0, 1.5]) is None  # 3.0 lies within [1, 4].
    assert plot.robust_ylim([9.0, 4.0, 2.0, 1.0]) == pytest.approx((1 - 0.15, 4 + 0.15))
