"""The production path on `gs://`, against the local GCS emulator (tests/gcs_emulator.py).

One tiny training run (`gs_run`, the train CLI in a subprocess: its data shards, tokenizer,
workdir, checkpoints, metrics, config and TensorBoard files all on gs://) is read by most tests
here; the evaluate/predict/model_init tests open its checkpoint from gs://. The fallback test
damages a small orbax checkpoint on gs:// in-process. The slow test kills a gs:// run with
SIGKILL while a checkpoint is being saved and checks that the rerun ends bit-identical to
`gs_run` (its cheaper twins: test_train_modes.py's local SIGKILL test and `gs_run`'s resumable
checkpoints).
"""

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import urllib.parse
import urllib.request

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import tensorflow as tf
from PIL import Image
from tiny import DEMO, REPO, tiny_overrides

from siglip_jax import fsutil
from siglip_jax.checkpoints.orbax_io import DAMAGED_DIR, Checkpointer
from siglip_jax.data import demo_shapes
from siglip_jax.data.tokenizer import Tokenizer
from siglip_jax.data.tokenizer_training import train_sentencepiece
from siglip_jax.sharding import make_mesh, param_shardings

BUCKET = "gs://bucket"
STEPS = 20
GARBAGE_SHARD = 3  # One of the 8 shards is not a tar file at all.
PP = ('decode|value_range(-1, 1)|tokenize(max_len=8, eos="sticky", inkey="texts", '
      'outkey="labels")|keep("image", "labels")')


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    return buf.getvalue()


def _write_shards(prefix: str) -> int:
    """8 tar shards of the demo images under `prefix`: shard 3 is garbage, shard 5 carries
    one image that does not decode. Returns the number of good pairs."""
    arrays = demo_shapes.make_split(2, seed=0)
    n, good = len(arrays["label"]), 0
    for shard in range(8):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for i in range(shard, n, 8):
                image = b"not an image" if (shard, i) == (5, 5) else _png(arrays["image"][i])
                good += image != b"not an image"
                for name, data in ((f"{i:04d}.png", image),
                                   (f"{i:04d}.txt", str(arrays["texts"][i]).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        data = buf.getvalue()
        if shard == GARBAGE_SHARD:
            good -= len(range(shard, n, 8))
            data = b"this is not a tar file " * 100
        with tf.io.gfile.GFile(f"{prefix}/{shard:02d}.tar", "wb") as f:
            f.write(data)
    return good


def _cli(workdir: str, data_dir: str, *extra: str) -> list[str]:
    overrides = tiny_overrides(
        data_dir, tensorboard=True, **{"input.cache": False, "input.pp": PP,
                                       "tokenizer.model": f"{BUCKET}/data/spm.model"})
    return [sys.executable, "-m", "siglip_jax.train", "--config", f"{DEMO}:steps={STEPS}",
            "--workdir", workdir, *[f"--config.{o}" for o in overrides],
            '--config.input.data={"name": "tar", "pattern": "gs://bucket/data/*.tar"}', *extra]


def _jsonl(path: str) -> list[dict]:
    with tf.io.gfile.GFile(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def gs_run(gcs, tmp_path_factory):
    """The train CLI, 20 steps on gs:// (checkpoints at 10 and 20, TensorBoard on)."""
    local = tmp_path_factory.mktemp("gs_run")
    data_dir = str(local / "demo")  # The zero-shot evaluator's (local) demo data.
    demo = demo_shapes.DemoShapes(data_dir, train_per_class=20, test_per_class=2)
    demo.prepare()
    good = _write_shards(f"{BUCKET}/data")
    tf.io.gfile.copy(demo.tokenizer_path, f"{BUCKET}/data/spm.model")
    workdir = f"{BUCKET}/run"
    proc = subprocess.run(_cli(workdir, data_dir), capture_output=True, text=True, cwd=REPO,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"workdir": workdir, "data_dir": data_dir, "good": good, "out": proc.stdout,
            "local": local}


def test_a_run_on_gs_trains_checkpoints_and_writes_metrics_and_config(gs_run):
    workdir = gs_run["workdir"]
    records = _jsonl(f"{workdir}/metrics.jsonl")
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert sorted(losses) == [1, 5, 10, 15, 20]
    assert all(np.isfinite(list(losses.values()))) and losses[20] < losses[1] - 1.0
    assert any("zeroshot/top1" in r for r in records if r["step"] == STEPS)
    config = json.loads(tf.io.gfile.GFile(f"{workdir}/config.json").read())
    assert config["input"]["data"]["pattern"] == "gs://bucket/data/*.tar"
    # TensorBoard's event files, read back from gs://, carry the same losses.
    logged = {}
    for path in tf.io.gfile.glob(f"{workdir}/tb/events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.tag == "loss":
                    logged[event.step] = float(tf.make_ndarray(value.tensor))
    assert logged.keys() == losses.keys()
    np.testing.assert_allclose([logged[s] for s in losses], list(losses.values()), rtol=1e-6)
    # Both asynchronous saves committed; the newest restores to step 20.
    steps = sorted(int(d.rstrip("/")) for d in tf.io.gfile.listdir(f"{workdir}/checkpoints"))
    assert steps == [10, 20]
    for step in steps:
        assert tf.io.gfile.exists(f"{workdir}/checkpoints/{step}/commit_success.txt")
    restored = ocp.StandardCheckpointer().restore(f"{workdir}/checkpoints/20/default")
    assert int(restored["step"]) == STEPS


def test_a_garbage_shard_and_a_bad_image_count_once_over_many_epochs(gs_run):
    # 20 steps × 64 examples read the 62 good pairs ~20 times, and the garbage shard's own
    # virtual shard falls back to reading the whole source again: each problem counts once.
    assert gs_run["good"] == 62
    last = [r for r in _jsonl(f"{gs_run['workdir']}/metrics.jsonl") if "loss" in r][-1]
    skipped = {k: v for k, v in last.items() if k.startswith("skipped/")}
    assert skipped == {"skipped/corrupt_image": 1, "skipped/unreadable_shard": 1}


def test_evaluate_cli_reads_the_gs_checkpoint(gs_run, tmp_path):
    from siglip_jax.evaluate import main

    out = tmp_path / "eval.json"
    assert main(["--checkpoint", gs_run["workdir"], "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    during = [r for r in _jsonl(f"{gs_run['workdir']}/metrics.jsonl") if r["step"] == STEPS]
    expected = {k: v for r in during for k, v in r.items() if k.startswith("zeroshot/")}
    assert expected and {k: results[k] for k in expected} == pytest.approx(expected, abs=1e-6)


def _local_copy(src: str, dst: str) -> None:
    for rel in fsutil.file_sizes(src):
        os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
        tf.io.gfile.copy(f"{src}/{rel}", os.path.join(dst, rel))


def test_predict_and_model_init_open_gs_checkpoints(gs_run, tmp_path):
    from siglip_jax.checkpoints.open import load_model_init
    from siglip_jax.models.build import make_model
    from siglip_jax.models.params import param_shapes
    from siglip_jax.predict import Predictor

    workdir, local = gs_run["workdir"], str(tmp_path / "run")
    _local_copy(f"{workdir}/checkpoints/20", f"{local}/checkpoints/20")
    saved = ocp.StandardCheckpointer().restore(f"{local}/checkpoints/20/default")["params"]
    predictor = Predictor(workdir)  # Model, tokenizer (gs://) and weights from the gs:// run.
    jax.tree.map(np.testing.assert_array_equal, predictor.params, saved)
    assert predictor.tokenize(["red circle"]).shape == (1, 8)  # The gs:// sentencepiece model.
    run = _run_config(gs_run, **{"model_init.img": workdir,
                                 "model_init.txt": f"{workdir}/checkpoints/10"})
    parts = load_model_init(run.model_init.parts(), param_shapes(make_model(run.model), 32, 8))
    jax.tree.map(np.testing.assert_array_equal, parts["img"], saved["img"])
    at_10 = ocp.StandardCheckpointer().restore(f"{workdir}/checkpoints/10/default")["params"]
    jax.tree.map(np.testing.assert_array_equal, parts["txt"], at_10["txt"])


def _run_config(gs_run, **extra):
    from siglip_jax.config import load_config
    from siglip_jax.schema import parse

    data = {"name": "tar", "pattern": "gs://bucket/data/*.tar"}
    return parse(load_config(f"{DEMO}:steps={STEPS}", tiny_overrides(
        gs_run["data_dir"], **{"input.data": data, "input.pp": PP,
                               "tokenizer.model": f"{BUCKET}/data/spm.model", **extra})))


def test_plan_checks_the_gs_paths_it_can_reach(gs_run):
    from siglip_jax import planner

    def plan(**extra):  # resize(32) tells the planner the image size the decoded PNGs have.
        extra = {"input.pp": PP.replace("decode|", "decode|resize(32)|"), **extra}
        return planner.make_plan(_run_config(gs_run, **extra),
                                 planner.parse_topology("cpu-8", cpu_memory_bytes=16 * 2**30))

    found = plan(**{"model_init.img": gs_run["workdir"]})
    assert found.errors == [] and not [n for n in found.notes if "not checked" in n]
    missing = plan(**{"model_init.img": f"{BUCKET}/nope", "input.data": {
        "name": "tar", "pattern": f"{BUCKET}/data/none-*.tar"}})
    assert missing.errors == ["model_init.img checkpoint: not found: 'gs://bucket/nope'",
                              "input.data.pattern: no file matches "
                              "'gs://bucket/data/none-*.tar'"]
    # TensorFlow has no s3:// filesystem here: such a path cannot be reached, only noted.
    unreachable = plan(**{"model_init.img": "s3://bucket/ckpt"})
    assert unreachable.errors == []
    assert [n for n in unreachable.notes if "not checked" in n] == [
        "model_init.img checkpoint 's3://bucket/ckpt' is remote and could not be reached (no "
        "credentials, no network or no answer in 30 s): not checked here"]


# ----------------------------------------------------------------------------- fallback


def _state(shift):
    params = {"w": jnp.arange(32.0).reshape(8, 4) + shift, "b": jnp.ones(4) + shift}
    return {"params": params, "opt_state": optax.adamw(1e-3).init(params),
            "step": jnp.int32(shift)}


def _abstract(state):
    shardings = param_shardings(state, [], make_mesh([("data", -1)]))
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        state, shardings)


def test_a_tokenizer_trained_onto_gs_reads_back_like_a_local_one(gcs, tmp_path):
    corpus = demo_shapes.tokenizer_corpus()
    local = train_sentencepiece(corpus, 64, str(tmp_path / "m.model"), model_type="word")
    remote = train_sentencepiece(corpus, 64, f"{BUCKET}/tokenizers/new/m.model",
                                 model_type="word")
    with tf.io.gfile.GFile(remote, "rb") as f, open(local, "rb") as g:
        assert f.read() == g.read()  # Training is deterministic: the same bytes either way.
    texts = ["a red circle", "a small blue square"]
    np.testing.assert_array_equal(Tokenizer(remote).encode(texts, 8),
                                  Tokenizer(local).encode(texts, 8))


def test_a_damaged_newest_step_on_gs_falls_back_and_is_kept(gcs):
    # Garbage in the array store's manifest: the metadata reads, the restore fails (the local
    # tests in test_faults.py try every kind of damage; here the move on gs:// is the point).
    workdir, damage = f"{BUCKET}/fallback", "default/manifest.ocdbt"
    with Checkpointer(workdir, 1, keep=3) as ckpt:  # Async saves, as the trainer makes them.
        for step in (1, 2):
            ckpt.maybe_save(step, _state(step))
    path = f"{workdir}/checkpoints/2/{damage}"
    size = tf.io.gfile.stat(path).length
    with tf.io.gfile.GFile(path, "wb") as f:
        f.write(np.random.default_rng(0).integers(0, 256, size, np.uint8).tobytes())
    before = fsutil.file_sizes(f"{workdir}/checkpoints/2")
    lines = []
    ckpt = Checkpointer(workdir, 1)
    step, state = ckpt.restore_latest(_abstract(_state(0)), lines.append)
    ckpt.close()
    assert step == 1
    np.testing.assert_array_equal(state["params"]["w"], np.arange(32.0).reshape(8, 4) + 1)
    assert len(lines) == 1 and lines[0].startswith("checkpoint step 2 is damaged (")
    assert f"moved it to {workdir}/{DAMAGED_DIR}/2 " in lines[0]
    assert [d.rstrip("/") for d in tf.io.gfile.listdir(f"{workdir}/checkpoints")] == ["1"]
    # Kept whole for inspection: every file, at its size.
    assert fsutil.file_sizes(f"{workdir}/{DAMAGED_DIR}/2") == before
    with Checkpointer(workdir, 1) as again:
        assert again.latest_step() == 1


# ----------------------------------------------------------------------------- SIGKILL


def _objects(prefix: str) -> list[str]:
    """Object names under gs://bucket/<prefix>, straight from the emulator (no client cache)."""
    url = (f"{os.environ['STORAGE_EMULATOR_HOST']}/storage/v1/b/bucket/o?"
           + urllib.parse.urlencode({"prefix": prefix}))
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url) as response:
        return [item["name"] for item in json.load(response).get("items", [])]


@pytest.mark.slow
def test_sigkill_during_an_async_save_then_rerun_equals_the_uninterrupted_run(gs_run):
    workdir = f"{BUCKET}/killed"
    proc = subprocess.Popen(_cli(workdir, gs_run["data_dir"], "--config.log_every=1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=REPO)
    deadline = time.monotonic() + 600
    while not any(name.startswith("killed/checkpoints/20/") for name in _objects("killed/")):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # Step 20's save has started (and may not have ended).
    proc.communicate()
    committed = "killed/checkpoints/20/commit_success.txt" in _objects("killed/")
    rerun = subprocess.run(_cli(workdir, gs_run["data_dir"]), capture_output=True, text=True,
                           cwd=REPO, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    if not committed:
        assert "resumed from checkpoint at step 10" in rerun.stdout, rerun.stdout[-3000:]
    expected = ocp.StandardCheckpointer().restore(f"{gs_run['workdir']}/checkpoints/20/default")
    got = ocp.StandardCheckpointer().restore(f"{workdir}/checkpoints/20/default")
    jax.tree.map(np.testing.assert_array_equal, got["params"], expected["params"])
    jax.tree.map(np.testing.assert_array_equal, got["opt_state"], expected["opt_state"])
