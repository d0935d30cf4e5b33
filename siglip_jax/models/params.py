"""Parameter shapes and counts without allocating the model (jax.eval_shape), variant tables."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax.typing import VariableDict

from siglip_jax.models import naflex, variants
from siglip_jax.models.common import NaFlexSettings
from siglip_jax.models.config import image_kind, image_kwargs
from siglip_jax.models.two_towers import Model


def param_shapes(
    model: Model, image_size: int | tuple[int, int] | None, text_len: int | None
) -> VariableDict:
    """The params pytree of `model` as ShapeDtypeStructs (nothing is allocated).

    For a NaFlex image tower `image_size` is the patch budget N (an int; the count does not
    depend on it); None leaves the image tower out.
    """
    if image_size is not None and image_kind(model.image) == "naflex":
        n = image_size if isinstance(image_size, int) else int(np.prod(image_size))
        patch = image_kwargs(model.image).get("patch_size", NaFlexSettings.patch_size)
        img = naflex.example_input(1, n, patch)
        txt = None if text_len is None else jax.ShapeDtypeStruct((1, text_len), jnp.int32)
        return jax.eval_shape(model.init, jax.random.key(0), img, txt)["params"]
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    img = None if image_size is None else jax.ShapeDtypeStruct((1, *image_size, 3), jnp.float32)
    txt = None if text_len is None else jax.ShapeDtypeStruct((1, text_len), jnp.int32)
    return jax.eval_shape(model.init, jax.random.key(0), img, txt)["params"]


def count(tree: VariableDict) -> int:
    """Total number of elements over the leaves of a (shape) pytree."""
    return int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree)))


def count_model_params(
    image: Mapping[str, object] | None,
    text: Mapping[str, object] | None,
    out_dim: int | tuple[int | None, int | None],
    image_size: int | tuple[int, int],
    text_len: int,
    bias_init: float | None = -10.0,
) -> dict[str, int]:
    """Counts {"img", "txt", "total"} params of a two-tower config, via jax.eval_shape."""
    model = Model(image=image, text=text, out_dim=out_dim, bias_init=bias_init)
    shapes = param_shapes(model, image_size, text_len)
    return {"img": count(shapes["img"]), "txt": count(shapes["txt"]), "total": count(shapes)}


def seed_table() -> list[dict[str, object]]:
    """Measured parameter counts of every published SigLIP checkpoint in variants.SIGLIP_SEEDS."""
    rows = []
    for name, seed in variants.SIGLIP_SEEDS.items():
        counts = count_model_params(
            {**seed["image"], "scan": True},  # Scanned: same count, much faster to trace.
            {**seed["text"], "scan": True},
            seed["out_dim"],
            seed["image_size"],
            seed["text_len"],
        )
        rows.append(dict(name=name, card_params_m=seed["card_params_m"], **counts))
    return rows


def siglip2_table() -> list[dict[str, object]]:
    """Measured parameter counts of every SigLIP 2 checkpoint in variants.SIGLIP2_SEEDS."""
    rows = []
    for name, seed in variants.SIGLIP2_SEEDS.items():
        counts = count_model_params(
            {**seed["image"], "scan": True}, {**seed["text"], "scan": True}, seed["out_dim"],
            seed["image_size"] or seed["max_num_patches"], seed["text_len"],
        )  # fmt: skip
        rows.append(dict(name=name, card_image_m=seed["card_image_m"], **counts))
    return rows


def siglip2_markdown_table(rows: list[dict[str, object]]) -> str:
    """Renders siglip2_table() rows as Markdown (docs/siglip2_models.md)."""
    return markdown_table(rows, card_key="card_image_m", card_title="card: vision encoder")


def markdown_table(rows: list[dict[str, object]], card_key: str = "card_params_m",
                   card_title: str = "model card") -> str:
    """Renders seed_table() (or siglip2_table()) rows as a Markdown table."""
    lines = [
        f"| checkpoint | image tower | text tower | total (ours) | {card_title} |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['img'] / 1e6:.1f} M | {r['txt'] / 1e6:.1f} M "
            f"| {r['total'] / 1e6:.1f} M | {r[card_key]} M |"
        )
    return "\n".join(lines)
