"""Quiet start-up (siglip_jax.console): the noise is gone on a normal run, back with --verbose
or SIGLIP_VERBOSE=1, and other output passes untouched. Each case runs in a fresh process."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLOO = "[Gloo] Rank 0 is connected to 1 peer ranks. Expected number of connected peer ranks is : 1"

# Writes like the libraries do: gloo's C++ straight to descriptor 1, orbax through absl logging.
SCRIPT = f"""
import os, sys
from siglip_jax.console import quiet_startup
args = quiet_startup(sys.argv[1:])
print("args", args, flush=True)
os.write(1, b"{GLOO}\\nnative line kept\\n")
from absl import logging
logging.warning("Metadata file does not exist: /x/_CHECKPOINT_METADATA")
logging.warning("another warning kept")
print("TF_ENABLE_ONEDNN_OPTS", os.environ.get("TF_ENABLE_ONEDNN_OPTS"), flush=True)
print("last line kept")
"""


def _run(*args, env_extra=None):
    env = {k: v for k, v in os.environ.items()
           if k not in ("SIGLIP_VERBOSE", "TF_ENABLE_ONEDNN_OPTS", "SIGLIP_NUM_PROCESSES")}
    env.update(PYTHONPATH=REPO, **(env_extra or {}))
    return subprocess.run([sys.executable, "-c", SCRIPT, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)


def test_quiet_multiprocess_run_drops_only_the_noise():
    result = _run("--num_processes", "2", "--config", "x")
    assert result.returncode == 0, result.stderr
    assert GLOO not in result.stdout and "Metadata file does not exist" not in result.stderr
    assert "native line kept" in result.stdout and "another warning kept" in result.stderr
    assert "TF_ENABLE_ONEDNN_OPTS 0" in result.stdout
    assert result.stdout.rstrip().endswith("last line kept")  # Drained at exit, in order.
    assert "args ['--num_processes', '2', '--config', 'x']" in result.stdout


@pytest.mark.parametrize("how", ["flag", "env"])
def test_verbose_keeps_everything(how):
    if how == "flag":
        result = _run("--num_processes", "2", "--verbose")
    else:
        result = _run("--num_processes", "2", env_extra={"SIGLIP_VERBOSE": "1"})
    assert result.returncode == 0, result.stderr
    assert GLOO in result.stdout and "Metadata file does not exist" in result.stderr
    assert "TF_ENABLE_ONEDNN_OPTS None" in result.stdout
    assert "args ['--num_processes', '2']" in result.stdout  # --verbose is taken out.


def test_single_process_stdout_is_not_redirected():
    result = _run()
    assert GLOO in result.stdout  # Only multi-process runs print gloo lines; left alone here.
    assert "Metadata file does not exist" not in result.stderr


# Runs `python -m siglip_jax.plan ARGS` in this process and reports the environment that
# TensorFlow was imported with (read when its first import starts: TF reads it as it loads).
PLAN = """
import os, runpy, sys
KEYS = ("TF_ENABLE_ONEDNN_OPTS", "TF_CPP_MIN_LOG_LEVEL", "SIGLIP_VERBOSE")
seen = {}
class Watch:
    def find_spec(self, name, path=None, target=None):
        if name == "tensorflow" and not seen:
            seen.update((k, os.environ.get(k)) for k in KEYS)
sys.meta_path.insert(0, Watch())
sys.argv = ["plan", *sys.argv[1:]]
try:
    runpy.run_module("siglip_jax.plan", run_name="__main__", alter_sys=True)
except SystemExit as exit:
    code = exit.code
print("exit", code, "tensorflow loaded", bool(seen), flush=True)
for key, value in seen.items():
    print("at tensorflow import", key, value, flush=True)
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_a_cli_starts_quietly(verbose):
    """plan on the demo loads TensorFlow and JAX: no notices unless --verbose.

    What TensorFlow prints depends on the host (its oneDNN notice appears only on CPUs where it
    enables oneDNN), so both cases check the cause, the environment TensorFlow is loaded with:
    quiet sets console.QUIET_ENV's oneDNN switch, --verbose leaves the environment alone."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("SIGLIP_VERBOSE", "TF_ENABLE_ONEDNN_OPTS", "TF_CPP_MIN_LOG_LEVEL")}
    result = subprocess.run(
        [sys.executable, "-c", PLAN, "--config", "configs/demo.py", "--topology", "cpu-8",
         *(["--verbose"] if verbose else [])],
        cwd=REPO, env={**env, "PYTHONPATH": REPO}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "result        ok" in result.stdout
    assert "exit 0 tensorflow loaded True" in result.stdout, result.stdout
    seen = dict(line.split()[-2:] for line in result.stdout.splitlines()
                if line.startswith("at tensorflow import "))
    # JAX's own import sets TF_CPP_MIN_LOG_LEVEL=1 when unset; console would set 2.
    if verbose:  # Nothing set for TensorFlow: it prints whatever it prints on this host.
        assert seen["TF_ENABLE_ONEDNN_OPTS"] == "None" and seen["SIGLIP_VERBOSE"] == "1", seen
        assert seen["TF_CPP_MIN_LOG_LEVEL"] in ("None", "1"), seen
    else:
        assert seen["TF_ENABLE_ONEDNN_OPTS"] == "0" and seen["SIGLIP_VERBOSE"] == "None", seen
        assert seen["TF_CPP_MIN_LOG_LEVEL"] in ("1", "2"), seen  # INFO notices hidden.
        for noise in ("oneDNN", "cpu_feature_guard", "absl::InitializeLog"):
            assert noise not in result.stderr, result.stderr


def test_eval_line_prints_counts_as_integers_and_splits_when_long():
    from siglip_jax.console import EVAL_LINE_WIDTH, format_eval

    short = format_eval(5, {"zeroshot/top1": 0.5, "zeroshot/num_examples": 720.0}, 1.25)
    assert short == "eval at step 5: zeroshot/top1 0.5000, zeroshot/num_examples 720 (1.2s)"
    many = {f"task{i}/{m}": v for i in range(6)
            for m, v in (("acc", 1.0), ("loss", 2.5), ("count", 23040.0))}
    lines = format_eval(10, many, 3.0).split("\n")
    assert len(format_eval(10, many, 3.0).replace("\n", " ")) > EVAL_LINE_WIDTH
    assert lines[0] == "eval at step 10 (3.0s):"
    assert lines[1:] == [f"  task{i}: acc 1.0000, loss 2.5000, count 23040" for i in range(6)]
