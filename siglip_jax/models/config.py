"""The model's config record (`model` section) and the one place a model is built from it.

`ModelConfig.parse(raw, where)` turns a `model` section (or `two_towers.Model` keyword
arguments) into typed, frozen records, each checked and resolved once:

  ImageTowerConfig  model.image: `kind` ("vit" FixRes | "naflex"), a size `variant` ("B/16")
                    and the other keys as given (`overrides`, models/variants.py); resolved:
                    `patch_size` (ph, pw), `width`
  TextTowerConfig   model.text: `variant` ("B") and `overrides`; resolved: `vocab_size`, `width`
  DecoderConfig     model.decoder (the LocCa caption decoder, models/decoder.py; None = none):
                    every key resolved, unset ones following the text tower
  ModelConfig       the three, plus out_dim, temperature_init, bias_init

The keys, defaults and one-line ConfigErrors are the config file's. The behaviour lives in
functions here: `model_kwargs` (the `two_towers.Model` keyword arguments, plain dicts) and
`decoder_vocab` (the decoder's DecoderVocab, or None); `models.build.make_model` makes the
flax Model (the record does not import the two-towers module).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from siglip_jax.data.locca import DecoderVocab
from siglip_jax.models import variants
from siglip_jax.models.decoder import DECODER_KEYS, decoder_kwargs
from siglip_jax.models.naflex import NaFlexViT
from siglip_jax.models.text import TextTransformer
from siglip_jax.models.vit import ViT
from siglip_jax.records import ConfigError, check_float, check_keys, freeze, thaw, to_plain

OutDim = int | tuple[int | None, int | None] | None
MODEL_KEYS = ("image", "text", "out_dim", "temperature_init", "bias_init", "decoder")


@dataclasses.dataclass(frozen=True)
class ImageTowerConfig:
    """The image tower: kind, size variant and explicit settings; patch size and width
    resolved from them."""

    kind: str  # "vit" (FixRes) | "naflex"
    variant: str | None  # e.g. "B/16"; None: the tower class's defaults.
    overrides: Mapping[str, object]  # The section's other keys, as given (None = unset).
    patch_size: tuple[int, int] | None  # (ph, pw); None only for a NaFlex tower left unchecked.
    width: int


@dataclasses.dataclass(frozen=True)
class TextTowerConfig:
    """The text tower: size variant and explicit settings; vocabulary and width resolved."""

    variant: str | None  # e.g. "B"; None: TextTransformer's defaults.
    overrides: Mapping[str, object]  # The section's other keys, as given (None = unset).
    vocab_size: int
    width: int


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """The LocCa caption decoder, every key resolved (models/decoder.decoder_kwargs)."""

    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    num_bins: int
    max_len: int
    dropout: float
    dtype: str | None  # A numpy dtype name; None: float32 compute.
    scan: bool
    remat_policy: str


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The two-towers model: image and text towers, head dims, t' and b inits, decoder."""

    image: ImageTowerConfig
    text: TextTowerConfig
    out_dim: OutDim = 128
    temperature_init: float = 10.0
    bias_init: float | None = -10.0
    decoder: DecoderConfig | None = None

    @classmethod
    def parse(cls, raw: Mapping[str, object] | None, where: str = "model") -> ModelConfig:
        """From a model section (or two_towers.Model keyword arguments); one-line
        ConfigError naming the bad key."""
        raw = dict(to_plain(raw) or {})
        check_keys(raw, MODEL_KEYS, where)
        try:
            image = parse_image(raw.get("image"))
            text, text_kw = parse_text(raw.get("text"))
        except (KeyError, ValueError, TypeError) as e:
            raise ConfigError(f"config.model: {e}") from None
        decoder = raw.get("decoder")
        if decoder is not None:
            if not isinstance(decoder, Mapping):
                raise ConfigError(f"config key model.decoder expects a dict (or None), got "
                                  f"{decoder!r}")
            try:
                decoder = parse_decoder(decoder, text_kw)
            except (KeyError, ValueError, TypeError) as e:
                raise ConfigError(f"config.model: {e}") from None
        out_dim = raw.get("out_dim", 128)
        if isinstance(out_dim, (list, tuple)):
            out_dim = tuple(out_dim)
        bias = raw.get("bias_init", -10.0)
        return cls(image=image, text=text, out_dim=out_dim,  # type: ignore[arg-type]
                   temperature_init=check_float(raw.get("temperature_init", 10.0),
                                                "model.temperature_init"),
                   bias_init=None if bias is None else check_float(bias, "model.bias_init"),
                   decoder=decoder)


def _pair(value: object) -> tuple[int, int]:
    if isinstance(value, (int, np.integer)):
        return int(value), int(value)
    ph, pw = value  # type: ignore[misc]
    return int(ph), int(pw)


def _split(raw: Mapping[str, object] | None, *drop: str) -> tuple[str | None, dict[str, object]]:
    """(variant, the other keys minus `drop`) of a tower section."""
    given = dict(raw or {})
    variant = given.pop("variant", None)
    for key in drop:
        given.pop(key, None)
    return (None if variant is None else str(variant)), given


def parse_image(raw: Mapping[str, object] | None) -> ImageTowerConfig:
    """The image tower record of a `model.image` section; KeyError/ValueError if bad."""
    raw = to_plain(raw) or {}
    kind = variants.image_kind(raw)
    kw = variants.image_kwargs(raw)
    tower = NaFlexViT if kind == "naflex" else ViT
    patch = kw.get("patch_size", tower.patch_size)
    variant, overrides = _split(raw, "kind")
    return ImageTowerConfig(kind=kind, variant=variant, overrides=freeze(overrides),
                            patch_size=None if patch is None else _pair(patch),
                            width=int(kw.get("width", tower.width)))


def parse_text(raw: Mapping[str, object] | None
               ) -> tuple[TextTowerConfig, dict[str, object]]:
    """(the text tower record of a `model.text` section, its resolved TextTransformer
    keyword arguments); KeyError/ValueError if bad."""
    raw = to_plain(raw) or {}
    kw = variants.text_kwargs(raw)
    variant, overrides = _split(raw)
    record = TextTowerConfig(
        variant=variant, overrides=freeze(overrides),
        vocab_size=int(kw.get("vocab_size", TextTransformer.vocab_size)),  # type: ignore[arg-type]
        width=int(kw.get("width", TextTransformer.width)))  # type: ignore[arg-type]
    return record, kw


def parse_decoder(raw: Mapping[str, object], text_kw: Mapping[str, object]) -> DecoderConfig:
    """The decoder record of a `model.decoder` section given the resolved text-tower keyword
    arguments (unset keys follow the text tower); ValueError naming the bad key."""
    kw = decoder_kwargs(dict(to_plain(raw)), text_kw)
    dtype = kw["dtype"]
    kw["dtype"] = None if dtype is None else np.dtype(dtype).name
    return DecoderConfig(**{k: kw[k] for k in DECODER_KEYS})


def image_dict(image: ImageTowerConfig) -> dict[str, object]:
    """The `model.image` section of the record (plain dicts and lists)."""
    out: dict[str, object] = {} if image.variant is None else {"variant": image.variant}
    if image.kind != "vit":
        out["kind"] = image.kind
    return {**out, **thaw(image.overrides)}


def text_dict(text: TextTowerConfig) -> dict[str, object]:
    """The `model.text` section of the record (plain dicts and lists)."""
    out: dict[str, object] = {} if text.variant is None else {"variant": text.variant}
    return {**out, **thaw(text.overrides)}


def decoder_dict(decoder: DecoderConfig) -> dict[str, object]:
    """The `model.decoder` section of the record, every key set (dtype a name)."""
    return dataclasses.asdict(decoder)


def model_kwargs(model: ModelConfig) -> dict[str, object]:
    """Keyword arguments of `two_towers.Model` (plain dicts and lists, JSON-ready)."""
    return {"image": image_dict(model.image), "text": text_dict(model.text),
            "out_dim": list(model.out_dim) if isinstance(model.out_dim, tuple)
            else model.out_dim,
            "temperature_init": model.temperature_init, "bias_init": model.bias_init,
            "decoder": None if model.decoder is None else decoder_dict(model.decoder)}


def decoder_vocab(model: ModelConfig) -> DecoderVocab | None:
    """The caption decoder's vocabulary (text ids, location bins, task tokens, mask id);
    None without a decoder."""
    if model.decoder is None:
        return None
    return DecoderVocab(model.text.vocab_size, model.decoder.num_bins)
