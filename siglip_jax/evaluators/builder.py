"""Builds the evaluators of a parsed run's `evals` for the trainer and the evaluation CLI.

Each `evals.<name>` section is an EvalConfig (evaluators/config.py) with these keys, plus its
type's own keys, which are the fields of the type's options record (evaluators/config.OPTIONS:
ZeroShotOptions, RetrievalOptions, DenseProbeOptions, DecoderTaskOptions, ReferringOptions;
docs/evaluation.md tabulates them):
  type           "zeroshot" | "retrieval" | "dense_probe" | "captioning" | "referring" |
                 "grounded_captioning"
  data           data source section (see data/builder.py); the source must know its size
  pp             preprocessing string (see data/pp.py)
  every_n_steps  run every N training steps (0: only at the end)
  batch_size     global evaluation batch size (rounded down to a multiple of the batch shards)

Every evaluator has `run(params) -> dict[str, float]` and an `every_n_steps` attribute; the
caller logs the results as `<name>/<metric>`. What each type's pp must produce:
  zeroshot             "image" and the integer "label" (metrics top1, top5, mean_class_recall,
                       num_examples)
  retrieval            "image" and "labels" = token ids [num_captions, L] (e.g. `tokenize(...,
                       inkey="captions")` on a list of captions) or [L] for one caption
                       (img2txt_r1/5/10, txt2img_r1/5/10, num_images, num_texts)
  dense_probe          "image" (a fixed size, multiple of the patch) and the segmentation map
                       [H, W] or [H, W, 1] of the same size (accuracy, miou, num_patches,
                       num_train_patches)
  captioning, referring, grounded_captioning
                       "image", "dec_tokens" and "dec_target_mask" from the `locca_task` op
                       with the one task ("cap", "aref", "gcap"); referring also "dec_box"
                       (`box_key="dec_box"`); captioning may give every caption as "dec_refs"
                       (`refs_key="dec_refs"`). The model needs `model.decoder`.
The model facts the evaluators need (the ViT patch size, the decoder vocabulary) are computed
once, by `model_facts`, and passed to them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
import tensorflow as tf
from jax.sharding import Mesh

from siglip_jax.data import input as input_lib
from siglip_jax.data.builder import Source, make_source
from siglip_jax.data.locca import DecoderVocab
from siglip_jax.data.pp import get_preprocess_fn
from siglip_jax.data.tokenizer import Tokenizer, encode_prompts
from siglip_jax.evaluators import prompts
from siglip_jax.evaluators.common import Embedder, Evaluator
from siglip_jax.evaluators.config import (
    DecoderTaskOptions,
    DenseProbeOptions,
    EvalConfig,
    ReferringOptions,
    RetrievalOptions,
    ZeroShotOptions,
)
from siglip_jax.evaluators.decoder_tasks import DecoderTaskEvaluator, make_decode_fn
from siglip_jax.evaluators.dense_probe import DenseProbeEvaluator
from siglip_jax.evaluators.retrieval import CAPTION_MASK_KEY, RetrievalEvaluator
from siglip_jax.evaluators.zeroshot import ZeroShotEvaluator
from siglip_jax.models.config import ModelConfig, decoder_vocab
from siglip_jax.records import ConfigError
from siglip_jax.schema import RunConfig, TokenizerConfig

Batches = Callable[[], Iterator[dict[str, np.ndarray]]]
PreprocessFn = Callable[[dict[str, tf.Tensor]], dict[str, tf.Tensor]]


def model_facts(model: ModelConfig) -> tuple[tuple[int, int] | None, DecoderVocab | None]:
    """(patch size (h, w) of a fixed-size ViT image tower, the decoder's vocabulary) of the
    model record, None where it has none: what the evaluators need to know of the model,
    computed once here and passed to them."""
    patch = model.image.patch_size if model.image.kind == "vit" else None
    return patch, decoder_vocab(model)


def build_evaluators(run: RunConfig, *, model: nn.Module | None, mesh: Mesh | None,
                     param_shardings: Mapping[str, object] | None,
                     tokenizer: Tokenizer | None, model_config: ModelConfig | None = None
                     ) -> dict[str, Evaluator]:
    """The evaluators of `run.evals`, by name (one-line ConfigErrors at build time).
    `model_config` describes `model` (default: the run's own model section; a checkpoint
    evaluated under another config passes its own)."""
    evaluators: dict[str, Evaluator] = {}
    embedder = None
    patch, vocab = model_facts(model_config or run.model)
    for spec in run.evals:
        where, options = f"evals.{spec.name}", spec.options
        if isinstance(options, ZeroShotOptions):
            names, templates = _prompt_config(options, where)  # Cheap checks before any data.
        embedder = embedder or Embedder(model, mesh, run.mesh.batch_axes, param_shardings)
        source = make_source(spec.data, f"{where}.data")
        if source.num_examples is None:
            raise ConfigError(f"{where}.data: the evaluation source must know its size")
        preprocess = get_preprocess_fn(spec.pp, tokenizer=tokenizer, decoder_vocab=vocab)
        shards = embedder.num_shards * jax.process_count()
        batch_size = max(shards, spec.batch_size // shards * shards)
        if isinstance(options, DenseProbeOptions):
            evaluator = _dense_probe(spec, options, model, patch, embedder, param_shardings,
                                     source, preprocess, batch_size)
        elif isinstance(options, ZeroShotOptions):
            if names == "from_data":
                names = source.class_names
                if not names:
                    raise ConfigError(f"{where}.class_names='from_data' but the source has no "
                                      "class names; give a list or an asset name like "
                                      "'imagenet'")
            evaluator = _zeroshot(spec, options, embedder, source, preprocess, batch_size,
                                  tokenizer, run.tokenizer, list(names), templates)
        elif isinstance(options, DecoderTaskOptions | ReferringOptions):
            evaluator = _decoder_task(spec, options, model, vocab, embedder, param_shardings,
                                      source, preprocess, batch_size)
        else:
            evaluator = _retrieval(spec, options, embedder, source, preprocess, batch_size)
        evaluators[spec.name] = evaluator
    return evaluators


def pp_output_spec(source: Source, preprocess: PreprocessFn, keys: Sequence[str], where: str
                   ) -> dict[str, tf.TensorSpec]:
    """The element spec of the preprocessed data (traced, nothing is read); ConfigError if the
    pp string fails or does not produce `keys` — at build time, not hours into training."""
    try:
        spec = source.dataset(0, 1).map(preprocess).element_spec
    except Exception as e:  # noqa: BLE001 - whatever the op raised, its last line.
        text = str(e).strip()
        last = text.splitlines()[-1].strip() if text else type(e).__name__
        raise ConfigError(f"{where}.pp: {last}") from None
    if not isinstance(spec, dict) or not set(keys) <= set(spec):
        produced = sorted(spec) if isinstance(spec, dict) else spec
        raise ConfigError(f"{where}.pp must produce {list(keys)}; it produces {produced}")
    return spec


def _batches_fn(source: Source, preprocess: PreprocessFn, batch_size: int) -> Batches:
    num_batches = input_lib.num_eval_batches(source.num_examples, batch_size)
    local_batch = batch_size // jax.process_count()

    def batches() -> Iterator[dict[str, np.ndarray]]:
        data = source.dataset(jax.process_index(), jax.process_count())
        return input_lib.eval_batches(data, preprocess, local_batch=local_batch,
                                      num_batches=num_batches, seed=jax.process_index())

    return batches


def _dense_probe(spec: EvalConfig, opts: DenseProbeOptions, model: nn.Module,
                 patch: tuple[int, int] | None, embedder: Embedder,
                 param_shardings: Mapping[str, object], source: Source,
                 preprocess: PreprocessFn, batch_size: int) -> DenseProbeEvaluator:
    """The dense_probe evaluator: train/test sections of the data, patch size of the model."""
    where = f"evals.{spec.name}"
    seg_key = opts.segmentation_key
    spec_out = pp_output_spec(source, preprocess, ("image", seg_key), where)
    if patch is None:
        raise ConfigError(f"{where}: dense_probe needs a ViT image tower (fixed-size images); "
                          "this model's image tower is not one")
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
    if opts.train_data is not None:
        train_source = make_source(opts.train_data, f"{where}.train_data")
        if train_source.num_examples is None:
            raise ConfigError(f"{where}.train_data: the source must know its size")
        pp_output_spec(train_source, preprocess, ("image", seg_key), f"{where}.train_data")
        train_batches = _batches_fn(train_source, preprocess, batch_size)
        test_batches = _batches_fn(source, preprocess, batch_size)
    else:
        k = int(opts.train_fraction * n) // pc  # Train examples per process.
        rest = -(-n // pc) - k  # At most this many test examples per process.
        if k < 1 or rest < 1:
            raise ConfigError(f"{where}: train_fraction={opts.train_fraction} of {n} "
                              f"examples over {pc} processes leaves an empty section")

        def section(train: bool) -> Batches:
            count = k if train else rest
            return lambda: input_lib.eval_batches(
                source.dataset(pi, pc).take(k) if train else source.dataset(pi, pc).skip(k),
                preprocess, local_batch=local_batch,
                num_batches=input_lib.num_eval_batches(count, local_batch), seed=pi)

        train_batches, test_batches = section(True), section(False)
    return DenseProbeEvaluator(
        model=model, mesh=embedder.mesh, batch_axes=embedder.batch_axes,
        param_shardings=param_shardings, patch_hw=patch, train_batches=train_batches,
        test_batches=test_batches, options=opts, every_n_steps=spec.every_n_steps)


def _prompt_config(opts: ZeroShotOptions, where: str) -> tuple[list[str] | str, list[str]]:
    """(class names or "from_data", templates) of a zeroshot section; ConfigError if bad."""
    names, templates = opts.class_names, opts.templates
    if names is None or templates is None:
        raise ConfigError(f"{where}: class_names and templates must be set (lists or asset "
                          "names)")
    try:
        if names != "from_data":
            names = prompts.class_names(names)
        return names, prompts.templates(templates)
    except prompts.PromptError as e:
        raise ConfigError(f"{where}: {e}") from None


def _zeroshot(spec: EvalConfig, opts: ZeroShotOptions, embedder: Embedder, source: Source,
              preprocess: PreprocessFn, batch_size: int, tokenizer: Tokenizer | None,
              tok_cfg: TokenizerConfig, class_names: list[str], templates: list[str]
              ) -> ZeroShotEvaluator:
    pp_output_spec(source, preprocess, ("image", "label"), f"evals.{spec.name}")
    tokenize = lambda texts: encode_prompts(tokenizer, tok_cfg, texts,
                                            canonicalize=opts.canonicalize)
    return ZeroShotEvaluator(embedder=embedder, class_names=class_names, templates=templates,
                             tokenize=tokenize, every_n_steps=spec.every_n_steps,
                             batches=_batches_fn(source, preprocess, batch_size))


def fix_captions(max_captions: int) -> PreprocessFn:
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


def _retrieval(spec: EvalConfig, opts: RetrievalOptions, embedder: Embedder, source: Source,
               preprocess: PreprocessFn, batch_size: int) -> RetrievalEvaluator:
    where, max_captions = f"evals.{spec.name}", opts.max_captions
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


def _decoder_task(spec: EvalConfig, opts: DecoderTaskOptions | ReferringOptions,
                  model: nn.Module, vocab: DecoderVocab | None, embedder: Embedder,
                  param_shardings: Mapping[str, object], source: Source,
                  preprocess: PreprocessFn, batch_size: int) -> DecoderTaskEvaluator:
    where = f"evals.{spec.name}"
    if vocab is None:
        raise ConfigError(f"{where}: type {spec.type!r} needs a model with a decoder "
                          "(config.model.decoder)")
    referring = isinstance(opts, ReferringOptions)
    keys = ("image", "dec_tokens", "dec_target_mask") + (("dec_box",) if referring else ())
    pp_output_spec(source, preprocess, keys, where)
    mesh, batch_axes = embedder.mesh, embedder.batch_axes
    decode = make_decode_fn(model, vocab, mesh, batch_axes, param_shardings,
                            parallel=opts.parallel,
                            constrain_boxes=referring and opts.constrain_boxes)
    return DecoderTaskEvaluator(kind=spec.type, decode=decode, mesh=mesh, batch_axes=batch_axes,
                                vocab=vocab, every_n_steps=spec.every_n_steps,
                                batches=_batches_fn(source, preprocess, batch_size))
