"""Training a sentencepiece model: the layouts of SigLIP's T5 and SigLIP 2's Gemma models.

`train_sentencepiece(sentences, vocab_size, out_path, layout=...)` writes a model file (local
or `gs://`) that `data.tokenizer.Tokenizer` loads; the demo data trains its tokenizer with it,
and so does `python -m siglip_jax.data.tokenizer train`. It needs sentencepiece, not
TensorFlow (TensorFlow's gfile only for a remote `out_path`).
"""

from __future__ import annotations

import io
from collections.abc import Iterable

import sentencepiece as spm

from siglip_jax.data.tokenizer_rules import TokenizerError
from siglip_jax.fsutil import write_bytes

_LAYOUTS: dict[str, dict[str, object]] = {
    "t5": dict(pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>",
               unk_piece="<unk>"),
    "gemma": dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>",
                  bos_piece="<bos>", unk_piece="<unk>", byte_fallback=True,
                  add_dummy_prefix=False, normalization_rule_name="identity",
                  remove_extra_whitespaces=False, split_digits=True,
                  allow_whitespace_only_pieces=True),
}



def train_sentencepiece(
    sentences: Iterable[str],
    vocab_size: int,
    out_path: str,
    *,
    model_type: str = "unigram",
    lowercase: bool = True,
    hard_vocab_limit: bool = False,
    layout: str = "t5",
) -> str:
    """Train a sentencepiece model and write it to out_path.

    ``layout="t5"``: <pad>=0, </s>=1, <unk>=2, no BOS (SigLIP's c4_en layout).
    ``layout="gemma"``: <pad>=0, <eos>=1, <bos>=2, <unk>=3 and Gemma's options (byte
    fallback, so vocab_size must exceed 256 + 4 + the corpus' characters; no dummy prefix;
    identity normalisation; digits split) — a tiny stand-in for SigLIP 2's Gemma tokenizer.
    With ``hard_vocab_limit=False`` (default) a small corpus may yield fewer pieces than
    ``vocab_size``; ``Tokenizer(out_path).vocab_size`` is the real size.
    """
    if model_type not in ("unigram", "bpe", "word", "char"):
        raise TokenizerError(f"model_type must be unigram|bpe|word|char, got {model_type!r}")
    if layout not in _LAYOUTS:
        raise TokenizerError(f"layout must be one of {sorted(_LAYOUTS)}, got {layout!r}")
    sents = [s.lower() if lowercase else s for s in sentences]
    sents = [s for s in (x.strip() for x in sents) if s]
    if not sents:
        raise TokenizerError("train_sentencepiece got no non-empty sentences")
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sents),
            model_writer=buf,
            vocab_size=int(vocab_size),
            model_type=model_type,
            hard_vocab_limit=hard_vocab_limit,
            character_coverage=1.0,
            num_threads=1,
            minloglevel=2,
            **_LAYOUTS[layout],
        )
    except RuntimeError as e:
        raise TokenizerError(
            f"sentencepiece training failed (vocab_size={vocab_size}): {e}"
        ) from None
    write_bytes(out_path, buf.getvalue())
    return out_path
