"""Our own checkpoints: an orbax CheckpointManager saving the train state asynchronously.

Every process writes its shards to `<workdir>/checkpoints/<step>`; restoring takes an abstract
state (shapes, dtypes, shardings), so a checkpoint can be read back onto another mesh.

Resuming (`restore_latest`) tells two failures apart. A DAMAGED step (a data file or
`_METADATA` truncated, overwritten or deleted: orbax then raises ValueError from tensorstore,
JSONDecodeError, UnicodeDecodeError or FileNotFoundError) is logged in one line, moved to
`<workdir>/checkpoints_damaged/<step>` (outside orbax's step scan, kept for inspection) and the
previous step is tried. A step whose STRUCTURE differs from the run's state (saved with another
optimizer or model) is not damage: it raises CheckpointStructureError naming the subtree.
With several processes every decision is taken jointly (a step is good only if every process
read it), and process 0 moves the directory.

Integrity (checkpoints/manifest.py): once orbax has finalised a step (every process's part
written and committed), process 0 writes `<step>/integrity_manifest.json` (each file's size,
small files' crc32). That happens at the first `poll()` after the async save ends (the trainer
polls every step), or at the next save or `close()`, which wait for it. Before restoring, a
step with a manifest is checked against it: a missing file or one of another size or checksum
is damage naming that file (the fallback above). A committed step WITHOUT a manifest (saved
before manifests existed, or the run was killed between orbax's commit and the manifest) is
restored with orbax's own checks only, after a one-line note: orbax lists only committed
steps, and refusing them would lose a checkpoint interval at every kill.

Replicated arrays: orbax's replica-parallel save splits an array that several devices hold
alike into one part per replica, so that every host writes a share. Each part is a device slice
dispatched from Python, which costs more than writing a small part (benchmarks/
checkpoint_save.py): the save splits an array only when each replica's part has at least
`min_replica_slice_bytes` (`checkpoint.min_replica_slice_bytes`, 64 KiB by default); smaller
arrays (biases, norms, a tiny model's every array) are written whole by one replica. The
checkpoint is the same either way (the parts make up one stored array).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

# orbax's default jax.Array handler keeps a per-host record of each array's write shape and
# PRNG-key type in this store; the class is not re-exported, so it comes from its module.
from orbax.checkpoint._src.metadata import array_metadata_store

from siglip_jax import fsutil
from siglip_jax.checkpoints import manifest
from siglip_jax.sharding import path_names

DAMAGED_DIR = "checkpoints_damaged"
MIN_REPLICA_SLICE_BYTES = 64 * 1024  # See the module doc (replicated arrays).
# The leaf types of a train state besides jax.Array, with orbax's default handlers.
_OTHER_LEAF_TYPES = (int, float, bytes, np.number, np.ndarray, str)


def _handlers(min_replica_slice_bytes: int) -> ocp.handlers.CheckpointHandlerRegistry:
    """The manager's one item handler: orbax's pytree handler, its jax.Array handler splitting
    replicated arrays only into parts of at least `min_replica_slice_bytes` (module doc).
    A handler of its own, not orbax's global type registry, which every user of orbax in the
    process shares."""
    types = ocp.type_handlers
    arrays = types.ArrayHandler(array_metadata_store=array_metadata_store.Store(),
                                min_slice_bytes_for_replica_parallel=min_replica_slice_bytes)
    leaves = types.create_type_handler_registry(
        (jax.Array, arrays), *((t, types.get_type_handler(t)) for t in _OTHER_LEAF_TYPES))
    handler = ocp.PyTreeCheckpointHandler(type_handler_registry=leaves)
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    registry.add(None, ocp.args.PyTreeSave, handler)
    registry.add(None, ocp.args.PyTreeRestore, handler)
    return registry


class CheckpointStructureError(ValueError):
    """The checkpoint's state tree or shapes differ from the run's (another optimizer/model)."""


class CheckpointDamagedError(OSError):
    """No checkpoint step in the directory could be read."""


class Checkpointer:
    """Saves every `every_n_steps` steps (and when forced), keeping the newest `keep`.

    `keep_every_n_steps` additionally keeps every checkpoint whose step is a multiple of it.
    """

    def __init__(self, workdir: str, every_n_steps: int, keep: int = 2,
                 keep_every_n_steps: int | None = None, use_async: bool = True,
                 min_replica_slice_bytes: int = MIN_REPLICA_SLICE_BYTES):
        self.directory = os.path.join(workdir, "checkpoints")
        self.every_n_steps = every_n_steps
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, keep_period=keep_every_n_steps or None,
            enable_async_checkpointing=use_async, create=True)
        self.manager = ocp.CheckpointManager(os.path.abspath(self.directory)
                                             if "://" not in self.directory else self.directory,
                                             options=options,
                                             handler_registry=_handlers(min_replica_slice_bytes))
        self._unverified: int | None = None  # A step saved whose manifest is not written yet.

    def latest_step(self) -> int | None:
        """The newest saved step, or None when there is no checkpoint yet."""
        return self.manager.latest_step()

    def restore(self, abstract_state: object, step: int | None = None) -> object:
        """Reads the checkpoint of `step` (default: latest) onto the given shardings."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        return self.manager.restore(step, args=ocp.args.PyTreeRestore(
            abstract_state, restore_args=ocp.checkpoint_utils.construct_restore_args(
                abstract_state)))

    def restore_latest(self, abstract_state: object, log: Callable[[str], None] = print
                       ) -> tuple[int, object] | None:
        """(step, state) of the newest readable step, or None if there is no checkpoint.

        Damaged steps are logged, moved to `<workdir>/checkpoints_damaged/<step>` and skipped;
        raises CheckpointStructureError on a structure mismatch and CheckpointDamagedError if
        checkpoints exist but none is readable.
        """
        tried = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            state, problem = self._try_restore(abstract_state, step)
            code = 2 if isinstance(problem, CheckpointStructureError) else int(bool(problem))
            worst = _max_over_processes(code)
            if worst == 2:
                raise problem if code == 2 else CheckpointStructureError(
                    f"checkpoint {self.directory}/{step} does not fit this run on another "
                    "process; start fresh in a new --workdir")
            if worst:
                problem = problem or "another process could not read it"
                where = self._move_aside(step)
                log(f"checkpoint step {step} is damaged ({_one_line(problem)}); moved it to "
                    f"{where} and trying the previous step")
                tried.append(step)
                continue
            note = unverified_note(self._step_dir(step))
            if note:
                log(f"checkpoint step {step} {note}")
            return step, state
        if tried:
            raise CheckpointDamagedError(
                f"no readable checkpoint in {self.directory}: steps {tried} are damaged (moved "
                f"to {self._damaged_root()}); delete the workdir or point --workdir elsewhere "
                "to start fresh")
        return None

    def _try_restore(self, abstract_state: object, step: int) -> tuple[object, object]:
        """(state, None) or (None, the problem: a message or a CheckpointStructureError)."""
        step_dir = self._step_dir(step)
        try:
            damage = manifest.check(step_dir) if manifest.has_manifest(step_dir) else None
        except Exception as e:  # noqa: BLE001 - an unlistable step is damage.
            damage = f"cannot list its files: {type(e).__name__}: {e}"
        if damage:
            return None, damage
        try:
            metadata = self._tree_metadata(step)
        except Exception as e:  # noqa: BLE001 - any unreadable metadata is damage.
            return None, f"unreadable metadata: {type(e).__name__}: {e}"
        mismatch = structure_mismatch(metadata, abstract_state)
        if mismatch:
            return None, CheckpointStructureError(
                f"checkpoint {self.directory}/{step} does not fit this run: {mismatch} (saved "
                "with another optimizer or model?); resume with the config it was saved with, "
                "or start fresh in a new --workdir")
        try:
            return self.restore(abstract_state, step), None
        except Exception as e:  # noqa: BLE001 - the structure matched, so this is damage.
            return None, f"{type(e).__name__}: {e}"

    def _step_dir(self, step: int) -> str:
        return fsutil.join(str(self.manager.directory), str(step))

    def _tree_metadata(self, step: int) -> object:
        path = epath.Path(self.manager.directory) / str(step) / "default"
        return ocp.StandardCheckpointHandler().metadata(path).tree

    def _damaged_root(self) -> str:
        return fsutil.join(os.path.dirname(self.directory.rstrip("/")), DAMAGED_DIR)

    def _move_aside(self, step: int) -> str:
        """Moves step dir to checkpoints_damaged/<step>[.n] (process 0) and rescans; the target.

        On an object store (`gs://`, no directory rename) the step is copied whole, then
        deleted (fsutil.move_tree): a crash in between leaves the damaged step in place (found
        and moved again at the next start) and a full or partial copy beside it, never a
        restore from damaged data.
        """
        root = self._damaged_root()
        target = fsutil.join(root, str(step))
        if jax.process_index() == 0:
            n = 0
            while fsutil.exists(target):
                n += 1
                target = fsutil.join(root, f"{step}.{n}")
            fsutil.move_tree(fsutil.join(str(self.manager.directory), str(step)), target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"checkpoint_move_aside_{step}")
        self.manager.reload()
        return target

    def is_due(self, step: int) -> bool:
        """Whether the schedule asks for a checkpoint at `step`."""
        return self.every_n_steps > 0 and step % self.every_n_steps == 0

    def maybe_save(self, step: int, state: object, force: bool = False) -> bool:
        """Starts an async save when `step` is due (or forced); returns whether it saved."""
        if not (force or self.is_due(step)) or step in self.manager.all_steps():
            return False
        self._write_manifest(wait=True)
        saved = bool(self.manager.save(step, args=ocp.args.PyTreeSave(state), force=True))
        if saved:
            self._unverified = step
        return saved

    def poll(self) -> None:
        """Writes the manifest of the last save if orbax has finalised it (never waits)."""
        self._write_manifest(wait=False)

    def _write_manifest(self, wait: bool) -> None:
        """Process 0 writes the manifest of the last saved step once orbax has committed it.

        Orbax commits a step only after every process's part is written (a barrier inside its
        finalisation), so what process 0 lists then is the whole step.
        """
        step = self._unverified
        if step is None:
            return
        if wait:
            self.manager.wait_until_finished()
        elif self.manager.is_saving_in_progress():
            return
        self._unverified = None
        if jax.process_index() != 0 or step not in self.manager.all_steps():
            return
        try:
            manifest.write(self._step_dir(step))
        except Exception as e:  # noqa: BLE001 - a failed manifest must not end the run.
            print(f"warning: could not write the integrity manifest of checkpoint step {step} "
                  f"({_one_line(e, 120)}); it will be restored with orbax's own checks only",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        """Waits for pending saves, writes their manifest and releases the manager, even if the
        wait fails."""
        try:
            self._write_manifest(wait=True)
            self.manager.wait_until_finished()
        finally:
            self.manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            self.close()
            return
        try:  # Already failing: finish what was started, but do not mask the first error.
            self.close()
        except Exception:  # noqa: BLE001, S110
            pass


def _subtree(names: tuple[str, ...], depth: int = 2) -> str:
    return "/".join(names[:depth]) + ("/..." if len(names) > depth else "")


def structure_mismatch(metadata_tree: object, abstract_state: object) -> str | None:
    """Where a saved tree (orbax metadata) differs from `abstract_state`; None if they fit.

    Compares leaf paths (names only: a namedtuple field and a dict key of the same name match)
    and shapes. The answer names the first differing subtree, e.g. `opt_state/0/...`.
    """
    saved = {path_names(p): leaf for p, leaf in
             jax.tree_util.tree_leaves_with_path(metadata_tree, is_leaf=lambda x: x is None)
             if leaf is not None}
    wanted = {path_names(p): leaf for p, leaf in
              jax.tree_util.tree_leaves_with_path(abstract_state)}
    only_saved = sorted(set(saved) - set(wanted))
    only_wanted = sorted(set(wanted) - set(saved))
    if only_saved or only_wanted:
        parts = []
        if only_wanted:
            parts.append(f"the run has {_subtree(only_wanted[0])} that the checkpoint lacks")
        if only_saved:
            parts.append(f"the checkpoint has {_subtree(only_saved[0])} that the run lacks")
        return "; ".join(parts) + f" ({len(only_saved) + len(only_wanted)} leaves differ)"
    for names in sorted(wanted, key=lambda n: (n[0] != "params", n)):  # Params first.
        have = getattr(saved[names], "shape", None)
        want = tuple(getattr(wanted[names], "shape", ()))
        if have is not None and tuple(have) != want:
            return f"{'/'.join(names)} has shape {tuple(have)} in the checkpoint, {want} in the run"
    return None


def unverified_note(step_dir: str) -> str | None:
    """The note for a committed step without an integrity manifest, None if it has one."""
    if manifest.has_manifest(step_dir):
        return None
    return ("has no integrity manifest (saved before manifests existed, or stopped between "
            "orbax's commit and the manifest): restored with orbax's own checks only")


def _one_line(problem: object, limit: int = 160) -> str:
    text = re.sub(r"\s+", " ", str(problem)).strip()
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _max_over_processes(code: int) -> int:
    """The largest `code` over all processes (every process gets the same answer)."""
    if jax.process_count() == 1:
        return code
    return int(np.max(multihost_utils.process_allgather(np.array([code], np.int32))))
