"""benchmarks/siglip2_ablation.py kept working (the benchmark itself is not a test): its table,
baselines and figure from kept runs (the session's shared SigLIP 2 run stands in for every
row), a real 2-step run of one row (slow), and the demo data options the ablation uses."""

import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from siglip_jax.data import demo_shapes as ds

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
import siglip2_ablation as bench  # noqa: E402


def _iou(a, b):
    """IoU of two (ymin, xmin, ymax, xmax) boxes, written out."""
    h = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    w = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = h * w
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def test_table_baselines_and_figure_from_kept_runs(siglip2_run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for row in ("sigmoid", "all", "random"):  # Read only: the fixture's workdir is shared.
        os.symlink(siglip2_run.workdir, out / f"{row}_0")
    assert bench.main(["--rows", "sigmoid,all", "--seeds", "1", "--reuse",
                       "--out", str(out)]) == 0
    saved = json.loads((out / "results.json").read_text())
    final = {k: v for r in siglip2_run.records for k, v in r.items()
             if r["step"] == siglip2_run.records[-1]["step"]}
    for key in ("zeroshot/top1", "referring/acc@0.5", "dense_class/miou_fg"):
        assert saved["results"]["all"][0][key] == pytest.approx(final[key])
    # The trivial referring predictors, recomputed here box by box.
    data = bench.run_data(siglip2_run.workdir, "test")
    train = bench.run_data(siglip2_run.workdir, "train")
    mean_box = np.concatenate([b[:n] for b, n in zip(train["boxes"], train["num_boxes"],
                                                     strict=True)]).mean(0)
    hits = [np.mean([_iou(boxes[0], boxes[k]) >= 0.5 for k in range(n)])
            for boxes, n in zip(data["boxes"], data["num_boxes"], strict=True)]
    ious = [np.mean([_iou(mean_box, boxes[k]) for k in range(n)])
            for boxes, n in zip(data["boxes"], data["num_boxes"], strict=True)]
    referring = saved["baselines"]["referring"]
    assert referring["largest object's box"]["referring/acc@0.5"] == pytest.approx(
        np.mean(hits))
    assert referring["mean training box"]["referring/mean_iou"] == pytest.approx(
        np.mean(ious), rel=1e-5)
    table = (out / "table.md").read_text()
    assert "| sigmoid | 1 |" in table and "| random | 1 |" in table
    assert "all: referring acc@0.5 vs the largest object's box" in table
    png = (out / "ablation.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_mean_std_and_separation():
    assert bench.mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert bench.mean_std([0.5, float("nan")]) == (0.5, 0.0)
    assert bench.separation([3.0, 5.0], [1.0, 1.0]) == pytest.approx(3.0 / math.sqrt(2))
    assert bench.separation([0.4, 0.6], 0.2) == pytest.approx(0.3 / math.sqrt(0.02))
    assert bench.parse_steps("sigmoid=5,all=2") == {"sigmoid": 5, "all": 2}


def test_data_options_draw_fewer_larger_objects():
    classes = ds.used_classes(3, 4)
    assert classes.tolist() == [c * 6 + s for c in range(3) for s in range(4)]
    split = ds.make_objects_split(2, seed=4, size=48, classes=classes, max_objects=3,
                                  scale=1.4)
    assert len(split["label"]) == 24 and set(split["label"].tolist()) == set(classes.tolist())
    assert split["num_boxes"].min() == 2 and split["num_boxes"].max() <= 3
    labels = split["box_labels"][split["box_labels"] >= 0]
    assert set(labels.tolist()) <= set(classes.tolist())
    # `scale` multiplies the radii: the same draws, 1.4× larger (two shapes fit at once).
    small = ds.draw_objects(np.random.default_rng(0), [0, 7], 48)
    large = ds.draw_objects(np.random.default_rng(0), [0, 7], 48, scale=1.4)
    np.testing.assert_allclose(large["radii"], 1.4 * small["radii"], rtol=1e-12)
    assert (large["segmentation"] > 0).sum() > 1.5 * (small["segmentation"] > 0).sum()
    default = ds.make_objects_split(1, seed=4, size=48)
    # Defaults unchanged: the same draws as without the options.
    np.testing.assert_array_equal(
        ds.make_objects_split(1, seed=4, size=48, classes=np.arange(36))["image"],
        default["image"])
    with pytest.raises(ValueError, match="need objects=True"):
        ds.DemoShapes(data_dir="/tmp", num_colours=3)
    with pytest.raises(ValueError, match="max_objects=4; expected 2..3"):
        ds.DemoShapes(data_dir="/tmp", objects=True, num_colours=1, num_shapes=3,
                      max_objects=4)


@pytest.mark.slow  # Twin in the default suite: test_table_baselines_and_figure_from_kept_runs.
def test_two_training_steps_of_one_row(tmp_path):
    out = tmp_path / "out"
    assert bench.main(["--rows", "sigmoid", "--seeds", "1", "--steps", "2", "--no-baselines",
                       "--no-figure", "--out", str(out), "--config-arg",
                       f"data_dir={tmp_path / 'data'}", "--config-arg", "train_per_class=2",
                       "--config-arg", "test_per_class=2"]) == 0
    saved = json.loads((out / "results.json").read_text())
    assert saved["results"]["sigmoid"][0]["step"] == 2
    assert 0.0 <= saved["results"]["sigmoid"][0]["dense_shape/miou_fg"] <= 1.0
