"""Builds a data source from a config section, e.g. `dict(name="tfds", tfds_name="coco_captions",
split="train", data_dir=...)`.

Sources (see data/sources.py and data/demo_shapes.py) are bound to one split and offer
`dataset(process_index, process_count, shuffle_files, seed)` (this process's examples as a
tf.data.Dataset of dicts), `num_examples` (None if unknown), `skips` (counts of skipped bad
examples), and where they have them `class_names` and `tokenizer_path`.

Keys by `name`:
  demo_shapes   split, data_dir, image_size, train_per_class, test_per_class, vocab_size,
                aspect (mixed aspect ratios, for NaFlex), objects (2–4 shapes per image with
                boxes, phrases and a segmentation map; image_size defaults to 64)
  tfds          tfds_name, split (slicing allowed, e.g. "train[:90%]"), data_dir, image_keys,
                text_key, check_images
  imagefolder   root (split: optional sub-folder of root), check_images
  csv           path, image_col, caption_col, delimiter, image_root, check_images
  tar           pattern (glob, list of globs, local or gs://), check_images, cycle_length
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Protocol

from siglip_jax.config import ConfigError, check_keys, to_plain

_KEYS = {
    "demo_shapes": ("split", "data_dir", "image_size", "train_per_class", "test_per_class",
                    "vocab_size", "aspect", "objects"),
    "tfds": ("tfds_name", "split", "data_dir", "image_keys", "text_key", "check_images"),
    "imagefolder": ("root", "split", "check_images"),
    "csv": ("path", "image_col", "caption_col", "delimiter", "image_root", "check_images",
            "split"),
    "tar": ("pattern", "check_images", "cycle_length", "split"),
}
SOURCES = tuple(_KEYS)


class Source(Protocol):
    """What the input pipeline and the evaluators need of a data source (bound to a split)."""

    num_examples: int | None
    skips: Any  # sources.SkipCounter: bad examples skipped, by reason.
    class_names: Sequence[str] | None
    tokenizer_path: str | None

    def dataset(self, process_index: int, process_count: int, shuffle_files: bool = False,
                seed: int = 0) -> Any:
        """This process's examples as a tf.data.Dataset of dicts."""


def _plain(data_cfg: Any) -> dict[str, Any]:
    from siglip_jax.records import thaw

    return dict(thaw(to_plain(data_cfg)))


def check_source_config(data_cfg: Any, where: str = "input.data") -> None:
    """ConfigError for an unknown source name or a key the source does not take."""
    cfg = _plain(data_cfg)
    name = cfg.pop("name", None)
    if name not in _KEYS:
        raise ConfigError(f"{where}.name {name!r} is not one of {SOURCES}")
    check_keys(cfg, _KEYS[name], where)


def make_source(data_cfg: Any, where: str = "input.data") -> Source:
    """The source named by `data_cfg.name`, configured by the section's other keys."""
    from siglip_jax.data import sources

    check_source_config(data_cfg, where)
    cfg = _plain(data_cfg)
    name = cfg.pop("name")
    try:
        if name == "demo_shapes":
            from siglip_jax.data.demo_shapes import DemoShapes

            source = DemoShapes(**cfg)
            source.prepare()
            return source
        if name == "tfds":
            return sources.TfdsSource(cfg.pop("tfds_name"), cfg.pop("split"), **cfg)
        if name == "imagefolder":
            root, split = cfg.pop("root"), cfg.pop("split", None)
            return sources.ImageFolderSource(os.path.join(root, split) if split else root,
                                             **cfg)
        cfg.pop("split", None)  # csv and tar: the files are the split.
        if name == "csv":
            return sources.CsvSource(cfg.pop("path"), **cfg)
        return sources.TarShardSource(cfg.pop("pattern"), **cfg)
    except KeyError as e:
        raise ConfigError(f"{where}: source {name!r} needs the key {e.args[0]!r}") from None
    except (sources.SourceError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None
