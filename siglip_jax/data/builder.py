"""Builds a data source from a config section such as `dict(name="demo_shapes", split="train")`.

Every source offers `dataset(split, process_index, process_count)` (this process's examples as a
tf.data.Dataset of dicts), `num_examples(split)`, and where it has them `class_names()` and
`tokenizer_path`.
"""

from __future__ import annotations

from typing import Any

from siglip_jax.config import ConfigError, check_keys, to_plain

SOURCES = ("demo_shapes",)


def make_source(data_cfg: Any) -> Any:
    """The source named by `data_cfg.name`, configured by the section's other keys."""
    cfg = dict(to_plain(data_cfg))
    name = cfg.pop("name", None)
    cfg.pop("split", None)
    if name == "demo_shapes":
        from siglip_jax.data.demo_shapes import DemoShapes

        check_keys(cfg, ("data_dir", "image_size", "train_per_class", "test_per_class",
                         "vocab_size"), "input.data")
        source = DemoShapes(**cfg)
        source.prepare()
        return source
    raise ConfigError(f"data source {name!r} is not one of {SOURCES}")
