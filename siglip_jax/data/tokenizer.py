"""Sentencepiece tokenizer: load and encode with big_vision / HF SigLIP pad+EOS rules.

Conventions (those of the T5 ``c4_en`` model big_vision's SigLIP uses): ``<pad>`` = 0,
``</s>`` (EOS) = 1, ``<unk>`` = 2, no BOS. Text batches are padded with EOS ("sticky" EOS,
pad id 1), so the last position of every row is EOS and the text tower can pool ``x[:, -1]``.

``encode(texts, max_len, eos)`` — with token ids ``t`` of a text, EOS id ``e``, pad id ``p``:

- ``"sticky"``: ``t + [e]`` right-padded with ``p`` (default ``p = e = 1``); if longer than
  ``max_len`` it is cut to ``t[:max_len - 1] + [e]``: the last token is always EOS. This equals
  ``transformers.SiglipTokenizer(..)(texts, padding="max_length", truncation=True,
  max_length=max_len)`` (with ``canonicalize=True``) and big_vision's
  ``tokenize(max_len, eos="sticky", pad_value=1)``.
- ``"yes"``: ``t + [e]`` padded with ``p`` (default: the model's ``<pad>`` id, 0), plainly cut
  to ``max_len`` (a truncated text has no EOS), as big_vision ``eos="yes"``.
- ``"none"``: ``t`` padded with ``p`` (default ``<pad>`` = 0), cut to ``max_len``.

Text normalisation before sentencepiece: ``lower=True`` lower-cases (big_vision's tokenize op
default); ``canonicalize=True`` additionally removes ASCII punctuation and collapses
whitespace, which is what HF ``SiglipTokenizer`` always does (and big_vision does to prompts).

Conventions (``CONVENTIONS``; ``Tokenizer.encode_as(texts, "siglip2")``) bundle these choices
per model family:

- ``"siglip"``: T5 ``c4_en`` model, lower-cased and canonicalised, sticky EOS, padded with EOS
  (id 1), 64 tokens = HF ``SiglipTokenizer``.
- ``"siglip2"``: Gemma model (``<pad>`` = 0, ``<eos>`` = 1, ``<bos>`` = 2, ``<unk>`` = 3),
  lower-cased (no punctuation stripping), no BOS, sticky EOS, padded with ``<pad>`` = 0 on the
  right, 64 tokens. This is HF ``Siglip2Tokenizer`` (``GemmaTokenizerFast`` with
  ``add_bos_token=False, add_eos_token=True``, right padding, plus a lower-casing normaliser)
  called with ``padding="max_length", truncation=True, max_length=64`` (the
  ``Siglip2Processor`` defaults), and big_vision's SigLIP 2
  ``lower|tok(length=64, model="gemma", bos="no", eos="sticky")``.

The rules that need no sentencepiece (``EOS_MODES``, ``CONVENTIONS``) live in
tokenizer_rules.py, the run's [tokenizer] section ``TokenizerConfig`` in config.py, so that
config parsing loads neither; ``encode_prompts(tokenizer, config, texts)`` tokenizes prompts
(class names, captions) the way a ``TokenizerConfig`` says. Training a model:
tokenizer_training.py (``train_sentencepiece``), also this module's ``train`` command.

CLI::

    python -m siglip_jax.data.tokenizer train --input captions.txt --vocab-size 64 --out m.model
    python -m siglip_jax.data.tokenizer encode --model m.model --max-len 16 "a red circle"
"""

from __future__ import annotations

import argparse
import re
import string
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np
import sentencepiece as spm

from siglip_jax.console import add_verbose_flag, quiet_startup
from siglip_jax.data.config import TokenizerConfig
from siglip_jax.data.tokenizer_rules import (
    EOS_MODES,
    TextConvention,
    TokenizerError,
    get_convention,
)
from siglip_jax.data.tokenizer_training import train_sentencepiece

if TYPE_CHECKING:
    import tensorflow as tf

_PUNCT_TABLE = str.maketrans("", "", string.punctuation)
_WS_RE = re.compile(r"\s+")


def canonicalize_text(text: str, lower: bool = True) -> str:
    """HF SiglipTokenizer / big_vision prompt canonicalisation: lower, drop punctuation, squash."""
    if lower:
        text = text.lower()
    text = text.translate(_PUNCT_TABLE)
    return _WS_RE.sub(" ", text).strip()


def _tf() -> ModuleType:
    """TensorFlow, imported on first use: the CLI quiets TensorFlow's start-up lines first
    (console.quiet_startup), and `--help` needs none of it."""
    import tensorflow  # Deliberately late: see the docstring.

    return tensorflow


def _read_bytes(path: str) -> bytes:
    tf = _tf()
    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            return f.read()
    except (tf.errors.NotFoundError, tf.errors.InvalidArgumentError, OSError) as e:
        raise TokenizerError(f"cannot read sentencepiece model file {path!r}: {e}") from None


class Tokenizer:
    """A sentencepiece model with SigLIP's EOS/padding rules (see module docstring)."""

    def __init__(self, model_path: str):
        self.model_path = model_path
        proto = _read_bytes(model_path)
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(proto)
        except (RuntimeError, OSError) as e:
            raise TokenizerError(f"{model_path!r} is not a sentencepiece model: {e}") from None

    # -- ids ---------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of pieces (the text tower's embedding rows)."""
        return int(self._sp.GetPieceSize())

    @property
    def eos_id(self) -> int:
        """Id of ``</s>`` (1 in the T5/SigLIP models); -1 if the model has none."""
        return int(self._sp.eos_id())

    @property
    def pad_id(self) -> int:
        """Padding id used for SigLIP text batches: EOS (HF/big_vision SigLIP convention)."""
        return self.eos_id

    @property
    def model_pad_id(self) -> int:
        """The model's own ``<pad>`` id (0 in T5/SigLIP models; -1 if none)."""
        return int(self._sp.pad_id())

    @property
    def unk_id(self) -> int:
        """Id of ``<unk>``."""
        return int(self._sp.unk_id())

    def piece(self, idx: int) -> str:
        """The sentencepiece piece string of one id."""
        return self._sp.IdToPiece(int(idx))

    # -- encode / decode -----------------------------------------------------------------------
    def _default_pad(self, eos: str) -> int:
        if eos == "sticky":
            return self.eos_id
        return max(self.model_pad_id, 0)

    def encode(
        self,
        texts: Sequence[str] | str,
        max_len: int,
        eos: str = "sticky",
        *,
        pad_value: int | None = None,
        lower: bool = True,
        canonicalize: bool = False,
    ) -> np.ndarray:
        """Token ids int32 [N, max_len] (or [max_len] for one str) with the given EOS mode."""
        single = isinstance(texts, (str, bytes))
        batch = [texts] if single else list(texts)
        if eos not in EOS_MODES:
            raise TokenizerError(f"eos must be one of {EOS_MODES}, got {eos!r}")
        if not isinstance(max_len, (int, np.integer)) or max_len < 1:
            raise TokenizerError(f"max_len must be a positive int, got {max_len!r}")
        if eos != "none" and self.eos_id < 0:
            raise TokenizerError(f"{self.model_path!r} has no EOS piece but eos={eos!r}")
        pad = self._default_pad(eos) if pad_value is None else int(pad_value)
        strs = []
        for t in batch:
            if isinstance(t, bytes):
                t = t.decode("utf-8")
            if not isinstance(t, str):
                raise TokenizerError(f"texts must be str or bytes, got {type(t).__name__}")
            if canonicalize:
                t = canonicalize_text(t, lower=lower)
            elif lower:
                t = t.lower()
            strs.append(t)
        pieces = self._sp.EncodeAsIds(strs) if strs else []
        out = np.full((len(batch), max_len), pad, np.int32)
        for i, ids in enumerate(pieces):
            if eos != "none":
                ids = ids + [self.eos_id]
            if len(ids) > max_len:
                ids = ids[: max_len - 1] + [self.eos_id] if eos == "sticky" else ids[:max_len]
            out[i, : len(ids)] = ids
        return out[0] if single else out

    def convention_pad(self, convention: str | TextConvention) -> int:
        """The padding id a convention uses with this model."""
        conv = get_convention(convention)
        pad = self.eos_id if conv.pad == "eos" else self.model_pad_id
        if pad < 0:
            raise TokenizerError(f"{self.model_path!r} has no {conv.pad!r} piece, which text "
                                 f"convention {convention!r} pads with")
        return pad

    def encode_as(self, texts: Sequence[str] | str, convention: str | TextConvention,
                  max_len: int | None = None) -> np.ndarray:
        """``encode`` with a convention's EOS, padding, lower-casing and length."""
        conv = get_convention(convention)
        return self.encode(texts, max_len or conv.max_len, conv.eos,
                           pad_value=self.convention_pad(conv), lower=conv.lower,
                           canonicalize=conv.canonicalize)

    def decode(self, ids: np.ndarray | Sequence[int] | Sequence[Sequence[int]]) -> str | list[str]:
        """Text of 1-D ids (stops at the first EOS), or a list for 2-D ids."""
        arr = np.asarray(ids)
        if arr.ndim == 2:
            return [self.decode(row) for row in arr]
        if arr.ndim != 1:
            raise TokenizerError(f"decode expects 1-D or 2-D ids, got shape {arr.shape}")
        toks = [int(t) for t in arr]
        if self.eos_id in toks:
            toks = toks[: toks.index(self.eos_id)]
        return self._sp.DecodeIds(toks)

    def tf_encode(
        self,
        texts: tf.Tensor,
        max_len: int,
        eos: str = "sticky",
        *,
        pad_value: int | None = None,
        lower: bool = True,
        canonicalize: bool = False,
    ) -> tf.Tensor:
        """``encode`` as a TF op (tf.numpy_function): string [] -> [L], [N] -> [N, L] int32."""
        tf = _tf()
        texts = tf.convert_to_tensor(texts, tf.string)
        if texts.shape.rank not in (0, 1):
            raise TokenizerError(f"tf_encode expects a string scalar or vector, got {texts.shape}")
        # Validate arguments now (eagerly), not at the first example inside tf.data.
        self.encode([], max_len, eos, pad_value=pad_value)

        def _np_encode(t: np.ndarray) -> np.ndarray:
            flat = [s.decode("utf-8") for s in np.asarray(t, object).reshape(-1)]
            ids = self.encode(
                flat, max_len, eos, pad_value=pad_value, lower=lower, canonicalize=canonicalize
            )
            return ids.reshape(np.shape(t) + (max_len,))

        out = tf.numpy_function(_np_encode, [texts], tf.int32, stateful=False)
        out.set_shape(texts.shape.concatenate([max_len]))
        return out


def encode_prompts(tokenizer: Tokenizer, config: TokenizerConfig, texts: Sequence[str],
                   canonicalize: bool = True) -> np.ndarray:
    """Token ids [N, config.max_len] of prompts: the config's convention's rules if it sets one,
    else its EOS mode with big_vision's canonicalisation (lower-case, no punctuation)."""
    if config.convention:
        return tokenizer.encode_as(list(texts), config.convention, config.max_len)
    return tokenizer.encode(list(texts), config.max_len, config.eos, canonicalize=canonicalize)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``train`` a model from a text file (one caption a line) or ``encode`` texts."""
    argv = quiet_startup(argv)
    parser = argparse.ArgumentParser(prog="python -m siglip_jax.data.tokenizer")
    sub = parser.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="train a sentencepiece model on one caption per line")
    tr.add_argument("--input", required=True, help="text file, one sentence a line")
    tr.add_argument("--vocab-size", type=int, required=True)
    tr.add_argument("--out", required=True, help="output .model path")
    tr.add_argument("--model-type", default="unigram", choices=["unigram", "bpe", "word", "char"])
    tr.add_argument("--no-lowercase", action="store_true")
    en = sub.add_parser("encode", help="print token ids of texts")
    en.add_argument("--model", required=True)
    en.add_argument("--max-len", type=int, default=64)
    en.add_argument("--eos", default="sticky", choices=list(EOS_MODES))
    en.add_argument("texts", nargs="+")
    add_verbose_flag(parser)
    args = parser.parse_args(argv)
    if args.cmd == "train":
        with _tf().io.gfile.GFile(args.input, "r") as f:
            lines = f.read().splitlines()
        path = train_sentencepiece(
            lines, args.vocab_size, args.out,
            model_type=args.model_type, lowercase=not args.no_lowercase,
        )
        print(f"wrote {path} (vocab_size={Tokenizer(path).vocab_size})")
    else:
        tok = Tokenizer(args.model)
        ids_nxl = tok.encode(args.texts, args.max_len, args.eos)
        for text, ids in zip(args.texts, ids_nxl, strict=True):
            print(f"{text}\t{' '.join(map(str, ids.tolist()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
