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

import os

from siglip_jax.data import sources
from siglip_jax.data.config import (
    CsvData,
    DemoShapesData,
    ImageFolderData,
    SourceConfig,
    TarData,
    TfdsData,
    given_fields,
    required_field,
)
from siglip_jax.data.demo_shapes import prepared_source
from siglip_jax.data.sources import Source
from siglip_jax.records import ConfigError, thaw


def make_source(record: SourceConfig, where: str = "input.data") -> Source:
    """The source `record` describes (bound to its split); ConfigError if it cannot be built."""
    try:
        if isinstance(record, DemoShapesData):
            return prepared_source(record, where)
        if isinstance(record, TfdsData):
            return sources.TfdsSource(required_field(record, "tfds_name", where),
                                      required_field(record, "split", where),
                                      **given_fields(record, "tfds_name", "split"))
        if isinstance(record, ImageFolderData):
            root = required_field(record, "root", where)
            return sources.ImageFolderSource(
                os.path.join(root, record.split) if record.split else root,
                **given_fields(record, "root", "split"))
        if isinstance(record, CsvData):
            return sources.CsvSource(required_field(record, "path", where),
                                     **given_fields(record, "path", "split"))
        if isinstance(record, TarData):
            return sources.TarShardSource(thaw(required_field(record, "pattern", where)),
                                          **given_fields(record, "pattern", "split"))
    except ConfigError:
        raise
    except (sources.SourceError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None
    raise TypeError(f"{where}: not a data-source record: {record!r}")
