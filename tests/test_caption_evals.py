"""Decoder-task evaluators (captioning, referring, grounded captioning): IoU and the scoring on
hand values, and whole evaluations with an oracle model whose answers are known."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from siglip_jax.config import ConfigError, load_config
from siglip_jax.data.input import eval_batches
from siglip_jax.data.locca import DecoderVocab
from siglip_jax.data.pp import get_preprocess_fn
from siglip_jax.data.tokenizer import Tokenizer, train_sentencepiece
from siglip_jax.evaluators import decoder_tasks as dt
from siglip_jax.evaluators.builder import build_evaluators
from siglip_jax.models.config import ModelConfig
from siglip_jax.schema import parse
from siglip_jax.sharding import make_mesh, mesh_of, replicated

L, BINS = 12, 10
CAPTIONS = ["a blue square", "a red circle", "two dogs play", "green triangle"]


# ------------------------------------------------------------------------------------------
# hand values


def test_box_iou_hand_values():
    a = [[0, 0, 1, 1], [0, 0, 2, 2], [0, 0, 1, 1], [0, 0, 1, 1], [0.5, 0.5, 0.2, 0.9],
         [0, 0, 1, 1], [np.nan, 0, 1, 1]]
    b = [[0, 0, 0.5, 0.5], [1, 1, 3, 3], [0, 0, 1, 1], [2, 2, 3, 3], [0, 0, 1, 1],
         [0, 0.5, 1, 1.5], [0, 0, 1, 1]]
    # 0.25/1; 1/(4+4-1); identical; disjoint; inverted (area 0); half overlap 0.5/1.5; NaN.
    np.testing.assert_allclose(dt.box_iou(a, b), [0.25, 1 / 7, 1, 0, 0, 1 / 3, 0])


def test_text_and_box_scores_by_hand():
    vocab = DecoderVocab(20, BINS)
    cap = vocab.task_id("cap")
    # Row 0: right; row 1: one wrong id (and then stops late); row 2: padding (invalid).
    tokens = np.array([[cap, 5, 6, 1, 0], [cap, 7, 8, 9, 1], [cap, 5, 1, 0, 0]])
    mask = np.array([[0, 1, 1, 1, 0], [0, 1, 1, 1, 1], [0, 1, 1, 0, 0]], np.float32)
    generated = np.array([[cap, 5, 6, 1, 0], [cap, 7, 3, 9, 4], [cap, 9, 9, 9, 9]])
    valid = np.array([True, True, False])
    got = dt.text_scores(generated, tokens, mask, valid, eos_id=1)
    # Reference ids: row 0 [5, 6, 1] all hit; row 1 [7, 8, 9, 1] vs [7, 3, 9, 4]: 2 hits.
    assert got == {"exact_match": 0.5, "token_acc": 5 / 7, "num_examples": 2.0}
    # With references (pp rows: ids, eos, 0-pad): row 1's answer [7, 3, 9, 4] (no eos)
    # matches none; the answer [7, 3, 1] matches the second reference.
    refs = np.zeros((3, 2, 5), np.int32)
    refs[1, 0, :4] = [7, 8, 9, 1]
    refs[1, 1, :3] = [7, 3, 1]
    assert dt.text_scores(generated, tokens, mask, valid, 1, refs)["exact_match"] == 0.5
    generated[1] = [cap, 7, 3, 1, 0]
    assert dt.text_scores(generated, tokens, mask, valid, 1, refs)["exact_match"] == 1.0
    # Boxes: bins of 0.1; prompt of 2 ids; a word id (3) in the answer makes IoU 0.
    aref, loc = vocab.task_id("aref"), vocab.loc_start
    tokens = np.array([[aref, 4, loc, loc, loc + 5, loc + 5, 1]] * 2)
    mask = np.array([[0, 0, 1, 1, 1, 1, 1]] * 2, np.float32)
    generated = np.array([[aref, 4, loc, loc + 1, loc + 5, loc + 6, 1],
                          [aref, 4, loc, 3, loc + 5, loc + 5, 1]])
    truth = np.array([[0.05, 0.05, 0.55, 0.55]] * 2)
    got = dt.box_scores(generated, tokens, mask, truth, np.array([True, True]), vocab)
    # Row 0: decoded (0.05, 0.15, 0.55, 0.65) vs truth: 0.5*0.4 / (0.25+0.25-0.2) = 2/3.
    assert got["acc@0.5"] == 0.5 and got["num_examples"] == 2.0
    assert got["mean_iou"] == pytest.approx((2 / 3 + 0) / 2)


# ------------------------------------------------------------------------------------------
# an oracle model: the image carries the whole decoder sequence the model will "answer"


class Oracle(nn.Module):
    """Pixels [0, :L, 0] of an image hold a decoder sequence; decode predicts it exactly
    (the id at each position: causal runs get CapPa's shifted input, parallel runs the mask
    ids), whatever the prompt."""

    text: dict
    decoder: dict

    @nn.compact
    def __call__(self, image, text=None, train=False):
        self.param("unused", nn.initializers.zeros, (1,))
        seq = jnp.asarray(image)[:, 0, :L, 0].astype(jnp.float32)
        return None, None, {"img/encoded": seq[..., None]}

    def decode(self, image_tokens, tokens, *, parallel, train=False, image_mask=None):
        seq = image_tokens[..., 0].astype(jnp.int32)[:, :tokens.shape[1]]
        size = DecoderVocab(self.text["vocab_size"], self.decoder["num_bins"]).mask_id
        return jax.nn.one_hot(seq, size) * 10.0


def paint(seq):
    """A uint8 image [2, L, 3] carrying `seq` in row 0, channel 0."""
    img = np.zeros((2, L, 3), np.uint8)
    img[0, :len(seq), 0] = seq
    return img


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = train_sentencepiece(CAPTIONS * 3, 30, str(tmp_path_factory.mktemp("ev") / "m.model"),
                               model_type="word")
    return Tokenizer(path)


def ids(tok, text):
    return [int(i) for i in tok.encode(text, 64, "none") if i != 0]


def oracle(tok):
    return Oracle(text={"vocab_size": tok.vocab_size}, decoder={"num_bins": BINS})


def record_of(model):
    """The model record describing a toy module (its text vocabulary and decoder)."""
    return ModelConfig.parse({"text": model.text, "decoder": model.decoder})


def test_captioning_through_build_evaluators(tok, tmp_path):
    vocab = DecoderVocab(tok.vocab_size, BINS)
    cap = vocab.task_id("cap")
    right = [[cap, *ids(tok, c), 1] for c in CAPTIONS]
    painted = [right[0], right[1], right[2][:-2] + [right[3][1], 1], right[0]]
    rows = ["image,caption"]
    for i, (caption, seq) in enumerate(zip(CAPTIONS, painted, strict=True)):
        Image.fromarray(paint(seq)).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,{caption}")
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    cfg = load_config("configs/demo.py")
    with cfg.unlocked():
        cfg.evals = {"cap": dict(
            type="captioning", data=dict(name="csv", path=str(tmp_path / "data.csv")),
            pp=f"decode|locca_task({L}, num_bins={BINS}, tasks=('cap',))|"
               "keep('image', 'dec_tokens', 'dec_target_mask')", batch_size=8)}
    run = parse(cfg)
    mesh = mesh_of(run.mesh)
    model = oracle(tok)
    params = {"unused": jnp.zeros((1,))}
    shardings = jax.tree.map(lambda _: replicated(mesh), params)
    evaluators = build_evaluators(run, model=model, mesh=mesh, param_shardings=shardings,
                                  tokenizer=tok, model_config=record_of(model))
    got = evaluators["cap"].run(params)
    # Rows 0, 1 right; row 2 wrong in its last word; row 3 another caption entirely.
    ref_tokens = sum(len(r) - 1 for r in right)
    hits = sum(int(np.sum(np.array(p[1:len(r)] + [0] * (len(r) - len(p)))[:len(r) - 1]
                          == np.array(r[1:])))
               for p, r in zip(painted, right, strict=True))
    assert got == {"exact_match": 0.5, "token_acc": pytest.approx(hits / ref_tokens),
                   "num_examples": 4.0}
    assert 0 < hits < ref_tokens

    # Without a decoder, or a referring pp without dec_box: one-line config errors.
    with pytest.raises(ConfigError, match="needs a model with a decoder"):
        no_decoder = Oracle(text={"vocab_size": 30}, decoder=None)
        build_evaluators(run, model=no_decoder, mesh=mesh, param_shardings=shardings,
                         tokenizer=tok, model_config=record_of(no_decoder))
    with cfg.unlocked():
        cfg.evals.cap.type = "referring"
    with pytest.raises(ConfigError, match="dec_box"):
        build_evaluators(parse(cfg), model=model, mesh=mesh, param_shardings=shardings,
                         tokenizer=tok, model_config=record_of(model))
    with cfg.unlocked():
        cfg.evals.cap.parallel = "yes"
    with pytest.raises(ConfigError, match="parallel expects true or false"):
        parse(cfg)


def _examples(tok, task, painted_answers):
    """Multi-object examples (1 valid object of K=2) + the last one without boxes."""
    vocab = DecoderVocab(tok.vocab_size, BINS)
    truth = [0.05, 0.05, 0.55, 0.55]
    box_ids = [vocab.loc_start + int(c * BINS) for c in truth]
    phrase = ids(tok, "green triangle")
    out = []
    for answer in painted_answers:
        prompt = [vocab.task_id(task), *(phrase if task == "aref" else box_ids)]
        out.append({"image": paint(prompt + answer + [1]), "texts": "a blue square",
                    "boxes": np.array([truth, [0, 0, 0, 0]], np.float32),
                    "box_texts": np.array([b"green triangle", b""]),
                    "num_boxes": np.int32(1)})
    out.append({**out[0], "num_boxes": np.int32(0)})  # Falls back to cap: not scored.
    return out, box_ids, phrase


def _evaluate(tok, kind, examples, **decode_kw):
    mesh = make_mesh([("data", -1)])
    model = oracle(tok)
    params = {"unused": jnp.zeros((1,))}
    task = dt.TASK_OF[kind]
    pp = get_preprocess_fn(f"locca_task({L}, num_bins={BINS}, tasks=({task!r},), "
                           "box_key='dec_box')|keep('image', 'dec_tokens', "
                           "'dec_target_mask', 'dec_box')", tokenizer=tok)
    sig = {k: tf.TensorSpec(np.shape(v), tf.convert_to_tensor(v).dtype)
           for k, v in examples[0].items()}
    data = tf.data.Dataset.from_generator(lambda: iter(examples), output_signature=sig)
    vocab = DecoderVocab(tok.vocab_size, BINS)
    decode = dt.make_decode_fn(model, vocab, mesh, ("data",),
                               jax.tree.map(lambda _: replicated(mesh), params), **decode_kw)
    evaluator = dt.DecoderTaskEvaluator(
        kind=kind, decode=decode, mesh=mesh, batch_axes=("data",), vocab=vocab,
        batches=lambda: eval_batches(data, pp, local_batch=8, num_batches=1))
    return evaluator.run(params)


@pytest.mark.parametrize("parallel", [False, True])
def test_referring_with_oracle(tok, parallel):
    loc = DecoderVocab(tok.vocab_size, BINS).loc_start
    answers = [[loc + 0, loc + 0, loc + 5, loc + 5],   # the true box: IoU 1
               [loc + 3, loc + 3, loc + 8, loc + 8],   # 0.2² / (0.5 - 0.04) = 0.087
               [loc + 0, loc + 1, loc + 5, loc + 6]]   # 0.5·0.4 / (0.5 - 0.2) = 2/3
    examples, _, _ = _examples(tok, "aref", answers)
    got = _evaluate(tok, "referring", examples, parallel=parallel)
    assert got["num_examples"] == 3.0 and got["acc@0.5"] == pytest.approx(2 / 3)
    assert got["mean_iou"] == pytest.approx((1 + 0.04 / 0.46 + 2 / 3) / 3, abs=1e-5)


def test_grounded_captioning_with_oracle(tok):
    phrase = ids(tok, "green triangle")
    other = ids(tok, "a red circle")
    examples, _, _ = _examples(tok, "gcap", [phrase, other, phrase[:1]])
    got = _evaluate(tok, "grounded_captioning", examples)
    # Reference = phrase + eos (3 ids): row 0 all 3 right; row 1 none of "a red" vs "green
    # triangle" (+ eos at a different place); row 2 [green, eos] vs [green, triangle, eos].
    want_hits = 3 + sum(a == b for a, b in zip(other + [1], phrase + [1], strict=False)) + 1
    assert got == {"exact_match": pytest.approx(1 / 3),
                   "token_acc": pytest.approx(want_hits / 9), "num_examples": 3.0}
