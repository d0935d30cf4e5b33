"""Multi-process setup: when and how to call `jax.distributed.initialize`.

On a multi-host TPU slice JAX finds its peers by itself. Elsewhere (several CPU processes on one
machine, or GPUs) the coordinator address, process count and process id come from flags or the
environment variables SIGLIP_COORDINATOR, SIGLIP_NUM_PROCESSES and SIGLIP_PROCESS_ID.
"""

from __future__ import annotations

import dataclasses
import os


@dataclasses.dataclass(frozen=True)
class Cluster:
    """How this process joins the others; `coordinator=None` means single process or TPU auto."""

    coordinator: str | None = None
    num_processes: int = 1
    process_id: int = 0
    heartbeat_timeout_s: int = 100

    @property
    def explicit(self) -> bool:
        """True when the peers are given by address (not found automatically)."""
        return self.coordinator is not None


def from_flags(coordinator: str | None, num_processes: int | None, process_id: int | None,
               heartbeat_timeout_s: int | None = None) -> Cluster:
    """A Cluster from flags, falling back to the SIGLIP_* environment variables."""
    env = os.environ
    coordinator = coordinator or env.get("SIGLIP_COORDINATOR") or None
    num = num_processes if num_processes is not None else env.get("SIGLIP_NUM_PROCESSES")
    pid = process_id if process_id is not None else env.get("SIGLIP_PROCESS_ID")
    heartbeat = heartbeat_timeout_s or int(env.get("SIGLIP_HEARTBEAT_TIMEOUT", 100))
    if coordinator is None:
        if num not in (None, 1, "1") or pid not in (None, 0, "0"):
            raise ValueError("--num_processes/--process_id need --coordinator HOST:PORT "
                             "(or SIGLIP_COORDINATOR)")
        return Cluster(heartbeat_timeout_s=heartbeat)
    if num is None or pid is None:
        raise ValueError("--coordinator needs --num_processes and --process_id "
                         "(or SIGLIP_NUM_PROCESSES and SIGLIP_PROCESS_ID)")
    num, pid = int(num), int(pid)
    if not 0 <= pid < num:
        raise ValueError(f"--process_id {pid} must be in [0, {num})")
    return Cluster(coordinator, num, pid, heartbeat)


def on_multihost_tpu() -> bool:
    """True on a TPU VM that is one of several hosts of a slice."""
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return len([h for h in hosts.split(",") if h.strip()]) > 1


def initialize(cluster: Cluster) -> None:
    """Joins the other processes (no-op for a single process)."""
    import jax

    if cluster.explicit and cluster.num_processes > 1:
        jax.distributed.initialize(
            coordinator_address=cluster.coordinator, num_processes=cluster.num_processes,
            process_id=cluster.process_id, heartbeat_timeout_seconds=cluster.heartbeat_timeout_s,
            initialization_timeout=max(60, cluster.heartbeat_timeout_s))
    elif not cluster.explicit and on_multihost_tpu():
        jax.distributed.initialize(heartbeat_timeout_seconds=cluster.heartbeat_timeout_s)
