"""The Python API: `siglip_jax.load(path)` → a model that embeds images and texts and scores them.

    import siglip_jax
    model = siglip_jax.load("path/to/checkpoint")        # a run, a .npz or a HF directory
    zimg = model.embed_images(["cat.jpg", "dog.png"])    # [2, D], L2-normalised
    ztxt = model.embed_texts(["a photo of a cat", "a photo of a dog"])
    probs = model.probabilities(["cat.jpg"], ["a photo of a cat", "a photo of a dog"])

`path` is our trainer's workdir (its newest step) or one step directory, a big_vision `.npz`
(pass `tokenizer=`, a sentencepiece file: a .npz carries none), or a Hugging Face SigLIP /
SigLIP 2 directory (FixRes `SiglipModel` or NaFlex `Siglip2Model`, with its tokenizer file);
relative paths and `~` are resolved. Images are file paths, PIL images or uint8 [H, W, 3]
arrays, preprocessed as the checkpoint's HF image processor does (predict.py); texts are
tokenized by the checkpoint's convention. `probabilities` is SigLIP's sigmoid of
`t · zimg · ztxtᵀ + b` with the model's own t and b: each (image, text) pair is judged on
its own, so a row need not sum to 1.

This module is the package's `load` (siglip_jax/__init__.py imports it on first use, so
`import siglip_jax` stays light). Loading sets the same quiet environment defaults as the
command-line tools (console.quiet_library; SIGLIP_VERBOSE=1 keeps the noise).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from siglip_jax.console import quiet_library
from siglip_jax.predict import Predictor, sigmoid


class Model:
    """A loaded checkpoint: embeddings, logits and sigmoid probabilities (see the module doc)."""

    def __init__(self, predictor: Predictor):
        self._predictor = predictor

    @property
    def path(self) -> str:
        """The checkpoint's absolute path."""
        return self._predictor.opened.path

    @property
    def format(self) -> str:
        """"orbax" (our run), "npz" (big_vision) or "hf" (Hugging Face directory)."""
        return self._predictor.opened.format

    @property
    def is_naflex(self) -> bool:
        """Whether the image tower is NaFlex (SigLIP 2, native aspect ratio)."""
        return self._predictor.opened.is_naflex

    @property
    def scale(self) -> float:
        """t = exp(t'), the learned logit scale."""
        return self._predictor.scale

    @property
    def bias(self) -> float:
        """b, the learned logit bias (0 for a model without one)."""
        return self._predictor.bias

    def __repr__(self) -> str:
        kind = "NaFlex" if self.is_naflex else "FixRes"
        return f"siglip_jax.Model({self.path!r}, format={self.format!r}, {kind})"

    def embed_images(self, images: Any, *, batch_size: int = 32) -> np.ndarray:
        """L2-normalised embeddings float32 [N, D] of one image or a sequence of images."""
        return self._predictor.embed_images(images, batch_size=batch_size)

    def embed_texts(self, texts: str | Sequence[str], *, batch_size: int = 256) -> np.ndarray:
        """L2-normalised embeddings float32 [N, D] of one text or a sequence of texts."""
        return self._predictor.embed_texts(texts, batch_size=batch_size)

    def logits(self, images: Any, texts: str | Sequence[str]) -> np.ndarray:
        """t · zimg · ztxtᵀ + b, float32 [N_images, N_texts]."""
        zimg = self.embed_images(images).astype(np.float64)
        ztxt = self.embed_texts(texts).astype(np.float64)
        return (self.scale * zimg @ ztxt.T + self.bias).astype(np.float32)

    def probabilities(self, images: Any, texts: str | Sequence[str]) -> np.ndarray:
        """sigmoid(logits), float32 [N_images, N_texts]: each pair judged on its own."""
        return sigmoid(self.logits(images, texts))


def load(path: str | os.PathLike, *, tokenizer: str | os.PathLike | None = None,
         text_len: int | None = None, image_size: int | tuple[int, int] | None = None
         ) -> Model:
    """Opens a checkpoint for inference (see the module doc); `tokenizer`, `text_len` and
    `image_size` override what the checkpoint says (a .npz needs `tokenizer`)."""
    quiet_library()
    return Model(Predictor(os.fspath(path), text_len=text_len,
                           tokenizer=None if tokenizer is None else os.fspath(tokenizer),
                           image_size=image_size))
