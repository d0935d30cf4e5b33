"""The tokenizer's rules that need neither sentencepiece nor TensorFlow, and its error type.

`EOS_MODES` are the EOS modes `Tokenizer.encode` implements (tokenizer.py documents each);
`CONVENTIONS` bundle a model family's text rules (`TextConvention`); `TokenizerError` is what
the tokenizer and its training raise. This module imports nothing of the package: the config
record that names these (`TokenizerConfig`, data/config.py), the pp `tokenize` op, the
tokenizer and its training (tokenizer_training.py) all read them from here, so parsing a
config loads neither sentencepiece nor TensorFlow.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping

EOS_MODES = ("sticky", "yes", "none")


class TokenizerError(ValueError):
    """A tokenizer model file or an encode argument is invalid."""


@dataclasses.dataclass(frozen=True)
class TextConvention:
    """How one model family turns texts into ids (see tokenizer.py's module docstring)."""

    max_len: int
    eos: str           # one of EOS_MODES
    pad: str           # "eos": pad with the EOS id; "pad": with the model's <pad> id
    lower: bool
    canonicalize: bool


CONVENTIONS: Mapping[str, TextConvention] = types.MappingProxyType({
    "siglip": TextConvention(64, "sticky", "eos", lower=True, canonicalize=True),
    "siglip2": TextConvention(64, "sticky", "pad", lower=True, canonicalize=False),
})


def get_convention(name: str | TextConvention) -> TextConvention:
    """The TextConvention called name (or name itself); TokenizerError if unknown."""
    if isinstance(name, TextConvention):
        return name
    if name not in CONVENTIONS:
        raise TokenizerError(f"unknown text convention {name!r}; known: {sorted(CONVENTIONS)}")
    return CONVENTIONS[name]
