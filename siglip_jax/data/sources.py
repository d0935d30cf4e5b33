"""Data sources: TFDS, image folders, CSV/TSV of (image, caption), webdataset tar shards.

Every source has ``.dataset(process_index, process_count, shuffle_files, seed)`` returning a
finite ``tf.data.Dataset`` of example dicts (images still encoded: the pp string starts with
``decode``), sharded between processes by files where possible, else by example index, so
that the processes read disjoint data that together cover the split. ``.num_examples`` is the
size of the whole (unsharded) source when known, else None.

Image-text sources yield ``{"image": tf.string (encoded bytes), "texts": tf.string}``;
``ImageFolderSource`` yields ``{"image": tf.string, "label": tf.int64}``; ``TfdsSource`` yields
the dataset's own features with image features left encoded.

Bad examples never crash training: undecodable images (checked with PIL: format must be one
TF decodes — JPEG, PNG, GIF, BMP — and the whole stream must decode; JPEGs are decoded at 1/8
scale which reads every byte at a fraction of the cost), unreadable/missing files and empty
captions are dropped and counted in ``source.skips`` (a thread-safe ``SkipCounter``;
``skips.as_dict()`` gives e.g. ``{"skipped/corrupt_image": 1}`` for the metrics). Each bad
record counts once per process however often it is read (every epoch, and again by a shard
that falls back to reading the whole source): records are named by a key (file row, tar
shard and offset, TFDS id). Counts include records read ahead by tf.data buffers and restart
at 0 in a new process.

All reading goes through ``tf.io.gfile``, so paths may be local or ``gs://``. The pipelines
contain no ``from_generator`` and only stateless ``numpy_function`` calls, so a
``tf.train.Checkpoint`` of their iterator can be saved and restored (resume mid-epoch).
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import io
import posixpath
import tarfile
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import numpy as np
import tensorflow as tf
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp")
_TFDS_ID = "tfds_id"  # The feature tfds.ReadConfig(add_tfds_id=True) adds: "<file>__<index>".
_TF_FORMATS = {"JPEG", "PNG", "GIF", "BMP"}


class SourceError(ValueError):
    """A source is misconfigured: missing files, unprepared dataset, bad column names."""


class SkipCounter:
    """Thread-safe counts of skipped examples by reason, for the trainer's metrics."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: collections.Counter[str] = collections.Counter()
        self._seen: set[tuple[str, object]] = set()

    def add(self, reason: str, n: int = 1, key: object = None) -> None:
        """Count n skipped examples for reason (n = 0 adds no entry). With a `key` (what names
        the bad record or file) the same (reason, key) counts only the first time."""
        if not n:
            return
        with self._lock:
            if key is not None:
                if (reason, key) in self._seen:
                    return
                self._seen.add((reason, key))
            self._counts[reason] += n

    def __getitem__(self, reason: str) -> int:
        with self._lock:
            return self._counts[reason]

    @property
    def total(self) -> int:
        """All skipped examples."""
        with self._lock:
            return sum(self._counts.values())

    def as_dict(self, prefix: str = "skipped/") -> dict[str, int]:
        """{prefix + reason: count} for metrics."""
        with self._lock:
            return {prefix + k: v for k, v in sorted(self._counts.items())}


def image_is_decodable(data: bytes) -> bool:
    """True if `data` is a JPEG/PNG/GIF/BMP image whose whole stream decodes (PIL)."""
    if not data:
        return False
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format not in _TF_FORMATS:
                return False
            if im.format == "JPEG":
                im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
        return True
    except Exception:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        return False


def _read_file(path: str) -> bytes | None:
    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            return f.read()
    except (tf.errors.OpError, OSError):
        return None


def _shard_indices(n: int, process_index: int, process_count: int) -> np.ndarray:
    """Indices i with i % process_count == process_index (disjoint, covering range(n))."""
    _check_process(process_index, process_count)
    return np.arange(process_index, n, process_count)


def _check_process(process_index: int, process_count: int) -> None:
    if not 0 <= process_index < process_count:
        raise SourceError(f"need 0 <= process_index < process_count, got "
                          f"{process_index}, {process_count}")


def _shuffled(ds: tf.data.Dataset, n: int, shuffle: bool, seed: int) -> tf.data.Dataset:
    if shuffle and n > 1:
        ds = ds.shuffle(n, seed=seed, reshuffle_each_iteration=True)
    return ds


def _load_and_check(counter: SkipCounter, check_images: bool, path: bytes, row: int,
                    text: bytes, need_text: bool) -> tuple[bytes, bool]:
    """Read one image file; count (once per row) and flag unreadable/corrupt images and empty
    captions."""
    data = _read_file(path.decode("utf-8"))
    row = int(row)
    if data is None:
        counter.add("unreadable_file", key=row)
        return b"", False
    if check_images and not image_is_decodable(data):
        counter.add("corrupt_image", key=row)
        return b"", False
    if need_text and not text.decode("utf-8", "replace").strip():
        counter.add("empty_caption", key=row)
        return b"", False
    return data, True


def _files_dataset(
    counter: SkipCounter,
    check_images: bool,
    paths: Sequence[str],
    rows: Sequence[int],
    extra: Mapping[str, Sequence[object]],
    text_key: str | None,
    shuffle: bool,
    seed: int,
) -> tf.data.Dataset:
    """Dataset of {"image": bytes, **extra} read from paths; bad rows dropped and counted
    (`rows`: each path's row number in the whole source, the key its skip counts once by)."""
    cols = {"_path": tf.constant(list(paths), tf.string, shape=[len(paths)]),
            "_row": tf.constant(np.asarray(rows, np.int64), shape=[len(paths)]),
            **{k: tf.constant(v) for k, v in extra.items()}}
    ds = _shuffled(tf.data.Dataset.from_tensor_slices(cols), len(paths), shuffle, seed)

    def load(row: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        text = row[text_key] if text_key else tf.constant(b"")
        img, ok = tf.numpy_function(
            lambda p, r, t: _load_and_check(counter, check_images, p, r, t,
                                            text_key is not None),
            [row["_path"], row["_row"], text], [tf.string, tf.bool], stateful=False)
        img.set_shape([])
        ok.set_shape([])
        out = {k: v for k, v in row.items() if k not in ("_path", "_row")}
        return {"image": img, **out, "_ok": ok}

    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.filter(lambda ex: ex["_ok"]).map(
        lambda ex: {k: v for k, v in ex.items() if k != "_ok"})


class Source(Protocol):
    """What the input pipeline and the evaluators need of a data source (bound to a split)."""

    num_examples: int | None
    skips: SkipCounter | None  # bad examples skipped, by reason (None: generated data)
    class_names: Sequence[str] | None
    tokenizer_path: str | None

    def dataset(self, process_index: int, process_count: int, shuffle_files: bool = False,
                seed: int = 0) -> tf.data.Dataset:
        """This process's examples as a tf.data.Dataset of dicts."""


# ------------------------------------------------------------------------------------------
# Image folders and CSV/TSV files


class ImageFolderSource:
    """root/<class name>/<image> -> {"image": bytes, "label": int64}; classes sorted by name."""

    tokenizer_path = None  # Sources without captions ship no tokenizer.

    def __init__(self, root: str, *, check_images: bool = True):
        if not tf.io.gfile.isdir(root):
            raise SourceError(f"ImageFolderSource: {root!r} is not a directory")
        self.root = root
        self.check_images = check_images
        self.skips = SkipCounter()
        self.class_names = sorted(
            d.rstrip("/") for d in tf.io.gfile.listdir(root)
            if tf.io.gfile.isdir(posixpath.join(root, d.rstrip("/"))))
        if not self.class_names:
            raise SourceError(f"ImageFolderSource: no class sub-directories in {root!r}")
        paths, labels = [], []
        for label, name in enumerate(self.class_names):
            folder = posixpath.join(root, name)
            for f in sorted(tf.io.gfile.listdir(folder)):
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    paths.append(posixpath.join(folder, f))
                    labels.append(label)
        if not paths:
            raise SourceError(f"ImageFolderSource: no {IMAGE_EXTENSIONS} files under {root!r}")
        self.paths, self.labels = paths, np.asarray(labels, np.int64)

    @property
    def num_examples(self) -> int:
        """Number of image files (before skipping corrupt ones)."""
        return len(self.paths)

    def dataset(self, process_index: int = 0, process_count: int = 1,
                shuffle_files: bool = False, seed: int = 0) -> tf.data.Dataset:
        """This process's share of the images (every process_count-th file)."""
        idx = _shard_indices(len(self.paths), process_index, process_count)
        return _files_dataset(self.skips, self.check_images, [self.paths[i] for i in idx],
                              idx, {"label": self.labels[idx]}, None, shuffle_files, seed)


class CsvSource:
    """CSV/TSV rows (image path, caption) -> {"image": bytes, "texts": str}.

    Relative image paths are resolved against `image_root` (default: the CSV's directory).
    The delimiter defaults to tab for .tsv files, else comma.
    """

    class_names = None
    tokenizer_path = None

    def __init__(self, path: str, image_col: str = "image", caption_col: str = "caption",
                 delimiter: str | None = None, *, image_root: str | None = None,
                 check_images: bool = True):
        if not tf.io.gfile.exists(path):
            raise SourceError(f"CsvSource: file {path!r} does not exist")
        if delimiter is None:
            delimiter = "\t" if path.lower().endswith(".tsv") else ","
        root = posixpath.dirname(path) if image_root is None else image_root
        with tf.io.gfile.GFile(path, "r") as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            fields = reader.fieldnames or []
            for col in (image_col, caption_col):
                if col not in fields:
                    raise SourceError(f"CsvSource: column {col!r} not in {path!r} "
                                      f"(columns: {fields}, delimiter {delimiter!r})")
            rows = [(r[image_col] or "", r[caption_col] or "") for r in reader]
        self.path, self.check_images, self.skips = path, check_images, SkipCounter()
        self.paths = [p if _is_absolute(p) or not p else posixpath.join(root, p)
                      for p, _ in rows]
        self.captions = [c for _, c in rows]

    @property
    def num_examples(self) -> int:
        """Number of rows (before skipping bad ones)."""
        return len(self.paths)

    def dataset(self, process_index: int = 0, process_count: int = 1,
                shuffle_files: bool = False, seed: int = 0) -> tf.data.Dataset:
        """This process's rows (every process_count-th row)."""
        idx = _shard_indices(len(self.paths), process_index, process_count)
        texts = tf.constant([self.captions[i] for i in idx], tf.string, shape=[len(idx)])
        return _files_dataset(self.skips, self.check_images, [self.paths[i] for i in idx],
                              idx, {"texts": texts}, "texts", shuffle_files, seed)


def _is_absolute(p: str) -> bool:
    return p.startswith("/") or "://" in p


# ------------------------------------------------------------------------------------------
# webdataset / img2dataset tar shards


@dataclasses.dataclass(frozen=True)
class _TarIndex:
    keys: list[bytes]
    img_off: list[int]
    img_len: list[int]
    txt_off: list[int]
    txt_len: list[int]


def _split_member(name: str) -> tuple[str, str]:
    """webdataset: key = path up to the first '.' of the basename; ext = the rest, lower."""
    d, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(d, stem), ext.lower()


def index_tar(path: str, counter: SkipCounter | None) -> _TarIndex:
    """Offsets of (image, caption) member pairs of one tar shard (headers only, no data read);
    index-level problems are counted in `counter` (None: not counted), once per shard path."""
    counter = counter or SkipCounter()
    imgs: dict[str, tuple[int, int]] = {}
    txts: dict[str, tuple[int, int]] = {}
    order: dict[str, None] = {}  # keys in first-seen order
    try:
        with tf.io.gfile.GFile(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                key, ext = _split_member(m.name)
                if ext in ("jpg", "jpeg", "png", "gif", "bmp"):
                    imgs[key] = (m.offset_data, m.size)
                elif ext == "txt":
                    txts[key] = (m.offset_data, m.size)
                else:
                    continue
                order.setdefault(key)
    except (tarfile.TarError, tf.errors.OpError, OSError):
        counter.add("unreadable_shard", key=path)
    keys = [k for k in order if k in imgs and k in txts]
    counter.add("missing_caption", sum(1 for k in imgs if k not in txts), key=path)
    counter.add("missing_image", sum(1 for k in txts if k not in imgs), key=path)
    return _TarIndex([k.encode() for k in keys], [imgs[k][0] for k in keys],
                     [imgs[k][1] for k in keys], [txts[k][0] for k in keys],
                     [txts[k][1] for k in keys])


class _ShardReader:
    """Reads byte ranges of shards, keeping one open handle per (thread, shard)."""

    def __init__(self, counter: SkipCounter, check_images: bool):
        self._local = threading.local()
        self.counter, self.check_images = counter, check_images

    def _handle(self, path: str) -> tf.io.gfile.GFile:
        cache = getattr(self._local, "files", None)
        if cache is None:
            cache = self._local.files = collections.OrderedDict()
        if path in cache:
            cache.move_to_end(path)
            return cache[path]
        if len(cache) >= 4:
            cache.popitem(last=False)[1].close()
        cache[path] = tf.io.gfile.GFile(path, "rb")
        return cache[path]

    def read(self, path: bytes, img_off: int, img_len: int, txt_off: int,
             txt_len: int) -> tuple[bytes, bytes, bool]:
        """(image bytes, caption, ok) of one pair; bad pairs are counted (once per pair) and
        flagged."""
        key = (path, int(img_off))
        try:
            f = self._handle(path.decode("utf-8"))
            f.seek(int(txt_off))
            text = f.read(int(txt_len))
            f.seek(int(img_off))
            img = f.read(int(img_len))
        except (tf.errors.OpError, OSError):
            self.counter.add("unreadable_file", key=key)
            return b"", b"", False
        if not text.decode("utf-8", "replace").strip():
            self.counter.add("empty_caption", key=key)
            return b"", b"", False
        if self.check_images and not image_is_decodable(img):
            self.counter.add("corrupt_image", key=key)
            return b"", b"", False
        return img, text.strip(), True


class TarShardSource:
    """img2dataset/webdataset tar shards ({key}.jpg + {key}.txt) -> {"image", "texts"}.

    `pattern`: a glob (local or gs://, via tf.io.gfile.glob) or a list of globs. Shards are
    split between processes by file when there are at least `process_count` shards, else
    by example. Each shard is indexed once when first opened (tar headers only), then
    pairs are read by offset — `cycle_length` shards at a time, interleaved.
    """

    class_names = None
    tokenizer_path = None

    def __init__(self, pattern: str | Sequence[str], *, check_images: bool = True,
                 cycle_length: int = 4):
        patterns = [pattern] if isinstance(pattern, str) else list(pattern)
        files: list[str] = []
        for p in patterns:
            files.extend(tf.io.gfile.glob(p))
        if not files:
            raise SourceError(f"TarShardSource: no files match {patterns}")
        self.files = sorted(set(files))
        self.check_images, self.cycle_length = check_images, cycle_length
        self.skips = SkipCounter()
        self._reader = _ShardReader(self.skips, check_images)

    @property
    def num_examples(self) -> int | None:
        """Unknown without reading every shard: None."""
        return None

    def _shard_pairs(self, path: tf.Tensor, count: tf.Tensor) -> tf.data.Dataset:
        def index(p: bytes, counts: bool) -> tuple[np.ndarray, ...]:
            ix = index_tar(p.decode("utf-8"), self.skips if counts else None)
            return (np.asarray(ix.keys, dtype=object).astype(bytes).reshape(-1),
                    *(np.asarray(a, np.int64).reshape(-1)
                      for a in (ix.img_off, ix.img_len, ix.txt_off, ix.txt_len)))

        cols = tf.numpy_function(index, [path, count], [tf.string] + [tf.int64] * 4,
                                 stateful=False)
        for c in cols:
            c.set_shape([None])
        return tf.data.Dataset.from_tensor_slices(tuple(cols)).map(
            lambda key, ioff, ilen, toff, tlen: (path, ioff, ilen, toff, tlen))

    def dataset(self, process_index: int = 0, process_count: int = 1,
                shuffle_files: bool = False, seed: int = 0) -> tf.data.Dataset:
        """This process's pairs: its shards (or every process_count-th pair of all shards)."""
        _check_process(process_index, process_count)
        by_file = len(self.files) >= process_count
        files = self.files[process_index::process_count] if by_file else self.files
        # Split by example, every reader indexes every file: only one of them (file i's
        # owner: i % process_count) counts the file's index-level skips, so they count once.
        counts = [by_file or i % process_count == process_index for i in range(len(files))]
        ds = tf.data.Dataset.from_tensor_slices((files, counts))
        ds = _shuffled(ds, len(files), shuffle_files, seed)
        ds = ds.interleave(self._shard_pairs, cycle_length=min(self.cycle_length, len(files)),
                           block_length=1, num_parallel_calls=tf.data.AUTOTUNE,
                           deterministic=True)
        if not by_file:
            ds = ds.shard(process_count, process_index)

        def read(*pair: tf.Tensor) -> dict[str, tf.Tensor]:
            img, txt, ok = tf.numpy_function(self._reader.read, list(pair),
                                             [tf.string, tf.string, tf.bool], stateful=False)
            for t in (img, txt, ok):
                t.set_shape([])
            return {"image": img, "texts": txt, "_ok": ok}

        ds = ds.map(read, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return ds.filter(lambda ex: ex["_ok"]).map(
            lambda ex: {"image": ex["image"], "texts": ex["texts"]})


# ------------------------------------------------------------------------------------------
# TFDS


class TfdsSource:
    """A prepared TFDS dataset (never downloads): builder `name`, `split` (slicing allowed).

    Image features listed in `image_keys` (default: every top-level tfds Image feature) are
    left encoded so the pp string's `decode` handles them. If `text_key` is given, examples
    whose text (or all of whose texts) is empty are skipped and counted. `check_images`
    additionally validates the images (off by default: TFDS checked them when preparing).
    Processes read disjoint, even sub-splits (`tfds.even_splits`); TFDS reads only the
    needed file ranges.
    """

    class_names = None
    tokenizer_path = None

    def __init__(self, name: str, split: str, data_dir: str | None = None, *,
                 image_keys: Sequence[str] | None = None, text_key: str | None = None,
                 check_images: bool = False):
        # Deliberately here: only TFDS sources need it, and it adds ~0.5 s to every import.
        import tensorflow_datasets as tfds

        self._tfds = tfds
        hint = (f"prepare it once (with network) with: tfds build {name.split(':')[0]} "
                f"--data_dir={data_dir or '~/tensorflow_datasets'} (or "
                f"tfds.builder({name!r}, data_dir=...).download_and_prepare())")
        try:
            self.builder = tfds.builder(name, data_dir=data_dir)
        except Exception as e:  # DatasetNotFoundError, bad version, unreadable info ...
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise SourceError(f"TFDS dataset {name!r} not found under data_dir={data_dir!r} "
                              f"({first}); {hint}") from None
        if not self.builder.is_prepared():
            raise SourceError(f"TFDS dataset {name!r} is not prepared under "
                              f"{self.builder.data_dir!r}; {hint}")
        try:
            self.num_examples = int(self.builder.info.splits[split].num_examples)
        except (KeyError, ValueError, TypeError) as e:
            raise SourceError(f"TFDS dataset {name!r} has no split {split!r} ({e}); splits: "
                              f"{sorted(self.builder.info.splits.keys())}") from None
        self.name, self.split, self.text_key = name, split, text_key
        feats = self.builder.info.features
        if image_keys is None:
            image_keys = [k for k, f in feats.items() if isinstance(f, tfds.features.Image)]
        for k in list(image_keys) + ([text_key] if text_key else []):
            if k not in feats:
                raise SourceError(f"TFDS dataset {name!r} has no feature {k!r}; "
                                  f"features: {sorted(feats)}")
        self.image_keys = list(image_keys)
        self.check_images = check_images
        self.skips = SkipCounter()

    def dataset(self, process_index: int = 0, process_count: int = 1,
                shuffle_files: bool = False, seed: int = 0) -> tf.data.Dataset:
        """This process's even sub-split of `split`."""
        _check_process(process_index, process_count)
        tfds = self._tfds
        sub = tfds.even_splits(self.split, process_count)[process_index]
        checked = self.text_key is not None or bool(self.check_images and self.image_keys)
        # A checked example carries its `tfds_id` (the key its skip counts once by) until
        # the check has run.
        read_config = tfds.ReadConfig(shuffle_seed=seed if shuffle_files else None,
                                      add_tfds_id=checked)
        ds = self.builder.as_dataset(
            split=sub, shuffle_files=shuffle_files, read_config=read_config,
            decoders={k: tfds.decode.SkipDecoding() for k in self.image_keys})
        if not checked:
            return ds
        return ds.filter(self._make_check()).map(
            lambda ex: {k: v for k, v in ex.items() if k != _TFDS_ID})

    def _make_check(self) -> Callable[[dict[str, tf.Tensor]], tf.Tensor]:
        img_key = self.image_keys[0] if self.check_images and self.image_keys else None

        def py_check(img: bytes, has_text: bool, example_id: bytes) -> bool:
            if not has_text:
                self.skips.add("empty_caption", key=example_id)
                return False
            if img_key is not None and not image_is_decodable(img):
                self.skips.add("corrupt_image", key=example_id)
                return False
            return True

        def check(ex: dict[str, tf.Tensor]) -> tf.Tensor:
            has_text = tf.constant(True)
            if self.text_key:
                lens = tf.strings.length(tf.strings.strip(ex[self.text_key]))
                has_text = tf.reduce_any(tf.reshape(lens, [-1]) > 0)
            img = ex[img_key] if img_key else tf.constant(b"")
            ok = tf.numpy_function(py_check, [img, has_text, ex[_TFDS_ID]], tf.bool,
                                   stateful=False)
            ok.set_shape([])
            return ok

        return check
