"""Assertions shared by test modules."""

import numpy as np

from siglip_jax.checkpoints import big_vision as bv


def assert_bit_equal(a, b):
    """Two nested param trees have the same keys, dtypes, shapes and bytes."""
    fa, fb = bv.flatten(a, ""), bv.flatten(b, "")
    assert sorted(fa) == sorted(fb)
    for k in fa:
        x, y = np.asarray(fa[k]), np.asarray(fb[k])
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), k
