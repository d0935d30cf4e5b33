"""LocCa decoding: batched greedy decoding equals a step-by-step python reference that re-runs
the full decoder on the growing sequence; the box constraint; one-shot parallel decoding."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from siglip_jax.data.locca import DecoderVocab
from siglip_jax.models import decoding
from siglip_jax.models.two_towers import Model

TEXT_VOCAB, BINS, L = 20, 8, 10
VOCAB = DecoderVocab(TEXT_VOCAB, BINS)
EOS = VOCAB.eos_id


@pytest.fixture(scope="module")
def tiny():
    """A tiny two-towers model with a decoder and random (non-zero) decoder params."""
    model = Model(image=dict(variant="mu", patch_size=8), text=dict(variant="mu",
                  vocab_size=TEXT_VOCAB), out_dim=8,
                  decoder=dict(width=32, depth=2, num_heads=2, num_bins=BINS, max_len=L))
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (6, 16, 16, 3)).astype(np.float32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), images,
                            jnp.zeros((6, 4), jnp.int32))["params"]

    def draw(path, leaf):  # Random params without compiling init (seconds on a busy CPU).
        if jax.tree_util.keystr(path).endswith("['scale']"):
            return np.float32(1) + 0.1 * rng.standard_normal(leaf.shape, np.float32)
        if jax.tree_util.keystr(path).endswith("['bias']"):
            return 0.1 * rng.standard_normal(leaf.shape, np.float32)
        fan_in = leaf.shape[0] if len(leaf.shape) > 1 else 1
        return rng.standard_normal(leaf.shape, np.float32) * np.float32(1 / np.sqrt(fan_in))

    params = jax.tree_util.tree_map_with_path(draw, shapes)
    # Make eos likely enough that some rows stop early and others run to the end.
    params["dec"]["head"]["bias"][EOS] += 1.0
    tokens, mask = jax.jit(functools.partial(decoding.image_tokens, model))(params, images)
    assert mask is None
    return model, params, images, tokens, _decoder(model, False)


def _decoder(model, parallel):
    """The decoder's logits of one call (jitted; one compile per sequence length)."""
    return jax.jit(lambda params, image, ids: model.apply(
        {"params": params}, image, ids, parallel=parallel, method="decode"))


def reference_greedy(run, params, tokens_nxw, prompt, *, box=False):
    """One row: append the argmax of the LAST position of a fresh decoder run (`run`, causal)
    on exactly CapPa's input for the next id (id 0, then the ids so far), until eos or length
    L; box rows take 4 location ids then eos."""
    seq = list(prompt)
    while len(seq) < L and (len(seq) == len(prompt) or seq[-1] != EOS):
        logits = run(params, tokens_nxw[None], jnp.array([[0] + seq]))[0, -1]
        logits = np.asarray(logits, np.float64)
        assert logits.shape == (VOCAB.mask_id,)  # The mask id is an input, never an output.
        if box:
            k = len(seq) - len(prompt)
            ids = np.arange(len(logits))
            allowed = (ids >= VOCAB.loc_start) & (ids < VOCAB.loc_start + BINS) if k < 4 else (
                ids == EOS)
            logits = np.where(allowed, logits, -np.inf)
        seq.append(int(np.argmax(logits)))
    return seq + [0] * (L - len(seq))


PROMPTS = [[VOCAB.task_id("cap")], [VOCAB.task_id("cap")], [VOCAB.task_id("aref"), 5, 7],
           [VOCAB.task_id("gcap"), 21, 22, 23, 24], [VOCAB.task_id("aref"), 9],
           [VOCAB.task_id("cap")]]


def padded(prompts):
    arr = np.zeros((len(prompts), L), np.int32)
    for i, p in enumerate(prompts):
        arr[i, :len(p)] = p
    # Garbage after the prompt must be ignored.
    arr[arr == 0] = 3
    return arr, np.array([len(p) for p in prompts], np.int32)


def test_greedy_equals_step_by_step_reference(tiny):
    model, params, images, tokens, run = tiny
    prompt, plen = padded(PROMPTS)
    fn = jax.jit(functools.partial(decoding.decode_images, model, vocab=VOCAB))
    got = np.asarray(fn(params, images, prompt, plen))
    want = np.array([reference_greedy(run, params, tokens[i], p)
                     for i, p in enumerate(PROMPTS)])
    np.testing.assert_array_equal(got, want)
    # The fixture exercises both endings: some rows stop at eos, some fill all L positions.
    ended = [(row[len(p):] == EOS).any() for row, p in zip(want, PROMPTS, strict=True)]
    assert any(ended) and not all(ended), want


def test_box_rows_get_four_location_ids_then_eos(tiny):
    model, params, images, tokens, run = tiny
    prompt, plen = padded(PROMPTS)
    box = np.array([p[0] == VOCAB.task_id("aref") for p in PROMPTS])
    fn = jax.jit(functools.partial(decoding.decode_images, model, vocab=VOCAB))
    got = np.asarray(fn(params, images, prompt, plen, box_rows_b=box))
    free = np.asarray(fn(params, images, prompt, plen))
    np.testing.assert_array_equal(got[~box], free[~box])  # Other rows are unconstrained.
    for i, p in enumerate(PROMPTS):
        if box[i]:
            want = reference_greedy(run, params, tokens[i], p, box=True)
            np.testing.assert_array_equal(got[i], want)
            answer = got[i, len(p):len(p) + 5]
            assert VOCAB.is_location(answer[:4]).all() and answer[4] == EOS


def test_parallel_decode_is_argmax_of_one_masked_pass(tiny):
    model, params, images, tokens, _ = tiny
    prompt, plen = padded(PROMPTS)
    fn = jax.jit(functools.partial(decoding.decode_images, model, vocab=VOCAB, parallel=True))
    got = np.asarray(fn(params, images, prompt, plen))
    run = _decoder(model, True)
    for i, p in enumerate(PROMPTS):
        inputs = list(p) + [VOCAB.mask_id] * (L - len(p))
        logits = run(params, tokens[i][None], jnp.array([inputs]))[0]
        guess = list(np.argmax(np.asarray(logits), -1)[len(p):])
        if EOS in guess:
            guess = guess[:guess.index(EOS) + 1]
        np.testing.assert_array_equal(got[i], list(p) + guess + [0] * (L - len(p) - len(guess)))


def test_greedy_with_hand_made_logits():
    # A "decoder" that always says: next id = (current id + 1), eos after id 6.
    def logits_fn(ids):
        nxt = jnp.where(ids >= 6, EOS, ids + 1)
        return jax.nn.one_hot(nxt, 12) * 5.0
    prompt = np.array([[4, 0, 0, 0, 0, 0], [2, 3, 0, 0, 0, 0], [9, 9, 9, 9, 9, 0]], np.int32)
    got = decoding.greedy_decode(logits_fn, prompt, np.array([1, 2, 5]), eos_id=EOS)
    np.testing.assert_array_equal(got, [[4, 5, 6, 1, 0, 0], [2, 3, 4, 5, 6, 1],
                                        [9, 9, 9, 9, 9, 1]])
    cut = decoding.cut_after_eos(jnp.array([[1, 5, 1, 7, 1]]), jnp.array([1]), EOS)
    np.testing.assert_array_equal(cut, [[1, 5, 1, 0, 0]])  # The prompt's 1 is not an eos.


class _MaskCounter(nn.Module):
    """Image tower: NaFlex-style dict in, tokens out; decoder: always answers the id
    2 + (number of image tokens its cross-attention may see)."""

    @nn.compact
    def __call__(self, image, text=None, train=False):
        self.param("unused", nn.initializers.zeros, (1,))
        return None, None, {"img/encoded": image["patches"]}

    def decode(self, image_tokens, tokens, *, parallel, train=False, image_mask=None):
        seen = (image_tokens.shape[1] if image_mask is None
                else jnp.sum(image_mask, axis=1))
        answer = jnp.broadcast_to(2 + jnp.asarray(seen)[..., None], tokens.shape)
        return jax.nn.one_hot(answer, VOCAB.size)


def test_naflex_patch_mask_reaches_the_decoder():
    mask = np.arange(6)[None, :] < np.array([[2], [5]])
    images = {"patches": np.zeros((2, 6, 3), np.float32), "mask": mask,
              "spatial_shapes": np.array([[1, 2], [1, 5]], np.int32)}
    prompt, plen = padded([[VOCAB.task_id("cap")], [VOCAB.task_id("cap")]])
    for parallel in (False, True):
        got = decoding.decode_images(_MaskCounter(), {"unused": jnp.zeros(1)}, images, prompt,
                                     plen, vocab=VOCAB, parallel=parallel)
        np.testing.assert_array_equal(got[:, :3], [[VOCAB.task_id("cap"), 4, 4],
                                                   [VOCAB.task_id("cap"), 7, 7]])
