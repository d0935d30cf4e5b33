"""Model size names ("B/16", "L/16", "So400m/14", text "B", ...) and tower-config validation.

`decode_variant("So400m/14")` gives width/depth/mlp_dim/num_heads (+ patch_size); the tables are
big_vision's (`vit.decode_variant`, Table 2 of arXiv:2106.04560; "g-opt" = SigLIP 2's giant
tower, width 1536, depth 40, MLP 6144, 16 heads, from the same big_vision table) plus our tiny
test size "mu". `image_kwargs` / `text_kwargs` turn a tower config Mapping (the `image` / `text`
dicts of the two-towers model) into constructor keyword arguments: variant fields fill the
defaults, explicit keys override them, keys set to None count as unset, unknown keys raise.
The image `kind` ("vit" = FixRes, default; "naflex" = SigLIP 2 NaFlex) picks the tower class
(`image_kind`); `posemb_grid` (the learned G×G position grid) exists only for NaFlex.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp

from siglip_jax.models.common import setting_names
from siglip_jax.models.naflex import NaFlexViT
from siglip_jax.models.text import TextTransformer
from siglip_jax.models.vit import ViT

# name: (width, depth, mlp_dim, num_heads)
SIZES: dict[str, tuple[int, int, int, int]] = {
    "mu": (32, 2, 128, 2),
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "So400m": (1152, 27, 4304, 16),
    "H": (1280, 32, 5120, 16),
    "g": (1408, 40, 6144, 16),
    "g-opt": (1536, 40, 6144, 16),
    "G": (1664, 48, 8192, 16),
    "e": (1792, 56, 15360, 16),
}

IMAGE_KINDS = ("vit", "naflex")
NAFLEX_ONLY_KEYS = ("posemb_grid",)


def _tower_keys(*tower_classes: type) -> tuple[str, ...]:
    keys = dict.fromkeys(k for cls in tower_classes for k in setting_names(cls))
    return ("variant", "width", *(k for k in keys if k not in ("num_classes", "width")))


def image_keys() -> tuple[str, ...]:
    """Valid keys of an image tower config: "variant", "kind" and the towers' settings (ViT's;
    NaFlexViT's for kind="naflex")."""
    return (*_tower_keys(ViT, NaFlexViT), "kind")


def text_keys() -> tuple[str, ...]:
    """Valid keys of a text tower config: "variant" plus the TextTransformer's settings."""
    return _tower_keys(TextTransformer)


class ConfigKeyError(KeyError):
    """A tower config has an unknown key or an unknown variant name."""

    def __str__(self) -> str:  # KeyError would repr() the message.
        return str(self.args[0])


def decode_variant(variant: str | None, *, allow_patch: bool = True) -> dict[str, object]:
    """Decode e.g. "B/16" -> {width, depth, mlp_dim, num_heads, patch_size}; None -> {}."""
    if variant is None:
        return {}
    size, _, patch = variant.partition("/")
    if size not in SIZES:
        raise ConfigKeyError(f"unknown model variant {variant!r}; valid sizes: {list(SIZES)}")
    width, depth, mlp_dim, num_heads = SIZES[size]
    out: dict[str, object] = dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads)
    if patch:
        if not allow_patch:
            raise ConfigKeyError(f"text variant {variant!r} must not have a /patch part")
        if not patch.isdigit():
            raise ConfigKeyError(f"variant {variant!r}: patch size must be an integer")
        out["patch_size"] = int(patch)
    return out


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


# The published SigLIP checkpoints (Hugging Face model cards google/<name>): model config,
# input sizes, and the parameter count the card states (millions).
def _seed(size: str, patch: int, res: int, card_m: int, vocab: int = 32_000) -> dict[str, object]:
    return dict(
        image=dict(variant=f"{size}/{patch}", pool_type="map"),
        text=dict(variant=size, vocab_size=vocab),
        out_dim=(None, SIZES[size][0]),
        image_size=res,
        text_len=64,
        card_params_m=card_m,
    )


SIGLIP_SEEDS: dict[str, dict[str, object]] = {
    "siglip-base-patch16-224": _seed("B", 16, 224, 203),
    "siglip-base-patch16-256": _seed("B", 16, 256, 203),
    "siglip-base-patch16-384": _seed("B", 16, 384, 203),
    "siglip-base-patch16-512": _seed("B", 16, 512, 204),
    "siglip-base-patch16-256-multilingual": _seed("B", 16, 256, 371, vocab=250_000),
    "siglip-large-patch16-256": _seed("L", 16, 256, 652),
    "siglip-large-patch16-384": _seed("L", 16, 384, 652),
    "siglip-so400m-patch14-224": _seed("So400m", 14, 224, 877),
    "siglip-so400m-patch14-384": _seed("So400m", 14, 384, 878),
}


# SigLIP 2 checkpoints (big_vision README_siglip2.md; HF google/<name>). Architecture facts:
# FixRes = SigLIP's (vit.py + two_towers.py, HF SiglipModel) with a 256k Gemma vocabulary and
# 64 text tokens; the text tower has the image tower's size, except g-opt whose image tower is
# paired with a So400m text tower projected to 1536 (big_vision SigLIP2_demo.ipynb: "The g-opt
# vision encoder is paired with a So400m text encoder", out_dim=[None, EMBDIM] with EMBDIM
# 1536); NaFlex (HF Siglip2Model, big_vision naflex_vit.py with nposemb=16, posemb learn_2d)
# has a 16x16 learned position grid and is evaluated at 256 patches. `card_image_m` is the
# vision-encoder size the README states (ViT-B 86M, L 303M, So400m 400M, g-opt 1B).
SIGLIP2_VOCAB = 256_000
_CARD_IMAGE_M = {"B": 86, "L": 303, "So400m": 400, "g-opt": 1000}


def _seed2(size: str, patch: int, res: int | None) -> dict[str, object]:
    text_size = "So400m" if size == "g-opt" else size
    image: dict[str, object] = dict(variant=f"{size}/{patch}", pool_type="map")
    if res is None:
        image.update(kind="naflex", posemb_grid=16)
    return dict(
        image=image,
        text=dict(variant=text_size, vocab_size=SIGLIP2_VOCAB),
        out_dim=(None, SIZES[size][0]),
        image_size=res,
        max_num_patches=256 if res is None else None,
        text_len=64,
        card_image_m=_CARD_IMAGE_M[size],
    )


SIGLIP2_SEEDS: dict[str, dict[str, object]] = {
    "siglip2-base-patch16-224": _seed2("B", 16, 224),
    "siglip2-base-patch16-256": _seed2("B", 16, 256),
    "siglip2-base-patch16-384": _seed2("B", 16, 384),
    "siglip2-base-patch16-512": _seed2("B", 16, 512),
    "siglip2-base-patch32-256": _seed2("B", 32, 256),
    "siglip2-large-patch16-256": _seed2("L", 16, 256),
    "siglip2-large-patch16-384": _seed2("L", 16, 384),
    "siglip2-large-patch16-512": _seed2("L", 16, 512),
    "siglip2-so400m-patch14-224": _seed2("So400m", 14, 224),
    "siglip2-so400m-patch14-384": _seed2("So400m", 14, 384),
    "siglip2-so400m-patch16-256": _seed2("So400m", 16, 256),
    "siglip2-so400m-patch16-384": _seed2("So400m", 16, 384),
    "siglip2-so400m-patch16-512": _seed2("So400m", 16, 512),
    "siglip2-giant-opt-patch16-256": _seed2("g-opt", 16, 256),
    "siglip2-giant-opt-patch16-384": _seed2("g-opt", 16, 384),
    "siglip2-base-patch16-naflex": _seed2("B", 16, None),
    "siglip2-so400m-patch16-naflex": _seed2("So400m", 16, None),
}
