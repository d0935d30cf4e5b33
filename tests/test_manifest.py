"""Integrity manifests of our checkpoints (siglip_jax/checkpoints/manifest.py, orbax_io.py).

A saved step carries every file's size (and small files' crc32); restore checks them first and
falls back past a step whose file is missing or changed, naming that file. A committed step
without a manifest is restored after a one-line note (the documented backward-compatible rule).
The last test does the same on gs:// against the local GCS emulator (tests/gcs_emulator.py).
"""

import json
import os
import shutil
import urllib.parse
import urllib.request

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from siglip_jax import fsutil
from siglip_jax.checkpoints import manifest
from siglip_jax.checkpoints.orbax_io import DAMAGED_DIR, Checkpointer

W = np.arange(32.0, dtype=np.float32).reshape(8, 4)


def _state(step):
    return {"params": {"w": jnp.asarray(W) + step, "b": jnp.ones(4) * step},
            "step": jnp.int32(step)}


def _abstract():
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                        _state(0))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Steps 1 and 2, saved asynchronously as the trainer saves them."""
    workdir = tmp_path_factory.mktemp("manifest") / "pristine"
    with Checkpointer(str(workdir), 1, keep=3) as ckpt:
        for step in (1, 2):
            ckpt.maybe_save(step, _state(step))
    return workdir


@pytest.fixture
def run(saved, tmp_path):
    shutil.copytree(saved, tmp_path / "run")
    return tmp_path / "run"


def _restore(workdir):
    lines = []
    ckpt = Checkpointer(str(workdir), 1)
    try:
        step, state = ckpt.restore_latest(_abstract(), lines.append)
    finally:
        ckpt.close()
    return step, state, lines


def test_the_manifest_lists_every_file_of_the_step_at_its_size(saved):
    step_dir = saved / "checkpoints" / "2"
    on_disk = {}
    for folder, _, files in os.walk(step_dir):
        for name in files:
            path = os.path.join(folder, name)
            on_disk[os.path.relpath(path, step_dir)] = os.path.getsize(path)
    written = json.loads((step_dir / manifest.NAME).read_text())
    del on_disk[manifest.NAME]
    assert written["sizes"] == on_disk
    assert any(rel.startswith("default/") and "/d/" in rel for rel in on_disk)  # Array data.
    assert manifest.check(str(step_dir)) is None


@pytest.mark.parametrize("kind", ["truncate", "same-size garbage", "delete"])
def test_a_damaged_array_file_falls_back_naming_that_file(run, kind):
    # A per-process ocdbt data file: orbax alone restores exact values without it (see
    # test_faults.py DAMAGE), so only the manifest notices.
    step_dir = run / "checkpoints" / "2"
    rel = sorted(r for r in json.loads((step_dir / manifest.NAME).read_text())["sizes"]
                 if r.startswith("default/ocdbt.process_0/d/"))[0]
    path = step_dir / rel
    size = path.stat().st_size
    if kind == "truncate":
        with open(path, "r+b") as f:
            f.truncate(size // 2)
    elif kind == "delete":
        path.unlink()
    else:
        path.write_bytes(bytes(255 - b for b in path.read_bytes()))
    step, state, lines = _restore(run)
    assert step == 1
    np.testing.assert_array_equal(state["params"]["w"], W + 1)
    assert len(lines) == 1 and "\n" not in lines[0]
    assert lines[0].startswith(f"checkpoint step 2 is damaged (file {rel} ")
    expected = {"truncate": f"has {size // 2} bytes, the manifest says {size})",
                "delete": "is missing)", "same-size garbage": "has another crc32"}[kind]
    assert expected in lines[0]
    assert sorted(os.listdir(run / "checkpoints")) == ["1"]
    assert (run / DAMAGED_DIR / "2" / manifest.NAME).exists()  # Kept whole for inspection.


def test_a_step_without_a_manifest_is_restored_after_a_note(run):
    (run / "checkpoints" / "2" / manifest.NAME).unlink()
    step, state, lines = _restore(run)
    assert step == 2
    np.testing.assert_array_equal(state["params"]["w"], W + 2)
    assert lines == ["checkpoint step 2 has no integrity manifest (saved before manifests "
                     "existed, or stopped between orbax's commit and the manifest): restored "
                     "with orbax's own checks only"]


def test_a_step_without_a_manifest_that_orbax_cannot_read_falls_back(run):
    step_dir = run / "checkpoints" / "2"
    (step_dir / manifest.NAME).unlink()
    (step_dir / "default" / "_METADATA").write_bytes(b"\xff" * 10)
    step, state, lines = _restore(run)
    assert step == 1 and len(lines) == 1
    assert lines[0].startswith("checkpoint step 2 is damaged (unreadable metadata")


def test_poll_writes_the_manifest_once_the_async_save_is_committed(tmp_path):
    ckpt = Checkpointer(str(tmp_path), 1)
    try:
        ckpt.maybe_save(1, _state(1))
        ckpt.manager.wait_until_finished()
        step_dir = tmp_path / "checkpoints" / "1"
        assert not (step_dir / manifest.NAME).exists()  # Not before the trainer polls.
        ckpt.poll()
        assert manifest.check(str(step_dir)) is None
        assert (step_dir / manifest.NAME).exists()
    finally:
        ckpt.close()


def _emulator_sizes(prefix):
    """{object name: size} under gs://bucket/<prefix>, straight from the emulator's JSON API."""
    url = (f"{os.environ['STORAGE_EMULATOR_HOST']}/storage/v1/b/bucket/o?"
           + urllib.parse.urlencode({"prefix": prefix}))
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url) as response:
        return {item["name"][len(prefix):]: int(item["size"])
                for item in json.load(response).get("items", [])
                if not item["name"].endswith("/")}  # Not the empty directory markers.


def test_on_gs_the_manifest_matches_the_objects_and_a_truncated_one_falls_back(gcs):
    workdir = "gs://bucket/manifest"
    with Checkpointer(workdir, 1, keep=3) as ckpt:
        for step in (1, 2):
            ckpt.maybe_save(step, _state(step))
    step_dir = f"{workdir}/checkpoints/2"
    objects = _emulator_sizes("manifest/checkpoints/2/")
    written = json.loads(fsutil.read_text(f"{step_dir}/{manifest.NAME}"))
    assert written["sizes"] == {k: v for k, v in objects.items() if k != manifest.NAME}
    rel = sorted(r for r in written["sizes"] if r.startswith("default/ocdbt.process_0/d/"))[0]
    data = fsutil.read_bytes(f"{step_dir}/{rel}")
    with tf.io.gfile.GFile(f"{step_dir}/{rel}", "wb") as f:
        f.write(data[: len(data) // 2])
    lines = []
    ckpt = Checkpointer(workdir, 1)
    step, state = ckpt.restore_latest(_abstract(), lines.append)
    ckpt.close()
    assert step == 1
    np.testing.assert_array_equal(state["params"]["w"], W + 1)
    assert lines[0].startswith(f"checkpoint step 2 is damaged (file {rel} has "
                               f"{len(data) // 2} bytes, the manifest says {len(data)})")


def test_a_manifest_that_cannot_be_written_is_a_warning_not_the_end_of_the_run(
        tmp_path, monkeypatch, capsys):
    def refuse(step_dir):
        raise PermissionError(f"{step_dir}: read-only")

    monkeypatch.setattr(manifest, "write", refuse)
    with Checkpointer(str(tmp_path), 1) as ckpt:
        ckpt.maybe_save(1, _state(1))
        ckpt.maybe_save(2, _state(2))  # Waits for step 1, then fails to write its manifest.
    warnings = capsys.readouterr().err.strip().splitlines()
    assert len(warnings) == 2 and warnings[0].startswith(
        "warning: could not write the integrity manifest of checkpoint step 1 (")
    monkeypatch.undo()
    step, state, lines = _restore(tmp_path)
    assert step == 2 and "has no integrity manifest" in lines[0]
