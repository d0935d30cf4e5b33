"""Model size names ("B/16", "L/16", "So400m/14", text "B", ...) and the published checkpoints.

`decode_variant("So400m/14")` gives width/depth/mlp_dim/num_heads (+ patch_size); the tables are
big_vision's (`vit.decode_variant`, Table 2 of arXiv:2106.04560; "g-opt" = SigLIP 2's giant
tower, width 1536, depth 40, MLP 6144, 16 heads, from the same big_vision table) plus our tiny
test size "mu". `SIGLIP_SEEDS` / `SIGLIP2_SEEDS` describe the released SigLIP and SigLIP 2
checkpoints. Tables only (this module imports nothing of the package): models/config.py
resolves a tower config with them (`image_kwargs`, `text_kwargs`).
"""

from __future__ import annotations

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
