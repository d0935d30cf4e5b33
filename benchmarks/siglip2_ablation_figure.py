"""The figure of benchmarks/siglip2_ablation.py: the metrics per row with error bars, and one
held-out image as the trained models see it (the decoder's caption and referring boxes, the
dense probe's segmentation next to the ground truth).

`make_figure(results, baselines, out_dir, path, columns)` is called by the benchmark after
training; the example panels load the seed-0 checkpoints it kept in `out_dir`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
from collections.abc import Mapping, Sequence

import numpy as np

ROW_COLOURS = {"sigmoid": "#7f7f7f", "decoder": "#1f77b4", "ssl": "#2ca02c", "all": "#d62728",
               "random": "#c7c7c7"}


def run_config(workdir: str):
    """The parsed config (schema.RunConfig) of a finished run, from its config.json."""
    from siglip_jax.config import load_config
    from siglip_jax.schema import parse

    return parse(load_config(os.path.join(workdir, "config.json"), []))


def run_data(workdir: str, split: str) -> dict:
    """The `split` of the demo data a finished run trained on (read from its config.json)."""
    from siglip_jax.data.demo_shapes import DemoShapes

    record = run_config(workdir).input.data
    given = {f.name: getattr(record, f.name) for f in dataclasses.fields(record)
             if getattr(record, f.name) is not None}
    return DemoShapes(**{**given, "split": split}).load()


class Example:
    """One trained run opened for the example panels: the model, its params on the run's
    mesh, the tokenizer and the evaluators of its config."""

    def __init__(self, workdir: str):
        # Heavy imports here: the metric panels need none of them.
        import jax

        from siglip_jax.checkpoints.open import open_model
        from siglip_jax.data.builder import make_source
        from siglip_jax.evaluators.builder import build_evaluators
        from siglip_jax.experiment import resolve_tokenizer
        from siglip_jax.models.build import make_model
        from siglip_jax.models.config import model_kwargs
        from siglip_jax.models.params import param_shapes
        from siglip_jax.sharding import mesh_of, param_shardings

        run = run_config(workdir)
        max_len = run.tokenizer.max_len
        opened = open_model(workdir, defaults={"model": model_kwargs(run.model),
                                               "text_len": max_len})
        self.model = make_model(opened.model)
        self.tokenizer = resolve_tokenizer(run.tokenizer, opened.tokenizer,
                                           lambda: make_source(run.input.data),
                                           vocab_size=opened.model.text.vocab_size)
        size = run.input.data.image_size
        abstract = param_shapes(self.model, (size, size), max_len)
        self.mesh = mesh_of(run.mesh)
        shardings = param_shardings(abstract, run.mesh.rules, self.mesh)
        params = opened.fitted_params(abstract)
        self.params = jax.tree_util.tree_map(
            lambda x, s: jax.make_array_from_callback(x.shape, s, lambda idx, x=x: x[idx]),
            params, shardings)
        self.run = run
        self.evaluators = build_evaluators(run, model=self.model, mesh=self.mesh,
                                           param_shardings=shardings, tokenizer=self.tokenizer,
                                           model_config=opened.model)
        self.patch = run.model.image.patch_size[0]  # Square patches.

    def _batch(self, examples: list[dict], pp: str, vocab) -> dict[str, np.ndarray]:
        """The examples through `pp` (its locca_task following the decoder's vocabulary
        `vocab`), repeated to a multiple of the device count."""
        import tensorflow as tf

        from siglip_jax.data.pp import get_preprocess_fn

        fn = get_preprocess_fn(pp, tokenizer=self.tokenizer, decoder_vocab=vocab)
        rows = [{k: np.asarray(v) for k, v in fn({k: tf.constant(v) for k, v in e.items()}
                                                  ).items()} for e in examples]
        devices = self.mesh.devices.size
        rows = rows * math.ceil(devices / len(rows))
        rows += rows[:(-len(rows)) % devices]
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

    def _decode(self, name: str, examples: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        """(generated ids, pp dec_tokens) of the decoder evaluator `name`, one row per
        example."""
        from siglip_jax.sharding import make_global_batch

        evaluator = self.evaluators[name]
        spec = next(s for s in self.run.evals if s.name == name)
        local = self._batch(examples, spec.pp, evaluator.vocab)
        keys = [k for k in local if k in ("image", "dec_tokens", "dec_target_mask", "dec_box")]
        batch = make_global_batch({k: local[k] for k in keys}, self.mesh,
                                  self.run.mesh.batch_axes)
        out = evaluator.decode(self.params, batch)
        return np.asarray(out["generated"])[:len(examples)], local["dec_tokens"][:len(examples)]

    def caption(self, example: dict) -> str:
        """The decoder's greedy caption of the image."""
        from siglip_jax.evaluators.decoder_tasks import answer_of

        generated, _ = self._decode("captioning", [example])
        vocab = self.evaluators["captioning"].vocab
        answer = answer_of(generated[0], 1, vocab.eos_id)  # After the task token.
        return self.tokenizer.decode([t for t in answer if 1 < t < vocab.text_vocab])

    def boxes(self, example: dict) -> np.ndarray:
        """The decoder's box [n, 4] for each object's phrase (referring expressions)."""
        from siglip_jax.data.locca import tokens_to_box

        n = int(example["num_boxes"])
        singles = []
        for k in range(n):
            one = dict(example)
            one["boxes"] = np.zeros_like(example["boxes"])
            one["boxes"][0] = example["boxes"][k]
            one["box_texts"] = np.array([example["box_texts"][k]] + [""] * (len(
                example["box_texts"]) - 1))
            one["num_boxes"] = np.int32(1)
            singles.append(one)
        generated, tokens = self._decode("referring", singles)
        vocab = self.evaluators["referring"].vocab
        ids = []
        for g, t in zip(generated, tokens, strict=True):
            # The answer starts at the first location id of the pp sequence (its target).
            p = int(np.argmax((t >= vocab.loc_start) & (t < vocab.loc_start + vocab.num_bins)))
            ids.append(g[p:p + 4])
        return tokens_to_box(np.stack(ids), vocab)

    def segmentation(self, image: np.ndarray) -> np.ndarray:
        """The dense probe's (class label set) patch labels [gh, gw] for one image; the probe
        is fitted as in the run's evaluation (the ablation: on the training split)."""
        import jax.numpy as jnp

        probe = self.evaluators["dense_class"]
        w, b, _ = probe.fit(self.params)
        x = np.asarray(image, np.float32)[None] / 127.5 - 1.0
        x = np.repeat(x, self.mesh.devices.size, 0)
        encoded = self.model.apply({"params": self.params}, jnp.asarray(x), None)[2]
        feats = np.asarray(encoded["img/encoded"])[0]
        g = image.shape[0] // self.patch
        feats = feats[-g * g:]
        return (feats @ w + b).argmax(-1).reshape(g, g)


def _metric_panels(fig, grid, results, baselines, columns):
    """One bar chart per metric: the rows side by side, mean ± std over seeds, seed dots."""
    metrics = [c for c in columns if c[1] != "step"]
    rows = [r for r in results if r != "random"]
    for i, (header, key, percent) in enumerate(metrics):
        ax = fig.add_subplot(grid[i // 5, i % 5])
        scale = 100 if percent else 1
        for j, row in enumerate(rows):
            values = [scale * r[key] for r in results[row] if isinstance(r.get(key), float)
                      and math.isfinite(r[key])]
            if not values:
                continue
            mean = statistics.fmean(values)
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            ax.bar(j, mean, yerr=std, color=ROW_COLOURS.get(row, "k"), capsize=3)
            ax.plot([j] * len(values), values, "k.", ms=3)
        if key.startswith("referring/") and baselines.get("referring"):
            for name, m in baselines["referring"].items():
                ax.axhline(100 * m[key], ls="--", lw=1,
                           color="k" if "largest" in name else "0.5", label=name)
            ax.legend(fontsize=5, loc="upper left")
        if key.startswith("dense") and results.get("random"):
            values = [100 * r[key] for r in results["random"] if key in r]
            if values:
                ax.axhline(statistics.fmean(values), ls=":", color="k", lw=1,
                           label="random tower")
                ax.legend(fontsize=5, loc="lower left")
        ax.set_xticks(range(len(rows)), rows, fontsize=6, rotation=30)
        ax.set_title(header + (" %" if percent else ""), fontsize=7)
        ax.tick_params(labelsize=6)


def _label_colours(labels: np.ndarray) -> np.ndarray:
    """RGB [.., 3] floats for demo class labels (0 background black; the shape's colour,
    darker per shape index)."""
    from siglip_jax.data.demo_shapes import COLOURS, SHAPES

    palette = np.array(list(COLOURS.values()), np.float32) / 255
    cls = np.maximum(labels - 1, 0)
    shade = 1.0 - 0.18 * (cls % len(SHAPES))
    rgb = palette[cls // len(SHAPES)] * shade[..., None]
    return np.where((labels > 0)[..., None], rgb, 0.0)


def _example_panels(fig, grid, out_dir: str, rows: Sequence[str]):
    """The held-out image with the decoder's caption and boxes, and the probe's maps."""
    from matplotlib.patches import Rectangle

    from siglip_jax.evaluators.dense_probe import patch_labels

    first = os.path.join(out_dir, f"{rows[0]}_0")
    test = run_data(first, "test")
    index = len(test["image"]) - 1  # Never a fitted image (the fit uses the first half at most).
    while test["num_boxes"][index] < 3 and index > len(test["image"]) // 2:
        index -= 1
    example = {k: test[k][index] for k in ("image", "texts", "boxes", "box_texts",
                                           "num_boxes", "label")}
    image = example["image"]
    patch = run_config(first).model.image.patch_size[0]  # Square patches.
    truth = patch_labels(test["segmentation"][index][None], (patch, patch), 37)[0]
    g = image.shape[0] // patch
    decoder_row = next((r for r in ("all", "decoder") if r in rows), None)
    opened: dict[str, Example] = {}  # One Example per run (the decoder row may be "all").

    def open_run(row: str) -> Example:
        if row not in opened:
            opened[row] = Example(os.path.join(out_dir, f"{row}_0"))
        return opened[row]

    ax = fig.add_subplot(grid[2, 0:2])
    ax.imshow(image)
    ax.set_axis_off()
    title = f"truth: {example['texts']}"
    if decoder_row:
        run = open_run(decoder_row)
        title += f"\n{decoder_row} (seed 0) caption: {run.caption(example)}"
        size = image.shape[0]
        for phrase, box in zip(example["box_texts"], run.boxes(example), strict=False):
            y0, x0, y1, x1 = (np.asarray(box) * size).tolist()
            ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False,
                                   ec="white", lw=1.2))
            ax.text(x0, y0 - 1, phrase, color="white", fontsize=5, va="bottom")
    ax.set_title(title, fontsize=6)
    ax = fig.add_subplot(grid[2, 2])
    ax.imshow(_label_colours(truth.reshape(g, g)))
    ax.set_title("truth (patch majority)", fontsize=6)
    ax.set_axis_off()
    other = next((r for r in ("all", "ssl", "decoder") if r in rows), None)
    for k, row in enumerate(r for r in ("sigmoid", other) if r in rows):
        run = open_run(row)
        ax = fig.add_subplot(grid[2, 3 + k])
        ax.imshow(_label_colours(run.segmentation(image)))
        ax.set_title(f"dense probe on {row} (seed 0)", fontsize=6)
        ax.set_axis_off()


def make_figure(results: Mapping[str, list[dict]], baselines: Mapping, out_dir: str,
                path: str, columns: Sequence[tuple[str, str, bool]]) -> None:
    """Writes the PNG: metric panels (2 × 5) above the example panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(13, 9), dpi=110)
    grid = fig.add_gridspec(3, 5, height_ratios=[1, 1, 1.3], hspace=0.6, wspace=0.35)
    _metric_panels(fig, grid, results, baselines, columns)
    _example_panels(fig, grid, out_dir, list(results))
    fig.suptitle("SigLIP 2 objectives on the demo: mean ± std over seeds", fontsize=9)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
