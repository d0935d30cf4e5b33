"""Model size names ("B/16", "L/16", "So400m/14", text "B", ...) and tower-config validation.

`decode_variant("So400m/14")` gives width/depth/mlp_dim/num_heads (+ patch_size); the tables are
big_vision's (`vit.decode_variant`, Table 2 of arXiv:2106.04560) plus our tiny test size "mu".
`image_kwargs` / `text_kwargs` turn a tower config Mapping (the `image` / `text` dicts of the
two-towers model) into constructor keyword arguments: variant fields fill the defaults,
explicit keys override them, keys set to None count as unset, unknown keys raise.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

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
    "G": (1664, 48, 8192, 16),
    "e": (1792, 56, 15360, 16),
}



def _tower_keys(tower_cls: type) -> tuple[str, ...]:
    from siglip_jax.models.common import setting_names

    return ("variant", *(k for k in setting_names(tower_cls) if k != "num_classes"))


def image_keys() -> tuple[str, ...]:
    """Valid keys of an image tower config: "variant" plus the ViT's settings."""
    from siglip_jax.models.vit import ViT

    return _tower_keys(ViT)


def text_keys() -> tuple[str, ...]:
    """Valid keys of a text tower config: "variant" plus the TextTransformer's settings."""
    from siglip_jax.models.text import TextTransformer

    return _tower_keys(TextTransformer)


class ConfigKeyError(KeyError):
    """A tower config has an unknown key or an unknown variant name."""

    def __str__(self) -> str:  # KeyError would repr() the message.
        return str(self.args[0])


def decode_variant(variant: str | None, *, allow_patch: bool = True) -> dict[str, Any]:
    """Decode e.g. "B/16" -> {width, depth, mlp_dim, num_heads, patch_size}; None -> {}."""
    if variant is None:
        return {}
    size, _, patch = variant.partition("/")
    if size not in SIZES:
        raise ConfigKeyError(f"unknown model variant {variant!r}; valid sizes: {list(SIZES)}")
    width, depth, mlp_dim, num_heads = SIZES[size]
    out: dict[str, Any] = dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads)
    if patch:
        if not allow_patch:
            raise ConfigKeyError(f"text variant {variant!r} must not have a /patch part")
        if not patch.isdigit():
            raise ConfigKeyError(f"variant {variant!r}: patch size must be an integer")
        out["patch_size"] = int(patch)
    return out


def _items(cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    if cfg is None:
        return {}
    keys = cfg.keys()  # Works for dict, FrozenDict and ml_collections ConfigDict.
    return {k: cfg[k] for k in keys}


def _as_dtype(value: Any) -> Any:
    return None if value is None else jnp.dtype(value)


def _resolve(cfg: Mapping[str, Any] | None, valid: tuple[str, ...], tower: str) -> dict[str, Any]:
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


def image_kwargs(cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    """Image tower config (keys image_keys()) -> `vit.ViT` keyword arguments."""
    return _resolve(cfg, image_keys(), "image")


def text_kwargs(cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    """Text tower config (keys text_keys()) -> `text.TextTransformer` keyword arguments."""
    return _resolve(cfg, text_keys(), "text")


# The published SigLIP checkpoints (Hugging Face model cards google/<name>): model config,
# input sizes, and the parameter count the card states (millions).
def _seed(size: str, patch: int, res: int, card_m: int, vocab: int = 32_000) -> dict[str, Any]:
    return dict(
        image=dict(variant=f"{size}/{patch}", pool_type="map"),
        text=dict(variant=size, vocab_size=vocab),
        out_dim=(None, SIZES[size][0]),
        image_size=res,
        text_len=64,
        card_params_m=card_m,
    )


SIGLIP_SEEDS: dict[str, dict[str, Any]] = {
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
