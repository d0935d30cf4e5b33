"""Tokenizer: sentencepiece training, EOS/pad rules, parity with HF SiglipTokenizer, tf.data."""


import numpy as np
import pytest
import sentencepiece as spm
import tensorflow as tf

from siglip_jax.data import tokenizer as tokmod
from siglip_jax.data.tokenizer import Tokenizer, TokenizerError
from siglip_jax.data.tokenizer_training import train_sentencepiece

COLOURS = "red green blue yellow purple orange".split()
SHAPES = "circle square triangle star".split()
CAPTIONS = [
    f"a {c} {s} on a {b} background" for c in COLOURS for s in SHAPES for b in ("white", "black")
] + [
    "A photo of a cat, sitting on the mat!",
    "Two dogs play in the snow.",
    "The zebra's stripes: black & white.",
    "Ein Hund läuft über die Straße",
]

# Punctuation, case, repeated spaces, unknown characters, empty, very long.
SENTENCES = [
    "a red circle on a white background",
    "A Photo of a CAT, sitting!",
    "",
    "  spaced   out  words ",
    "x" * 100,
    "two dogs play in the snow. zebra's stripes",
    "Ünïcödé 日本 straße",
    "a blue star",
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("spm")
    return {
        mt: train_sentencepiece(CAPTIONS, 64, str(d / f"{mt}.model"), model_type=mt)
        for mt in ("unigram", "bpe", "word")
    }


def test_train_uses_t5_special_ids(tmp_path):
    captions = [f"{c} {s} number {i}" for i in range(5) for c in COLOURS for s in SHAPES][:100]
    path = train_sentencepiece(captions, 64, str(tmp_path / "new" / "dir" / "m.model"))
    sp = spm.SentencePieceProcessor(model_file=path)  # The missing directories were made.
    assert [sp.id_to_piece(i) for i in range(3)] == ["<pad>", "</s>", "<unk>"]
    assert sp.bos_id() == -1
    tok = Tokenizer(path)
    assert (tok.pad_id, tok.eos_id, tok.unk_id, tok.model_pad_id) == (1, 1, 2, 0)
    assert 3 < tok.vocab_size <= 64 and tok.vocab_size == sp.get_piece_size()


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
@pytest.mark.parametrize("max_len", [1, 4, 8, 16, 64])
def test_matches_hf_siglip_tokenizer(models, model_type, max_len):
    transformers = pytest.importorskip("transformers")
    hf = transformers.SiglipTokenizer(models[model_type])
    want = np.array(
        hf(SENTENCES, padding="max_length", truncation=True, max_length=max_len)["input_ids"]
    )
    got = Tokenizer(models[model_type]).encode(SENTENCES, max_len, "sticky", canonicalize=True)
    assert got.dtype == np.int32 and got.shape == (len(SENTENCES), max_len)
    np.testing.assert_array_equal(got, want)


def test_matches_hf_without_canonicalize_on_plain_text(models):
    transformers = pytest.importorskip("transformers")
    plain = ["a red circle on a white background", "Two Dogs play in the snow", "a blue star"]
    hf = transformers.SiglipTokenizer(models["bpe"])
    want = np.array(hf(plain, padding="max_length", truncation=True, max_length=9)["input_ids"])
    np.testing.assert_array_equal(Tokenizer(models["bpe"]).encode(plain, 9), want)


def test_eos_modes_big_vision_table(models):
    """big_vision ops_text.get_pp_tokenize docstring, max_len=3, with real word ids."""
    tok = Tokenizer(models["word"])
    sp = spm.SentencePieceProcessor(model_file=models["word"])
    a, r, c = (sp.piece_to_id(f"▁{w}") for w in ("a", "red", "circle"))
    assert min(a, r, c) > 2  # all in-vocabulary words
    texts = ["a", "a red", "a red circle"]
    np.testing.assert_array_equal(
        tok.encode(texts, 3, "none"), [[a, 0, 0], [a, r, 0], [a, r, c]])
    np.testing.assert_array_equal(
        tok.encode(texts, 3, "yes"), [[a, 1, 0], [a, r, 1], [a, r, c]])
    np.testing.assert_array_equal(
        tok.encode(texts, 3, "sticky"), [[a, 1, 1], [a, r, 1], [a, r, 1]])
    np.testing.assert_array_equal(
        tok.encode(texts, 3, "sticky", pad_value=0), [[a, 1, 0], [a, r, 1], [a, r, 1]])
    # lower=True is the default; lower=False leaves upper-case words unknown (id 2).
    np.testing.assert_array_equal(tok.encode("A RED", 3), [a, r, 1])
    np.testing.assert_array_equal(tok.encode("A RED", 3, lower=False), [2, 1, 1])


def test_every_eos_the_config_accepts_is_one_the_tokenizer_encodes(models):
    """TokenizerConfig.eos takes exactly the tokenizer's EOS_MODES (one constant), each of which
    Tokenizer.encode and encode_prompts accept; anything else is a one-line ConfigError."""
    from siglip_jax.config import ConfigError
    from siglip_jax.data.config import TokenizerConfig
    from siglip_jax.data.tokenizer_rules import EOS_MODES
    from siglip_jax.schema import TokenizerConfig as SchemaTokenizerConfig

    assert SchemaTokenizerConfig is TokenizerConfig and tokmod.EOS_MODES is EOS_MODES
    assert set(EOS_MODES) == {"sticky", "yes", "none"}
    tok = Tokenizer(models["word"])
    for eos in EOS_MODES:
        config = TokenizerConfig(max_len=4, eos=eos)
        texts = ["a red circle", "A Red!"]
        np.testing.assert_array_equal(tokmod.encode_prompts(tok, config, texts),
                                      tok.encode(texts, 4, eos, canonicalize=True))
    for bad in ("no", "maybe", None):
        with pytest.raises(ConfigError, match=f"^tokenizer.eos {bad!r} is not one of "
                                              r"\('sticky', 'yes', 'none'\)$"):
            TokenizerConfig(max_len=4, eos=bad)
        with pytest.raises(TokenizerError, match="eos must be one of"):
            tok.encode(["a"], 4, bad)


def test_encode_prompts_follows_the_convention(models):
    """With a convention the config's eos is ignored and the convention's rules apply; without
    one, canonicalize=False keeps punctuation (big_vision's prompts canonicalise by default)."""
    from siglip_jax.data.config import TokenizerConfig

    tok = Tokenizer(models["word"])
    texts = ["A Photo of a CAT, sitting!"]
    conv = TokenizerConfig(max_len=8, eos="yes", convention="siglip")
    np.testing.assert_array_equal(tokmod.encode_prompts(tok, conv, texts),
                                  tok.encode_as(texts, "siglip", 8))
    plain = TokenizerConfig(max_len=8)
    np.testing.assert_array_equal(tokmod.encode_prompts(tok, plain, texts, canonicalize=False),
                                  tok.encode(texts, 8, "sticky", canonicalize=False))
    assert not np.array_equal(tokmod.encode_prompts(tok, plain, texts, canonicalize=False),
                              tokmod.encode_prompts(tok, plain, texts))


def test_decode_stops_at_eos(models):
    tok = Tokenizer(models["bpe"])
    texts = ["a red circle on a white background", "two dogs play in the snow"]
    ids = tok.encode(texts, 40)
    assert tok.decode(ids) == texts
    assert tok.decode(ids[0]) == texts[0]
    words = Tokenizer(models["word"])
    sp = spm.SentencePieceProcessor(model_file=models["word"])
    a, r = sp.piece_to_id("▁a"), sp.piece_to_id("▁red")
    assert words.decode([a, r, 1, a, 1]) == "a red"
    assert words.decode([a, r]) == "a red"


def test_tf_encode_eager_and_in_tf_data(models):
    tok = Tokenizer(models["bpe"])
    want = tok.encode(SENTENCES, 8)
    scalar = tok.tf_encode(tf.constant(SENTENCES[1]), 8)
    assert scalar.shape == (8,) and scalar.dtype == tf.int32
    np.testing.assert_array_equal(scalar.numpy(), want[1])
    np.testing.assert_array_equal(tok.tf_encode(tf.constant(SENTENCES), 8).numpy(), want)
    ds = tf.data.Dataset.from_tensor_slices(SENTENCES).map(
        lambda t: tok.tf_encode(t, 8), num_parallel_calls=2
    )
    assert ds.element_spec.shape == (8,)
    np.testing.assert_array_equal(np.stack(list(ds.as_numpy_iterator())), want)
    batched = tf.data.Dataset.from_tensor_slices(SENTENCES).batch(3).map(
        lambda t: tok.tf_encode(t, 8))
    assert batched.element_spec.shape.as_list() == [None, 8]
    np.testing.assert_array_equal(np.concatenate(list(batched.as_numpy_iterator())), want)


def test_tf_encode_pipeline_is_checkpointable(models, tmp_path):
    tok = Tokenizer(models["bpe"])
    ds = tf.data.Dataset.from_tensor_slices(SENTENCES).map(lambda t: tok.tf_encode(t, 8))
    it = iter(ds)
    next(it)
    ckpt = tf.train.Checkpoint(it=it)
    path = ckpt.save(str(tmp_path / "ck"))
    second = next(it).numpy()
    ckpt.restore(path)
    np.testing.assert_array_equal(next(it).numpy(), second)


def test_errors_are_clear(tmp_path, models):
    with pytest.raises(TokenizerError, match="missing.model"):
        Tokenizer(str(tmp_path / "missing.model"))
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="bad.model"):
        Tokenizer(str(tmp_path / "bad.model"))
    tok = Tokenizer(models["bpe"])
    with pytest.raises(TokenizerError, match="eos must be one of"):
        tok.encode(["a"], 4, "always")
    with pytest.raises(TokenizerError, match="max_len"):
        tok.encode(["a"], 0)
    with pytest.raises(TokenizerError, match="no non-empty"):
        train_sentencepiece(["", "  "], 8, str(tmp_path / "x.model"))


def test_cli_train_and_encode(tmp_path, capsys):
    inp = tmp_path / "captions.txt"
    inp.write_text("\n".join(CAPTIONS))
    out = tmp_path / "sub" / "m.model"
    assert tokmod.main(["train", "--input", str(inp), "--vocab-size", "40",
                        "--out", str(out), "--model-type", "word"]) == 0
    assert out.exists() and "vocab_size=" in capsys.readouterr().out
    assert tokmod.main(["encode", "--model", str(out), "--max-len", "5", "a red star"]) == 0
    line = capsys.readouterr().out.strip()
    text, ids = line.split("\t")
    assert text == "a red star"
    np.testing.assert_array_equal([int(i) for i in ids.split()],
                                  Tokenizer(str(out)).encode("a red star", 5))


# ------------------------------------------------------------------------------------------
# SigLIP 2: the Gemma special-token layout and the "siglip2" convention

GEMMA_TEXTS = SENTENCES + [
    "A Photo of a CAT, sitting on the MAT!",
    "Two dogs play in the snow in 2024.",
    "Οδός and Straße",
    " ".join(CAPTIONS[:12]),  # long: truncated, the last kept id must be EOS
]


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    """A tiny Gemma-layout BPE model saved as <dir>/tokenizer.model (how HF finds it)."""
    d = tmp_path_factory.mktemp("gemma")
    corpus = CAPTIONS + ["two dogs play in the snow in 2024", "οδος and straße"]
    train_sentencepiece(corpus, 400, str(d / "tokenizer.model"), model_type="bpe",
                        layout="gemma")
    return d


def _hf_gemma(cls_name, gemma_dir):
    transformers = pytest.importorskip("transformers")
    # The settings of the released SigLIP 2 tokenizers (transformers' convert_siglip2_to_hf).
    return getattr(transformers, cls_name).from_pretrained(
        str(gemma_dir), add_bos_token=False, add_eos_token=True, padding_side="right")


def test_gemma_layout_special_ids(gemma_dir):
    sp = spm.SentencePieceProcessor(model_file=str(gemma_dir / "tokenizer.model"))
    assert [sp.id_to_piece(i) for i in range(4)] == ["<pad>", "<eos>", "<bos>", "<unk>"]
    tok = Tokenizer(str(gemma_dir / "tokenizer.model"))
    assert (tok.model_pad_id, tok.eos_id, tok.unk_id) == (0, 1, 3)
    assert tok.convention_pad("siglip2") == 0 and tok.convention_pad("siglip") == 1


@pytest.mark.parametrize("max_len", [1, 5, 16, 64])
def test_siglip2_convention_matches_hf_siglip2_tokenizer(gemma_dir, max_len):
    hf = _hf_gemma("Siglip2Tokenizer", gemma_dir)
    want = np.array(hf(GEMMA_TEXTS, padding="max_length", truncation=True,
                       max_length=max_len)["input_ids"])
    tok = Tokenizer(str(gemma_dir / "tokenizer.model"))
    got = tok.encode_as(GEMMA_TEXTS, "siglip2", max_len)
    assert got.shape == (len(GEMMA_TEXTS), max_len)
    np.testing.assert_array_equal(got, want)
    # The plain GemmaTokenizer(Fast) does not lower-case: equal on lower-cased input.
    gemma = _hf_gemma("GemmaTokenizer", gemma_dir)
    lowered = [t.lower() for t in GEMMA_TEXTS]
    np.testing.assert_array_equal(
        got, gemma(lowered, padding="max_length", truncation=True, max_length=max_len)[
            "input_ids"])
    # The long text (> 64 pieces) is truncated and still ends in EOS (1); a short one is
    # EOS then <pad> (0) to the end.
    assert len(tok.encode(GEMMA_TEXTS[-1], 1000, "none").nonzero()[0]) > 64
    assert got[-1, -1] == 1
    if max_len >= 16:
        np.testing.assert_array_equal(got[SENTENCES.index("a blue star"), -2:], [0, 0])


def test_siglip2_processor_defaults_and_pp_op(gemma_dir):
    transformers = pytest.importorskip("transformers")
    from transformers.models.siglip2.image_processing_pil_siglip2 import (
        Siglip2ImageProcessorPil,
    )

    proc = transformers.Siglip2Processor(image_processor=Siglip2ImageProcessorPil(),
                                         tokenizer=_hf_gemma("Siglip2Tokenizer", gemma_dir))
    want = np.array(proc(text=GEMMA_TEXTS)["input_ids"])  # its defaults: 64, max_length pad
    assert want.shape == (len(GEMMA_TEXTS), 64)
    tok = Tokenizer(str(gemma_dir / "tokenizer.model"))
    np.testing.assert_array_equal(tok.encode_as(GEMMA_TEXTS, "siglip2"), want)
    from siglip_jax.data.pp import get_preprocess_fn

    fn = get_preprocess_fn('tokenize(convention="siglip2")', tokenizer=tok)
    ds = tf.data.Dataset.from_tensor_slices({"texts": GEMMA_TEXTS}).map(fn)
    np.testing.assert_array_equal(np.stack([e["labels"] for e in ds.as_numpy_iterator()]), want)
    np.testing.assert_array_equal(fn({"texts": tf.constant(GEMMA_TEXTS)})["labels"], want)
    # Explicit arguments override the convention's: the SigLIP 1 EOS padding.
    sticky_eos = get_preprocess_fn('tokenize(16, convention="siglip2", pad_value=1)',
                                   tokenizer=tok)
    np.testing.assert_array_equal(sticky_eos({"texts": tf.constant(GEMMA_TEXTS)})["labels"],
                                  tok.encode(GEMMA_TEXTS, 16, "sticky", pad_value=1))


def test_siglip2_lowercases_like_big_vision_not_like_hf_normalizer(gemma_dir):
    # Upper-case final sigma: Python's and TF's lower() (big_vision's `lower` op, which SigLIP 2
    # was trained with) give "ς"; HF Siglip2Tokenizer's Lowercase normaliser maps per
    # character and gives "σ". We follow big_vision; the ids differ only in such words.
    text = ["ΟΔΟΣ and Straße"]
    tf_lower = tf.strings.lower(tf.constant(text), encoding="utf-8").numpy()[0].decode()
    assert tf_lower == text[0].lower() == "οδος and straße"
    tok = Tokenizer(str(gemma_dir / "tokenizer.model"))
    ours = tok.encode_as(text, "siglip2", 16)
    gemma = _hf_gemma("Gemma" + "Tokenizer", gemma_dir)
    np.testing.assert_array_equal(
        ours, gemma([tf_lower], padding="max_length", truncation=True, max_length=16)[
            "input_ids"])
    hf = _hf_gemma("Siglip2Tokenizer", gemma_dir)
    theirs = np.array(hf(text, padding="max_length", truncation=True, max_length=16)[
        "input_ids"])
    assert not np.array_equal(ours, theirs)


def test_convention_errors(models, gemma_dir):
    from siglip_jax.data.pp import PPError, get_preprocess_fn

    tok = Tokenizer(str(gemma_dir / "tokenizer.model"))
    with pytest.raises(TokenizerError, match="unknown text convention 'siglip3'"):
        tok.encode_as(["a"], "siglip3")
    with pytest.raises(PPError, match="unknown convention 'gemma'"):
        get_preprocess_fn('tokenize(convention="gemma")', tokenizer=tok)
    with pytest.raises(PPError, match="give max_len"):
        get_preprocess_fn("tokenize()", tokenizer=tok)
    with pytest.raises(TokenizerError, match="layout must be one of"):
        train_sentencepiece(CAPTIONS, 64, "/tmp/never.model", layout="llama")
