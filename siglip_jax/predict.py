"""Zero-shot predictions: images + candidate labels → independent sigmoid probabilities.

    python -m siglip_jax.predict --checkpoint DIR cat.jpg dog.png --labels "2 cats" "2 dogs"

API: `predict(images, labels, checkpoint=DIR)` (or `Predictor(DIR)(images, labels)` to load
once) returns {"probs": [N_img, N_label], "logits": ..., "texts": prompts}, with
`logits = exp(t') · zimg · ztxtᵀ + b` and `probs = sigmoid(logits)`: each label is judged on
its own (SigLIP is not a softmax over the labels; the probabilities need not sum to 1).

Checkpoints (opened with `checkpoints.open.open_model`): a HF SigLIP directory (with its
`spiece.model`), our trainer's workdir or step directory, or a big_vision .npz (its model,
image size and text length are read off the arrays; pass tokenizer=). Keyword arguments
model_config, image_size, text_len and tokenizer override what the checkpoint says.
Preprocessing is the HF SigLIP processor's: RGB, resize to the model's resolution with PIL
(bilinear unless the directory's preprocessor_config.json, or the processor_config.json of
transformers ≥ 5, says otherwise), × 1/255, then (x − 0.5) / 0.5 (or the config's mean/std),
i.e. values in [−1, 1]. Texts are the template filled with each label, lower-cased and
stripped of punctuation (HF `SiglipTokenizer` / big_vision canonicalisation), EOS-terminated
and padded with EOS to the model's text length.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from siglip_jax.checkpoints.hf_processor import PREPROCESSOR_FILE
from siglip_jax.console import add_verbose_flag, quiet_startup
from siglip_jax.models.build import make_model

DEFAULT_TEMPLATE = "This is a photo of {}."
PROCESSOR_FILE = "processor_config.json"  # transformers ≥ 5 keeps the image settings here.
_PIL_RESAMPLE = {0: "NEAREST", 1: "LANCZOS", 2: "BILINEAR", 3: "BICUBIC", 4: "BOX", 5: "HAMMING"}


class PredictError(ValueError):
    """Inputs or a checkpoint that predict cannot use; the message says what is missing."""


def processor_file(checkpoint: str | None) -> tuple[str | None, dict[str, Any] | None]:
    """(path, image processor settings) of a HF directory: its preprocessor_config.json, or
    the "image_processor" entry of the processor_config.json that transformers ≥ 5 saves;
    (None, None) when it has neither."""
    if not checkpoint:
        return None, None
    path = os.path.join(checkpoint, PREPROCESSOR_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            return path, json.load(f)
    path = os.path.join(checkpoint, PROCESSOR_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            cfg = json.load(f).get("image_processor")
        if isinstance(cfg, dict):
            return path, cfg
    return None, None


def image_preprocessing(checkpoint: str | None, image_size: tuple[int, int]) -> dict[str, Any]:
    """The preprocessing settings: HF preprocessor_config.json where present, else defaults."""
    settings = {"size": tuple(image_size), "resample": 2, "rescale_factor": 1 / 255,
                "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "do_resize": True,
                "do_rescale": True, "do_normalize": True}
    path, cfg = processor_file(checkpoint)
    if cfg is not None:
        size = cfg.get("size") or {}
        if "height" in size and "width" in size:
            settings["size"] = (int(size["height"]), int(size["width"]))
        for ours, theirs in (("resample", "resample"), ("rescale_factor", "rescale_factor"),
                             ("mean", "image_mean"), ("std", "image_std"),
                             ("do_resize", "do_resize"), ("do_rescale", "do_rescale"),
                             ("do_normalize", "do_normalize")):
            if cfg.get(theirs) is not None:
                settings[ours] = cfg[theirs]
    if int(settings["resample"]) not in _PIL_RESAMPLE:
        raise PredictError(f"{path}: unknown resample {settings['resample']!r}")
    return settings


def load_image(image: Any) -> Any:
    """A PIL RGB image from a path, a PIL image or a uint8 [H, W, 3] array."""
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as img:
                return img.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise PredictError(f"cannot read image {os.fspath(image)!r}: {e}") from None
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[-1] != 3 or array.dtype != np.uint8:
        raise PredictError(f"an image array must be uint8 [H, W, 3], got {array.dtype} "
                           f"{array.shape}")
    return Image.fromarray(array)


def preprocess_images(images: Sequence[Any], settings: Mapping[str, Any]) -> np.ndarray:
    """float32 [N, H, W, 3] model inputs, as the HF SigLIP image processor computes them."""
    from PIL import Image

    out = []
    height, width = settings["size"]
    resample = getattr(Image.Resampling, _PIL_RESAMPLE[int(settings["resample"])])
    for image in images:
        img = load_image(image)
        if settings["do_resize"]:
            img = img.resize((width, height), resample=resample)
        x = np.asarray(img, np.float64)
        if settings["do_rescale"]:
            x = x * float(settings["rescale_factor"])
        if settings["do_normalize"]:
            x = (x - np.asarray(settings["mean"], np.float64)) / np.asarray(settings["std"],
                                                                             np.float64)
        if x.shape[:2] != (height, width):
            raise PredictError(f"image of size {x.shape[:2]} is not the model's {height}x{width}"
                               " and resizing is off")
        out.append(x.astype(np.float32))
    return np.stack(out)


def naflex_settings(checkpoint: str | None, *, max_num_patches: int | None = None,
                    patch_size: int | None = None) -> dict[str, Any]:
    """NaFlex preprocessing settings: preprocessor_config.json where present, else SigLIP 2's.

    Defaults are the released NaFlex processors' (patch 16, 256 patches, PIL bilinear,
    x/255, mean = std = 0.5); explicit arguments override the file.
    """
    settings: dict[str, Any] = {"patch_size": 16, "max_num_patches": 256, "resample": 2,
                                "rescale_factor": 1 / 255, "mean": (0.5, 0.5, 0.5),
                                "std": (0.5, 0.5, 0.5), "do_resize": True,
                                "do_rescale": True, "do_normalize": True}
    path, cfg = processor_file(checkpoint)
    if cfg is not None:
        for ours, theirs in (("patch_size", "patch_size"), ("max_num_patches", "max_num_patches"),
                             ("resample", "resample"), ("rescale_factor", "rescale_factor"),
                             ("mean", "image_mean"), ("std", "image_std"),
                             ("do_resize", "do_resize"), ("do_rescale", "do_rescale"),
                             ("do_normalize", "do_normalize")):
            if cfg.get(theirs) is not None:
                settings[ours] = cfg[theirs]
    if max_num_patches is not None:
        settings["max_num_patches"] = max_num_patches
    if patch_size is not None:
        settings["patch_size"] = patch_size
    if int(settings["resample"]) not in _PIL_RESAMPLE:
        raise PredictError(f"{path}: unknown resample {settings['resample']!r}")
    if not settings["do_resize"]:
        raise PredictError(f"{path}: do_resize=false is not supported for NaFlex (images are "
                           "always resized to the patch budget)")
    return settings


def preprocess_images_naflex(images: Sequence[Any], settings: Mapping[str, Any]
                             ) -> dict[str, np.ndarray]:
    """NaFlex model inputs {"patches" [N, P, p·p·3] float32, "mask" [N, P] bool,
    "spatial_shapes" [N, 2] int32}, bit-equal to HF Siglip2ImageProcessor's (PIL backend)."""
    # Late, on purpose: predict.py is also the CLI, whose start-up stays quiet (TF loads here).
    from siglip_jax.data.naflex import NaFlexError, naflex_preprocess

    try:
        return naflex_preprocess(
            [load_image(image) for image in images], int(settings["max_num_patches"]),
            int(settings["patch_size"]), resample=int(settings["resample"]),
            rescale_factor=float(settings["rescale_factor"]) if settings["do_rescale"] else 1.0,
            mean=settings["mean"] if settings["do_normalize"] else 0.0,
            std=settings["std"] if settings["do_normalize"] else 1.0)
    except NaFlexError as e:
        raise PredictError(f"NaFlex preprocessing: {e}") from None


class Predictor:
    """A loaded model + tokenizer + preprocessing; call it with images and labels."""

    def __init__(self, checkpoint: str, *, model_config: Mapping[str, Any] | None = None,
                 image_size: int | tuple[int, int] | None = None, text_len: int | None = None,
                 tokenizer: str | None = None):
        import jax

        # Late, on purpose: predict.py is also the CLI, whose start-up stays quiet (TF loads here).
        from siglip_jax.checkpoints.open import open_model, resolve_path
        from siglip_jax.data.tokenizer import Tokenizer

        if tokenizer:  # Relative to the current directory, or ~.
            tokenizer = resolve_path(tokenizer)
        opened = open_model(checkpoint, overrides={
            "model": model_config, "image_size": image_size, "text_len": text_len,
            "tokenizer": tokenizer})
        if not opened.text_len:
            raise PredictError(f"checkpoint {checkpoint!r} does not say its text length; "
                               "pass text_len=")
        if not opened.tokenizer:
            raise PredictError(f"checkpoint {checkpoint!r} has no tokenizer (spiece.model); "
                               "pass tokenizer= (--tokenizer FILE: a sentencepiece .model)")
        hf_dir = opened.path if opened.format == "hf" else None
        if opened.is_naflex:
            patch = opened.model_config["image"].get("patch_size", 16)
            has_file = processor_file(hf_dir)[1] is not None
            self.image_settings = naflex_settings(  # The directory's processor file decides.
                hf_dir, max_num_patches=None if has_file else opened.max_num_patches,
                patch_size=None if has_file else patch if isinstance(patch, int)
                else int(patch[0]))
        elif opened.image_size is None:
            raise PredictError("cannot tell the model's image size (no learned square position "
                               "embedding); pass image_size=")
        else:
            self.image_settings = image_preprocessing(hf_dir, opened.image_size)
        self.opened = opened
        self.tokenizer = Tokenizer(opened.tokenizer)
        self.text_len = opened.text_len
        self.model = make_model(opened.model)
        self.params = opened.fitted_params()
        self._apply = jax.jit(self._forward)
        self._embed_images = jax.jit(lambda p, x: self.model.apply({"params": p}, x, None)[0])
        self._embed_texts = jax.jit(lambda p, x: self.model.apply({"params": p}, None, x)[1])
        _, _, out = self.model.apply({"params": self.params}, None, None)
        self.scale = float(out["t"])  # t = exp(t'), the logit scale.
        self.bias = float(out["b"]) if "b" in out else 0.0

    def _forward(self, params, images, texts):
        import jax
        import jax.numpy as jnp

        zimg, ztxt, out = self.model.apply({"params": params}, images, texts)
        logits = jnp.matmul(zimg, ztxt.T, precision=jax.lax.Precision.HIGHEST) * out["t"]
        return logits + out.get("b", 0.0)

    def embed_images(self, images: Any, *, batch_size: int = 32) -> np.ndarray:
        """L2-normalised image embeddings float32 [N, D] of image files, PIL images or uint8
        [H, W, 3] arrays (one image or a sequence)."""
        images = _as_list(images)
        rows = [np.asarray(self._embed_images(self.params,
                                              self.preprocess(images[i:i + batch_size])))
                for i in range(0, len(images), batch_size)]
        return np.concatenate(rows).astype(np.float32)

    def embed_texts(self, texts: str | Sequence[str], *, batch_size: int = 256) -> np.ndarray:
        """L2-normalised text embeddings float32 [N, D] of the texts, as given (no template)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise PredictError("give at least one text")
        rows = [np.asarray(self._embed_texts(self.params,
                                             self.tokenize(texts[i:i + batch_size])))
                for i in range(0, len(texts), batch_size)]
        return np.concatenate(rows).astype(np.float32)

    def tokenize(self, texts: Sequence[str]) -> np.ndarray:
        """Token ids [N, text_len] of the texts, by the checkpoint's text convention."""
        return self.opened.encode_texts(self.tokenizer, texts)

    def preprocess(self, images: Sequence[Any]) -> Any:
        """Model inputs of the images: [N, H, W, 3], or the NaFlex patch dict."""
        if self.opened.is_naflex:
            return preprocess_images_naflex(images, self.image_settings)
        return preprocess_images(images, self.image_settings)

    def __call__(self, images: Sequence[Any], labels: Sequence[str], *,
                 template: str = DEFAULT_TEMPLATE, batch_size: int = 32) -> dict[str, Any]:
        """{"probs", "logits"} [N_img, N_label] float32 and the "texts" that were scored."""
        if isinstance(labels, str):
            labels = [labels]
        if not labels:
            raise PredictError("give at least one label")
        if "{}" not in template:
            raise PredictError(f"template {template!r} has no '{{}}' for the label")
        images = _as_list(images)
        texts = [template.replace("{}", label) for label in labels]
        tokens = self.tokenize(texts)
        rows = []
        for start in range(0, len(images), batch_size):
            pixels = self.preprocess(images[start:start + batch_size])
            rows.append(np.asarray(self._apply(self.params, pixels, tokens)))
        logits = np.concatenate(rows).astype(np.float32)
        if not np.isfinite(logits).all():
            raise PredictError(nonfinite_model_message(self.opened.path, self.params))
        probs = sigmoid(logits)
        return {"probs": probs, "logits": logits, "texts": texts}


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """SigLIP's probabilities: the logistic function of each logit (in float64), float32."""
    return (1.0 / (1.0 + np.exp(-np.asarray(logits, np.float64)))).astype(np.float32)


def _as_list(images: Any) -> list[Any]:
    """One image (a path, PIL image or array) or a sequence of them, as a non-empty list."""
    if isinstance(images, np.ndarray) and images.ndim == 4:  # A batch [N, H, W, 3].
        images = list(images)
    elif isinstance(images, (str, os.PathLike)) or not isinstance(images, Sequence):
        images = [images]
    if not images:
        raise PredictError("give at least one image")
    return list(images)


def nonfinite_model_message(checkpoint: str, params: Any, limit: int = 3) -> str:
    """One line saying that `checkpoint` gives NaN/Inf scores, naming its non-finite weights."""
    import jax

    bad = [jax.tree_util.keystr(path, simple=True, separator="/")
           for path, leaf in jax.tree_util.tree_leaves_with_path(params)
           if np.issubdtype(np.asarray(leaf).dtype, np.inexact)
           and not np.isfinite(np.asarray(leaf)).all()]
    where = (f"non-finite weights in {', '.join(bad[:limit])}"
             + (f" and {len(bad) - limit} more" if len(bad) > limit else "")
             if bad else "its weights are finite but its scores overflow")
    return (f"checkpoint {checkpoint!r} gives non-finite scores (NaN/Inf): {where}; the model "
            "has diverged, use an earlier checkpoint")


def predict(images: Sequence[Any], labels: Sequence[str], *, checkpoint: str,
            template: str = DEFAULT_TEMPLATE, **kwargs: Any) -> dict[str, Any]:
    """Sigmoid probabilities [N_img, N_label] (and logits) of `labels` for `images`."""
    return Predictor(checkpoint, **kwargs)(images, labels, template=template)


def format_table(names: Sequence[str], labels: Sequence[str], probs: np.ndarray) -> str:
    """A text table: one row per image, one column per label, probabilities in percent."""
    first = max([len("image"), *(len(n) for n in names)])
    widths = [max(len(label), 7) for label in labels]
    lines = ["  ".join(["image".ljust(first), *(lab.rjust(w) for lab, w in
                                                  zip(labels, widths, strict=True))])]
    for name, row in zip(names, probs, strict=True):
        cells = [f"{100 * p:.1f}%".rjust(w) for p, w in zip(row, widths, strict=True)]
        lines.append("  ".join([name.ljust(first), *cells]))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; prints a table of sigmoid probabilities."""
    argv = quiet_startup(argv)
    parser = argparse.ArgumentParser(
        prog="python -m siglip_jax.predict",
        description="Zero-shot: independent sigmoid probability of each label for each image.")
    parser.add_argument("--checkpoint", required=True,
                        help="HF SigLIP directory, our workdir/step dir, or a .npz")
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--labels", nargs="+", required=True, help="candidate labels")
    parser.add_argument("--template", default=DEFAULT_TEMPLATE,
                        help=f"prompt template with {{}} (default {DEFAULT_TEMPLATE!r})")
    parser.add_argument("--json", help="also write probs and logits to this JSON file")
    parser.add_argument("--tokenizer", help="sentencepiece .model file (needed for a .npz; "
                                            "default: the checkpoint's)")
    add_verbose_flag(parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    # Late, on purpose: predict.py is also the CLI, whose start-up stays quiet (TF loads here).
    from siglip_jax.checkpoints.hf import HFCheckpointError
    from siglip_jax.checkpoints.loader import (
        CheckpointFormatError,
        CheckpointMismatchError,
        CheckpointNotFoundError,
    )

    try:
        result = predict(args.images, args.labels, checkpoint=args.checkpoint,
                         template=args.template,
                         tokenizer=args.tokenizer)
    except (PredictError, CheckpointNotFoundError, CheckpointFormatError,
            CheckpointMismatchError, HFCheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_table([os.path.basename(p) for p in args.images], args.labels,
                       result["probs"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"images": args.images, "labels": args.labels, "texts": result["texts"],
                       "probs": result["probs"].tolist(), "logits": result["logits"].tolist()},
                      f, indent=2)
    return 0


if __name__ == "__main__":
    from siglip_jax.shutdown import run_main

    run_main(main)
