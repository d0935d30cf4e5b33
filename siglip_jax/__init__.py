"""siglip_jax: train and evaluate SigLIP image-text models with JAX/Flax.

`siglip_jax.load(path)` (siglip_jax/api.py) opens a checkpoint for inference. It is imported
on first use, so that `import siglip_jax` loads neither JAX nor TensorFlow.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
_LAZY = ("load", "Model")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        # Delayed on purpose (the one upward import of the package, allowed by
        # tests/test_architecture.py): api.py loads JAX, which `import siglip_jax` must not.
        from siglip_jax import api

        return getattr(api, name)
    raise AttributeError(f"module 'siglip_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
