"""Sources built offline: tar shards, image folders, CSV/TSV and a tiny prepared TFDS dataset."""

import csv
import io
import tarfile

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from extras import require
from PIL import Image

from siglip_jax.data.pp import get_preprocess_fn
from siglip_jax.data.sources import (
    CsvSource,
    ImageFolderSource,
    SourceError,
    TarShardSource,
    TfdsSource,
    image_is_decodable,
)
from siglip_jax.data.tokenizer import Tokenizer, train_sentencepiece

skimage = require("skimage")
require("skimage.data")  # sets skimage.data


def _jpeg(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", **kw)
    return buf.getvalue()


def _real_images(n: int) -> list[np.ndarray]:
    """n distinct small RGB crops of skimage's astronaut, coffee and chelsea."""
    bases = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea()]
    out = []
    for i in range(n):
        b = bases[i % 3]
        y, x = 37 * (i // 3), 23 * (i // 3)
        out.append(np.ascontiguousarray(b[y:y + 160:4, x:x + 200:4]))  # 40 x 50
    return out


IMAGES = _real_images(14)
GOOD_JPEGS = [_jpeg(a) for a in IMAGES]
TRUNCATED = GOOD_JPEGS[0][: len(GOOD_JPEGS[0]) // 2]
GARBAGE = bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8))


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """4 shards, 12 good pairs; plus 1 truncated jpeg, 1 garbage jpeg, 1 empty caption,
    1 image without caption, 1 caption without image, a .json sidecar (ignored)."""
    d = tmp_path_factory.mktemp("shards")
    good = {}
    k = 0
    for s in range(4):
        with tarfile.open(d / f"{s:05d}.tar", "w") as tar:
            for _ in range(3):
                key = f"{s:05d}/{k:09d}"
                good[f"caption number {k}"] = GOOD_JPEGS[k]
                _add(tar, f"{key}.jpg", GOOD_JPEGS[k])
                _add(tar, f"{key}.json", b"{}")
                _add(tar, f"{key}.txt", f"  caption number {k}\n".encode())
                k += 1
            if s == 1:
                _add(tar, "00001/bad1.jpg", TRUNCATED)
                _add(tar, "00001/bad1.txt", b"truncated image")
                _add(tar, "00001/bad2.txt", b"garbage image")
                _add(tar, "00001/bad2.jpg", GARBAGE)
            if s == 2:
                _add(tar, "00002/empty.jpg", GOOD_JPEGS[12])
                _add(tar, "00002/empty.txt", b"   \n")
                _add(tar, "00002/nocap.jpg", GOOD_JPEGS[13])
                _add(tar, "00002/noimg.txt", b"no image here")
    return str(d / "*.tar"), good


def _collect(ds: tf.data.Dataset, text_key: str = "texts") -> dict[str, bytes]:
    out = {}
    for ex in ds.as_numpy_iterator():
        t = ex[text_key].decode()
        assert t not in out
        out[t] = ex["image"]
    return out


def test_image_is_decodable_agrees_with_tf():
    png = io.BytesIO()
    Image.fromarray(IMAGES[1]).save(png, "PNG")
    tiff = io.BytesIO()
    Image.fromarray(IMAGES[1]).save(tiff, "TIFF")
    for ok in (GOOD_JPEGS[0], png.getvalue()):
        assert image_is_decodable(ok)
        assert tf.io.decode_image(ok, channels=3).shape == (40, 50, 3)
    for bad in (TRUNCATED, GARBAGE, b"", b"hello", tiff.getvalue()):
        assert not image_is_decodable(bad)


def test_tar_shards_pairs_skips_and_pp(shards):
    pattern, good = shards
    src = TarShardSource(pattern)
    assert src.num_examples is None and len(src.files) == 4
    got = _collect(src.dataset())
    assert got == good  # exact bytes, stripped captions, nothing else
    assert src.skips.as_dict() == {
        "skipped/corrupt_image": 2, "skipped/empty_caption": 1,
        "skipped/missing_caption": 1, "skipped/missing_image": 1}
    assert src.skips.total == 5

    tok = Tokenizer(train_sentencepiece(list(good), 32, pattern.replace("*.tar", "t.model"),
                                        model_type="word"))
    fn = get_preprocess_fn("decode|resize(16)|value_range(-1, 1)|tokenize(6)|keep('image', "
                           "'labels')", tokenizer=tok)
    batch = next(src.dataset().map(fn).batch(12).as_numpy_iterator())
    assert batch["image"].shape == (12, 16, 16, 3) and batch["image"].dtype == np.float32
    assert -1 <= batch["image"].min() < -0.5 and 0.5 < batch["image"].max() <= 1
    assert batch["labels"].shape == (12, 6) and batch["labels"].dtype == np.int32
    assert (batch["labels"][:, -1] == 1).all()


@pytest.mark.parametrize("count", [2, 3, 8])  # 8 > 4 shards: falls back to example sharding
def test_tar_processes_disjoint_and_covering(shards, count):
    pattern, good = shards
    src = TarShardSource(pattern)
    parts = [set(_collect(src.dataset(i, count))) for i in range(count)]
    assert sum(len(p) for p in parts) == len(good)
    assert set().union(*parts) == set(good)


def test_tar_shuffle_files_is_seeded(shards):
    src = TarShardSource(shards[0], cycle_length=1)

    def order(seed: int) -> list[str]:
        return list(_collect(src.dataset(shuffle_files=True, seed=seed)))

    assert order(1) == order(1)
    assert len({tuple(order(s)) for s in range(4)}) > 1
    assert sorted(order(2)) == sorted(shards[1])


def test_tar_iterator_checkpoint_resumes(shards, tmp_path):
    ds = TarShardSource(shards[0]).dataset()
    it = iter(ds)
    for _ in range(4):
        next(it)
    ckpt = tf.train.Checkpoint(it=it)
    path = ckpt.save(str(tmp_path / "it"))
    rest = [e["texts"].numpy() for e in it]
    ckpt.restore(path)
    assert [e["texts"].numpy() for e in it] == rest and len(rest) == 8


def test_tar_errors(tmp_path):
    with pytest.raises(SourceError, match="no files match"):
        TarShardSource(str(tmp_path / "nothing-*.tar"))
    (tmp_path / "broken.tar").write_bytes(b"this is not a tar file" * 40)
    src = TarShardSource(str(tmp_path / "broken.tar"))
    assert list(src.dataset().as_numpy_iterator()) == []
    assert src.skips["unreadable_shard"] == 1


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    for c, name in enumerate(["dog", "cat", "bird"]):  # sorted: bird=0, cat=1, dog=2
        (root / name).mkdir()
        for i in range(3):
            (root / name / f"{i}.JPG").write_bytes(GOOD_JPEGS[3 * c + i])
    (root / "cat" / "broken.jpg").write_bytes(TRUNCATED)
    (root / "cat" / "notes.txt").write_text("not an image")
    return str(root)


def test_image_folder(folder):
    src = ImageFolderSource(folder)
    assert src.class_names == ["bird", "cat", "dog"] and src.num_examples == 10
    got = [(e["image"], int(e["label"])) for e in src.dataset().as_numpy_iterator()]
    want = {GOOD_JPEGS[3 * c + i]: {0: 2, 1: 1, 2: 0}[c] for c in range(3) for i in range(3)}
    assert dict(got) == want and len(got) == 9
    assert src.skips.as_dict() == {"skipped/corrupt_image": 1}
    parts = [{e["image"] for e in src.dataset(i, 2).as_numpy_iterator()} for i in range(2)]
    assert not parts[0] & parts[1] and parts[0] | parts[1] == set(want)
    out = next(src.dataset().map(get_preprocess_fn("decode|central_crop(32)")).as_numpy_iterator())
    assert out["image"].shape == (32, 32, 3) and out["label"].dtype == np.int64
    with pytest.raises(SourceError, match="not a directory"):
        ImageFolderSource(folder + "/missing")


@pytest.mark.parametrize("suffix", [".csv", ".tsv"])
def test_csv_source(tmp_path, suffix):
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(6):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(GOOD_JPEGS[i])
        rows.append((f"img/{i}.jpg", f"photo {i}, with a comma"))
    (tmp_path / "img" / "bad.jpg").write_bytes(GARBAGE)
    rows += [("img/bad.jpg", "corrupt"), ("img/missing.jpg", "missing file"),
             (str(tmp_path / "img" / "0.jpg"), "")]
    delim = "\t" if suffix == ".tsv" else ","
    path = tmp_path / f"pairs{suffix}"
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter=delim)
        w.writerow(["filepath", "title"])
        w.writerows(rows)
    src = CsvSource(str(path), "filepath", "title")
    assert src.num_examples == 9
    got = _collect(src.dataset())
    assert got == {f"photo {i}, with a comma": GOOD_JPEGS[i] for i in range(6)}
    assert src.skips.as_dict() == {"skipped/corrupt_image": 1, "skipped/empty_caption": 1,
                                   "skipped/unreadable_file": 1}
    parts = [set(_collect(src.dataset(i, 2))) for i in range(2)]
    assert not parts[0] & parts[1] and parts[0] | parts[1] == set(got)
    with pytest.raises(SourceError, match="column 'caption' not in"):
        CsvSource(str(path), "filepath", "caption")


class SiglipTinyCaptions(tfds.core.GeneratorBasedBuilder):
    """10 image-caption pairs (one with an empty caption), for tests."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(40, 50, 3)),
            "texts": tfds.features.Text(),
            "label": tfds.features.ClassLabel(num_classes=3),
        }))

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples(10), "test": self._generate_examples(4)}

    def _generate_examples(self, n):
        for i in range(n):
            yield i, {"image": IMAGES[i], "texts": "" if i == 3 else f"tfds caption {i}",
                      "label": i % 3}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tfds"))
    SiglipTinyCaptions(data_dir=d).download_and_prepare()
    return d


def test_tfds_source_reads_encoded_images_and_skips_empty(tfds_dir):
    src = TfdsSource("siglip_tiny_captions", "train", tfds_dir, text_key="texts")
    assert src.num_examples == 10 and src.image_keys == ["image"]
    exs = list(src.dataset().as_numpy_iterator())
    assert sorted(e["texts"].decode() for e in exs) == sorted(
        f"tfds caption {i}" for i in range(10) if i != 3)
    assert src.skips.as_dict() == {"skipped/empty_caption": 1}
    fn = get_preprocess_fn("decode|value_range(-1, 1)")
    for e in exs:
        i = int(e["texts"].decode().split()[-1])
        assert isinstance(e["image"], bytes)  # still encoded
        img = fn(e)["image"].numpy()
        np.testing.assert_allclose(img, IMAGES[i] / 127.5 - 1, atol=1e-6)  # TFDS stores PNG


def test_tfds_split_slicing_and_processes(tfds_dir):
    src = TfdsSource("siglip_tiny_captions", "train[:60%]", tfds_dir)
    assert src.num_examples == 6
    parts = [{e["texts"] for e in src.dataset(i, 2).as_numpy_iterator()} for i in range(2)]
    assert len(parts[0]) == len(parts[1]) == 3 and not parts[0] & parts[1]
    # TFDS stores examples in hashed-key order: the reference is TFDS's own first 60 %.
    ref = tfds.builder("siglip_tiny_captions", data_dir=tfds_dir).as_dataset("train")
    assert parts[0] | parts[1] == {e["texts"] for e in ref.take(6).as_numpy_iterator()}
    shuffled = [e["texts"] for e in
                TfdsSource("siglip_tiny_captions", "train", tfds_dir).dataset(
                    shuffle_files=True, seed=3).as_numpy_iterator()]
    assert len(shuffled) == 10


def test_tfds_not_prepared_is_one_clear_line(tmp_path, tfds_dir):
    with pytest.raises(SourceError) as e:
        TfdsSource("mnist", "train", str(tmp_path))
    msg = str(e.value)
    assert "\n" not in msg and "not prepared" in msg and "tfds build mnist" in msg
    with pytest.raises(SourceError, match="'no_such_dataset_xyz' not found"):
        TfdsSource("no_such_dataset_xyz", "train", str(tmp_path))
    with pytest.raises(SourceError, match="no split 'validation'"):
        TfdsSource("siglip_tiny_captions", "validation", tfds_dir)
    with pytest.raises(SourceError, match="no feature 'caption'"):
        TfdsSource("siglip_tiny_captions", "train", tfds_dir, text_key="caption")


# ------------------------------------------------------------------------------------------
# Config records (data/config.py) and the builder (data/builder.py)


def test_source_records_parse_and_build(shards, folder):
    import dataclasses
    import os

    from siglip_jax.config import ConfigError
    from siglip_jax.data.builder import make_source
    from siglip_jax.data.config import (
        RECORDS,
        SOURCES,
        ImageFolderData,
        InputConfig,
        TarData,
        parse_source,
    )

    assert SOURCES == ("demo_shapes", "tfds", "imagefolder", "csv", "tar")
    assert all(RECORDS[name].name == name for name in SOURCES)
    pattern, good = shards
    tar = parse_source({"name": "tar", "pattern": [pattern], "cycle_length": 2.0}, "input.data")
    assert tar == TarData(pattern=(pattern,), cycle_length=2) and tar.check_images is None
    assert parse_source(tar, "input.data") is tar  # A record passes through.
    with pytest.raises(dataclasses.FrozenInstanceError):
        tar.pattern = "x"  # type: ignore[misc]
    src = make_source(tar)
    assert isinstance(src, TarShardSource) and src.cycle_length == 2 and len(src.files) == 4
    assert src.check_images  # unset: TarShardSource's own default
    assert _collect(src.dataset()) == good

    root, split = os.path.split(folder)
    record = parse_source({"name": "imagefolder", "root": root, "split": split}, "evals.a.data")
    assert record == ImageFolderData(root=root, split=split)
    assert make_source(record, "evals.a.data").class_names == ["bird", "cat", "dog"]
    run_input = InputConfig(data={"name": "tar", "pattern": pattern}, pp="decode",
                            global_batch=2)
    assert run_input.data == TarData(pattern=pattern)

    for raw, message in [
        ({"name": "webdataset"}, "input.data.name 'webdataset' is not one of ("),
        ({"pattern": pattern}, "input.data.name None is not one of ("),
        ({"name": "tar", "colour": 1}, "unknown config key input.data.colour; valid keys "
                                       "under input.data: check_images, cycle_length, pattern"),
        ({"name": "tar", "cycle_length": 1.5}, "config key input.data.cycle_length expects an "
                                               "int, got 1.5"),
        ({"name": "demo_shapes", "image_size": 0}, "config key input.data.image_size must be "
                                                   ">= 1, got 0"),
        ("gs://x/*.tar", "config key input.data expects a data-source dict, got 'gs://x/*.tar'"),
    ]:
        with pytest.raises(ConfigError) as info:
            parse_source(raw, "input.data")
        assert str(info.value).startswith(message) and "\n" not in str(info.value)
    for raw, message in [
        ({"name": "csv"}, "input.data: source 'csv' needs the key 'path'"),
        ({"name": "tfds", "tfds_name": "x"}, "input.data: source 'tfds' needs the key 'split'"),
        ({"name": "demo_shapes"}, "input.data: source 'demo_shapes' needs the key 'data_dir'"),
        ({"name": "tar", "pattern": pattern.replace("*.tar", "none-*.tar")},
         "input.data: TarShardSource: no files match"),
    ]:
        with pytest.raises(ConfigError) as info:
            make_source(parse_source(raw, "input.data"))
        assert str(info.value).startswith(message) and "\n" not in str(info.value)
