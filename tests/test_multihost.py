"""Multi-host rehearsal: 2 CPU processes × 4 devices against 1 process × 8 devices."""

import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath
from once_per_session import once_per_session
from tiny import tiny_config, tiny_overrides

from siglip_jax import distributed
from siglip_jax.trainer import train

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "launch" / "local_multihost.sh"


# Checkpoints every 5 steps (4 kept): step 10 is kept for the one-process resume, and step
# 5 is there to fall back to when step 10 is damaged. Every replicated array is split between
# the replicas of both processes, however small (what a pod's large arrays get; the default
# leaves a tiny model's arrays whole to process 0), so that each process writes a part.
CHECKPOINTS = {"checkpoint.every_n_steps": 5, "checkpoint.keep": 4,
               "checkpoint.min_replica_slice_bytes": 0}
FAULT_FLAGS = ["--grace", "20", "--heartbeat", "10"]


def launch(num, workdir, data_dir, steps, logdir, script_args=(), **kwargs):
    args = [str(SCRIPT), str(num), "--logdir", str(logdir), *script_args,
            "--", "--config", f"{REPO}/configs/demo.py:steps={steps}", "--workdir",
            str(workdir), *[f"--config.{o}" for o in tiny_overrides(data_dir, **CHECKPOINTS)]]
    env = {**os.environ, "PYTHON": sys.executable, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=REPO, **kwargs)


def finish(proc):
    """Waits for a launch that must succeed; its output."""
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    assert "all 2 processes finished" in out
    return out


def losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def params_at(workdir, step):
    """The params of a checkpoint, on one device whatever process layout saved it."""
    path = os.path.join(workdir, "checkpoints", str(step), "default")
    metadata = ocp.StandardCheckpointHandler().metadata(epath.Path(path)).tree
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          metadata)
    state = ocp.StandardCheckpointer().restore(path, target)
    return {jax.tree_util.keystr(p): np.asarray(v)
            for p, v in jax.tree_util.tree_flatten_with_path(state["params"])[0]}


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, tiny_run):
    """(data dir, workdir) of an uninterrupted 2-process run of 20 steps on the data of the
    session's tiny run (tests/conftest.py), the same config but for its checkpoints."""
    def build(root):
        finish(launch(2, root / "multi", tiny_run.data_dir, 20, root / "logs"))
        return str(root / "multi")

    return tiny_run.data_dir, Path(once_per_session(tmp_path_factory, "two_processes", build))


def test_two_processes_equal_one_process_and_checkpoints_move_between_them(
        tmp_path, tiny_run, two_process_run):
    # The one-process reference is the session's tiny run: the same model, data, optimizer and
    # 20 steps (checkpoints at 10 and 20, TensorBoard on; neither changes a value).
    data_dir, multi = two_process_run
    single = Path(tiny_run.workdir)
    config = tiny_config(data_dir, 20, **CHECKPOINTS)
    single_losses, multi_losses = losses(single), losses(multi)
    assert sorted(single_losses) == sorted(multi_losses) == [1, 5, 10, 15, 20]
    for step, value in single_losses.items():
        np.testing.assert_allclose(multi_losses[step], value, rtol=1e-5, err_msg=f"step {step}")

    # Resume the 2-process run's step-10 checkpoint in one process: same end point.
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(multi / "checkpoints" / "10", resumed / "checkpoints" / "10")
    summary = train(config, str(resumed))
    assert summary["step"] == 20
    resumed_losses = losses(resumed)
    assert sorted(resumed_losses) == [11, 15, 20]
    for step in (15, 20):
        np.testing.assert_allclose(resumed_losses[step], single_losses[step], rtol=1e-5)
    # Params agree up to reduction-order noise. Attention key biases are left out: softmax is
    # invariant to them, so their gradient is exactly zero and their values are rounding noise
    # that Adam amplifies to ~1e-3 whatever the reduction order.
    reference = params_at(single, 20)
    compared = 0
    for key, value in params_at(resumed, 20).items():
        if "['key']['bias']" in key:
            continue
        np.testing.assert_allclose(value, reference[key], rtol=1e-4, atol=1e-5, err_msg=key)
        compared += 1
    assert compared > 20


def _pids_of(marker, process_id):
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if marker.encode() in args and b"--process_id" in args and b"siglip_jax.train" in args:
            if args[args.index(b"--process_id") + 1] == str(process_id).encode():
                pids.append(int(entry))
    return pids


def _assert_same_run(workdir, reference):
    """Bit-exact: the final params and every loss logged after the resume."""
    reference_losses, got = losses(reference), losses(workdir)
    for step in (15, 20):
        assert got[step] == reference_losses[step], (step, got[step], reference_losses[step])
    expected = params_at(reference, 20)
    for key, value in params_at(workdir, 20).items():
        np.testing.assert_array_equal(value, expected[key], err_msg=key)


def test_a_killed_process_stops_the_others_and_a_rerun_resumes_bit_exactly(
        tmp_path, two_process_run):
    data_dir, reference = two_process_run
    workdir = tmp_path / "wd"
    proc = launch(2, workdir, data_dir, 20, tmp_path / "logs", script_args=FAULT_FLAGS)
    # Kill process 1 once step 10 is complete (its manifest is written after orbax's commit,
    # at the next step): 9 steps (about 9 s) before the end, so the run is still going.
    complete = workdir / "checkpoints" / "10" / "integrity_manifest.json"
    deadline = time.monotonic() + 300
    while not complete.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
        time.sleep(0.02)
    victims = _pids_of(str(workdir), 1)
    assert len(victims) == 1
    os.kill(victims[0], signal.SIGKILL)
    killed_at = time.monotonic()
    out, _ = proc.communicate(timeout=120)
    elapsed = time.monotonic() - killed_at
    assert proc.returncode != 0
    assert elapsed < 60, elapsed  # Heartbeat (10 s) or grace (20 s) ends the survivor.
    assert "process 1 exited with code 137" in out
    assert "FAILED: process 1" in out
    assert not _pids_of(str(workdir), 0)  # Nothing is left running.
    assert "killing the" not in out  # The survivor stopped by itself, within the grace.
    # The survivor says what happened in one line (its watchdog, at 0.3 of the heartbeat; or,
    # when gloo raised in a collective first, the trainer waiting for the watchdog's verdict),
    # before JAX's coordination service would abort it with a C++ dump. One race is outside
    # our reach: gloo may abort the survivor at once (C++ `terminate`, exit 134), before any
    # Python code runs; the launcher still names the dead process above.
    survivor = (tmp_path / "logs" / "process_0.log").read_text()
    if "terminate called after throwing an instance of 'gloo::" in survivor:
        assert "process 0 exited with code 134 " in out, out
    else:
        errors = [line for line in survivor.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, survivor[-3000:]
        assert errors[0].startswith("error: process 1 of 2 stopped (no sign of life for ")
        assert "process 0 exited with code 1 " in out

    # The same command again, after damaging process 1's part of the newest complete step
    # (10; its largest array file, truncated): both processes take the same decision (the
    # restore agrees across processes), fall back to step 5 together, resume and end where
    # the uninterrupted run ended, bit for bit. (One rerun checks both the resume after a
    # kill and the fallback: each launch costs ~15 s of process start.)
    step_10 = workdir / "checkpoints" / "10"
    victim = max((p for p in step_10.rglob("*") if "ocdbt.process_1/d/" in str(p)),
                 key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    out = finish(launch(2, workdir, data_dir, 20, tmp_path / "logs", script_args=FAULT_FLAGS))
    assert "checkpoint step 10 is damaged" in out, out[-3000:]
    assert "resumed from checkpoint at step 5" in out
    assert (workdir / "checkpoints_damaged" / "10").is_dir()
    _assert_same_run(workdir, reference)


class _FakeKeyValueStore:
    """The two key-value calls of JAX's coordination-service client the watchdog uses."""

    def __init__(self, peers_alive=(), fail=False):
        self.values, self.fail, self.peers_alive = {}, fail, peers_alive

    def key_value_set(self, key, value, allow_overwrite=False):
        if self.fail:
            raise RuntimeError("UNAVAILABLE: failed to connect")
        self.values[key] = value
        for peer in self.peers_alive:  # A live peer beats whenever we do.
            self.values[f"siglip_jax/alive/{peer}"] = str(int(value) * 7)

    def key_value_dir_get(self, key):
        return [(k, v) for k, v in self.values.items() if k.startswith(key)]


@pytest.mark.parametrize(("alive", "fail", "expected"), [
    ((), False, "error: process 1 of 3 stopped (no sign of life for"),
    ((1, 2), True, "error: process 0 lost the coordinator (process 0 at 127.0.0.1:1)"),
])
def test_the_watchdog_names_a_silent_peer_in_one_line(alive, fail, expected):
    # Cheap twin of the launcher test below: peer 2 (alive or done) is never reported.
    store = _FakeKeyValueStore(peers_alive=alive, fail=fail)
    store.values["siglip_jax/alive/2"] = "done"
    lost = queue.Queue()
    cluster = distributed.Cluster("127.0.0.1:1", 3, 0, heartbeat_timeout_s=1)
    started = time.monotonic()
    watchdog = distributed.watch_peers(cluster, interval_s=0.05, stale_s=0.5, on_lost=lost.put,
                                       client=store)
    try:
        line = lost.get(timeout=10)
    finally:
        watchdog.stop.set()
    assert line.startswith(expected) and "\n" not in line
    assert "rerun the same command" in line
    assert time.monotonic() - started < 5


def test_the_watchdog_keeps_quiet_while_peers_beat():
    store = _FakeKeyValueStore(peers_alive=(1,))
    lost = queue.Queue()
    cluster = distributed.Cluster("127.0.0.1:1", 2, 0, heartbeat_timeout_s=1)
    watchdog = distributed.watch_peers(cluster, interval_s=0.05, stale_s=0.3, on_lost=lost.put,
                                       client=store)
    time.sleep(1.0)
    watchdog.stop.set()
    assert lost.empty()
    assert store.values["siglip_jax/alive/0"] not in ("", "done")


def _silence_verdicts(polls, peers=(1,), stale_s=3.0, max_count_s=1.5):
    """PeerSilence's answer after each (time, beats) poll, starting at time 0."""
    silence = distributed.PeerSilence(list(peers), stale_s, max_count_s, now=0.0)
    return [silence.observe(now, beats) for now, beats in polls]


def test_silence_counts_polls_on_time_in_full():
    # Beats change at t=1 and 2, then stop: counted 1, 2, 3 (not yet above 3 s), then 4.
    polls = [(1, {1: "1"}), (2, {1: "2"}), (3, {1: "2"}), (4, {1: "2"}), (5, {1: "2"}),
             (6, {1: "2"})]
    assert _silence_verdicts(polls) == [None] * 5 + [(1, 4.0)]


def test_a_late_poll_counts_as_a_short_one():
    # The whole machine froze from t=2 to t=11: the first poll after it still reads the old
    # beat (the peer wakes a moment later) and counts 1.5 s, not 9 s; the peer then beats.
    polls = [(1, {1: "1"}), (2, {1: "2"}), (11, {1: "2"}), (12, {1: "3"})]
    assert _silence_verdicts(polls) == [None] * 4
    # A watchdog that only gets to poll every 3 s still names a dead peer: 1.5 s per poll.
    polls = [(3, {1: "1"}), (6, {1: "1"}), (9, {1: "1"}), (12, {1: "1"})]
    assert _silence_verdicts(polls) == [None, None, None, (1, 9.0)]


def test_silence_skips_finished_peers_and_counts_peers_that_never_beat():
    polls = [(1, {1: "done"}), (2, {1: "done"}), (3, {1: "done"}), (4, {1: "done"})]
    assert _silence_verdicts(polls, peers=(1, 2)) == [None] * 3 + [(2, 4.0)]


# One process of a 2-process cluster: joins, starts its watchdog (beats every 0.2 s, a peer
# is dead after 1.5 s of silence), and waits for the stop file.
_WATCHING_PROCESS = """
import os, sys, time
import jax
from siglip_jax import distributed
coordinator, process_id, stop_file = sys.argv[1], int(sys.argv[2]), sys.argv[3]
jax.distributed.initialize(coordinator, 2, process_id)
distributed.watch_peers(distributed.Cluster(coordinator, 2, process_id), interval_s=0.2,
                        stale_s=1.5)
print("watching", flush=True)
while not os.path.exists(stop_file):
    time.sleep(0.05)
"""


def test_a_run_frozen_whole_is_not_taken_for_dead(tmp_path):
    # What an overloaded or paused machine does: both processes stop (SIGSTOP) for 3 s, twice
    # the watchdogs' window; process 0 wakes first and polls at once, while process 1 sleeps
    # 0.3 s more. Counting wall time, process 0 took process 1 for dead (as in a CI run).
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    stop_file = tmp_path / "stop"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    procs = [subprocess.Popen([sys.executable, "-c", _WATCHING_PROCESS, f"127.0.0.1:{port}",
                               str(i), str(stop_file)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=env) for i in range(2)]
    try:
        for proc in procs:
            for line in proc.stdout:
                if line.startswith("watching"):
                    break
            assert proc.poll() is None, f"a watching process ended at start (exit {proc.poll()})"
        time.sleep(1.0)
        for proc in procs:
            os.kill(proc.pid, signal.SIGSTOP)
        time.sleep(3.0)
        for proc in procs:
            os.kill(proc.pid, signal.SIGCONT)
            time.sleep(0.3)
        time.sleep(1.5)
        stop_file.touch()
        outputs = [proc.communicate(timeout=60)[0] for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    for proc, out in zip(procs, outputs, strict=True):
        assert proc.returncode == 0 and "error:" not in out, out[-2000:]


_GLOO_ERROR = RuntimeError("UNKNOWN: Gloo AllGather failed: [external/gloo/gloo/transport/tcp/"
                           "pair.cc:547] Connection closed by peer [127.0.0.1]:21398\nmore")


_OTHER_ERROR = RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 1 bytes")


@pytest.mark.parametrize(("alive", "error", "expected"), [
    ((), _GLOO_ERROR, "error: process 1 of 2 stopped (no sign of life for"),  # The verdict.
    ((), _OTHER_ERROR, "error: process 1 of 2 stopped (no sign of life for"),
    ((1,), _GLOO_ERROR, "error: process 0 of 2: a collective with the other processes failed "
     "(UNKNOWN: Gloo AllGather failed: [external/gloo/gloo/transport/tcp/pair.cc:547] "
     "Connection closed by peer [127.0.0.1]:21398); a peer has probably stopped"),
    ((1,), _OTHER_ERROR, None),  # Peers alive, not a lost connection: the error goes through.
])
def test_a_failed_collective_waits_for_the_watchdogs_verdict(alive, error, expected):
    # What the trainer prints when gloo raises in the main thread (a race seen in CI): the
    # dead peer's name if the watchdog finds it within its window, else the error's gist.
    store = _FakeKeyValueStore(peers_alive=alive)
    cluster = distributed.Cluster("127.0.0.1:1", 2, 0, heartbeat_timeout_s=1)
    watchdog = distributed.watch_peers(cluster, interval_s=0.05, stale_s=0.3,
                                       on_lost=lambda line: None, client=store)
    try:
        line = watchdog.explain_collective_failure(error)
    finally:
        watchdog.stop.set()
    if expected is None:
        assert line is None
        return
    assert line.startswith(expected) and "\n" not in line, line
    assert "rerun the same command" in line
