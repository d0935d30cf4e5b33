"""Multi-process setup: when and how to call `jax.distributed.initialize`.

On a multi-host TPU slice JAX finds its peers by itself. Elsewhere (several CPU processes on one
machine, or GPUs) the coordinator address, process count and process id come from flags or the
environment variables SIGLIP_COORDINATOR, SIGLIP_NUM_PROCESSES and SIGLIP_PROCESS_ID.

A lost peer: JAX's coordination service notices a process whose heartbeat stops only after
`heartbeat_timeout_s`, then aborts every other process with a C++ stack dump. So that a
survivor says what happened in one line first, each process of an explicit cluster runs a
watchdog thread (`watch_peers`) that posts a beat counter to the service's key-value store
every second and reads the others'; a peer whose counter stops for 0.3 of the heartbeat
timeout (at least 3 s), or a coordinator that stops answering, ends this process with one
`error:` line naming the process and exit code 1. A process leaving normally marks itself
done first. Why 0.3: in a rehearsal the service aborted a survivor less than 3/4 of the
timeout after a kill (it counts from the dead process's last heartbeat, which may be well
before the kill), so the watchdog must speak early; its thread beats whatever the main thread
does (compiling, waiting in a collective), so a slow step is not taken for a death.

Silence is counted only while the watchdog itself runs on time (`PeerSilence`): a poll that
comes late (this process, or the whole machine, was frozen: an overloaded CI host, a paused
VM) adds at most 1.5 polling intervals, since the peers were most likely frozen too and beat
again at once. Counting wall time instead, in a run frozen for longer than the window the
process that woke first could take the others for dead (seen in CI; reproduced by stopping
both processes of a cluster with SIGSTOP).

A peer that dies inside a collective can also make gloo raise in the main thread ("Connection
closed by peer") before the watchdog has seen the silence; the trainer then waits for the
watchdog's verdict (`PeerWatchdog.explain_collective_failure`), so the line still names the
dead process. (Gloo may instead abort the survivor in C++ at once, exit 134, before any Python
runs; the launcher then names the dead process.)
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import sys
import threading
import time
from collections.abc import Callable


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


def initialize(cluster: Cluster) -> PeerWatchdog | None:
    """Joins the other processes (no-op for a single process); returns the peer watchdog of an
    explicit cluster (None otherwise)."""
    import jax

    if cluster.explicit and cluster.num_processes > 1:
        jax.distributed.initialize(
            coordinator_address=cluster.coordinator, num_processes=cluster.num_processes,
            process_id=cluster.process_id, heartbeat_timeout_seconds=cluster.heartbeat_timeout_s,
            initialization_timeout=max(60, cluster.heartbeat_timeout_s))
        return watch_peers(cluster)
    if not cluster.explicit and on_multihost_tpu():
        jax.distributed.initialize(heartbeat_timeout_seconds=cluster.heartbeat_timeout_s)
    return None


_KEY = "siglip_jax/alive"
_DONE = "done"
# Words of a collective's error when a peer's connection went away (gloo over TCP).
LOST_PEER_SIGNS = ("gloo", "connection closed", "connection reset", "broken pipe")


def lost_peer_message(cluster: Cluster, peer: int | None, silent_s: float) -> str:
    """The one line a survivor prints; `peer=None` means the coordinator stopped answering."""
    rerun = ("rerun the same command to resume every process from the last complete "
             "checkpoint")
    if peer is None:
        return (f"error: process {cluster.process_id} lost the coordinator (process 0 at "
                f"{cluster.coordinator}), which stopped answering; {rerun}")
    return (f"error: process {peer} of {cluster.num_processes} stopped (no sign of life for "
            f"{silent_s:.0f} s); process {cluster.process_id} stops too; {rerun}")


@dataclasses.dataclass
class PeerWatchdog:
    """Handle on a running watchdog thread (`watch_peers`)."""

    cluster: Cluster
    stop: threading.Event
    stale_s: float
    interval_s: float
    reported: threading.Event = dataclasses.field(default_factory=threading.Event)
    line: str = ""  # What the watchdog reported, once it has.

    def explain_collective_failure(self, error: BaseException) -> str | None:
        """The one line for an error the main thread got from a collective (gloo raises when a
        peer's connection closes). Waits until the watchdog could have named a dead peer; if
        it did, its line is the answer (by default the watchdog has ended the process with it
        already). Else a line quoting the error if it reads like a lost connection, or None
        (not a lost peer: the caller lets the error through as it is)."""
        if self.reported.wait(self.stale_s + 3 * self.interval_s):
            return self.line
        text = str(error).strip()
        if not any(sign in text.lower() for sign in LOST_PEER_SIGNS):
            return None
        first_line = text.splitlines()[0]
        return (f"error: process {self.cluster.process_id} of {self.cluster.num_processes}: a "
                f"collective with the other processes failed ({first_line}); a peer has "
                "probably stopped; rerun the same command to resume every process from the "
                "last complete checkpoint")


class PeerSilence:
    """How long each peer has been silent, counted only while this process watched on time.

    `observe(now, beats)` takes one poll: the time and each peer's last posted beat (missing:
    not posted yet; `"done"`: left normally, never silent). A peer whose beat changed starts
    over at zero; otherwise it gains the time since the previous poll, at most `max_count_s`,
    so a poll delayed by a freeze of this process or the machine counts as a short one. Returns
    (peer, seconds since its beat last changed) for the first peer silent for more than
    `stale_s`, else None.
    """

    def __init__(self, peers: list[int], stale_s: float, max_count_s: float, now: float):
        self.stale_s, self.max_count_s, self.started = stale_s, max_count_s, now
        self._previous_poll = now
        self._beat: dict[int, str | None] = dict.fromkeys(peers)
        self._counted = dict.fromkeys(peers, 0.0)
        self._changed_at = dict.fromkeys(peers, now)

    def observe(self, now: float, beats: dict[int, str]) -> tuple[int, float] | None:
        counted = min(now - self._previous_poll, self.max_count_s)
        self._previous_poll = now
        for peer in self._beat:
            value = beats.get(peer)
            if value == _DONE:
                continue
            if value is not None and value != self._beat[peer]:
                self._beat[peer], self._counted[peer], self._changed_at[peer] = value, 0.0, now
                continue
            self._counted[peer] += counted
            if self._counted[peer] > self.stale_s:
                return peer, now - self._changed_at[peer]
        return None


def _leave(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)


def watch_peers(cluster: Cluster, interval_s: float = 1.0, stale_s: float | None = None,
                on_lost: Callable[[str], None] = _leave, client: object | None = None
                ) -> PeerWatchdog:
    """Starts this process's watchdog thread (see the module doc); returns its handle.

    Needs `jax.distributed.initialize` done (or a `client` with JAX's key-value methods). At
    normal interpreter exit the watchdog stops and marks this process done, so that slower
    peers do not take it for dead.
    """
    if client is None:
        from jax._src import distributed as jax_distributed  # The client has no public handle.

        client = jax_distributed.global_state.client
    stale_s = stale_s if stale_s is not None else max(3.0, 0.3 * cluster.heartbeat_timeout_s)
    watchdog = PeerWatchdog(cluster, threading.Event(), stale_s, interval_s)
    stop = watchdog.stop
    me = cluster.process_id

    def report(line: str) -> None:
        watchdog.line = line
        on_lost(line)  # By default this ends the process.
        watchdog.reported.set()

    def beat(value: str) -> None:
        client.key_value_set(f"{_KEY}/{me}", value, allow_overwrite=True)

    def watch() -> None:
        silence = PeerSilence([p for p in range(cluster.num_processes) if p != me], stale_s,
                              max_count_s=1.5 * interval_s, now=time.monotonic())
        count = 0
        while not stop.wait(interval_s):
            count += 1
            now = time.monotonic()
            try:
                beat(str(count))
                values = dict(client.key_value_dir_get(_KEY))
            except Exception:  # noqa: BLE001 - any failure to reach the service.
                if not stop.is_set():
                    report(lost_peer_message(cluster, None, now - silence.started))
                return
            # Keys come back whole or relative to the directory, depending on the version.
            ids = {k: k.rsplit("/", 1)[-1] for k in values}
            beats = {int(i): values[k] for k, i in ids.items() if i.isdigit()}
            lost = silence.observe(now, beats)
            if lost is not None and not stop.is_set():
                report(lost_peer_message(cluster, *lost))
                return

    def finish() -> None:
        stop.set()
        try:
            beat(_DONE)
        except Exception:  # noqa: BLE001, S110 - the service may be gone already.
            pass

    atexit.register(finish)
    threading.Thread(target=watch, name="siglip-peer-watchdog", daemon=True).start()
    return watchdog
