"""The tokenizer's rules that need neither sentencepiece nor TensorFlow, and its config record.

`EOS_MODES` are the EOS modes `Tokenizer.encode` implements (tokenizer.py documents each);
`CONVENTIONS` bundle a model family's text rules (`TextConvention`). `TokenizerConfig` is the
run's [tokenizer] section: the sentencepiece model ("" = the checkpoint's or the data
source's), max_len, eos (one of `EOS_MODES`) and convention ("" | "siglip" | "siglip2"). This
module is separate from tokenizer.py so that parsing a config does not load TensorFlow (the
command-line entry points quiet TensorFlow's start-up notices before its first import).
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping

from siglip_jax.records import check_choice, check_int, set_fields

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


def get_convention(name: str | TextConvention) -> TextConvention:
    """The TextConvention called name (or name itself); TokenizerError if unknown."""
    if isinstance(name, TextConvention):
        return name
    if name not in CONVENTIONS:
        raise TokenizerError(f"unknown text convention {name!r}; known: {sorted(CONVENTIONS)}")
    return CONVENTIONS[name]
