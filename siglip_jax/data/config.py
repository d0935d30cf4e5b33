"""The data layer's config records: the data-source section, [input] and [tokenizer].

`parse_source(raw, where)` turns a data-source section (a mapping with a `name`) into its
typed, frozen record (`SourceConfig`: one record class per source, `RECORDS` by name); an
unknown name or key, or a count that is not an int, is a one-line ConfigError naming the key.
Fields left None take the source class's own default; a source's required keys (its path or
dataset name) are checked when data/builder.make_source builds it. `InputConfig` is the run's
[input] section; the evaluators' sections call `parse_source` for their data too.
`TokenizerConfig` is the [tokenizer] section (its rules: data/tokenizer_rules.py).

Keys by `name`:
  demo_shapes   split, data_dir, image_size, train_per_class, test_per_class, vocab_size,
                aspect (mixed aspect ratios, for NaFlex), objects (2–4 shapes per image with
                boxes, phrases and a segmentation map; image_size defaults to 64), and with
                objects: num_colours, num_shapes, max_objects, object_scale
  tfds          tfds_name, split (slicing allowed, e.g. "train[:90%]"), data_dir, image_keys,
                text_key, check_images
  imagefolder   root (split: optional sub-folder of root), check_images
  csv           path, image_col, caption_col, delimiter, image_root, check_images (split: unused)
  tar           pattern (glob, list of globs, local or gs://), check_images, cycle_length
                (split: unused)

This module loads neither TensorFlow nor the sources, so parsing a config stays light.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping
from typing import ClassVar

from siglip_jax.data.tokenizer_rules import CONVENTIONS, EOS_MODES
from siglip_jax.records import (
    ConfigError,
    build_record,
    check_choice,
    check_int,
    freeze,
    set_fields,
    thaw,
    to_plain,
)


def _check_ints(record: object, where: str, *names: str) -> None:
    """The named fields, where set, as ints (ConfigError naming the key otherwise)."""
    set_fields(record, **{n: check_int(getattr(record, n), f"{where}.{n}", 1)
                          for n in names if getattr(record, n) is not None})


@dataclasses.dataclass(frozen=True)
class DemoShapesData:
    """The generated demo dataset (data/demo_shapes.py); None fields: DemoShapes' defaults."""

    name: ClassVar[str] = "demo_shapes"
    split: str | None = None
    data_dir: str | None = None
    image_size: int | None = None
    train_per_class: int | None = None
    test_per_class: int | None = None
    vocab_size: int | None = None
    aspect: bool | None = None
    objects: bool | None = None
    num_colours: int | None = None
    num_shapes: int | None = None
    max_objects: int | None = None
    object_scale: float | None = None


@dataclasses.dataclass(frozen=True)
class TfdsData:
    """A TFDS dataset split (sources.TfdsSource)."""

    name: ClassVar[str] = "tfds"
    tfds_name: str | None = None
    split: str | None = None
    data_dir: str | None = None
    image_keys: tuple[str, ...] | None = None
    text_key: str | None = None
    check_images: bool | None = None


@dataclasses.dataclass(frozen=True)
class ImageFolderData:
    """`root/<class>/*.jpg` (sources.ImageFolderSource); `split` is a sub-folder of root."""

    name: ClassVar[str] = "imagefolder"
    root: str | None = None
    split: str | None = None
    check_images: bool | None = None


@dataclasses.dataclass(frozen=True)
class CsvData:
    """A csv/tsv file of image paths and captions (sources.CsvSource)."""

    name: ClassVar[str] = "csv"
    path: str | None = None
    image_col: str | None = None
    caption_col: str | None = None
    delimiter: str | None = None
    image_root: str | None = None
    check_images: bool | None = None
    split: str | None = None  # unused: the file is the split


@dataclasses.dataclass(frozen=True)
class TarData:
    """WebDataset-style tar shards (sources.TarShardSource)."""

    name: ClassVar[str] = "tar"
    pattern: str | tuple[str, ...] | None = None
    check_images: bool | None = None
    cycle_length: int | None = None
    split: str | None = None  # unused: the files are the split


SourceConfig = DemoShapesData | TfdsData | ImageFolderData | CsvData | TarData
RECORDS: Mapping[str, type[SourceConfig]] = types.MappingProxyType({
    cls.name: cls for cls in (DemoShapesData, TfdsData, ImageFolderData, CsvData, TarData)})
SOURCES = tuple(RECORDS)
_INT_KEYS: Mapping[str, tuple[str, ...]] = types.MappingProxyType({  # positive ints if given
    "demo_shapes": ("image_size", "train_per_class", "test_per_class", "vocab_size",
                    "num_colours", "num_shapes", "max_objects"),
    "tar": ("cycle_length",)})


def parse_source(raw: Mapping[str, object] | SourceConfig, where: str) -> SourceConfig:
    """The record of a data-source section (a record passes through); ConfigError naming the
    key for an unknown source name, an unknown key or a non-integer count."""
    if isinstance(raw, tuple(RECORDS.values())):
        return raw
    plain = thaw(to_plain(raw))
    if not isinstance(plain, dict):
        raise ConfigError(f"config key {where} expects a data-source dict, got {raw!r}")
    name = plain.pop("name", None)
    if name not in RECORDS:
        raise ConfigError(f"{where}.name {name!r} is not one of {SOURCES}")
    record = build_record(RECORDS[name], {k: freeze(v) for k, v in plain.items()}, where)
    _check_ints(record, where, *_INT_KEYS.get(name, ()))
    return record


@dataclasses.dataclass(frozen=True)
class InputConfig:
    """The training input: data source record, pp string, batch, shuffling, caching."""

    data: SourceConfig
    pp: str
    global_batch: int
    shuffle_buffer: int = 10_000
    cache: bool = False
    # NaFlex only: ((max_num_patches, global_batch), ...); each step draws one pair (seeded by
    # the run's seed and the step) and uses the pp with that patch budget and that batch
    # (SigLIP 2 §2.4). Empty: the pp's own budget and global_batch at every step.
    seq_lens: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        set_fields(self, data=parse_source(self.data, "input.data"), pp=str(self.pp),
                   global_batch=check_int(self.global_batch, "input.global_batch", 1),
                   shuffle_buffer=check_int(self.shuffle_buffer, "input.shuffle_buffer", 0),
                   cache=bool(self.cache), seq_lens=_seq_lens(self.seq_lens))


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
    """The [tokenizer] config section: the sentencepiece model ("" = the checkpoint's or the
    data source's), the text length, the EOS mode (one of EOS_MODES) and the convention ("" |
    "siglip" | "siglip2": how prompts are tokenized, see `tokenizer.encode_prompts`)."""

    max_len: int
    model: str = ""
    eos: str = "sticky"
    convention: str = ""

    def __post_init__(self) -> None:
        set_fields(self, max_len=check_int(self.max_len, "tokenizer.max_len", 1),
                   model=str(self.model or ""),
                   eos=check_choice(self.eos, "tokenizer.eos", EOS_MODES),
                   convention=check_choice(self.convention, "tokenizer.convention",
                                           ("", *CONVENTIONS)))


def given_fields(record: SourceConfig, *skip: str) -> dict[str, object]:
    """The record's fields that are set (not None), except `skip`, as keyword arguments of
    the source it describes."""
    return {f.name: thaw(getattr(record, f.name)) for f in dataclasses.fields(record)
            if f.name not in skip and getattr(record, f.name) is not None}


def required_field(record: SourceConfig, key: str, where: str) -> str | tuple[str, ...]:
    """The record's `key`; ConfigError naming it if unset."""
    value = getattr(record, key)
    if value is None:
        raise ConfigError(f"{where}: source {record.name!r} needs the key {key!r}")
    return value


def _seq_lens(value: object) -> tuple[tuple[int, int], ...]:
    """input.seq_lens as ((max_num_patches, global_batch), ...), each positive."""
    pairs = []
    for entry in value or ():
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2):
            raise ConfigError(f"input.seq_lens entry {entry!r}: expected a (max_num_patches, "
                              "global_batch) pair")
        pairs.append((check_int(entry[0], "input.seq_lens patches", 1),
                      check_int(entry[1], "input.seq_lens global_batch", 1)))
    if len({n for n, _ in pairs}) != len(pairs):
        raise ConfigError(f"input.seq_lens {pairs}: each patch budget at most once")
    return tuple(pairs)
