"""Fault injection (issue 15): a diverged model never scores well, metrics.jsonl stays strict
JSON, a damaged newest checkpoint falls back to the previous one (every damage kind orbax
shows), a changed optimizer is a one-line structure error, errors are one line."""

import glob
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from siglip_jax.checkpoints.orbax_io import (
    DAMAGED_DIR,
    CheckpointDamagedError,
    Checkpointer,
    CheckpointStructureError,
)
from siglip_jax.evaluators.retrieval import recall_at_k
from siglip_jax.evaluators.zeroshot import _counts, accumulate
from siglip_jax.metrics import MetricWriter
from siglip_jax.sharding import ShardingError, batch_sharding, make_mesh, param_shardings


@pytest.fixture(scope="module")
def mesh():
    return make_mesh([("data", -1)])


# ----------------------------------------------------------------------------- metrics


def _reference_top1(logits, labels):
    """Numpy: a hit only if every other class scores strictly lower (NaN is never a hit)."""
    hits = []
    for row, y in zip(np.asarray(logits, np.float64), labels, strict=True):
        others = np.delete(row, y)
        hits.append(bool(np.isfinite(row).all() and (others < row[y]).all()))
    return np.mean(hits)


def test_zeroshot_nan_embeddings_are_nan_metrics_not_a_perfect_score():
    zimg = jnp.full((4, 3), jnp.nan)
    zcls = jnp.eye(3)
    counts = _counts(zimg, zcls, jnp.array([0, 1, 2, 0]), jnp.array([True, True, True, False]))
    result = accumulate([counts])
    assert np.isnan(result["top1"]) and np.isnan(result["top5"])
    assert np.isnan(result["mean_class_recall"])
    assert result["nonfinite"] == 3.0  # The padding row does not count.
    assert result["num_examples"] == 3.0


def test_zeroshot_ties_are_not_hits():
    # A collapsed model: every class embedding equal, so every image ties all classes.
    zimg = jnp.tile(jnp.array([[1.0, 0.0]]), (6, 1))
    zcls = jnp.tile(jnp.array([[0.6, 0.8]]), (4, 1))
    labels = np.array([0, 1, 2, 3, 0, 1])
    result = accumulate([_counts(zimg, zcls, jnp.asarray(labels), jnp.ones(6, bool))])
    assert result["top1"] == _reference_top1(zimg @ zcls.T, labels) == 0.0
    assert result["top5"] == 1.0  # Rank 3 of 4 classes (all tied) is still within top 5.
    assert "nonfinite" not in result
    # One class breaks the tie for image 0 only: that image is a top-1 hit, nothing else.
    zcls2 = zcls.at[0].set(jnp.array([0.8, 0.6]))
    result = accumulate([_counts(zimg[:1], zcls2, jnp.array([0]), jnp.ones(1, bool))])
    assert result["top1"] == _reference_top1(zimg[:1] @ zcls2.T, [0]) == 1.0


def _embedded(mesh, zimg, ztxt):
    sharding = batch_sharding(mesh, ("data",))
    put = lambda x: jax.device_put(jnp.asarray(x), sharding)
    n, c = ztxt.shape[:2]
    return [{"zimg": put(zimg), "ztxt": put(ztxt), "img_valid": put(np.ones(n, bool)),
             "txt_valid": put(np.ones((n, c), bool))}]


def test_retrieval_nan_embeddings_are_nan_recalls(mesh):
    zimg = np.full((8, 2), np.nan, np.float32)
    ztxt = np.ones((8, 1, 2), np.float32)
    result = recall_at_k(_embedded(mesh, zimg, ztxt), mesh, ks=(1, 5))
    assert all(np.isnan(v) for k, v in result.items() if k.startswith(("img2txt", "txt2img")))
    assert result["nonfinite"] == 16.0  # 8 image queries + 8 caption queries.
    assert result["num_images"] == 8.0


def test_retrieval_ties_are_not_hits(mesh):
    # Collapsed: every image and caption embedding identical → every query ties 7 negatives.
    zimg = np.tile([[1.0, 0.0]], (8, 1)).astype(np.float32)
    ztxt = np.tile([[[1.0, 0.0]]], (8, 1, 1)).astype(np.float32)
    result = recall_at_k(_embedded(mesh, zimg, ztxt), mesh, ks=(1, 5, 8))
    # Rank = 7 tied negatives: a miss at k=1 and 5, a hit at k=8 (all 8 candidates).
    assert result["img2txt_r1"] == result["txt2img_r1"] == 0.0
    assert result["img2txt_r5"] == result["txt2img_r5"] == 0.0
    assert result["img2txt_r8"] == result["txt2img_r8"] == 1.0


def _raise_on_constant(name):
    raise ValueError(f"non-standard JSON constant {name}")


def test_metrics_jsonl_is_strict_json_with_nonfinite_flag(tmp_path):
    writer = MetricWriter(str(tmp_path), tensorboard=False)
    writer.write(3, {"loss": np.float32(np.nan), "lr": 1e-3, "grad_norm": np.inf,
                     "eval/top1": np.array(0.5)})
    writer.write(4, {"loss": 1.5})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    first, second = (json.loads(line, parse_constant=_raise_on_constant) for line in lines)
    assert first == {"step": 3, "loss": None, "lr": 1e-3, "grad_norm": None, "eval/top1": 0.5,
                     "nonfinite": ["loss", "grad_norm"]}
    assert second == {"step": 4, "loss": 1.5}


# ----------------------------------------------------------------------------- predict


@pytest.fixture(scope="module")
def nan_workdir(tmp_path_factory):
    """Our orbax workdir of a tiny model whose image head kernel is NaN, + a sentencepiece."""
    from siglip_jax.data.tokenizer import train_sentencepiece
    from siglip_jax.models.two_towers import Model

    path = tmp_path_factory.mktemp("nanmodel")
    spiece = str(path / "spiece.model")
    words = ["a photo of", "cat", "dog", "red car", "blue bird", "three", "one"]
    train_sentencepiece([f"{a} {b}" for a in words for b in words], 40, spiece)
    model = dict(image=dict(width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=8,
                            pool_type="gap"),
                 text=dict(vocab_size=40, width=16, depth=1, mlp_dim=32, num_heads=2),
                 out_dim=8, bias_init=-3.0)
    params = jax.jit(Model(**model).init)(jax.random.key(0), np.zeros((1, 16, 16, 3)),
                                          np.zeros((1, 8), np.int32))["params"]
    params["img"]["head"]["kernel"] = jnp.full_like(params["img"]["head"]["kernel"], jnp.nan)
    workdir = path / "run"
    ckpt = Checkpointer(str(workdir), 0, use_async=False)
    ckpt.maybe_save(5, {"params": params, "step": np.int32(5)}, force=True)
    ckpt.close()
    (workdir / "config.json").write_text(json.dumps(
        {"model": model, "tokenizer": {"model": spiece, "max_len": 8, "eos": "sticky"}}))
    return workdir


def test_predict_refuses_a_nonfinite_model(nan_workdir, tmp_path, capsys):
    from PIL import Image

    from siglip_jax.predict import PredictError, main, predict

    image = np.full((16, 16, 3), 128, np.uint8)
    with pytest.raises(PredictError, match=r"non-finite scores.*img/head/kernel"):
        predict([image], ["cat", "dog"], checkpoint=str(nan_workdir))
    Image.fromarray(image).save(tmp_path / "x.png")
    assert main(["--checkpoint", str(nan_workdir), str(tmp_path / "x.png"),
                 "--labels", "cat", "dog"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: checkpoint {str(nan_workdir)!r} gives non-finite scores")
    assert err.count("\n") == 1


def test_predict_decompression_bomb_is_a_one_line_error(tmp_path, monkeypatch):
    from PIL import Image

    from siglip_jax.predict import PredictError, load_image

    path = tmp_path / "bomb.png"
    Image.new("RGB", (64, 64)).save(path)
    # 64·64 = 4096 pixels > 2 × 1000: the size at which PIL refuses (not just warns).
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(PredictError, match=r"cannot read image .*bomb.png.*decompression bomb"):
        load_image(str(path))


# ----------------------------------------------------------------------------- checkpoints


def _state(tx, params, shift):
    params = jax.tree.map(lambda x: x + shift, params)
    return {"params": params, "opt_state": tx.init(params), "step": jnp.int32(shift)}


PARAMS = {"w": jnp.arange(32.0).reshape(8, 4), "b": jnp.ones(4)}
ADAM = optax.adamw(1e-3)


def _abstract(state, mesh):
    shardings = param_shardings(state, [], mesh)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        state, shardings)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A workdir with steps 1 and 2 (async saves, as the trainer makes them)."""
    workdir = tmp_path_factory.mktemp("ckpt") / "pristine"
    with Checkpointer(str(workdir), 1, keep=3) as ckpt:
        for step in (1, 2):
            ckpt.maybe_save(step, _state(ADAM, PARAMS, step))
    return workdir


def _damage(path, kind):
    if kind == "truncate":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    elif kind == "garbage":
        size = os.path.getsize(path)
        with open(path, "wb") as f:
            f.write(np.random.default_rng(0).integers(0, 256, size, np.uint8).tobytes())
    else:
        os.remove(path)


# Which file kinds orbax needs to restore (tried by hand: damaging _CHECKPOINT_METADATA,
# commit_success.txt, _sharding or the per-process ocdbt.process_0/ copies does not stop a
# restore, and the values still come back exact).
DAMAGE = [(pattern, kind) for pattern in ("default/d/*", "default/manifest.ocdbt",
                                          "default/_METADATA")
          for kind in ("truncate", "garbage", "delete")]
DAMAGE += [("default/array_metadatas/process_0", "truncate"),
           ("default/array_metadatas/process_0", "garbage")]


@pytest.mark.parametrize(("pattern", "kind"), DAMAGE)
def test_damaged_newest_step_falls_back_to_the_previous(saved, tmp_path, mesh, pattern, kind):
    workdir = tmp_path / "run"
    shutil.copytree(saved, workdir)
    for path in glob.glob(str(workdir / "checkpoints" / "2" / pattern)):
        _damage(path, kind)
    lines = []
    ckpt = Checkpointer(str(workdir), 1)
    step, state = ckpt.restore_latest(_abstract(_state(ADAM, PARAMS, 0), mesh), lines.append)
    ckpt.close()
    assert step == 1
    np.testing.assert_array_equal(state["params"]["w"], np.arange(32.0).reshape(8, 4) + 1)
    assert len(lines) == 1 and "\n" not in lines[0]
    assert lines[0].startswith("checkpoint step 2 is damaged (")
    assert sorted(os.listdir(workdir / "checkpoints")) == ["1"]
    assert os.path.isdir(workdir / DAMAGED_DIR / "2" / "default")  # Kept for inspection.
    assert Checkpointer(str(workdir), 1).latest_step() == 1


def test_no_readable_step_is_one_clear_error_and_an_empty_dir_is_none(saved, tmp_path, mesh):
    workdir = tmp_path / "run"
    shutil.copytree(saved, workdir)
    for path in glob.glob(str(workdir / "checkpoints" / "*" / "default" / "_METADATA")):
        _damage(path, "garbage")
    ckpt = Checkpointer(str(workdir), 1)
    with pytest.raises(CheckpointDamagedError, match=r"no readable checkpoint .*steps \[2, 1\]"):
        ckpt.restore_latest(_abstract(_state(ADAM, PARAMS, 0), mesh), lambda _: None)
    assert sorted(os.listdir(workdir / DAMAGED_DIR)) == ["1", "2"]
    assert ckpt.restore_latest(_abstract(_state(ADAM, PARAMS, 0), mesh)) is None


@pytest.mark.parametrize(("tx", "params", "match"), [
    (optax.chain(optax.clip_by_global_norm(1.0), ADAM), PARAMS,
     r"does not fit this run: .*opt_state/0/.*new --workdir"),
    (ADAM, {"w": jnp.zeros((8, 2)), "b": jnp.ones(4)}, r"params/w has shape \(8, 4\) in the "
                                                       r"checkpoint, \(8, 2\) in the run"),
])
def test_structure_change_is_not_damage(saved, tmp_path, mesh, tx, params, match):
    workdir = tmp_path / "run"
    shutil.copytree(saved, workdir)
    ckpt = Checkpointer(str(workdir), 1)
    with pytest.raises(CheckpointStructureError, match=match) as info:
        ckpt.restore_latest(_abstract(_state(tx, params, 0), mesh))
    assert "\n" not in str(info.value)
    assert sorted(os.listdir(workdir / "checkpoints")) == ["1", "2"]  # Nothing moved.
    assert not os.path.exists(workdir / DAMAGED_DIR)


def test_close_after_an_error_with_a_pending_async_save(tmp_path):
    big = {"w": jnp.ones((512, 512))}
    with pytest.raises(RuntimeError, match="boom"), Checkpointer(str(tmp_path), 1) as ckpt:
        ckpt.maybe_save(1, big)
        raise RuntimeError("boom")
    assert Checkpointer(str(tmp_path), 1).latest_step() == 1  # The save still completed.


# ----------------------------------------------------------------------------- one-line errors


def test_sharding_errors_are_their_own_class(mesh):
    with pytest.raises(ShardingError, match="does not divide the 8 devices"):
        make_mesh([("data", 3)])
    with pytest.raises(ShardingError, match="'nomatch.*' matches no parameter"):
        param_shardings(PARAMS, [("nomatch.*", "replicate")], mesh)
    with pytest.raises(ShardingError, match="valid regexes"):
        param_shardings(PARAMS, [("(", "replicate")], mesh)


# ----------------------------------------------------------------------------- data


def _png(i: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (i % 256, 7, 9)).save(buf, "PNG")
    return buf.getvalue()


def _tar(path, keys, captions=True):
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for key in keys:
            members = [(f"{key}.png", _png(key))]
            if captions:
                members.append((f"{key}.txt", f"caption {key}".encode()))
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _texts(source, shard_ids, num_shards=8, steps=6, start_step=0):
    from siglip_jax.data.input import train_batches

    batches = train_batches(source, lambda ex: {"texts": ex["texts"]}, shard_ids=shard_ids,
                            num_shards=num_shards, shard_batch=2, seed=3, shuffle_buffer=8,
                            start_step=start_step)
    return [[t.decode() for t in next(batches)["texts"]] for _ in range(steps)]


@pytest.fixture(scope="module")
def one_bad_of_eight(tmp_path_factory):
    """8 tar shards of 3 pairs each; shard 3 is not a tar file at all."""
    d = tmp_path_factory.mktemp("tars")
    for s in range(8):
        _tar(d / f"{s:02d}.tar", range(10 * s, 10 * s + 3))
    (d / "03.tar").write_bytes(b"this is not a tar file" * 40)
    return str(d / "*.tar")


def test_an_unreadable_shard_does_not_end_training(one_bad_of_eight):
    from siglip_jax.data.sources import TarShardSource

    source = TarShardSource(one_bad_of_eight, check_images=False)
    texts = _texts(source, list(range(8)))
    assert all(len(rows) == 16 for rows in texts)  # Old code: StopIteration at batch 0.
    good = {f"caption {10 * s + i}" for s in range(8) if s != 3 for i in range(3)}
    for rows in texts:
        assert set(rows) <= good
        # Shard k's rows come from file k (k != 3); shard 3 reads the whole source.
        for k in range(8):
            if k != 3:
                assert {int(r.split()[1]) // 10 for r in rows[2 * k:2 * k + 2]} == {k}
    # Process-count invariant (2 processes × 4 shards) and resumable at any step.
    halves = [_texts(TarShardSource(one_bad_of_eight, check_images=False), ids)
              for ids in (range(4), range(4, 8))]
    assert [a + b for a, b in zip(*halves, strict=True)] == texts
    assert _texts(TarShardSource(one_bad_of_eight, check_images=False), list(range(8)),
                  steps=2, start_step=4) == texts[4:6]


def test_no_usable_data_is_a_clear_error_not_stopiteration(tmp_path):
    from siglip_jax.data.sources import SourceError, TarShardSource

    _tar(tmp_path / "a.tar", range(3), captions=False)
    with pytest.raises(SourceError, match="yields no usable example"):
        _texts(TarShardSource(str(tmp_path / "*.tar"), check_images=False), list(range(8)))


def test_a_dataset_smaller_than_the_batch_shards_is_a_config_error(tmp_path):
    from siglip_jax.config import ConfigError
    from siglip_jax.data.sources import CsvSource

    for i in range(5):
        (tmp_path / f"{i}.png").write_bytes(_png(i))
    (tmp_path / "d.csv").write_text("image,caption\n" + "".join(
        f"{i}.png,caption {i}\n" for i in range(5)))
    with pytest.raises(ConfigError, match=r"has 5 examples, fewer than the 8 batch shards"):
        _texts(CsvSource(str(tmp_path / "d.csv")), list(range(8)))


def test_index_skips_count_once_with_fewer_files_than_shards(tmp_path):
    from siglip_jax.data.sources import TarShardSource

    _tar(tmp_path / "a.tar", range(6))
    _tar(tmp_path / "b.tar", range(100, 103), captions=False)  # 3 images without caption.
    source = TarShardSource(str(tmp_path / "*.tar"), check_images=False)
    read = [ex for shard in range(8) for ex in source.dataset(shard, 8).as_numpy_iterator()]
    assert len(read) == 6
    assert source.skips.as_dict() == {"skipped/missing_caption": 3}  # Old code: 24.


# ----------------------------------------------------------------------------- prompt exit

_FAIL_MID_RUN = """
import sys
from siglip_jax import metrics, train
from siglip_jax.shutdown import run_main

write = metrics.MetricWriter.write
def failing_write(self, step, values):
    if step >= 12:
        raise RuntimeError(f"injected failure at step {step}")
    return write(self, step, values)
metrics.MetricWriter.write = failing_write
run_main(train.main)
"""


def test_an_error_mid_run_exits_promptly_with_code_1_and_keeps_the_checkpoint(tmp_path):
    """An unexpected error after the async checkpointer and tf.data threads started: exit 1
    (not an abort 134 or a hang), the traceback on stderr, the pending save completed."""
    import subprocess
    import sys

    import tiny

    workdir = tmp_path / "run"
    args = [f"--config.{o}" for o in tiny.tiny_overrides(tmp_path / "data", log_every=1)]
    proc = subprocess.run(
        [sys.executable, "-c", _FAIL_MID_RUN, "--config", f"{tiny.DEMO}:steps=20",
         "--workdir", str(workdir), *args], capture_output=True, text=True, timeout=300,
        cwd=tiny.REPO, env={**os.environ, "PYTHONPATH": str(tiny.REPO)})
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "RuntimeError: injected failure at step 12" in proc.stderr
    assert "terminate called" not in proc.stderr
    assert Checkpointer(str(workdir), 10).latest_step() == 10


@pytest.mark.parametrize(("body", "code", "stderr"), [
    ("raise RuntimeError('boom')", 1, "RuntimeError: boom"),
    ("return 3", 3, ""),
    ("raise SystemExit('usage: bad')", 1, "usage: bad"),
])
def test_run_main_exit_codes(body, code, stderr):
    import subprocess
    import sys

    import tiny

    script = f"from siglip_jax.shutdown import run_main\ndef main():\n    {body}\nrun_main(main)\n"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": str(tiny.REPO)})
    assert proc.returncode == code
    assert stderr in proc.stderr


# ----------------------------------------------------------------------------- model_init


def test_model_init_full_loads_every_part_of_our_own_run_by_relative_path(tiny_run, tmp_path,
                                                                          monkeypatch):
    """model_init.full from one of our workdirs (the session's tiny run), named relative to the
    current directory: towers, t and b all come from it (with lr 0 the run keeps them bit for
    bit)."""
    import orbax.checkpoint as ocp
    import tiny

    from siglip_jax.trainer import train

    os.symlink(tiny_run.workdir, tmp_path / "src")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dst").mkdir()
    train(tiny.tiny_config(tiny_run.data_dir, steps=2, lr=0.0, wd=0.0,
                           **{"model_init.full": "src"}), str(tmp_path / "dst"))
    restore = lambda run, step: ocp.StandardCheckpointer().restore(
        str(tmp_path / run / "checkpoints" / str(step) / "default"))["params"]
    src, dst = restore("src", tiny.TINY_STEPS), restore("dst", 2)
    assert sorted(src) == sorted(dst) == ["b", "img", "t", "txt"]
    for a, b in zip(jax.tree.leaves(src), jax.tree.leaves(dst), strict=True):
        np.testing.assert_array_equal(a, b)
