"""pp ops: each run eagerly AND inside tf.data (unknown static shapes), against references."""

import inspect
import io

import numpy as np
import pytest
import tensorflow as tf
from extras import require
from PIL import Image

from siglip_jax.data import ops_general, ops_locca, ops_naflex, ops_views, pp, registry
from siglip_jax.data.pp import OPS, PPError, get_preprocess_fn
from siglip_jax.data.registry import PPKeyError, add_example_seeds
from siglip_jax.data.tokenizer import Tokenizer, train_sentencepiece

skimage = require("skimage")
require("skimage.data")  # sets skimage.data

RNG = np.random.default_rng(0)


def _encode(arr: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **kw)
    return buf.getvalue()


def run_many(pp_string: str, examples: list[dict], **kw) -> list[dict]:
    """Run each example eagerly and through one tf.data pipeline (static shapes erased).

    Asserts both give identical outputs and returns the numpy outputs.
    """
    fn = get_preprocess_fn(pp_string, **kw)
    eager = [{k: v.numpy() for k, v in fn(ex).items()} for ex in examples]
    tensors = {k: tf.convert_to_tensor(v) for k, v in examples[0].items()}
    sig = {k: tf.TensorSpec([None] * t.shape.rank, t.dtype) for k, t in tensors.items()}
    ds = tf.data.Dataset.from_generator(lambda: iter(examples), output_signature=sig)
    graph = list(ds.map(fn).as_numpy_iterator())
    assert len(graph) == len(eager)
    for e, g in zip(eager, graph, strict=True):
        assert set(e) == set(g)
        for k in e:
            np.testing.assert_array_equal(e[k], g[k], err_msg=f"eager vs tf.data: {k}")
    return eager


def run_both(pp_string: str, example: dict, **kw) -> dict:
    """run_many for one example."""
    return run_many(pp_string, [example], **kw)[0]


def coord_image(h: int, w: int) -> np.ndarray:
    """float32 [h, w, 3]: channel 0 = row, 1 = column, 2 = row*w+col (locates any crop)."""
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return np.stack([yy, xx, yy * w + xx], -1).astype(np.float32)


def bilinear_ref(x: np.ndarray, oh: int, ow: int) -> np.ndarray:
    """TF2 bilinear (half-pixel centres, no antialias) in float64."""
    def axis(n_in, n_out):
        c = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        lo = np.floor(c).astype(int)
        return lo, np.minimum(lo + 1, n_in - 1), c - lo
    y0, y1, wy = axis(x.shape[0], oh)
    x0, x1, wx = axis(x.shape[1], ow)
    x = x.astype(np.float64)
    top = x[y0][:, x0] * (1 - wx)[None, :, None] + x[y0][:, x1] * wx[None, :, None]
    bot = x[y1][:, x0] * (1 - wx)[None, :, None] + x[y1][:, x1] * wx[None, :, None]
    return top * (1 - wy)[:, None, None] + bot * wy[:, None, None]


# ------------------------------------------------------------------------------------------
# decode / resize / crops


def test_decode_png_exact_and_gray_to_rgb():
    rgb = RNG.integers(0, 256, (13, 17, 3), dtype=np.uint8)
    out = run_both("decode", {"image": _encode(rgb, "PNG")})["image"]
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, rgb)
    gray = RNG.integers(0, 256, (5, 6), dtype=np.uint8)
    out = run_both("decode", {"image": _encode(gray, "PNG")})["image"]
    np.testing.assert_array_equal(out, np.repeat(gray[..., None], 3, -1))
    # Already-decoded images pass through.
    np.testing.assert_array_equal(run_both("decode", {"image": rgb})["image"], rgb)


def test_decode_jpeg_close_to_pil():
    coffee = np.asarray(Image.fromarray(skimage.data.coffee()).resize((96, 64)))
    data = _encode(coffee, "JPEG", quality=90)
    out = run_both("decode", {"image": data})["image"]
    ref = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert out.shape == ref.shape == (64, 96, 3)
    assert np.abs(out.astype(int) - ref).mean() < 1.5  # IDCT variants differ by ~1 level


def test_resize_bilinear_float_matches_formula():
    x = RNG.normal(size=(5, 7, 3)).astype(np.float32)
    out = run_both("resize((9, 4))", {"image": x})["image"]
    assert out.dtype == np.float32 and out.shape == (9, 4, 3)
    np.testing.assert_allclose(out, bilinear_ref(x, 9, 4), atol=1e-5)
    sq = run_both("resize(6)", {"image": x})["image"]
    np.testing.assert_allclose(sq, bilinear_ref(x, 6, 6), atol=1e-5)


def test_resize_uint8_keeps_dtype_and_truncates_like_big_vision():
    x = RNG.integers(0, 256, (6, 10, 3), dtype=np.uint8)
    out = run_both("resize((11, 3))", {"image": x})["image"]
    ref = np.floor(np.clip(bilinear_ref(x, 11, 3), 0, 255))
    assert out.dtype == np.uint8
    assert np.abs(out.astype(int) - ref).max() <= 1 and (out == ref).mean() > 0.95


def test_resize_antialias_close_to_pil_bilinear():
    img = skimage.data.astronaut()[::2, ::2]  # 256 x 256
    out = run_both("resize(64, antialias=True)", {"image": img})["image"]
    ref = np.asarray(Image.fromarray(img).resize((64, 64), Image.BILINEAR))
    assert np.abs(out.astype(int) - ref).mean() < 1.5


@pytest.mark.parametrize("hw,size,want", [((40, 60), 20, (20, 30)), ((45, 30), 20, (30, 20)),
                                          ((33, 50), 16, (16, 24))])
def test_resize_small_shapes(hw, size, want):
    x = RNG.integers(0, 256, (*hw, 3), dtype=np.uint8)
    assert run_both(f"resize_small({size})", {"image": x})["image"].shape == (*want, 3)


def test_resize_small_area_is_block_mean():
    x = RNG.integers(0, 256, (8, 12, 3), dtype=np.uint8)
    out = run_both("resize_small(4)", {"image": x})["image"]
    ref = np.floor(x.astype(np.float64).reshape(4, 2, 6, 2, 3).mean((1, 3)))
    assert np.abs(out.astype(int) - ref).max() <= 1 and (out == ref).mean() > 0.95


def test_central_crop_is_slice():
    x = RNG.integers(0, 256, (9, 12, 3), dtype=np.uint8)
    np.testing.assert_array_equal(run_both("central_crop(4)", {"image": x})["image"],
                                  x[2:6, 4:8])
    np.testing.assert_array_equal(run_both("central_crop((3, 5))", {"image": x})["image"],
                                  x[3:6, 3:8])


def _locate(crop: np.ndarray, img: np.ndarray) -> tuple[int, int]:
    y0, x0 = int(crop[0, 0, 0]), int(crop[0, 0, 1])
    h, w = crop.shape[:2]
    np.testing.assert_array_equal(crop, img[y0:y0 + h, x0:x0 + w])
    return y0, x0


def test_random_crop_is_window_reproducible_and_varies():
    img = coord_image(12, 15)
    offsets = set()
    exs = [{"image": img, "_seed": np.array([7, s])} for s in range(12)]
    for ex, out in zip(exs, run_many("random_crop((5, 6))", exs), strict=True):
        assert "_seed" not in out
        crop = out["image"]
        assert crop.shape == (5, 6, 3)
        offsets.add(_locate(crop, img))
        again = get_preprocess_fn("random_crop((5, 6))")(ex)["image"].numpy()
        np.testing.assert_array_equal(again, crop)
    assert len(offsets) >= 6


def test_inception_crop_area_and_aspect_in_range():
    img = coord_image(40, 50)
    areas = []
    exs = [{"image": img, "_seed": np.array([3, s])} for s in range(16)]
    for out in run_many("inception_crop(area_min=10, area_max=50)", exs):
        crop = out["image"]
        _locate(crop, img)
        h, w = crop.shape[:2]
        areas.append(h * w / (40 * 50))
        assert 0.08 <= areas[-1] <= 0.52
        assert 0.7 <= w / h <= 1.45
    assert len(set(areas)) > 4
    resized = run_both("inception_crop(24)", {"image": img.astype(np.uint8),
                                              "_seed": np.array([0, 1])})["image"]
    assert resized.shape == (24, 24, 3) and resized.dtype == np.uint8


def test_flip_lr_is_identity_or_mirror_half_the_time():
    img = coord_image(4, 5)
    flips = 0
    exs = [{"image": img, "_seed": np.array([1, s])} for s in range(48)]
    for out in (o["image"] for o in run_many("flip_lr", exs)):
        if np.array_equal(out, img[:, ::-1]):
            flips += 1
        else:
            np.testing.assert_array_equal(out, img)
    assert 12 <= flips <= 36


def test_random_ops_at_different_positions_use_different_seeds():
    img = coord_image(30, 30)
    pipe = "copy('image', 'b')|random_crop(10)|random_crop(10, key='b')"
    exs = [{"image": img, "_seed": np.array([5, s])} for s in range(8)]
    outs = run_many(pipe, exs)
    differ = sum(_locate(o["image"], img) != _locate(o["b"], img) for o in outs)
    assert differ >= 5
    # The seed depends on the op's position, not on what follows it.
    alone = run_many("copy('image', 'b')|random_crop(10)", exs)
    for o, a in zip(outs, alone, strict=True):
        np.testing.assert_array_equal(a["image"], o["image"])


def test_without_seed_random_ops_still_work():
    out = get_preprocess_fn("random_crop(3)|flip_lr")({"image": coord_image(6, 6)})
    assert out["image"].shape == (3, 3, 3)


# ------------------------------------------------------------------------------------------
# value ops


def test_value_range_hand_values():
    x = np.array([[[0, 51, 255]]], np.uint8)
    out = run_both("value_range(-1, 1)", {"image": x})["image"]
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[[-1.0, -0.6, 1.0]]], atol=1e-6)
    out = run_both("value_range(0, 1, in_min=-1, in_max=1, clip_values=True)",
                   {"image": np.array([[[-3.0, 0.0, 0.5, 2.0]]], np.float32)})["image"]
    np.testing.assert_allclose(out, [[[0.0, 0.5, 0.75, 1.0]]], atol=1e-6)


def test_normalize_per_channel():
    x = RNG.integers(0, 256, (3, 4, 3), dtype=np.uint8)
    mean, std = (120.0, 110.0, 100.0), (60.0, 50.0, 40.0)
    out = run_both(f"normalize({mean}, {std})", {"image": x})["image"]
    ref = (x.astype(np.float64) - np.array(mean)) / np.array(std)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
    half = run_both("normalize(127.5, 127.5)", {"image": x})["image"]
    np.testing.assert_allclose(half, x / 127.5 - 1, atol=1e-6)


def test_siglip_image_pp_range_and_shape():
    data = _encode(skimage.data.chelsea(), "JPEG")
    out = run_both("decode|resize(32)|value_range(-1, 1)|keep('image')", {"image": data})
    img = out["image"]
    assert set(out) == {"image"} and img.shape == (32, 32, 3) and img.dtype == np.float32
    assert -1.0 <= img.min() < -0.5 and 0.5 < img.max() <= 1.0


# ------------------------------------------------------------------------------------------
# text and dict ops


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    caps = [f"a {c} {s} on a {b} background" for c in ("red", "green", "blue")
            for s in ("circle", "square") for b in ("white", "black")]
    caps += ["a photo of a cat sitting on the mat", "two dogs play in the snow"]
    return train_sentencepiece(caps, 48, str(tmp_path_factory.mktemp("pp") / "m.model"),
                               model_type="bpe")


def test_tokenize_matches_hf_siglip(spm_model):
    transformers = pytest.importorskip("transformers")
    hf = transformers.SiglipTokenizer(spm_model)
    texts = ["A Red Circle, on a white background!", "two dogs", ""]
    outs = run_many("tokenize(max_len=6, canonicalize=True)", [{"texts": t} for t in texts],
                    tokenizer=Tokenizer(spm_model))
    want = hf(texts, padding="max_length", truncation=True, max_length=6)["input_ids"]
    assert outs[0]["labels"].dtype == np.int32
    np.testing.assert_array_equal(np.stack([o["labels"] for o in outs]), want)
    # model= path instead of a tokenizer object; several texts -> [N, L]; custom keys.
    out = run_both(f"tokenize(6, model={spm_model!r}, inkey='c', outkey='t', canonicalize=True)",
                   {"c": texts})
    want = hf(texts, padding="max_length", truncation=True, max_length=6)["input_ids"]
    np.testing.assert_array_equal(out["t"], want)


def test_tokenize_sticky_last_token_is_eos(spm_model):
    out = run_both("tokenize(4)", {"texts": "a red circle on a white background"},
                   tokenizer=Tokenizer(spm_model))
    assert out["labels"][-1] == 1 and (out["labels"][:-1] > 2).all()


def test_lower_unicode():
    out = run_both("lower", {"texts": ["ÄBC Straße", "MiXeD 123"]})
    assert [t.decode() for t in out["texts"]] == ["äbc straße", "mixed 123"]


def test_keep_and_copy():
    ex = {"image": np.zeros((2, 2, 3), np.uint8), "texts": "a", "label": np.int64(3)}
    out = run_both("copy('label', 'y')|keep('image', 'y')", ex)
    assert set(out) == {"image", "y"} and out["y"] == 3
    with pytest.raises(PPKeyError, match="'nope'.*example has"):
        get_preprocess_fn("keep('nope')")(ex)


def test_choice_picks_every_caption_with_shared_index():
    caps = ["one", "two", "three"]
    seen = set()
    exs = [{"texts": caps, "ids": np.array([1, 2, 3]), "_seed": np.array([9, s])}
           for s in range(24)]
    for out in run_many("choice(('texts', 'ids'))", exs):
        t = out["texts"].decode()
        assert caps.index(t) + 1 == out["ids"]
        seen.add(t)
    assert seen == set(caps)
    empty = run_both("choice", {"texts": np.array([], dtype=object).astype(bytes)})
    assert empty["texts"] == b""


def test_add_example_seeds_parallel_map_is_reproducible():
    img = coord_image(16, 16)
    ds = tf.data.Dataset.from_tensors({"image": img}).repeat(8)
    fn = get_preprocess_fn("random_crop(4)|flip_lr")

    def run(parallel: int) -> dict:
        d = add_example_seeds(ds, seed=11)
        d = d.map(lambda ex: {**fn(ex), "i": ex["_seed"][1]}, num_parallel_calls=parallel,
                  deterministic=False)
        return {int(e["i"]): e["image"] for e in d.as_numpy_iterator()}

    a, b = run(1), run(4)
    assert sorted(a) == list(range(8))
    for i in a:
        np.testing.assert_array_equal(a[i], b[i])
    assert len({a[i].tobytes() for i in a}) > 4


# ------------------------------------------------------------------------------------------
# parser and registry


def test_registry_is_read_only_and_complete():
    want = {"decode", "resize", "resize_small", "central_crop", "random_crop", "inception_crop",
            "flip_lr", "value_range", "normalize", "tokenize", "lower", "keep", "copy", "choice"}
    assert want <= set(OPS)
    with pytest.raises(TypeError):
        OPS["evil"] = lambda ctx: None  # type: ignore[index]
    assert not hasattr(pp, "_register")


def test_registry_is_exactly_what_the_op_modules_registered():
    """Every op module's table is frozen and read-only; pp.OPS is their union, nothing else;
    every `get_*` factory of an op module is registered (and under its own name)."""
    modules = (ops_general, ops_naflex, ops_locca, ops_views)
    union = {}
    for module in modules:
        with pytest.raises(TypeError):
            module.OPS["evil"] = lambda ctx: None  # type: ignore[index]
        assert not set(module.OPS) & set(union), module.__name__
        union.update(module.OPS)
        factories = {name[4:]: fn for name, fn in vars(module).items()
                     if name.startswith("get_") and getattr(fn, "__module__", "") ==
                     module.__name__}
        assert factories == dict(module.OPS), module.__name__
    assert dict(OPS) == union
    assert set(OPS) == {
        "decode", "resize", "resize_small", "central_crop", "random_crop", "inception_crop",
        "flip_lr", "value_range", "normalize", "resize_to_patches", "patchify", "tokenize",
        "lower", "choice", "keep", "copy", "locca_task", "local_crops", "global_view"}


def test_op_table_refuses_late_and_duplicate_registrations():
    table = registry.OpTable()
    table.register("a")(lambda ctx: None)
    with pytest.raises(RuntimeError, match="registered twice"):
        table.register("a")(lambda ctx: None)
    frozen = table.freeze()
    assert set(frozen) == {"a"}
    with pytest.raises(RuntimeError, match="after its table was frozen"):
        table.register("b")(lambda ctx: None)
    assert set(frozen) == {"a"}
    with pytest.raises(RuntimeError, match="registered by two op modules"):
        registry.merge(frozen, frozen)


def test_builder_resolves_names_only_through_the_registry():
    """An op is found only if the registry given to the builder has it: a registry without
    `flip_lr` rejects it, one with a made-up op builds it, and the default is pp.OPS."""
    def get_double(ctx, key="x"):
        del ctx
        return lambda data: {**data, key: data[key] * 2}

    ops = registry.merge({"double": get_double})
    out = get_preprocess_fn("double|double(key='x')", ops=ops)({"x": 3})
    assert int(out["x"]) == 12
    with pytest.raises(PPError, match=r"unknown op 'flip_lr'; registered ops: \['double'\]"):
        get_preprocess_fn("double|flip_lr", ops=ops)
    with pytest.raises(PPError, match="unknown op 'double'"):
        get_preprocess_fn("double")
    assert inspect.signature(get_preprocess_fn).parameters["ops"].default is OPS


def test_parse_args_and_pipe_inside_quotes():
    calls = pp.parse(" decode | tokenize(max_len=64, eos='sticky', model='a|b.model') |flip_lr")
    assert [c.name for c in calls] == ["decode", "tokenize", "flip_lr"]
    assert calls[1].kwargs == {"max_len": 64, "eos": "sticky", "model": "a|b.model"}
    assert pp.parse("resize((3, 4))")[0].args == ((3, 4),)


@pytest.mark.parametrize("bad,msg", [
    ("decode|resize(", r"op #2 'resize\(' \(char 7\).*syntax"),
    ("decode|fancy_aug(3)", r"op #2.*unknown op 'fancy_aug'.*registered ops: \[.*'decode'"),
    ("decode||flip_lr", r"op #2.*empty op"),
    ("resize(__import__('os').getpid())", r"op #1.*Python literals"),
    ("resize(size)", r"op #1.*Python literals"),
    ("resize(1, 2, 3, 4, 5)", r"op #1.*too many positional.*resize\(size"),
    ("value_range(vmin=0, bogus=1)", r"op #1.*bogus"),
    ("decode|central_crop('big')", r"op #2.*central_crop: size must be"),
    ("tokenize(8)", r"op #1.*model="),
    ("resize.x(3)", r"op #1.*expected `name`"),
])
def test_parse_errors_name_op_and_position(bad, msg):
    with pytest.raises(PPError, match=msg):
        get_preprocess_fn(bad)


def test_nested_keys_are_read_with_slashes():
    """TFDS nests features (COCO: {"captions": {"text": [N]}}); ops read them as a/b."""
    data = {"image": tf.zeros((2, 2, 3), tf.uint8),
            "captions": {"text": tf.constant(["A Cat", "a dog"]), "id": tf.constant([1, 2])}}
    out = get_preprocess_fn('lower(key="captions/text")|copy("captions/text", "texts")|'
                            'keep("texts")')(data)
    assert out["texts"].numpy().tolist() == [b"a cat", b"a dog"]
    ds = tf.data.Dataset.from_tensors(data).map(get_preprocess_fn('copy("captions/id", "ids")'))
    assert next(iter(ds))["ids"].numpy().tolist() == [1, 2]
    with pytest.raises(KeyError, match=r"needs key 'captions/txt'; example has \['captions/id', "
                                       r"'captions/text', 'image'\]"):
        get_preprocess_fn('copy("captions/txt", "t")')(data)


def test_eval_batches_give_random_ops_the_same_draw_every_time():
    """Evaluation data is seeded per example: a random op (here random_crop) draws the same
    window at every evaluation, and different examples draw different windows."""
    from siglip_jax.data.input import eval_batches

    image = np.arange(16 * 16 * 3, dtype=np.uint8).reshape(16, 16, 3)
    data = tf.data.Dataset.from_tensor_slices({"image": np.stack([image] * 8)})
    preprocess = get_preprocess_fn("random_crop(4)")

    def crops():
        return np.concatenate([b["image"] for b in eval_batches(
            data, preprocess, local_batch=4, num_batches=2, seed=3)])

    first, again = crops(), crops()
    np.testing.assert_array_equal(first, again)
    assert len({c.tobytes() for c in first}) > 1  # Same image, different windows.
