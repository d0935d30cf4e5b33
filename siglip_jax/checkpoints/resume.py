"""Continue another run's train state in a new run whose image tower changed shape.

SigLIP 2 (arXiv:2502.14786 §2.4) makes its resolution variants by resuming a run near its end
at the target resolution (and patch size), and its NaFlex variants by resuming the 90 %
checkpoint with a NaFlex tower. `restore_resized(path, abstract_state, mesh)` reads a saved
train state of ours (a workdir: its newest step, or a step directory) into this run's state:

  * every leaf of this run's state is taken from the leaf of the same name in the checkpoint
    (names only: a namedtuple field and a dict key of the same name match), restored straight
    into its sharding; the step counter comes along, so the schedule continues;
  * `img/embedding/kernel` (params and EMA teacher) of another patch size is resized by
    pseudo-inverse (models/patch_resize.py, FlexiViT), conv [p, p, 3, D] or NaFlex
    [p·p·3, D] either way; `img/pos_embedding` of another grid or layout ([1, N, D] FixRes,
    [G, G, D] NaFlex) is resized bilinearly;
  * the optimizer state of a resized parameter (Adam's moments) starts again at zero: its old
    moments are statistics of gradients in the old parameterisation. A parameter that only
    changes layout (same patch, same grid: FixRes -> NaFlex) is reshaped, moments included.
    Everything else (all other moments, Adam's count, the schedule's count) continues;
  * leaves of the checkpoint that this run lacks (an objective switched off: its heads, their
    moments, the EMA teacher) are not read; a leaf this run has and the checkpoint lacks, or
    any other change of shape, is a ResumeError naming it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import Mesh

from siglip_jax.checkpoints.loader import saved_steps
from siglip_jax.models.patch_resize import pi_resize_kernel, posemb_to_grid
from siglip_jax.sharding import path_names, replicated

Names = tuple[str, ...]
KERNEL = ("img", "embedding", "kernel")
POSEMB = ("img", "pos_embedding")


class ResumeError(ValueError):
    """The checkpoint cannot be continued in this run (a missing leaf, a shape we cannot map)."""


def item_dir(path: str) -> str:
    """The orbax item directory (`…/checkpoints/<step>/default`) of a workdir (newest step) or
    a step directory; ResumeError if neither."""
    path = os.fspath(path).rstrip("/")
    steps = saved_steps(path)
    if steps:
        return os.path.join(path, "checkpoints", str(steps[-1]), "default")
    for candidate in (os.path.join(path, "default"), path):
        if (epath.Path(candidate) / "_METADATA").exists():
            return candidate
    raise ResumeError(f"model_init.resume={path!r}: not a workdir with saved steps nor a step "
                      "directory (<workdir>/checkpoints/<step>) of ours")


def _resize_kernel(old: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Conv [p, p, 3, D] or flat [p·p·3, D] kernel → `shape` (either layout), by PI."""
    d = old.shape[-1]
    conv = old if old.ndim == 4 else old.reshape(*(2 * [int(round(np.sqrt(old.shape[0] / 3)))]),
                                                 3, d)
    if len(shape) == 4:
        return pi_resize_kernel(conv, shape[:2])
    patch = int(round(np.sqrt(shape[0] / 3)))
    return pi_resize_kernel(conv, (patch, patch)).reshape(shape)


def _resizer(names: Names) -> Callable[[np.ndarray, tuple[int, ...]], np.ndarray] | None:
    """How a parameter (of params or teacher) of another shape is fitted, None if it cannot."""
    if names[0] not in ("params", "teacher"):
        return None
    if names[-3:] == KERNEL:
        return _resize_kernel
    if names[-2:] == POSEMB:
        return posemb_to_grid
    return None


def local_value(array: jax.Array) -> np.ndarray:
    """A replicated array's value on this host."""
    return np.asarray(array.addressable_data(0))


def restore_resized(path: str, abstract_state: Mapping[str, optax.Params], mesh: Mesh
                    ) -> tuple[dict[str, optax.Params], list[str]]:
    """(this run's state from the checkpoint at `path`, notes on what was resized, restarted
    or left out). `abstract_state` carries the target shapes, dtypes and shardings."""
    directory = item_dir(path)
    saved_tree = ocp.StandardCheckpointHandler().metadata(epath.Path(directory)).tree
    saved = {path_names(p): leaf for p, leaf in
             jax.tree_util.tree_leaves_with_path(saved_tree, is_leaf=lambda x: x is None)
             if leaf is not None}
    wanted = {path_names(p): leaf
              for p, leaf in jax.tree_util.tree_leaves_with_path(abstract_state)}
    missing = sorted(set(wanted) - set(saved))
    if missing:
        raise ResumeError(f"model_init.resume={path!r}: the checkpoint has no "
                          f"{'/'.join(missing[0])} ({len(missing)} leaves of this run missing: "
                          "another model, optimizer or objective?)")
    resized = {n for n in wanted if tuple(saved[n].shape) != tuple(wanted[n].shape)}
    resized_params = {n[1:] for n in resized if _resizer(n)}
    for n in sorted(resized):
        if not _resizer(n) and not any(n[-len(p):] == p for p in resized_params):
            raise ResumeError(f"model_init.resume={path!r}: {'/'.join(n)} has shape "
                              f"{tuple(saved[n].shape)} in the checkpoint, "
                              f"{tuple(wanted[n].shape)} in this run, and is not a patch "
                              "kernel, a position embedding or their optimizer state")

    def target(names: Names, leaf: object) -> object:
        want = wanted.get(names)
        if leaf is None:
            return None  # An empty optimizer state, as saved.
        if want is None:
            return _DROP  # Not read (partial restore).
        sharding = want.sharding if names not in resized else replicated(mesh)
        return jax.ShapeDtypeStruct(tuple(leaf.shape), want.dtype, sharding=sharding)

    item = _prune(jax.tree_util.tree_map_with_path(
        lambda p, leaf: target(path_names(p), leaf), saved_tree,
        is_leaf=lambda x: x is None or hasattr(x, "shape")))
    restored = ocp.PyTreeCheckpointer().restore(directory, args=ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True))
    values = {path_names(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(restored)}
    notes = [f"resized {'/'.join(n)} {tuple(saved[n].shape)} -> {tuple(wanted[n].shape)}"
             for n in sorted(resized) if _resizer(n)]
    restarted = sorted(n for n in resized if not _resizer(n)
                       and int(np.prod(saved[n].shape)) != int(np.prod(wanted[n].shape)))
    if restarted:
        notes.append(f"optimizer state restarted at zero for {len(restarted)} leaves of the "
                     "resized parameters")
    dropped = sorted({n[:2] if n[0] != "opt_state" else n[-2:] for n in set(saved) - set(wanted)})
    if dropped:
        notes.append("not continued (absent from this run): "
                     + ", ".join("/".join(n) for n in dropped[:6])
                     + (f" (+{len(dropped) - 6} more)" if len(dropped) > 6 else ""))

    def fit(p: tuple[object, ...], want: jax.ShapeDtypeStruct) -> jax.Array:
        names = path_names(p)
        if names not in resized:
            return values[names]
        fn = _resizer(names)
        shape = tuple(want.shape)
        old = local_value(values[names])
        if old.size == int(np.prod(shape)):  # Same patch and grid, another layout: reshape.
            new = old.reshape(shape)
        else:
            new = fn(old.astype(np.float32), shape) if fn else np.zeros(shape, np.float32)
        return jax.device_put(np.asarray(new).astype(want.dtype), want.sharding)

    return jax.tree_util.tree_map_with_path(fit, abstract_state), notes


_DROP = object()  # A saved leaf this run does not read.


def _prune(tree: object) -> object:
    """Drops the dict entries whose leaves are all _DROP (what is not read); the rest of the
    saved structure (None: an empty optimizer state) stays as saved."""
    if isinstance(tree, Mapping):
        out = {k: _prune(v) for k, v in tree.items()}
        return {k: v for k, v in out.items() if v is not _DROP}
    if isinstance(tree, (list, tuple)):
        out = [_prune(v) for v in tree]
        if any(v is _DROP for v in out):
            raise ResumeError("model_init.resume: a sequence in the saved optimizer state "
                              "holds leaves this run lacks (another optimizer chain?)")
        return type(tree)(out)
    return tree
