"""LocCa data: box tokenisation round trip, and the `locca_task` pp op against hand-built
sequences, eagerly and inside tf.data, plus its task/parallel sampling frequencies."""

import numpy as np
import pytest
import tensorflow as tf

from siglip_jax.data import locca
from siglip_jax.data.ops_locca import tf_box_to_tokens
from siglip_jax.data.pp import OPS, PPError, get_preprocess_fn
from siglip_jax.data.registry import add_example_seeds
from siglip_jax.data.tokenizer import Tokenizer, train_sentencepiece

NUM_BINS = 10


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    sents = ["a red circle on a white background", "a blue square", "green triangle",
             "a photo of a cat sitting on the mat", "two dogs play in the snow"]
    path = train_sentencepiece(sents, 40, str(tmp_path_factory.mktemp("locca") / "m.model"),
                               model_type="bpe")
    return Tokenizer(path)


def text_ids(tok, text):
    """Sentencepiece ids of a text, no eos (lower-cased as the op does)."""
    return [int(i) for i in tok.encode(text, 64, "none") if i != 0]


def example(caption="a blue square", boxes=((0.1, 0.2, 0.5, 0.65), (0.0, 0.0, 1.0, 1.0)),
            phrases=("green triangle", "a red circle"), num=None, k=3):
    """A multi-object example with K = k rows, zero/"" padded past num_boxes."""
    num = len(boxes) if num is None else num
    b = np.zeros((k, 4), np.float32)
    b[:len(boxes)] = np.reshape(boxes, (-1, 4))
    p = np.array(list(phrases) + [""] * (k - len(phrases)), object)
    return {"image": np.zeros((4, 4, 3), np.uint8), "texts": caption, "label": np.int32(0),
            "boxes": b, "box_texts": p.astype(bytes), "num_boxes": np.int32(num)}


def run(pp_string, examples, tok):
    """Outputs eagerly and through tf.data with unknown static shapes; asserts they agree."""
    fn = get_preprocess_fn(pp_string, tokenizer=tok)
    eager = [{k: np.asarray(v) for k, v in fn(ex).items()} for ex in examples]
    sig = {k: tf.TensorSpec([None] * np.ndim(v), tf.convert_to_tensor(v).dtype)
           for k, v in examples[0].items()}
    ds = tf.data.Dataset.from_generator(lambda: iter(examples), output_signature=sig)
    graph = list(ds.map(fn).as_numpy_iterator())
    for e, g in zip(eager, graph, strict=True):
        for key in ("dec_tokens", "dec_target_mask", "dec_parallel"):
            np.testing.assert_array_equal(e[key], g[key], err_msg=key)
    return eager


# ------------------------------------------------------------------------------------------
# boxes


def test_box_round_trip_within_half_a_bin():
    vocab = locca.DecoderVocab(text_vocab=50, num_bins=NUM_BINS)
    coords = np.random.default_rng(0).uniform(0, 1, (500, 4))
    coords[:4] = [[0.0, 1.0, 0.1, 0.95]] * 4  # Edges and an exact bin boundary.
    ids = locca.box_to_tokens(coords, vocab)
    assert ids.dtype == np.int32 and ids.min() >= 50 and ids.max() < 50 + NUM_BINS
    back = locca.tokens_to_box(ids, vocab)
    assert np.abs(back - coords).max() <= 0.5 / NUM_BINS + 1e-6
    # Hand values: bin = floor(c * 10), 1.0 -> last bin; centre = (bin + 0.5) / 10.
    np.testing.assert_array_equal(locca.box_to_tokens([0.0, 0.1, 0.99, 1.0], vocab),
                                  [50, 51, 59, 59])
    np.testing.assert_allclose(locca.tokens_to_box([50, 51, 59, 3], vocab)[:3],
                               [0.05, 0.15, 0.95])
    assert np.isnan(locca.tokens_to_box([50, 51, 59, 3], vocab)[3])  # 3 is a text id.
    np.testing.assert_array_equal(tf_box_to_tokens(tf.constant(coords, tf.float32),
                                                   vocab).numpy(),
                                  locca.box_to_tokens(coords.astype(np.float32), vocab))
    with pytest.raises(ValueError, match="last axis of 4"):
        locca.box_to_tokens(np.zeros((2, 3)), vocab)


def test_vocab_layout_and_checks():
    v = locca.DecoderVocab(text_vocab=50, num_bins=10)
    assert (v.loc_start, v.task_id("cap"), v.task_id("gcap"), v.mask_id, v.size) == (
        50, 60, 62, 63, 64)
    np.testing.assert_array_equal(v.is_location(np.array([49, 50, 59, 60])),
                                  [False, True, True, False])
    with pytest.raises(ValueError, match="eos_id"):
        locca.DecoderVocab(text_vocab=50, eos_id=50)


# ------------------------------------------------------------------------------------------
# the pp op


def expected(tok, task, *, caption="a blue square", phrase="green triangle",
             box=(0.1, 0.2, 0.5, 0.65), max_len=16, prefix_loss=False):
    """Hand-built [task, prefix, target, eos, 0...] and its mask (text ids from the tokenizer)."""
    vocab = locca.DecoderVocab(tok.vocab_size, NUM_BINS)
    box_ids = [vocab.loc_start + int(np.floor(c * NUM_BINS)) for c in box]
    if task == "cap":
        prefix, target = [], text_ids(tok, caption)[:max_len - 2]
    elif task == "aref":
        prefix, target = text_ids(tok, phrase)[:max_len - 6], box_ids
    else:
        prefix, target = box_ids, text_ids(tok, phrase)[:max_len - 6]
    seq = [vocab.task_id(task), *prefix, *target, 1]
    mask = [0.0] * (1 + len(prefix)) + [1.0] * (len(target) + 1)
    if prefix_loss:
        mask = [0.0] + [1.0] * (len(seq) - 1)
    pad = max_len - len(seq)
    return np.array(seq + [0] * pad, np.int32), np.array(mask + [0.0] * pad, np.float32)


@pytest.mark.parametrize("task", ["cap", "aref", "gcap"])
def test_single_task_sequences_match_hand_built(tok, task):
    # One box, so the sampled object is known; no _seed: any draw gives the same sequence.
    ex = example(boxes=[(0.1, 0.2, 0.5, 0.65)], phrases=["green triangle"])
    pp_str = f"locca_task(max_len=16, num_bins={NUM_BINS}, tasks=({task!r},), parallel_frac=0)"
    out = run(pp_str, [ex], tok)[0]
    want_seq, want_mask = expected(tok, task)
    np.testing.assert_array_equal(out["dec_tokens"], want_seq)
    np.testing.assert_array_equal(out["dec_target_mask"], want_mask)
    assert out["dec_tokens"].dtype == np.int32 and out["dec_target_mask"].dtype == np.float32
    assert out["dec_parallel"].dtype == bool and not out["dec_parallel"]
    assert "image" in out and "texts" in out  # Other keys pass through.


def test_prefix_loss_and_extra_outputs(tok):
    ex = example(boxes=[(0.1, 0.2, 0.5, 0.65)], phrases=["green triangle"])
    out = run(f"locca_task(16, {NUM_BINS}, tasks='aref', prefix_loss=True, box_key='box')",
              [ex], tok)[0]
    want_seq, want_mask = expected(tok, "aref", prefix_loss=True)
    np.testing.assert_array_equal(out["dec_tokens"], want_seq)
    np.testing.assert_array_equal(out["dec_target_mask"], want_mask)
    np.testing.assert_allclose(out["box"], [0.1, 0.2, 0.5, 0.65])
    # refs: every caption as target ids + eos, 0-padded.
    ex = example(caption=np.array([b"a blue square", b"two dogs play in the snow"]))
    ex["_seed"] = np.array([0, 1], np.int64)  # The caption in dec_tokens is a seeded pick.
    out = run(f"locca_task(8, {NUM_BINS}, tasks='cap', refs_key='refs')", [ex], tok)[0]
    for row, cap in zip(out["refs"], ["a blue square", "two dogs play in the snow"],
                        strict=True):
        ids = text_ids(tok, cap)[:6] + [1]
        np.testing.assert_array_equal(row, ids + [0] * (8 - len(ids)))


def test_truncation_keeps_task_box_and_eos(tok):
    long = "a photo of a cat sitting on the mat"
    ex = example(caption=long, boxes=[(0.1, 0.2, 0.5, 0.65)], phrases=[long])
    assert len(text_ids(tok, long)) > 3  # So max_len=8 truncates.
    for task in ("cap", "aref", "gcap"):
        out = run(f"locca_task(8, {NUM_BINS}, tasks={task!r}, parallel_frac=0)", [ex], tok)[0]
        want_seq, want_mask = expected(tok, task, caption=long, phrase=long, max_len=8)
        np.testing.assert_array_equal(out["dec_tokens"], want_seq)
        np.testing.assert_array_equal(out["dec_target_mask"], want_mask)
        assert out["dec_tokens"][-1] == 1  # Full: ends in eos.


def test_no_boxes_falls_back_to_cap(tok):
    ex = example(boxes=[], phrases=[], num=0)
    no_keys = {k: v for k, v in ex.items() if k not in ("boxes", "box_texts", "num_boxes")}
    want_seq, want_mask = expected(tok, "cap")
    for e in (ex, no_keys):
        out = run(f"locca_task(16, {NUM_BINS}, tasks=('aref', 'gcap'), parallel_frac=0)",
                  [e], tok)[0]
        np.testing.assert_array_equal(out["dec_tokens"], want_seq)
        np.testing.assert_array_equal(out["dec_target_mask"], want_mask)


def test_sampling_frequencies_match_weights_and_are_seeded(tok):
    n = 1200
    ds = tf.data.Dataset.from_tensors(example()).repeat(n)
    fn = get_preprocess_fn(f"locca_task(16, {NUM_BINS}, weights=(0.5, 0.3, 0.2), "
                           "parallel_frac=0.5)", tokenizer=tok)
    outs = list(add_example_seeds(ds, seed=3).map(fn).as_numpy_iterator())
    again = list(add_example_seeds(ds, seed=3).take(50).map(fn).as_numpy_iterator())
    for a, b in zip(outs, again, strict=False):  # Same seeds -> same tasks, objects, flags.
        np.testing.assert_array_equal(a["dec_tokens"], b["dec_tokens"])
        assert a["dec_parallel"] == b["dec_parallel"]
    vocab = locca.DecoderVocab(tok.vocab_size, NUM_BINS)
    task = np.array([o["dec_tokens"][0] for o in outs]) - vocab.task_id("cap")
    freq = np.bincount(task, minlength=3) / n
    # Binomial std at n=1200 is <= 0.015: 4 sigma bounds.
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.2], atol=0.06)
    par = np.array([bool(o["dec_parallel"]) for o in outs])
    assert not par[task != 0].any()  # parallel_tasks defaults to ("cap",), as SigLIP 2.
    assert abs(par[task == 0].mean() - 0.5) < 0.1
    # Both objects get picked: gcap's first box id is ymin's bin, 1 (object 0) or 0 (object 1).
    ymin = [o["dec_tokens"][1] - vocab.loc_start for o in outs
            if o["dec_tokens"][0] == vocab.task_id("gcap")]
    assert set(ymin) == {0, 1} and abs(np.mean(ymin) - 0.5) < 0.15


def test_bad_arguments_name_the_option(tok):
    assert "locca_task" in OPS
    for args, match in [("max_len=4", "max_len=4"), ("16, tasks=('cap', 'vqa')", "tasks="),
                        ("16, weights=(1, 2)", "weights="), ("16, parallel_frac=2", "parallel")]:
        with pytest.raises(PPError, match=match):
            get_preprocess_fn(f"locca_task({args})", tokenizer=tok)
    with pytest.raises(PPError, match="tokenizer"):
        get_preprocess_fn("locca_task(16)")


def test_follows_the_model_decoder_vocabulary(tok):
    # The trainer/evaluators pass the model's vocabulary: its text size may exceed the
    # tokenizer's (a model built for a 64-piece vocabulary, a 40-piece tokenizer).
    model_vocab = locca.DecoderVocab(text_vocab=64, num_bins=NUM_BINS)
    ex = example(boxes=[(0.1, 0.2, 0.5, 0.65)], phrases=["green triangle"])
    fn = get_preprocess_fn("locca_task(16, tasks='gcap', parallel_frac=0)", tokenizer=tok,
                           decoder_vocab=model_vocab)
    out = fn(ex)["dec_tokens"].numpy()
    assert out[0] == 64 + NUM_BINS + 2 and list(out[1:5]) == [65, 66, 69, 70]
    with pytest.raises(PPError, match="num_bins=7 but the model's decoder has 10"):
        get_preprocess_fn("locca_task(16, num_bins=7)", tokenizer=tok, decoder_vocab=model_vocab)


# ------------------------------------------------------------------------------------------
# all_tasks=True: one row per task


def test_all_tasks_rows_match_hand_built(tok):
    ex = example(boxes=[(0.1, 0.2, 0.5, 0.65)], phrases=["green triangle"])
    out = run(f"locca_task(16, {NUM_BINS}, all_tasks=True, parallel_frac=0, box_key='box')",
              [ex], tok)[0]
    assert out["dec_tokens"].shape == (3, 16) and out["dec_target_mask"].shape == (3, 16)
    assert out["dec_parallel"].shape == (3,) and not out["dec_parallel"].any()
    for row, task in enumerate(("cap", "aref", "gcap")):
        want_seq, want_mask = expected(tok, task)
        np.testing.assert_array_equal(out["dec_tokens"][row], want_seq, err_msg=task)
        np.testing.assert_array_equal(out["dec_target_mask"][row], want_mask, err_msg=task)
    np.testing.assert_allclose(out["box"], [0.1, 0.2, 0.5, 0.65])
    # Task order follows `tasks`; parallel_frac=1 makes exactly the parallel_tasks rows parallel.
    out = run(f"locca_task(16, {NUM_BINS}, tasks=('gcap', 'cap'), all_tasks=True, "
              "parallel_frac=1, parallel_tasks=('cap',))", [ex], tok)[0]
    np.testing.assert_array_equal(out["dec_tokens"][0], expected(tok, "gcap")[0])
    np.testing.assert_array_equal(out["dec_tokens"][1], expected(tok, "cap")[0])
    np.testing.assert_array_equal(out["dec_parallel"], [False, True])


def test_all_tasks_without_boxes_zeroes_the_box_rows(tok):
    ex = example(boxes=[], phrases=[], num=0)
    no_keys = {k: v for k, v in ex.items() if k not in ("boxes", "box_texts", "num_boxes")}
    vocab = locca.DecoderVocab(tok.vocab_size, NUM_BINS)
    for e in (ex, no_keys):
        out = run(f"locca_task(16, {NUM_BINS}, all_tasks=True, parallel_frac=0)", [e], tok)[0]
        want_seq, want_mask = expected(tok, "cap")
        np.testing.assert_array_equal(out["dec_tokens"][0], want_seq)
        np.testing.assert_array_equal(out["dec_target_mask"][0], want_mask)
        np.testing.assert_array_equal(out["dec_target_mask"][1:], np.zeros((2, 16)))
        assert list(out["dec_tokens"][1:, 0]) == [vocab.task_id("aref"), vocab.task_id("gcap")]


def test_all_tasks_seeded_object_and_parallel_draws(tok):
    n = 600
    ds = tf.data.Dataset.from_tensors(example()).repeat(n)
    fn = get_preprocess_fn(f"locca_task(16, {NUM_BINS}, all_tasks=True, parallel_frac=0.5, "
                           "parallel_tasks=('cap', 'gcap'))", tokenizer=tok)
    outs = list(add_example_seeds(ds, seed=5).map(fn).as_numpy_iterator())
    again = list(add_example_seeds(ds, seed=5).take(30).map(fn).as_numpy_iterator())
    for a, b in zip(outs, again, strict=False):
        np.testing.assert_array_equal(a["dec_tokens"], b["dec_tokens"])
        np.testing.assert_array_equal(a["dec_parallel"], b["dec_parallel"])
    vocab = locca.DecoderVocab(tok.vocab_size, NUM_BINS)
    # aref's target and gcap's prefix are the same object's box ids.
    for o in outs[:50]:
        aref_len = int(np.argmax(o["dec_target_mask"][1]))  # First target position.
        np.testing.assert_array_equal(o["dec_tokens"][1, aref_len:aref_len + 4],
                                      o["dec_tokens"][2, 1:5])
    ymin = np.array([o["dec_tokens"][2, 1] - vocab.loc_start for o in outs])
    assert set(ymin) == {0, 1} and abs(ymin.mean() - 0.5) < 0.15
    par = np.array([o["dec_parallel"] for o in outs])
    assert not par[:, 1].any() and abs(par[:, 0].mean() - 0.5) < 0.1
    assert abs(par[:, 2].mean() - 0.5) < 0.1
    assert 0.1 < np.mean(par[:, 0] != par[:, 2]) < 0.9  # Drawn per row, not shared.
    with pytest.raises(PPError, match="weights=.*all_tasks"):
        get_preprocess_fn("locca_task(16, weights=(1, 1, 1), all_tasks=True)", tokenizer=tok)
