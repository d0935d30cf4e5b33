"""Our own checkpoints: an orbax CheckpointManager saving the train state asynchronously.

Every process writes its shards to `<workdir>/checkpoints/<step>`; restoring takes an abstract
state (shapes, dtypes, shardings), so a checkpoint can be read back onto another mesh.
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp


class Checkpointer:
    """Saves every `every_n_steps` steps (and when forced), keeping the newest `keep`.

    `keep_every_n_steps` additionally keeps every checkpoint whose step is a multiple of it.
    """

    def __init__(self, workdir: str, every_n_steps: int, keep: int = 2,
                 keep_every_n_steps: int | None = None, use_async: bool = True):
        self.directory = os.path.join(workdir, "checkpoints")
        self.every_n_steps = every_n_steps
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, keep_period=keep_every_n_steps or None,
            enable_async_checkpointing=use_async, create=True)
        self.manager = ocp.CheckpointManager(os.path.abspath(self.directory)
                                             if "://" not in self.directory else self.directory,
                                             options=options)

    def latest_step(self) -> int | None:
        """The newest saved step, or None when there is no checkpoint yet."""
        return self.manager.latest_step()

    def restore(self, abstract_state: Any, step: int | None = None) -> Any:
        """Reads the checkpoint of `step` (default: latest) onto the given shardings."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        return self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))

    def is_due(self, step: int) -> bool:
        """Whether the schedule asks for a checkpoint at `step`."""
        return self.every_n_steps > 0 and step % self.every_n_steps == 0

    def maybe_save(self, step: int, state: Any, force: bool = False) -> bool:
        """Starts an async save when `step` is due (or forced); returns whether it saved."""
        if not (force or self.is_due(step)) or step in self.manager.all_steps():
            return False
        return bool(self.manager.save(step, args=ocp.args.StandardSave(state), force=True))

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self.manager.wait_until_finished()
        self.manager.close()
