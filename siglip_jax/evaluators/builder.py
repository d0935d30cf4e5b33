"""Builds the evaluators named in `config.evals` (each a dict with a `type`) for the trainer
and the evaluation CLI. Every evaluator has `run(params) -> dict[str, float]` and an
`every_n_steps` attribute; the caller logs the results as `<name>/<metric>`.

Keys shared by all types:
  type           "zeroshot" | "retrieval" | "dense_probe" | "captioning" | "referring" |
                 "grounded_captioning"
  data           data source section (see data/builder.py); the source must know its size
  pp             preprocessing string (see data/pp.py)
  every_n_steps  run every N training steps (0: only at the end)
  batch_size     global evaluation batch size (rounded down to a multiple of the batch shards)

`zeroshot` (metrics top1, top5, mean_class_recall, num_examples) — pp must produce "image" and
keep the integer "label":
  class_names    a list of names, an asset name ("imagenet"), or "from_data" (the source's)
  templates      a list of templates with "{}", one such string, or an asset ("clip80", "clip7")
  canonicalize   prompts are lower-cased and stripped of punctuation before tokenizing, as
                 big_vision and HF SigLIP do (default True)

`retrieval` (metrics img2txt_r1/5/10, txt2img_r1/5/10, num_images, num_texts) — pp must produce
"image" and "labels" = token ids [num_captions, L] (e.g. `tokenize(..., inkey="captions")` on a
list of captions) or [L] for one caption:
  max_captions   use at most this many captions per image and pad/mask images with fewer
                 (required when the number varies, e.g. 5 for COCO); 0 = as produced

`dense_probe` (metrics accuracy, miou, num_patches, num_train_patches; evaluators/
dense_probe.py) — a ridge-regression linear probe on the image tower's frozen patch features
predicts each patch's majority segmentation label; pp must produce "image" (a fixed size,
multiple of the patch) and the segmentation map [H, W] or [H, W, 1] of the same size:
  label_set         "class" (37) | "shape" (7) | "colour" (7) for demo maps; "raw" otherwise
  num_classes       number of labels with label_set "raw"
  ignore_label      a map value that does not vote (e.g. 255); None = every pixel votes
  segmentation_key  the pp output holding the map (default "segmentation")
  train_fraction    the first fraction of `data` fits the probe, the rest tests it (0.5)
  train_data        a separate source section to fit on (then all of `data` tests)
  ridge             ridge strength relative to the mean feature variance (1e-3)
`captioning` (exact_match, token_acc, num_examples), `referring` (acc@0.5, mean_iou,
num_examples), `grounded_captioning` (exact_match, token_acc, num_examples): the LocCa
decoder's tasks (evaluators/decoder_tasks.py); the model needs `model.decoder`. pp must
produce "image", "dec_tokens" and "dec_target_mask" with the `locca_task` op and the one task
("cap", "aref", "gcap"); `referring` also needs "dec_box" (`box_key="dec_box"`); captioning
may give every caption as "dec_refs" (`refs_key="dec_refs"`):
  parallel         one-shot parallel decoding instead of greedy (default False)
  constrain_boxes  referring only: the 4 answer ids are location ids, then eos (default True)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol

import jax
import numpy as np
import tensorflow as tf

from siglip_jax.config import ConfigError
from siglip_jax.data import input as input_lib
from siglip_jax.data.builder import make_source
from siglip_jax.data.pp import get_preprocess_fn
from siglip_jax.data.tokenizer import encode_prompts
from siglip_jax.evaluators import prompts
from siglip_jax.evaluators.common import Embedder
from siglip_jax.evaluators.decoder_tasks import (
    TASK_OF,
    DecoderTaskEvaluator,
    make_decode_fn,
    model_vocab,
)
from siglip_jax.evaluators.dense_probe import DenseProbeEvaluator
from siglip_jax.evaluators.retrieval import CAPTION_MASK_KEY, RetrievalEvaluator
from siglip_jax.evaluators.zeroshot import ZeroShotEvaluator
from siglip_jax.schema import EvalConfig, TokenizerConfig, parse


class Evaluator(Protocol):
    """A periodic evaluation: its cadence and a run over the current params."""

    every_n_steps: int  # 0: only at the end of training.

    def run(self, params: Any) -> dict[str, float]:
        """Metrics of the params, e.g. {"top1": 0.9, ...}."""

def build_evaluators(config: Any, *, model: Any, mesh: Any, param_shardings: Any,
                     tokenizer: Any) -> dict[str, Evaluator]:
    """The evaluators of config.evals (a RunConfig, or a config parsed here), by name."""
    run = parse(config)
    evaluators: dict[str, Evaluator] = {}
    embedder = None
    for spec in run.evals:
        where = f"evals.{spec.name}"
        if spec.type == "zeroshot":
            names, templates = _prompt_config(spec, where)  # Cheap checks before any data.
        embedder = embedder or Embedder(model, mesh, run.mesh.batch_axes, param_shardings)
        source = make_source(spec.data, f"{where}.data")
        if source.num_examples is None:
            raise ConfigError(f"{where}.data: the evaluation source must know its size")
        preprocess = get_preprocess_fn(spec.pp, tokenizer=tokenizer, decoder_vocab=(
            model_vocab(model) if getattr(model, "decoder", None) is not None else None))
        shards = embedder.num_shards * jax.process_count()
        batch_size = max(shards, spec.batch_size // shards * shards)
        if spec.type == "dense_probe":
            evaluator = _dense_probe(spec, where, model, embedder, param_shardings, source,
                                     preprocess, batch_size)
        elif spec.type == "zeroshot":
            if names == "from_data":
                names = source.class_names
                if not names:
                    raise ConfigError(f"{where}.class_names='from_data' but the source has no "
                                      "class names; give a list or an asset name like "
                                      "'imagenet'")
            evaluator = _zeroshot(spec, where, embedder, source, preprocess, batch_size,
                                  tokenizer, run.tokenizer, list(names), templates)
        elif spec.type in TASK_OF:
            evaluator = _decoder_task(spec, where, model, mesh, run.mesh.batch_axes,
                                      param_shardings, source, preprocess, batch_size)
        else:
            evaluator = _retrieval(spec, where, embedder, source, preprocess, batch_size)
        evaluators[spec.name] = evaluator
    return evaluators


def pp_output_spec(source: Any, preprocess: Callable, keys: tuple[str, ...], where: str
                   ) -> dict[str, tf.TensorSpec]:
    """The element spec of the preprocessed data (traced, nothing is read); ConfigError if the
    pp string fails or does not produce `keys` — at build time, not hours into training."""
    try:
        spec = source.dataset(0, 1).map(preprocess).element_spec
    except Exception as e:  # tf.data traces with AutoGraph, which wraps the op's own error.
        text = str(e).strip()
        last = text.splitlines()[-1].strip() if text else type(e).__name__
        raise ConfigError(f"{where}.pp: {last}") from None
    if not isinstance(spec, dict) or not set(keys) <= set(spec):
        produced = sorted(spec) if isinstance(spec, dict) else spec
        raise ConfigError(f"{where}.pp must produce {list(keys)}; it produces {produced}")
    return spec


def _batches_fn(source: Any, preprocess: Callable, batch_size: int
                ) -> Callable[[], Iterator[dict[str, np.ndarray]]]:
    num_batches = input_lib.num_eval_batches(source.num_examples, batch_size)
    local_batch = batch_size // jax.process_count()

    def batches() -> Iterator[dict[str, np.ndarray]]:
        data = source.dataset(jax.process_index(), jax.process_count())
        return input_lib.eval_batches(data, preprocess, local_batch=local_batch,
                                      num_batches=num_batches)

    return batches


def _dense_probe(spec: EvalConfig, where: str, model: Any, embedder: Embedder,
                 param_shardings: Any, source: Any, preprocess: Callable, batch_size: int
                 ) -> DenseProbeEvaluator:
    """The dense_probe evaluator: train/test sections of the data, patch size of the model."""
    from siglip_jax.models.two_towers import towers
    from siglip_jax.models.vit import ViT

    opts = spec.options
    seg_key = opts["segmentation_key"]
    spec_out = pp_output_spec(source, preprocess, ("image", seg_key), where)
    img = towers(model)[0]
    if not isinstance(img, ViT):
        raise ConfigError(f"{where}: dense_probe needs a ViT image tower (fixed-size images), "
                          f"not {type(img).__name__}")
    patch = tuple(img.patch_size) if isinstance(img.patch_size, tuple | list) else (
        int(img.patch_size),) * 2
    image_shape, seg_shape = spec_out["image"].shape, spec_out[seg_key].shape
    if image_shape.rank == 3 and image_shape[:2].is_fully_defined():
        h, w = image_shape[:2]
        if h % patch[0] or w % patch[1]:
            raise ConfigError(f"{where}.pp: images of {h}×{w} do not tile into the model's "
                              f"{patch[0]}×{patch[1]} patches")
        if seg_shape.rank is not None and seg_shape[:2].is_fully_defined() and tuple(
                seg_shape[:2]) != (h, w):
            raise ConfigError(f"{where}.pp: {seg_key!r} is {seg_shape}, expected the image's "
                              f"{h}×{w}")
    pc, pi = jax.process_count(), jax.process_index()
    local_batch = batch_size // pc
    n = source.num_examples
    if opts["train_data"] is not None:
        train_source = make_source(opts["train_data"], f"{where}.train_data")
        if train_source.num_examples is None:
            raise ConfigError(f"{where}.train_data: the source must know its size")
        pp_output_spec(train_source, preprocess, ("image", seg_key), f"{where}.train_data")
        train_batches = _batches_fn(train_source, preprocess, batch_size)
        test_batches = _batches_fn(source, preprocess, batch_size)
    else:
        k = int(opts["train_fraction"] * n) // pc  # Train examples per process.
        rest = -(-n // pc) - k  # At most this many test examples per process.
        if k < 1 or rest < 1:
            raise ConfigError(f"{where}: train_fraction={opts['train_fraction']} of {n} "
                              f"examples over {pc} processes leaves an empty section")

        def section(train: bool) -> Callable[[], Iterator[dict[str, np.ndarray]]]:
            count = k if train else rest
            return lambda: input_lib.eval_batches(
                source.dataset(pi, pc).take(k) if train else source.dataset(pi, pc).skip(k),
                preprocess, local_batch=local_batch,
                num_batches=input_lib.num_eval_batches(count, local_batch))

        train_batches, test_batches = section(True), section(False)
    return DenseProbeEvaluator(
        model=model, mesh=embedder.mesh, batch_axes=embedder.batch_axes,
        param_shardings=param_shardings, patch_hw=patch, train_batches=train_batches,
        test_batches=test_batches, label_set=opts["label_set"],
        num_classes=opts["num_classes"], ignore_label=opts["ignore_label"],
        segmentation_key=seg_key, ridge=opts["ridge"], every_n_steps=spec.every_n_steps)


def _prompt_config(spec: EvalConfig, where: str) -> tuple[Any, list[str]]:
    """(class names or "from_data", templates) of a zeroshot section; ConfigError if bad."""
    names, templates = spec.options["class_names"], spec.options["templates"]
    if names is None or templates is None:
        raise ConfigError(f"{where}: class_names and templates must be set (lists or asset "
                          "names)")
    try:
        if names != "from_data":
            names = prompts.class_names(names)
        return names, prompts.templates(templates)
    except prompts.PromptError as e:
        raise ConfigError(f"{where}: {e}") from None


def _zeroshot(spec: EvalConfig, where: str, embedder: Embedder, source: Any,
              preprocess: Callable, batch_size: int, tokenizer: Any, tok_cfg: TokenizerConfig,
              class_names: list[str], templates: list[str]) -> ZeroShotEvaluator:
    pp_output_spec(source, preprocess, ("image", "label"), where)
    canonicalize = bool(spec.options["canonicalize"])
    tokenize = lambda texts: encode_prompts(tokenizer, tok_cfg, texts,
                                            canonicalize=canonicalize)
    return ZeroShotEvaluator(embedder=embedder, class_names=class_names, templates=templates,
                             tokenize=tokenize, every_n_steps=spec.every_n_steps,
                             batches=_batches_fn(source, preprocess, batch_size))


def fix_captions(max_captions: int) -> Callable[[dict[str, tf.Tensor]], dict[str, tf.Tensor]]:
    """tf map: "labels" [n, L] (or [L]) → [max_captions, L] plus a "_caption_mask" [C]."""

    def apply(example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        labels = example["labels"]
        if labels.shape.rank == 1:
            labels = labels[None]
        n = tf.shape(labels)[0]
        if max_captions:
            labels = labels[:max_captions]
            mask = tf.range(max_captions) < tf.minimum(n, max_captions)
            labels = tf.pad(labels, [[0, max_captions - tf.shape(labels)[0]], [0, 0]],
                            constant_values=1)
            labels = tf.ensure_shape(labels, [max_captions, labels.shape[-1]])
        else:
            mask = tf.ones([n], tf.bool)
        return {**example, "labels": labels, CAPTION_MASK_KEY: mask}

    return apply


def _retrieval(spec: EvalConfig, where: str, embedder: Embedder, source: Any,
               preprocess: Callable, batch_size: int) -> RetrievalEvaluator:
    max_captions = spec.options["max_captions"]
    labels = pp_output_spec(source, preprocess, ("image", "labels"), where)["labels"].shape
    if labels.rank not in (1, 2):
        raise ConfigError(f"{where}: 'labels' must be [num_captions, L] or [L], got {labels}")
    if labels.rank == 2 and labels[0] is None and not max_captions:
        raise ConfigError(f"{where}: the number of captions per image varies; set "
                          f"{where}.max_captions (e.g. 5 for COCO)")
    fix = fix_captions(max_captions)
    return RetrievalEvaluator(embedder=embedder, every_n_steps=spec.every_n_steps,
                              batches=_batches_fn(source, lambda ex: fix(preprocess(ex)),
                                                  batch_size))


def _decoder_task(spec: EvalConfig, where: str, model: Any, mesh: Any,
                  batch_axes: tuple[str, ...], param_shardings: Any, source: Any,
                  preprocess: Callable, batch_size: int) -> DecoderTaskEvaluator:
    if getattr(model, "decoder", None) is None:
        raise ConfigError(f"{where}: type {spec.type!r} needs a model with a decoder "
                          "(config.model.decoder)")
    keys = ("image", "dec_tokens", "dec_target_mask") + (
        ("dec_box",) if spec.type == "referring" else ())
    pp_output_spec(source, preprocess, keys, where)
    vocab = model_vocab(model)
    decode = make_decode_fn(model, vocab, mesh, batch_axes, param_shardings,
                            parallel=bool(spec.options["parallel"]),
                            constrain_boxes=bool(spec.options.get("constrain_boxes", False)))
    return DecoderTaskEvaluator(kind=spec.type, decode=decode, mesh=mesh, batch_axes=batch_axes,
                                vocab=vocab, every_n_steps=spec.every_n_steps,
                                batches=_batches_fn(source, preprocess, batch_size))
