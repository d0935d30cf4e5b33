"""Builds a data source from its config record (data/config.py), e.g. the record of
`dict(name="tfds", tfds_name="coco_captions", split="train", data_dir=...)`.

`make_source(record, where)` builds the source; a required key the record leaves unset (a
source's path or dataset name) or a source that cannot be opened is a one-line ConfigError.

Sources (see data/sources.py, whose `Source` protocol they follow, and data/demo_shapes.py)
are bound to one split and offer
`dataset(process_index, process_count, shuffle_files, seed)` (this process's examples as a
tf.data.Dataset of dicts), `num_examples` (None if unknown), `skips` (counts of skipped bad
examples), and where they have them `class_names` and `tokenizer_path`.
"""

from __future__ import annotations

import dataclasses
import os

from siglip_jax.data import sources
from siglip_jax.data.config import (
    CsvData,
    DemoShapesData,
    ImageFolderData,
    SourceConfig,
    TarData,
    TfdsData,
)
from siglip_jax.data.demo_shapes import prepared_source
from siglip_jax.data.sources import Source
from siglip_jax.records import ConfigError, thaw


def _given(record: SourceConfig, *skip: str) -> dict[str, object]:
    """The record's fields that are set (not None), except `skip`, as keyword arguments."""
    return {f.name: thaw(getattr(record, f.name)) for f in dataclasses.fields(record)
            if f.name not in skip and getattr(record, f.name) is not None}


def _required(record: SourceConfig, key: str, where: str) -> str | tuple[str, ...]:
    """The record's `key`; ConfigError naming it if unset."""
    value = getattr(record, key)
    if value is None:
        raise ConfigError(f"{where}: source {record.name!r} needs the key {key!r}")
    return value


def make_source(record: SourceConfig, where: str = "input.data") -> Source:
    """The source `record` describes (bound to its split); ConfigError if it cannot be built."""
    try:
        if isinstance(record, DemoShapesData):
            _required(record, "data_dir", where)
            return prepared_source(record)
        if isinstance(record, TfdsData):
            return sources.TfdsSource(_required(record, "tfds_name", where),
                                      _required(record, "split", where),
                                      **_given(record, "tfds_name", "split"))
        if isinstance(record, ImageFolderData):
            root = _required(record, "root", where)
            return sources.ImageFolderSource(
                os.path.join(root, record.split) if record.split else root,
                **_given(record, "root", "split"))
        if isinstance(record, CsvData):
            return sources.CsvSource(_required(record, "path", where),
                                     **_given(record, "path", "split"))
        if isinstance(record, TarData):
            return sources.TarShardSource(thaw(_required(record, "pattern", where)),
                                          **_given(record, "pattern", "split"))
    except ConfigError:
        raise
    except (sources.SourceError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None
    raise TypeError(f"{where}: not a data-source record: {record!r}")
