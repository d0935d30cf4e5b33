"""big_vision `.npz` checkpoints: load and save, scanned <-> unscanned block layouts.

A big_vision params file is an `.npz` whose keys are the "/"-joined tree paths under
`params/` (`params/img/Transformer/encoderblock_0/...`, `params/txt/...`, `params/t`,
`params/b`). Scanned models store the encoder blocks stacked under `encoderblock` (leading
axis = depth); unscanned models use `encoderblock_{i}`. `load_npz(path, target)` converts each
encoder to the layout of `target`, checks every name and shape, and casts to the target dtypes.
Files are read with `allow_pickle=False`.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping

import jax
import numpy as np
from flax.typing import VariableDict

from siglip_jax.models.patch_resize import resample_posemb as _resample_posemb

PREFIX = "params"
_BLOCK_RE = re.compile(r"^encoderblock_(\d+)$")
_MAX_LISTED = 5


class CheckpointMismatchError(ValueError):
    """A checkpoint's names or shapes do not match the model it is loaded into."""


def flatten(tree: Mapping[str, object], prefix: str = PREFIX) -> dict[str, object]:
    """Nested dict -> {"params/a/b": leaf} (prefix "" gives "a/b")."""
    out: dict[str, object] = {}

    def rec(node: object, path: str) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                rec(v, f"{path}/{k}" if path else str(k))
        else:
            out[path] = node

    rec(tree, prefix)
    return out


def unflatten(flat: Mapping[str, object]) -> dict[str, object]:
    """{"a/b": leaf} -> nested dict."""
    tree: dict[str, object] = {}
    for key, value in flat.items():
        *parents, leaf = key.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def _stack_blocks(enc: Mapping[str, object], where: str) -> dict[str, object]:
    """Encoder dict with encoderblock_{i} -> encoderblock (leading axis = depth)."""
    idx = sorted(int(m.group(1)) for k in enc if (m := _BLOCK_RE.match(k)))
    if idx != list(range(len(idx))):
        raise CheckpointMismatchError(f"{where}: encoder blocks are not 0..n-1: {idx}")
    out = {k: v for k, v in enc.items() if not _BLOCK_RE.match(k)}
    blocks = [enc[f"encoderblock_{i}"] for i in idx]
    out["encoderblock"] = jax.tree.map(lambda *xs: np.stack(xs), *blocks)
    return out


def _unstack_blocks(enc: Mapping[str, object]) -> dict[str, object]:
    """Encoder dict with encoderblock (stacked) -> encoderblock_{i}."""
    out = {k: v for k, v in enc.items() if k != "encoderblock"}
    depth = jax.tree.leaves(enc["encoderblock"])[0].shape[0]
    for i in range(depth):
        out[f"encoderblock_{i}"] = jax.tree.map(lambda x, i=i: x[i], enc["encoderblock"])
    return out


def _is_unscanned(d: Mapping[str, object]) -> bool:
    return any(_BLOCK_RE.match(k) for k in d)


def to_layout(tree: Mapping[str, object], scanned: bool) -> dict[str, object]:
    """Converts every encoder in `tree` to the scanned (stacked) or unscanned layout."""

    def rec(node: object, where: str) -> object:
        if not isinstance(node, Mapping):
            return node
        node = {k: rec(v, f"{where}/{k}") for k, v in node.items()}
        if scanned and _is_unscanned(node):
            return _stack_blocks(node, where)
        if not scanned and "encoderblock" in node:
            return _unstack_blocks(node)
        return node

    return rec(tree, "")


def match_layout(tree: Mapping[str, object], target: Mapping[str, object]) -> dict[str, object]:
    """Converts each encoder of `tree` to the layout the same encoder has in `target`."""

    def rec(node: object, tgt: object, where: str) -> object:
        if not isinstance(node, Mapping) or not isinstance(tgt, Mapping):
            return node
        if "encoderblock" in tgt and _is_unscanned(node):
            node = _stack_blocks(node, where)
        elif _is_unscanned(tgt) and "encoderblock" in node:
            node = _unstack_blocks(node)
        return {k: rec(v, tgt.get(k), f"{where}/{k}") for k, v in node.items()}

    return rec(tree, target, "")


def check_match(flat: Mapping[str, object], flat_target: Mapping[str, object], source: str) -> None:
    """Raises CheckpointMismatchError listing the first mismatching keys and both shapes."""
    problems = []
    for k in sorted(set(flat) | set(flat_target)):
        if k not in flat:
            problems.append(f"{k}: missing in file (model {tuple(flat_target[k].shape)})")
        elif k not in flat_target:
            problems.append(f"{k}: not in model (file {tuple(np.shape(flat[k]))})")
        elif tuple(np.shape(flat[k])) != tuple(flat_target[k].shape):
            problems.append(
                f"{k}: file {tuple(np.shape(flat[k]))} vs model {tuple(flat_target[k].shape)}"
            )
    if problems:
        shown = "; ".join(problems[:_MAX_LISTED])
        more = f" (+{len(problems) - _MAX_LISTED} more)" if len(problems) > _MAX_LISTED else ""
        raise CheckpointMismatchError(
            f"{source} does not match the model: {len(problems)} mismatching keys: {shown}{more}"
        )


def _maybe_resample_posemb(params: dict[str, object], target: Mapping[str, object]
                           ) -> dict[str, object]:
    img, timg = params.get("img"), target.get("img")
    if not isinstance(img, Mapping) or not isinstance(timg, Mapping):
        return params
    if "pos_embedding" in img and "pos_embedding" in timg:
        if np.shape(img["pos_embedding"])[0] != 1:  # NaFlex [G, G, D]: resized per image.
            return params
        new_len = timg["pos_embedding"].shape[1]
        params = {**params, "img": {**img}}
        params["img"]["pos_embedding"] = _resample_posemb(img["pos_embedding"], new_len)
    return params


def load_params(
    params: Mapping[str, object],
    target: VariableDict,
    *,
    source: str = "checkpoint",
    resample_posemb: bool = False,
) -> dict[str, object]:
    """Fits a nested numpy params tree to `target` (params or ShapeDtypeStruct tree).

    Converts encoder layouts to those of `target`, optionally resamples the image position
    embedding to the target grid, checks names and shapes, casts to the target dtypes.
    """
    target = jax.tree.map(lambda x: x, target)  # Plain nested dicts of leaves.
    params = match_layout(params, target)
    if resample_posemb:
        params = _maybe_resample_posemb(params, target)
    flat, flat_target = flatten(params, ""), flatten(target, "")
    check_match(flat, flat_target, source)
    return unflatten({k: np.asarray(flat[k]).astype(flat_target[k].dtype) for k in flat_target})


def read_npz(path: str | os.PathLike, prefix: str = PREFIX) -> dict[str, np.ndarray]:
    """Reads an .npz (allow_pickle=False) -> nested dict of the keys under `prefix/`."""
    try:
        with np.load(path, allow_pickle=False) as data:
            flat = {k: data[k] for k in data.files}
    except ValueError as e:  # Object arrays need pickle: we refuse them.
        raise ValueError(f"cannot read {path} without pickle (allow_pickle=False): {e}") from e
    if prefix:
        start = prefix + "/"
        selected = {k[len(start) :]: v for k, v in flat.items() if k.startswith(start)}
        if not selected:
            raise CheckpointMismatchError(
                f"{path} has no keys under {prefix!r}/; first keys: {sorted(flat)[:_MAX_LISTED]}"
            )
        flat = selected
    return unflatten(flat)


def load_npz(
    path: str | os.PathLike,
    target: VariableDict | None = None,
    *,
    prefix: str = PREFIX,
    resample_posemb: bool = False,
) -> dict[str, object]:
    """Loads a big_vision params .npz; with `target`, fitted and checked against it."""
    params = read_npz(path, prefix)
    if target is None:
        return params
    return load_params(params, target, source=str(path), resample_posemb=resample_posemb)


def save_npz(
    path: str | os.PathLike,
    params: Mapping[str, object],
    *,
    scanned: bool | None = None,
    prefix: str = PREFIX,
) -> None:
    """Writes params as a big_vision .npz ("params/..." keys), atomically.

    `scanned` True/False converts every encoder to that layout first; None keeps the layout.
    bfloat16 leaves are widened to float32 (exact; load casts back to the target dtype).
    """
    params = jax.device_get(params)
    if scanned is not None:
        params = to_layout(params, scanned)
    flat = {}
    for k, v in flatten(params, prefix).items():
        v = np.asarray(v)
        if v.dtype.kind == "V" or v.dtype.name == "bfloat16":
            v = v.astype(np.float32)
        flat[k] = v
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(suffix=".npz", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **flat)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
