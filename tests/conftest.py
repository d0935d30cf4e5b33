"""Test setup: 8 emulated CPU devices and strict numerics, before JAX starts its backend."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# libtpu may be installed (for compile-only TPU tests): keep the default backend CPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_threefry_partitionable", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
