"""NaFlex preprocessing against transformers' Siglip2ImageProcessor (PIL backend), eagerly, in
tf.data, and in the pp ops; patch order against an independent formula."""

import io

import numpy as np
import pytest
import tensorflow as tf
from extras import require
from PIL import Image

from siglip_jax.data import naflex
from siglip_jax.data.pp import PPError, get_preprocess_fn

skimage_data = require("skimage.data")
transformers = require("transformers")
hf_siglip2 = require("transformers.models.siglip2.image_processing_pil_siglip2")

RNG = np.random.default_rng(0)
# One grey level in [0, 255] is 2/255 after (x/255 - 0.5)/0.5: TF's antialiased bilinear
# kernel vs PIL's two-pass 8-bit resize (measured max: exactly one level).
TF_KERNEL_ATOL = 2 / 255 + 1e-6


def _images() -> dict[str, np.ndarray]:
    """Square, wide, tall, tiny and odd-sized images: real photos and synthetic ones."""
    coffee = skimage_data.coffee()  # 400 x 600
    return {
        "square_astronaut": skimage_data.astronaut(),          # 512 x 512
        "wide_coffee": coffee,
        "tall_coffee": np.ascontiguousarray(coffee.transpose(1, 0, 2)),  # 600 x 400
        "wide_rocket": skimage_data.rocket(),                   # 427 x 640
        "very_tall_noise": RNG.integers(0, 256, (300, 40, 3), dtype=np.uint8),
        "tiny_noise": RNG.integers(0, 256, (5, 7, 3), dtype=np.uint8),
        "one_pixel": np.array([[[200, 10, 90]]], np.uint8),
        "very_wide_chelsea": np.ascontiguousarray(skimage_data.chelsea()[100:140]),  # 40 x 451
    }


def _hf(images: list[np.ndarray], max_num_patches: int, patch_size: int) -> dict[str, np.ndarray]:
    proc = hf_siglip2.Siglip2ImageProcessorPil(patch_size=patch_size,
                                               max_num_patches=max_num_patches)
    # PIL inputs: a 1x1x3 array would be ambiguous (channels first or last) to HF.
    out = proc(images=[Image.fromarray(a) for a in images], return_tensors="np")
    return {"patches": out["pixel_values"], "mask": out["pixel_attention_mask"],
            "spatial_shapes": out["spatial_shapes"]}


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def test_target_size_equals_hf_rule_on_a_sweep():
    sizes = [(1, 1), (1, 5000), (5000, 1), (5, 7), (224, 224), (256, 256), (255, 257),
             (400, 600), (600, 400), (4000, 3000), (16, 4096), (33, 17)]
    sizes += [tuple(int(v) for v in RNG.integers(1, 2000, 2)) for _ in range(150)]
    for patch, budget in [(16, 256), (16, 64), (14, 1024), (16, 1), (32, 7)]:
        want = np.array([hf_siglip2.get_image_size_for_max_num_patches(h, w, patch, budget)
                         for h, w in sizes])
        got = np.array([naflex.target_size(h, w, patch, budget) for h, w in sizes])
        np.testing.assert_array_equal(got, want, err_msg=f"patch {patch}, budget {budget}")
        # The same rule as TF ops, vectorised over all sizes at once and inside a graph.
        graph = tf.function(lambda hw, p=patch, b=budget: naflex.tf_target_size(hw, p, b))
        np.testing.assert_array_equal(graph(tf.constant(sizes, tf.int32)).numpy(), want)
        grid = (want[:, 0] // patch) * (want[:, 1] // patch)
        assert np.all(grid <= budget) and np.all(want % patch == 0)


@pytest.mark.parametrize("budget,patch", [(256, 16), (64, 16), (49, 14)])
def test_numpy_path_is_bit_exact_hf(budget, patch):
    images = list(_images().values())
    want = _hf(images, budget, patch)
    got = naflex.naflex_preprocess(images, budget, patch)
    np.testing.assert_array_equal(got["spatial_shapes"], want["spatial_shapes"])
    np.testing.assert_array_equal(got["mask"], want["mask"].astype(bool))
    np.testing.assert_array_equal(got["patches"], want["patches"])
    assert got["patches"].dtype == np.float32 and got["mask"].dtype == bool
    assert got["spatial_shapes"].dtype == np.int32
    # Real patches count h*w, the rest is zero padding.
    n_real = got["spatial_shapes"].prod(-1)
    np.testing.assert_array_equal(got["mask"].sum(-1), n_real)
    assert not np.any(got["patches"][~got["mask"]])


def test_patch_order_matches_independent_formula():
    # Pixel (y, x, c) holds 100*y + 10*x + c style codes; patch k of the (h, w) grid must be
    # rows y0..y0+p, columns x0..x0+p with channel fastest, grid row-major.
    p, h, w = 2, 4, 6
    yy, xx, cc = np.meshgrid(np.arange(h), np.arange(w), np.arange(3), indexing="ij")
    img = (1000 * yy + 10 * xx + cc).astype(np.float32)
    want = []
    for gy in range(h // p):
        for gx in range(w // p):
            want.append([img[gy * p + dy, gx * p + dx, c]
                         for dy in range(p) for dx in range(p) for c in range(3)])
    np.testing.assert_array_equal(naflex.patchify_array(img, p), np.array(want))
    out = naflex.tf_patchify(tf.constant(img), p, 8)
    np.testing.assert_array_equal(out["patches"].numpy()[:6], np.array(want))
    np.testing.assert_array_equal(out["patches"].numpy()[6:], 0)
    np.testing.assert_array_equal(out["mask"].numpy(), [True] * 6 + [False] * 2)
    np.testing.assert_array_equal(out["spatial_shapes"].numpy(), [2, 3])


def _pipe(patch: int, budget: int, method: str) -> str:
    return (f'decode|resize_to_patches({patch}, {budget}, method="{method}")'
            f"|value_range(0, 1)|normalize(0.5, 0.5)|patchify({patch}, {budget})")


def _tf_data_batches(pp_string: str, images: list[np.ndarray], batch: int) -> dict:
    """Encoded PNGs → pp in tf.data → fixed-shape batches mixing aspect ratios."""
    ds = tf.data.Dataset.from_tensor_slices({"image": [_png(a) for a in images]})
    ds = ds.map(get_preprocess_fn(pp_string)).batch(batch)
    parts = [b["image"] for b in ds.as_numpy_iterator()]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


@pytest.mark.parametrize("method", ["pil", "bilinear"])
def test_pp_ops_in_tf_data_and_eagerly_match_hf(method):
    budget, patch = 64, 16
    images = list(_images().values())
    want = _hf(images, budget, patch)
    got = _tf_data_batches(_pipe(patch, budget, method), images, batch=3)
    assert got["patches"].shape == (len(images), budget, patch * patch * 3)
    assert got["mask"].dtype == bool and got["spatial_shapes"].dtype == np.int32
    np.testing.assert_array_equal(got["spatial_shapes"], want["spatial_shapes"])
    np.testing.assert_array_equal(got["mask"], want["mask"].astype(bool))
    if method == "pil":  # PIL inside tf.data; x/255 in float32 = HF's float64 rescale, cast
        np.testing.assert_array_equal(got["patches"], want["patches"])
    else:  # the kernels do differ (not a trivially loose bound), by at most one grey level
        np.testing.assert_allclose(got["patches"], want["patches"], rtol=0, atol=TF_KERNEL_ATOL)
        assert np.abs(got["patches"] - want["patches"]).max() > 1e-3
    fn = get_preprocess_fn(_pipe(patch, budget, method))
    for i, img in enumerate(images[:4]):  # eagerly, same numbers as in tf.data
        eager = fn({"image": tf.constant(img)})["image"]
        np.testing.assert_array_equal(eager["patches"].numpy(), got["patches"][i])
        np.testing.assert_array_equal(eager["spatial_shapes"].numpy(), got["spatial_shapes"][i])


def test_resize_to_patches_keeps_dtype_and_static_channels():
    fn = get_preprocess_fn("resize_to_patches(16, 256)")
    out = fn({"image": tf.constant(skimage_data.coffee())})["image"]
    assert out.dtype == tf.uint8 and tuple(out.shape) == (208, 304, 3)  # 13 x 19 = 247 patches
    sig = {"image": tf.TensorSpec([None, None, 3], tf.uint8)}
    ds = tf.data.Dataset.from_generator(lambda: iter([{"image": skimage_data.coffee()}]),
                                        output_signature=sig).map(fn)
    assert ds.element_spec["image"].shape.as_list() == [None, None, 3]


def test_bad_arguments_and_images():
    with pytest.raises(PPError, match="max_num_patches must be a positive int"):
        get_preprocess_fn("resize_to_patches(16, 0)")
    with pytest.raises(PPError, match="method must be one of"):
        get_preprocess_fn('resize_to_patches(16, 64, method="cubic")')
    with pytest.raises(PPError, match="patch_size must be a positive int"):
        get_preprocess_fn("patchify(0, 64)")
    fn = get_preprocess_fn("patchify(16, 4)")
    with pytest.raises(tf.errors.InvalidArgumentError, match="multiples of 16"):
        fn({"image": tf.zeros([20, 32, 3])})
    with pytest.raises(tf.errors.InvalidArgumentError, match="exceeds max_num_patches=4"):
        fn({"image": tf.zeros([48, 32, 3])})
    with pytest.raises(naflex.NaFlexError, match="uint8"):
        naflex.naflex_preprocess([np.zeros((4, 4, 3), np.float32)])


def test_demo_shapes_aspect_gives_mixed_shapes_that_batch_with_naflex(tmp_path):
    from siglip_jax.data import demo_shapes
    from siglip_jax.data.demo_shapes import ASPECTS, COLOURS, SHAPES, DemoShapes

    src = DemoShapes(str(tmp_path), image_size=32, train_per_class=2, test_per_class=1,
                     aspect=True)
    src.prepare()
    examples = list(src.dataset().as_numpy_iterator())
    assert len(examples) == src.num_examples == 72 and "hw" not in examples[0]
    want_shapes = {(round(32 * ah / max(ah, aw)), round(32 * aw / max(ah, aw)))
                   for ah, aw in ASPECTS}
    shapes = {ex["image"].shape[:2] for ex in examples}
    assert shapes == want_shapes  # every aspect ratio occurs, longer side 32
    palette = np.array(list(COLOURS.values()), np.float32)
    for ex in examples:  # the shape is drawn inside the visible image, in its class colour
        colour = palette[ex["label"] // len(SHAPES)]
        near = np.abs(ex["image"].astype(np.float32) - colour).max(-1) < 50
        assert near.mean() > 0.03, (ex["image"].shape, ex["texts"])
    # Square demo data is unchanged by the option (same files as before, no "hw").
    assert "hw" not in demo_shapes.make_split(1, 0, 8)
    pp_string = "resize_to_patches(4, 48)|value_range(-1, 1)|patchify(4, 48)|keep('image')"
    batch = next(src.dataset().map(get_preprocess_fn(pp_string)).batch(72)
                 .as_numpy_iterator())["image"]
    assert batch["patches"].shape == (72, 48, 48)
    want = [hf_siglip2.get_image_size_for_max_num_patches(*ex["image"].shape[:2], 4, 48)
            for ex in examples]
    np.testing.assert_array_equal(batch["spatial_shapes"], np.array(want) // 4)
    np.testing.assert_array_equal(batch["mask"].sum(-1), batch["spatial_shapes"].prod(-1))
    assert len({tuple(s) for s in batch["spatial_shapes"]}) == len(ASPECTS)


def test_predict_naflex_reads_hf_preprocessor_config_and_matches_hf(tmp_path):
    from siglip_jax import predict

    proc = hf_siglip2.Siglip2ImageProcessorPil(patch_size=8, max_num_patches=40,
                                               image_mean=[0.4, 0.5, 0.6],
                                               image_std=[0.2, 0.3, 0.25])
    proc.save_pretrained(str(tmp_path))
    settings = predict.naflex_settings(str(tmp_path))
    assert (settings["patch_size"], settings["max_num_patches"]) == (8, 40)
    images = list(_images().values())[:5]
    path = tmp_path / "coffee.png"
    path.write_bytes(_png(images[1]))
    inputs = [images[0], str(path), Image.fromarray(images[2]), images[3], images[4]]
    got = predict.preprocess_images_naflex(inputs, settings)
    want = proc(images=[Image.fromarray(a) for a in images], return_tensors="np")
    np.testing.assert_array_equal(got["patches"], want["pixel_values"])
    np.testing.assert_array_equal(got["mask"], want["pixel_attention_mask"].astype(bool))
    np.testing.assert_array_equal(got["spatial_shapes"], want["spatial_shapes"])
    defaults = predict.naflex_settings(None, max_num_patches=64)
    assert (defaults["patch_size"], defaults["max_num_patches"]) == (16, 64)
    with pytest.raises(predict.PredictError, match="uint8"):
        predict.preprocess_images_naflex([np.zeros((4, 4), np.float32)], defaults)


def test_input_pipeline_carries_naflex_dicts_to_global_arrays(tmp_path):
    """train/eval batches and make_global_batch handle the nested image dict (8 devices)."""
    import jax

    from siglip_jax.data.demo_shapes import DemoShapes
    from siglip_jax.data.input import MASK_KEY, eval_batches, train_batches
    from siglip_jax.data.tokenizer import Tokenizer
    from siglip_jax.sharding import make_global_batch, make_mesh

    src = DemoShapes(str(tmp_path), image_size=32, train_per_class=1, test_per_class=1,
                     aspect=True)
    src.prepare()
    pp_string = ('resize_to_patches(8, 16)|value_range(-1, 1)|patchify(8, 16)'
                 '|tokenize(convention="siglip2", max_len=8)|keep("image", "labels")')
    fn = get_preprocess_fn(pp_string, tokenizer=Tokenizer(src.tokenizer_path))
    batch = next(train_batches(src, fn, shard_ids=list(range(8)), num_shards=8,
                               shard_batch=2, seed=0))
    img = batch["image"]
    assert img["patches"].shape == (16, 16, 192) and img["mask"].shape == (16, 16)
    np.testing.assert_array_equal(img["mask"].sum(-1), img["spatial_shapes"].prod(-1))
    assert len({tuple(s) for s in img["spatial_shapes"]}) > 1  # mixed aspect ratios
    assert batch["labels"].shape == (16, 8)
    mesh = make_mesh([("data", -1)])
    glob = make_global_batch(batch, mesh, ("data",))
    assert glob["image"]["patches"].shape == (16, 16, 192)
    assert len(glob["image"]["mask"].sharding.device_set) == jax.device_count() == 8
    np.testing.assert_array_equal(np.asarray(glob["image"]["spatial_shapes"]),
                                  img["spatial_shapes"])
    # Eval: the last batch is zero-padded inside the nested dict too.
    batches = list(eval_batches(src.dataset().take(5), fn, local_batch=4, num_batches=2))
    last = batches[-1]
    np.testing.assert_array_equal(last[MASK_KEY], [True, False, False, False])
    assert last["image"]["patches"].shape == (4, 16, 192)
    assert not last["image"]["mask"][1:].any() and not last["image"]["patches"][1:].any()
