"""The demo's multi-object mode: boxes, phrases, captions and segmentation checked against the
pixels, the main-object label, the source/tokenizer path and the --objects CLI."""

import re

import numpy as np
import pytest

from siglip_jax.data import demo_shapes as ds

COLOUR_NAMES = list(ds.COLOURS)


@pytest.fixture(scope="module")
def split():
    return ds.make_objects_split(2, seed=5, size=64)  # 72 images, 2 per main class.


def _name(label: int) -> str:
    return f"{COLOUR_NAMES[label // 6]} {ds.SHAPES[label % 6]}"


def test_fields_shapes_and_padding(split):
    n = 72
    assert split["image"].shape == (n, 64, 64, 3) and split["image"].dtype == np.uint8
    assert split["segmentation"].shape == (n, 64, 64) and split["segmentation"].dtype == np.uint8
    assert split["boxes"].shape == (n, 4, 4) and split["boxes"].dtype == np.float32
    assert split["box_texts"].shape == (n, 4) and split["num_boxes"].dtype == np.int32
    assert split["label"].dtype == np.int32 and split["texts"].shape == (n,)
    counts = split["num_boxes"]
    assert set(counts) == {2, 3, 4}
    for i, k in enumerate(counts):
        assert (split["boxes"][i, k:] == 0).all()
        assert (split["box_texts"][i, k:] == "").all() and (split["box_texts"][i, :k] != "").all()
        assert (split["box_labels"][i, k:] == -1).all()
        assert len(set(split["box_labels"][i, :k])) == k  # Distinct classes.
    # Balanced over the main object's class.
    np.testing.assert_array_equal(np.bincount(split["label"], minlength=36), np.full(36, 2))


def test_boxes_are_the_tight_boxes_of_their_pixels(split):
    for i in range(len(split["label"])):
        seg = split["segmentation"][i]
        for k in range(split["num_boxes"][i]):
            ys, xs = np.nonzero(seg == 1 + split["box_labels"][i, k])
            want = np.array([ys.min(), xs.min(), ys.max() + 1, xs.max() + 1]) / 64
            np.testing.assert_array_equal(split["boxes"][i, k], want.astype(np.float32))
        # Every labelled pixel belongs to one of the listed objects; boxes do not overlap.
        assert set(np.unique(seg)) == {0, *(1 + split["box_labels"][i, :split["num_boxes"][i]])}
        b = split["boxes"][i, :split["num_boxes"][i]]
        for p in range(len(b)):
            for q in range(p + 1, len(b)):
                inter_y = min(b[p, 2], b[q, 2]) - max(b[p, 0], b[q, 0])
                inter_x = min(b[p, 3], b[q, 3]) - max(b[p, 1], b[q, 1])
                assert inter_y <= 0 or inter_x <= 0


def test_label_is_the_largest_object_and_pixels_have_its_colour(split):
    palette = np.array(list(ds.COLOURS.values()), np.float64)
    for i in range(len(split["label"])):
        seg, labels = split["segmentation"][i], split["box_labels"][i, :split["num_boxes"][i]]
        assert labels[0] == split["label"][i]
        sizes = [(seg == 1 + c).sum() for c in labels]
        assert sizes[0] > max(sizes[1:])
        for c in labels:  # The drawn colour is nearest the named colour's palette entry.
            mean = split["image"][i][seg == 1 + c].astype(np.float64).mean(0)
            assert np.argmin(((palette - mean) ** 2).sum(1)) == c // 6
        assert split["image"][i][seg == 0].mean() < 110  # Dark background.


def test_phrases_and_captions_name_the_drawn_objects(split):
    for i in range(len(split["label"])):
        k = split["num_boxes"][i]
        labels, phrases = split["box_labels"][i, :k], split["box_texts"][i, :k]
        for c, phrase in zip(labels, phrases, strict=True):
            size, name = phrase.split(" ", 1)
            assert size in ("small", "large") and name == _name(c)
        assert phrases[0].startswith("large ")
        m = re.fullmatch(r"(?:a )?(\w+ \w+ \w+) (?:with|and) (a \w+ \w+(?: and a \w+ \w+)*)",
                         split["texts"][i])
        assert m, split["texts"][i]
        assert m.group(1) == phrases[0]
        assert m.group(2).split(" and ") == [f"a {_name(c)}" for c in labels[1:]]


def test_deterministic_and_seeds_differ():
    a, b = ds.make_objects_split(1, 3, 48), ds.make_objects_split(1, 3, 48)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["image"], ds.make_objects_split(1, 4, 48)["image"])


def test_source_tokenizer_and_cache(tmp_path):
    from siglip_jax.config import ConfigError
    from siglip_jax.data.builder import make_source
    from siglip_jax.data.config import parse_source
    from siglip_jax.data.tokenizer import Tokenizer

    cfg = dict(name="demo_shapes", split="test", data_dir=str(tmp_path), objects=True,
               train_per_class=1, test_per_class=1)
    source = make_source(parse_source(cfg, "input.data"))
    assert source.image_size == 64 and "demo_objects_" in source.root
    example = next(iter(source.dataset(0, 1).as_numpy_iterator()))
    assert example["image"].shape == (64, 64, 3) and example["segmentation"].shape == (64, 64)
    assert example["boxes"].shape == (4, 4) and example["box_texts"].shape == (4,)
    # Every word of every caption and phrase is in the vocabulary (no <unk> = id 2).
    tok = Tokenizer(source.tokenizer_path)
    data = source.load()
    texts = [str(t) for t in data["texts"]] + [str(t) for t in data["box_texts"].ravel() if t]
    ids = tok.encode(texts, 20, "sticky")
    assert (ids != 2).all()
    # The single-object cache of the same folder is separate and keeps its layout.
    single = make_source(parse_source({**cfg, "objects": False}, "input.data"))
    assert single.image_size == 32 and single.root != source.root
    assert set(single.load()) == {"image", "label", "texts"}
    with pytest.raises(ConfigError, match="objects=True does not support aspect=True"):
        make_source(parse_source({**cfg, "aspect": True}, "input.data"))


def test_cli_writes_png_and_prints_boxes(tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "objects.png"
    assert ds.main(["--objects", "--colour", "blue", "--shape", "ring", "--seed", "2",
                    "--out", str(out)]) == 0
    image = np.asarray(Image.open(out))
    assert image.shape == (64, 64, 3)
    printed = capsys.readouterr().out
    lines = [line for line in printed.splitlines() if "box (ymin" in line]
    assert 2 <= len(lines) <= 4 and lines[0].split()[:3] == ["large", "blue", "ring"]
    # The printed boxes are the tight boxes of each shape's pixels in the same drawing.
    again = ds.write_objects_png(str(tmp_path / "again.png"), 64, 2, main=2 * 6 + 4)
    np.testing.assert_array_equal(again["image"], image)
    for line, phrase in zip(lines, again["box_texts"], strict=True):
        assert line.split()[:3] == phrase.split()
        label = COLOUR_NAMES.index(phrase.split()[1]) * 6 + ds.SHAPES.index(phrase.split()[2])
        ys, xs = np.nonzero(again["segmentation"] == 1 + label)
        values = [float(v) for v in re.findall(r"[\d.]+", line.split("=")[1])]
        assert values == pytest.approx([ys.min() / 64, xs.min() / 64, (ys.max() + 1) / 64,
                                        (xs.max() + 1) / 64], abs=1e-3)
    with pytest.raises(SystemExit):
        ds.main(["--out", str(out)])
