"""The model's config record (`model` section): tower and decoder settings resolved once.

`ModelConfig.parse(raw, where)` turns a `model` section (or `two_towers.Model` keyword
arguments) into typed, frozen records, each checked and resolved once:

  ImageTowerConfig  model.image: `kind` ("vit" FixRes | "naflex"), a size `variant` ("B/16",
                    models/variants.py) and the other keys as given (`overrides`); resolved:
                    `patch_size` (ph, pw), `width`
  TextTowerConfig   model.text: `variant` ("B") and `overrides`; resolved: `vocab_size`, `width`
  DecoderConfig     model.decoder (the LocCa caption decoder, models/decoder.py; None = none):
                    every key resolved, unset ones following the text tower
  ModelConfig       the three, plus out_dim, temperature_init, bias_init

A tower section's keys are the settings of its tower (models/common.ViTSettings,
NaFlexSettings, TextSettings; the flax towers inherit them, so this module does not import
the towers). `image_kwargs` / `text_kwargs` turn a section into the tower's keyword
arguments: variant fields fill the defaults, explicit keys override them, keys set to None
count as unset, unknown keys raise; the image `kind` ("vit" = FixRes, default; "naflex" =
SigLIP 2 NaFlex) picks the tower (`image_kind`), and `posemb_grid` exists only for NaFlex.
`decoder_kwargs` resolves a `model.decoder` section: unset keys follow the text tower
(width, mlp_dim, heads, dtype, scan, remat) with half its depth (SigLIP 2 §2.2).

The keys, defaults and one-line ConfigErrors are the config file's. The behaviour lives in
functions here: `model_kwargs` (the `two_towers.Model` keyword arguments, plain dicts) and
`decoder_vocab` (the decoder's DecoderVocab, or None); `models.build.make_model` makes the
flax Model (the record does not import the two-towers module).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

from siglip_jax.data.locca import DEFAULT_MAX_LEN, DEFAULT_NUM_BINS, DecoderVocab
from siglip_jax.models.common import (
    NaFlexSettings,
    TextSettings,
    ViTSettings,
    remat_policy_names,
    setting_names,
)
from siglip_jax.models.variants import IMAGE_KINDS, NAFLEX_ONLY_KEYS, ConfigKeyError, decode_variant
from siglip_jax.records import ConfigError, check_float, check_keys, freeze, thaw, to_plain

OutDim = int | tuple[int | None, int | None] | None
MODEL_KEYS = ("image", "text", "out_dim", "temperature_init", "bias_init", "decoder")
DECODER_KEYS = ("width", "depth", "mlp_dim", "num_heads", "num_bins", "max_len", "dropout",
                "dtype", "scan", "remat_policy")


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
    """The LocCa caption decoder, every key resolved (`decoder_kwargs`)."""

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


def _tower_keys(*tower_classes: type) -> tuple[str, ...]:
    keys = dict.fromkeys(k for cls in tower_classes for k in setting_names(cls))
    return ("variant", "width", *(k for k in keys if k not in ("num_classes", "width")))


def image_keys() -> tuple[str, ...]:
    """Valid keys of an image tower config: "variant", "kind" and the image towers' settings
    (models/common.ViTSettings, NaFlexSettings)."""
    return (*_tower_keys(ViTSettings, NaFlexSettings), "kind")


def text_keys() -> tuple[str, ...]:
    """Valid keys of a text tower config: "variant" plus the text tower's settings
    (models/common.TextSettings)."""
    return _tower_keys(TextSettings)


def _items(cfg: Mapping[str, object] | None) -> dict[str, object]:
    if cfg is None:
        return {}
    keys = cfg.keys()  # Works for dict, FrozenDict and ml_collections ConfigDict.
    return {k: cfg[k] for k in keys}


def _as_dtype(value: object) -> jnp.dtype | None:
    return None if value is None else jnp.dtype(value)


def _resolve(cfg: Mapping[str, object] | None, valid: tuple[str, ...],
             tower: str) -> dict[str, object]:
    items = _items(cfg)
    unknown = sorted(set(items) - set(valid))
    if unknown:
        raise ConfigKeyError(f"unknown {tower} config key(s) {unknown}; valid keys: {list(valid)}")
    kw = decode_variant(items.pop("variant", None), allow_patch=tower == "image")
    kw.update({k: v for k, v in items.items() if v is not None})
    for key in ("dtype", "param_dtype"):
        if key in kw:
            kw[key] = _as_dtype(kw[key])
    return kw


def image_kind(cfg: Mapping[str, object] | None) -> str:
    """The image tower kind of a config: "vit" (FixRes, the default) or "naflex"."""
    kind = _items(cfg).get("kind") or "vit"
    if kind not in IMAGE_KINDS:
        raise ConfigKeyError(f"unknown image kind {kind!r}; valid: {list(IMAGE_KINDS)}")
    return kind


def image_kwargs(cfg: Mapping[str, object] | None) -> dict[str, object]:
    """Image tower config (keys image_keys()) -> `vit.ViT` / `naflex.NaFlexViT` keyword arguments.

    `kind` is not included (see `image_kind`); NaFlex-only keys on a FixRes tower raise, and
    a NaFlex tower has only the learned position grid (posemb must be unset or "learn").
    """
    kind = image_kind(cfg)
    kw = _resolve(cfg, image_keys(), "image")
    kw.pop("kind", None)
    if kind == "vit":
        bad = sorted(set(kw) & set(NAFLEX_ONLY_KEYS))
        if bad:
            raise ConfigKeyError(f"image config key(s) {bad} need kind='naflex' (got 'vit')")
    else:
        if kw.pop("posemb", "learn") != "learn":
            raise ConfigKeyError("image kind 'naflex' supports only posemb='learn' (a G×G grid)")
    return kw


def text_kwargs(cfg: Mapping[str, object] | None) -> dict[str, object]:
    """Text tower config (keys text_keys()) -> `text.TextTransformer` keyword arguments."""
    return _resolve(cfg, text_keys(), "text")


def _positive_int(cfg: Mapping[str, object], key: str, minimum: int = 1) -> int:
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"model.decoder.{key} must be an int >= {minimum}, got {value!r}")
    return int(value)


def decoder_kwargs(cfg: Mapping[str, object], text: Mapping[str, object]) -> dict[str, object]:
    """`model.decoder` dict -> `Decoder` keyword arguments (minus vocab_size) + `num_bins`.

    `text` holds the resolved text-tower kwargs (`text_kwargs`): unset keys take
    the text tower's width, mlp_dim, num_heads, dtype, scan and remat_policy, and half its
    depth (at least 1). Raises a one-line ValueError naming the bad key.
    """
    items = {k: cfg[k] for k in cfg.keys() if cfg[k] is not None}
    unknown = sorted(set(items) - set(DECODER_KEYS))
    if unknown:
        raise ValueError(f"unknown model.decoder key(s) {unknown}; valid keys: "
                         f"{list(DECODER_KEYS)}")
    txt = {f: text.get(f, getattr(TextSettings, f)) for f in
           ("width", "depth", "mlp_dim", "num_heads", "dtype", "scan", "remat_policy")}
    kw: dict[str, object] = {
        "width": txt["width"],
        "depth": max(1, int(txt["depth"]) // 2),
        "mlp_dim": txt["mlp_dim"] or 4 * int(txt["width"]),
        "num_heads": txt["num_heads"],
        "num_bins": DEFAULT_NUM_BINS,
        "max_len": DEFAULT_MAX_LEN,
        "dropout": 0.0,
        "dtype": txt["dtype"],
        "scan": bool(txt["scan"]),
        "remat_policy": txt["remat_policy"],
    }
    if "width" in items and "mlp_dim" not in items:
        items["mlp_dim"] = 4 * items["width"] if isinstance(items["width"], int) else None
    kw.update(items)
    for key, minimum in (("width", 1), ("depth", 1), ("mlp_dim", 1), ("num_heads", 1),
                         ("num_bins", 2), ("max_len", 2)):
        kw[key] = _positive_int(kw, key, minimum)
    if kw["width"] % kw["num_heads"]:
        raise ValueError(f"model.decoder.width {kw['width']} is not divisible by num_heads "
                         f"{kw['num_heads']}")
    dropout = kw["dropout"]
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not (
            0.0 <= dropout < 1.0):
        raise ValueError(f"model.decoder.dropout must be a number in [0, 1), got {dropout!r}")
    kw["dropout"] = float(dropout)
    if not isinstance(kw["scan"], (bool, np.bool_)):
        raise ValueError(f"model.decoder.scan must be a bool, got {kw['scan']!r}")
    if kw["remat_policy"] not in remat_policy_names():
        raise ValueError(f"model.decoder.remat_policy {kw['remat_policy']!r} is not one of "
                         f"{remat_policy_names()}")
    if kw["dtype"] is not None:
        try:
            kw["dtype"] = jnp.dtype(kw["dtype"])
        except TypeError:
            raise ValueError(f"model.decoder.dtype {kw['dtype']!r} is not a dtype") from None
    return kw


def parse_image(raw: Mapping[str, object] | None) -> ImageTowerConfig:
    """The image tower record of a `model.image` section; KeyError/ValueError if bad."""
    raw = to_plain(raw) or {}
    kind = image_kind(raw)
    kw = image_kwargs(raw)
    tower = NaFlexSettings if kind == "naflex" else ViTSettings
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
    kw = text_kwargs(raw)
    variant, overrides = _split(raw)
    record = TextTowerConfig(
        variant=variant, overrides=freeze(overrides),
        vocab_size=int(kw.get("vocab_size", TextSettings.vocab_size)),  # type: ignore[arg-type]
        width=int(kw.get("width", TextSettings.width)))  # type: ignore[arg-type]
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
