"""Test setup: 8 emulated CPU devices and strict numerics, before JAX starts its backend, and
one persistent XLA compilation cache per test session.

The cache is a fresh temporary folder (removed at exit), so a run never reads programs from
an earlier one: each distinct program is still compiled once per session, and every later
build of it (the tiny trainer's step is built by many test files, in-process and in the
subprocesses, which inherit JAX_COMPILATION_CACHE_DIR) loads the compiled executable instead
of compiling again. Compile-only TPU programs cannot be read back (tests/test_tpu_compile.py
turns the cache off for itself).

`tiny_run` (session fixture): one trained run of tests/tiny.py `tiny_config` (configs/demo.py
shrunk, 20 steps, checkpoints at 10 and 20, TensorBoard on), read by test_train.py (the training
itself), test_faults.py (a source run for model_init), test_train_modes.py (the uninterrupted
run a SIGKILLed CLI run must equal) and test_multihost.py (the one-process reference; its data
folder also feeds the 2-process runs). Other runs of the same model, mesh and optimizer reuse
its compiled step through the cache (the step count is not part of it).

`siglip2_run` (session fixture): one tiny trained SigLIP 2 run (tests/tiny.py `siglip2_config`:
every objective, the decoder, the EMA teacher, seven evaluators, a checkpoint at each of 4
steps), trained once per session on first use and read by test_siglip2_demo.py (the training
itself), test_export.py (its checkpoints) and test_evaluate_cli.py (its evaluations). Tests
must not write into its workdir.

Parallel runs (pytest-xdist, `-n 2` in the README's command): each worker is a process with
its own session, so a session or module fixture is built once per worker that needs it,
except the trained runs above (and test_multihost.py's 2-process run): the first worker to
ask trains them, the others read its result (tests/once_per_session.py). The workers share
the compilation cache, as the CLI subprocesses always did: an entry read while another
process is still writing it fails to decompress, and JAX then warns and compiles.
"""

import atexit
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# libtpu may be installed (for compile-only TPU tests): keep the default backend CPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# `import tensorflow` (2.21) ends by importing Keras 3's optimizers "so that registrations
# happen" and passes on an ImportError. Pointing tf.keras at the legacy Keras package, which
# the test extras do not install, turns that into an ImportError: TensorFlow then starts in
# about 2 s less CPU (5.9 → 3.9 s with tensorflow_datasets, docs/contributing.md), in the
# workers and in every CLI subprocess (they inherit it). Nothing here uses tf.keras.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
# Compile time dominates this suite (tiny models, hundreds of programs). Two XLA flags cut it
# (docs/contributing.md has the numbers): LLVM's optimisation level 0, and XLA's older CPU
# code emitters instead of its fusion emitters. Values stay within float rounding (the tests
# compare against references with tolerances, or a run against itself under the same flags).
# A flag already in XLA_FLAGS is left as set; subprocesses inherit XLA_FLAGS. XLA aborts the
# process on a flag it does not define, and the emitter switch belongs to XLA's move to the
# new emitters (it may go), so a probe process first checks that this jaxlib accepts it.
# Every program is cached, not only those over JAX's default 1 s, so the CLI subprocesses
# reuse the quick ones too.


def _xla_accepts(flag: str) -> bool:
    probe = subprocess.run([sys.executable, "-c", "import jax; jax.jit(abs)(1.0)"],
                           env={**os.environ, "XLA_FLAGS": flag}, capture_output=True)
    return probe.returncode == 0


_flags = os.environ.get("XLA_FLAGS", "")
if "--xla_backend_optimization_level" not in _flags:
    _flags += " --xla_backend_optimization_level=0"
if ("--xla_cpu_use_fusion_emitters" not in _flags
        and _xla_accepts("--xla_cpu_use_fusion_emitters=false")):
    _flags += " --xla_cpu_use_fusion_emitters=false"
os.environ["XLA_FLAGS"] = _flags.strip()
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache_dir = tempfile.mkdtemp(prefix="siglip_jax_test_xla_cache_")
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_threefry_partitionable", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])


import pytest  # noqa: E402
import tiny  # noqa: E402
from once_per_session import once_per_session  # noqa: E402

# The session fixture `gcs`: a local GCS emulator for the gs:// tests (tests/gcs_emulator.py).
pytest_plugins = ["gcs_emulator"]


@dataclasses.dataclass(frozen=True)
class TrainedRun:
    """A finished run: its data folder, workdir, train() summary and metrics.jsonl records."""

    data_dir: str
    workdir: str
    summary: dict
    records: list


def _train(root, config_of) -> TrainedRun:
    # Delayed: the trainer loads TensorFlow, which a session that never trains need not pay.
    from siglip_jax.trainer import train

    data_dir, workdir = str(root / "data"), str(root / "run")
    os.makedirs(workdir)
    summary = train(config_of(data_dir), workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return TrainedRun(data_dir, workdir, summary, records)


def _trained_once(tmp_path_factory, name, config_of) -> TrainedRun:
    fields = once_per_session(tmp_path_factory, name,
                              lambda root: dataclasses.asdict(_train(root, config_of)))
    return TrainedRun(**fields)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> TrainedRun:
    """The session's one tiny demo run (see the module doc); read it, never write to it."""
    return _trained_once(tmp_path_factory, "tiny_run", tiny.tiny_run_config)


@pytest.fixture(scope="session")
def siglip2_run(tmp_path_factory) -> TrainedRun:
    """The session's one tiny SigLIP 2 run (see the module doc); read it, never write to it."""
    return _trained_once(tmp_path_factory, "siglip2_run", tiny.siglip2_config)

