"""Load model params from any checkpoint we know, detecting the format from the path.

Formats (`detect_format`):
  "orbax"  our trainer's checkpoints: a workdir (`<workdir>/checkpoints/<step>/default`, the
           newest step is used, `<workdir>/config.json` holds the run's config), a step
           directory `<workdir>/checkpoints/<step>`, or its `default` item directory. Only the
           "params" of the saved train state {"params", "opt_state", "step"} are read.
  "npz"    a big_vision params `.npz` ("params/..." keys, scanned or unscanned blocks).
  "hf"     a Hugging Face SigLIP directory (config.json + model.safetensors or its index).

`load_params(path, model_config=None, target=None)` returns numpy params and the model config
(two_towers.Model kwargs) that came with the checkpoint: the run's `model` section for ours,
the translated config.json for HF; a .npz carries none, so `model_config` is returned as given.
With `target` (params or ShapeDtypeStructs of the model to load into) the params are converted
to its block layout, checked name by name and shape by shape (CheckpointMismatchError, one
line) and cast to its dtypes. `checkpoint_info` also gives the image size, text length and
tokenizer file a checkpoint implies, where it knows them.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from types import ModuleType

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax.typing import VariableDict

from siglip_jax.checkpoints import big_vision as bv
from siglip_jax.checkpoints import hf

FORMATS = ("orbax", "npz", "hf")
CheckpointMismatchError = bv.CheckpointMismatchError
_STEP_RE = re.compile(r"^\d+$")


class CheckpointNotFoundError(FileNotFoundError):
    """The checkpoint path does not exist or holds no checkpoint."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class CheckpointFormatError(ValueError):
    """The path exists but is not a checkpoint format we can read."""


def _gfile(path: str) -> ModuleType | None:
    """tf.io.gfile for remote (`scheme://`) paths, None for local ones (plain os is faster)."""
    if "://" not in path:
        return None
    import tensorflow as tf  # Deliberately late: only remote paths need TensorFlow.

    return tf.io.gfile


def _exists(path: str) -> bool:
    fs = _gfile(path)
    return fs.exists(path) if fs else os.path.exists(path)


def _isdir(path: str) -> bool:
    fs = _gfile(path)
    return fs.isdir(path) if fs else os.path.isdir(path)


def _listdir(path: str) -> list[str]:
    fs = _gfile(path)
    return [d.rstrip("/") for d in fs.listdir(path)] if fs else os.listdir(path)


def saved_steps(workdir: str | os.PathLike) -> list[int]:
    """The steps saved in one of our workdirs (`checkpoints/<step>/default`), ascending."""
    checkpoints_dir = os.path.join(os.fspath(workdir), "checkpoints")
    if not _isdir(checkpoints_dir):
        return []
    return sorted(int(d) for d in _listdir(checkpoints_dir)
                  if _STEP_RE.match(d) and _isdir(os.path.join(checkpoints_dir, d, "default")))


def _latest_step_dir(checkpoints_dir: str) -> str | None:
    steps = saved_steps(os.path.dirname(checkpoints_dir.rstrip("/")))
    return os.path.join(checkpoints_dir, str(steps[-1])) if steps else None


def _orbax_item_dir(path: str) -> tuple[str | None, str | None]:
    """(…/<step>/default item dir, the run's workdir) if `path` is one of our checkpoints."""
    if _isdir(os.path.join(path, "checkpoints")):  # A workdir.
        step = _latest_step_dir(os.path.join(path, "checkpoints"))
        if step is None:
            raise CheckpointNotFoundError(f"checkpoint {path!r}: the workdir has no saved step "
                                          "in checkpoints/ yet")
        return os.path.join(step, "default"), path
    if os.path.basename(path) == "default" and _exists(os.path.join(path, "_METADATA")):
        step = os.path.dirname(path)
        return path, os.path.dirname(os.path.dirname(step))
    if _exists(os.path.join(path, "default", "_METADATA")):  # A step dir.
        return os.path.join(path, "default"), os.path.dirname(os.path.dirname(path))
    return None, None


def detect_format(path: str | os.PathLike) -> str:
    """"orbax", "npz" or "hf" for a checkpoint path; raises a one-line error otherwise."""
    path = os.fspath(path)
    if not _exists(path):
        raise CheckpointNotFoundError(f"checkpoint {path!r} does not exist")
    if not _isdir(path):
        if path.endswith(".npz"):
            return "npz"
        raise CheckpointFormatError(f"checkpoint {path!r}: a file that is not a .npz; expected "
                                    "a big_vision .npz, a HF SigLIP directory or our workdir")
    if _orbax_item_dir(path)[0] is not None:
        return "orbax"
    if _exists(os.path.join(path, hf.CONFIG_FILE)) and (
            _exists(os.path.join(path, hf.WEIGHTS_FILE))
            or _exists(os.path.join(path, hf.INDEX_FILE))):
        return "hf"
    raise CheckpointFormatError(
        f"checkpoint {path!r}: not a workdir or step directory of ours (checkpoints/<step>/"
        "default), nor a HF SigLIP directory (config.json + model.safetensors)")


def _read_json(path: str) -> dict[str, object] | None:
    if not _exists(path):
        return None
    fs = _gfile(path)
    with fs.GFile(path) if fs else open(path) as f:
        return json.load(f)


def _orbax_entry(item_dir: str, key: str = "params", required: bool = True
                 ) -> dict[str, object] | None:
    """One top-level entry of a saved train state as numpy (None if absent and not required)."""
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(item_dir).item_metadata.tree
    if key not in tree:
        if not required:
            return None
        raise CheckpointFormatError(f"checkpoint {item_dir!r} has no {key!r} (keys: "
                                    f"{sorted(tree)})")
    item = {key: tree[key]}
    restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                          item)
    restored = checkpointer.restore(item_dir, args=ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, partial_restore=True))
    return jax.tree_util.tree_map(np.asarray, dict(restored[key]))


def _orbax_params(item_dir: str) -> dict[str, object]:
    return _orbax_entry(item_dir, "params")


def load_state_entry(path: str | os.PathLike, key: str) -> dict[str, object] | None:
    """numpy tree of one entry of our run's saved train state (e.g. "teacher", the EMA
    teacher of the self-supervised objectives), None if the state has no such entry.

    `path` is our workdir (newest step) or a step directory; a .npz or HF directory (which
    hold params only) raises CheckpointFormatError.
    """
    path = os.fspath(path)
    fmt = detect_format(path)
    if fmt != "orbax":
        raise CheckpointFormatError(f"checkpoint {path!r} is a {fmt} checkpoint: it holds "
                                    f"params only, no train state entry {key!r}")
    return _orbax_entry(_orbax_item_dir(path)[0], key, required=False)


def checkpoint_info(path: str | os.PathLike) -> dict[str, object]:
    """What a checkpoint says about itself without reading weights: format, model config,
    image_size (h, w), max_num_patches (NaFlex patch budget), text_len, tokenizer (file path),
    run config and workdir where known (else None). HF SigLIP 2 NaFlex (Siglip2Model)
    directories give image_size None and max_num_patches; their sentencepiece file is
    `tokenizer.model`.
    """
    path = os.fspath(path)
    fmt = detect_format(path)
    info: dict[str, object] = {"format": fmt, "model": None, "image_size": None, "text_len": None,
                            "max_num_patches": None, "tokenizer": None, "run_config": None,
                            "workdir": None}
    if fmt == "hf":
        spec = hf.model_config_from_hf(path)
        size = spec["image_size"]
        info.update(model=spec["model"], image_size=None if size is None else tuple(size),
                    max_num_patches=spec["max_num_patches"], text_len=int(spec["text_len"]))
        for name in ("spiece.model", "tokenizer.model"):  # SigLIP, SigLIP 2 (Gemma).
            if _exists(os.path.join(path, name)):
                info["tokenizer"] = os.path.join(path, name)
                break
    elif fmt == "orbax":
        workdir = _orbax_item_dir(path)[1]
        info["workdir"] = workdir
        run = _read_json(os.path.join(workdir, "config.json")) if workdir else None
        if run is not None:
            info["run_config"] = run
            info["model"] = run.get("model")
            tok = run.get("tokenizer") or {}
            info["text_len"] = tok.get("max_len")
            info["tokenizer"] = tok.get("model") or None
    return info


def load_params(path: str | os.PathLike, model_config: Mapping[str, object] | None = None, *,
                target: VariableDict | None = None, resample_posemb: bool = False
                ) -> tuple[dict[str, object], dict[str, object] | None]:
    """(numpy params, model config) from an orbax workdir/step dir, a .npz or a HF directory.

    The model config is the checkpoint's own when it has one, else `model_config`. With
    `target`, params are fitted to it (block layout, names, shapes, dtypes) or a one-line
    CheckpointMismatchError names the first mismatching keys.
    """
    path = os.fspath(path)
    info = checkpoint_info(path)
    fmt = info["format"]
    if fmt == "npz":
        params = bv.read_npz(path)
    elif fmt == "hf":
        params, _ = hf.load_hf(path)
    else:
        params = _orbax_params(_orbax_item_dir(path)[0])
    config = info["model"] if info["model"] is not None else (
        dict(model_config) if model_config is not None else None)
    if target is not None:
        params = bv.load_params(params, target, source=path, resample_posemb=resample_posemb)
    return params, config
