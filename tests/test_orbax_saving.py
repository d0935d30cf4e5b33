"""How our checkpoints write replicated arrays (siglip_jax/checkpoints/orbax_io.py).

orbax's replica-parallel save splits an array held alike by several devices into one part per
replica, each part a device slice (`jax.lax.slice_in_dim`). Ours splits only when a part has at
least `min_replica_slice_bytes`; the counts below are worked out by hand from that rule. The
checkpoint itself does not change: steps saved by the previous version (orbax's StandardSave)
restore, and ours open with orbax's own StandardCheckpointer.
"""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from siglip_jax.checkpoints.orbax_io import MIN_REPLICA_SLICE_BYTES, Checkpointer

REPLICAS = 8  # One data axis over the 8 CPU devices: every array below is replicated 8 times.
SMALL = np.arange(32.0, dtype=np.float32).reshape(8, 4)  # 128 B: 16 B a replica.
# 512 KiB: 64 KiB a replica, exactly the default minimum (parts of the minimum are split).
LARGE = np.arange(128 * 1024, dtype=np.float32).reshape(128, 1024)


def _replicated():
    return NamedSharding(jax.make_mesh((REPLICAS,), ("data",)), PartitionSpec())


def _state():
    sharding = _replicated()
    return {"params": {"small": jax.device_put(SMALL, sharding),
                       "large": jax.device_put(LARGE, sharding)},
            "step": jax.device_put(jnp.int32(7), sharding)}


def _abstract():
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        _state())


def _assert_is_the_state(restored):
    np.testing.assert_array_equal(np.asarray(restored["params"]["small"]), SMALL)
    np.testing.assert_array_equal(np.asarray(restored["params"]["large"]), LARGE)
    assert int(restored["step"]) == 7


def test_the_default_minimum_is_64_kib():
    assert MIN_REPLICA_SLICE_BYTES == LARGE.nbytes // REPLICAS == 64 * 1024


@pytest.mark.parametrize("minimum, slices", [
    (None, REPLICAS),  # The default: only LARGE (64 KiB parts) is split, into 8 parts.
    (0, 2 * REPLICAS),  # SMALL and LARGE (the scalar step has no axis to split).
    (64 * 1024 + 1, 0),  # Above LARGE's parts: nothing is split.
])
def test_replicated_arrays_are_split_only_into_parts_of_the_minimum(
        tmp_path, monkeypatch, minimum, slices):
    sliced = []
    slice_in_dim = jax.lax.slice_in_dim

    def counting(array, *args, **kwargs):
        sliced.append(array.shape)
        return slice_in_dim(array, *args, **kwargs)

    monkeypatch.setattr(jax.lax, "slice_in_dim", counting)
    kwargs = {} if minimum is None else {"min_replica_slice_bytes": minimum}
    with Checkpointer(str(tmp_path), 1, **kwargs) as ckpt:
        ckpt.maybe_save(1, _state())
    monkeypatch.undo()
    assert len(sliced) == slices, sliced
    with Checkpointer(str(tmp_path), 1) as ckpt:
        step, restored = ckpt.restore_latest(_abstract())
    assert step == 1
    _assert_is_the_state(restored)


def test_a_step_saved_by_orbaxs_standard_save_restores(tmp_path):
    """The previous version saved with orbax's StandardSave: its steps resume unchanged."""
    manager = ocp.CheckpointManager(str(tmp_path / "checkpoints"),
                                    options=ocp.CheckpointManagerOptions(create=True))
    manager.save(3, args=ocp.args.StandardSave(_state()))
    manager.wait_until_finished()
    manager.close()
    with Checkpointer(str(tmp_path), 1) as ckpt:
        step, restored = ckpt.restore_latest(_abstract())
    assert step == 3
    _assert_is_the_state(restored)


def test_our_step_opens_with_orbaxs_standard_checkpointer(tmp_path):
    with Checkpointer(str(tmp_path), 1) as ckpt:
        ckpt.maybe_save(1, _state())
    restored = ocp.StandardCheckpointer().restore(
        tmp_path / "checkpoints" / "1" / "default", _abstract())
    _assert_is_the_state(restored)
