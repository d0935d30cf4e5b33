"""The options of each training objective (`config.loss.<name>`): defaults and checks.

    c.loss = dict(impl="ring", decoder=dict(weight=1.0), self_distillation=dict(weight=1.0))

`DEFAULTS[name]` holds an objective's options with their defaults (docs/siglip2_training.md,
"Options and defaults", gives the source of each); `check_options(name, raw)` returns them
with `raw` merged in and checked, or raises ValueError naming the bad option (schema.py turns
it into a one-line ConfigError). The objectives themselves (objectives/decoder.py,
distillation.py, masked.py) read the checked dicts. This module stays free of the model code,
so that the config schema can check a run's options without importing the objectives.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from siglip_jax.data.locca import TASKS

DECODER = "decoder"
SELF_DISTILLATION = "self_distillation"
MASKED_PREDICTION = "masked_prediction"
CENTERINGS = ("sinkhorn", "softmax")
GLOBAL_VIEW = "global_view"  # The batch key of the augmented global view (pp op global_view).

DEFAULTS: dict[str, dict[str, object]] = {
    # vocab_chunk: 8192 columns of the 256k Gemma vocabulary per block (32 blocks): on v4 at
    # 128 images × 3 rows per chip a block's float32 logits are 768 MiB
    # (docs/siglip2_training.md, "The chunked loss").
    DECODER: {"weight": 1.0, "tasks_per_example": 1, "vocab_chunk": 8192},
    SELF_DISTILLATION: {
        "weight": 1.0,          # SigLIP 2 §2.3 (times a per-size factor, see the docs).
        "start_frac": 0.8,      # SigLIP 2: added for the last 20 % of training.
        "ema": 0.996,           # Not given by SILC / SigLIP 2; DINO's base momentum.
        "n_local": 8,           # SILC: eight local views.
        "local_size": 96,       # Not given; DINO's local crop size (224 px global).
        "head_hidden": 2048,    # DINO head.
        "head_bottleneck": 256,
        "head_layers": 3,
        "prototypes": 65536,
        "student_temp": 0.1,    # DINO.
        "teacher_temp": 0.04,   # DINO.
        "centering": "sinkhorn",  # DINOv2 (stateless); "softmax" = sharpening only.
        "global_key": GLOBAL_VIEW,  # The teacher's view ("image": the sigmoid loss's).
    },
    MASKED_PREDICTION: {
        "weight": 0.25,         # SigLIP 2 §2.3 (times a per-size factor, see the docs).
        "start_frac": 0.8,      # SigLIP 2: added for the last 20 % of training.
        "ema": 0.996,           # Not given; the same teacher as self_distillation.
        "mask_ratio": 0.5,      # SigLIP 2 §2.3: 50 % of the patches.
        "head_hidden": 2048,    # iBOT / DINO head.
        "head_bottleneck": 256,
        "head_layers": 3,
        "prototypes": 8192,     # iBOT's patch-head size.
        "student_temp": 0.1,
        "teacher_temp": 0.04,
        "centering": "sinkhorn",
        "global_key": GLOBAL_VIEW,  # The view both see ("image": the sigmoid loss's).
    },
}


def _check_decoder(raw: Mapping[str, object]) -> dict[str, object]:
    """`weight` (a finite number >= 0, default 1.0), `tasks_per_example` (an int in 1..3, the
    pp's rows per example, default 1), `vocab_chunk` (an int >= 0: vocabulary columns per
    block of the chunked cross-entropy, 0 = full logits; default 8192)."""
    defaults = DEFAULTS[DECODER]
    unknown = sorted(set(raw) - set(defaults))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}; valid: {sorted(defaults)}")
    options = {**defaults, **raw}
    weight = options["weight"]
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (
            np.isfinite(weight) and weight >= 0):
        raise ValueError(f"weight must be a finite number >= 0, got {weight!r}")
    options["weight"] = float(weight)
    tasks = options["tasks_per_example"]
    if isinstance(tasks, bool) or not isinstance(tasks, int) or not 1 <= tasks <= len(TASKS):
        raise ValueError(f"tasks_per_example must be an int in 1..{len(TASKS)} (rows per "
                         f"example of the pp's locca_task), got {tasks!r}")
    chunk = options["vocab_chunk"]
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 0:
        raise ValueError(f"vocab_chunk must be an int >= 0 (vocabulary columns per block of "
                         f"the chunked cross-entropy; 0 = full logits), got {chunk!r}")
    return options


def _check_self_supervised(raw: Mapping[str, object], defaults: Mapping[str, object]
                           ) -> dict[str, object]:
    """`raw` merged over `defaults` (the two self-supervised objectives' shared checks):
    unknown names, wrong types and out-of-range values raise ValueError naming the option."""
    unknown = sorted(set(raw) - set(defaults))
    if unknown:
        raise ValueError(f"unknown option {unknown[0]!r} (known: {sorted(defaults)})")
    out = {**defaults, **raw}
    for key, default in defaults.items():
        value = out[key]
        if isinstance(default, bool) or isinstance(default, str):
            if type(value) is not type(default):
                raise ValueError(f"{key}={value!r}: expected a {type(default).__name__}")
        elif isinstance(default, int):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key}={value!r}: expected a positive int")
        elif isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{key}={value!r}: expected a number")
            out[key] = value = float(value)
    for key in ("start_frac", "ema"):
        if not 0.0 <= out[key] <= 1.0:
            raise ValueError(f"{key}={out[key]!r}: expected a number in [0, 1]")
    for key in ("student_temp", "teacher_temp"):
        if out[key] <= 0:
            raise ValueError(f"{key}={out[key]!r}: expected a temperature > 0")
    if out["weight"] < 0:
        raise ValueError(f"weight={out['weight']!r}: expected a number >= 0")
    if not out["global_key"]:
        raise ValueError("global_key='': expected a batch key, e.g. 'global_view' or 'image'")
    if out["centering"] not in CENTERINGS:
        raise ValueError(f"centering={out['centering']!r}: expected one of {CENTERINGS}")
    return out


def _check_self_distillation(raw: Mapping[str, object]) -> dict[str, object]:
    return _check_self_supervised(raw, DEFAULTS[SELF_DISTILLATION])


def _check_masked_prediction(raw: Mapping[str, object]) -> dict[str, object]:
    opts = _check_self_supervised(raw, DEFAULTS[MASKED_PREDICTION])
    if not 0.0 < opts["mask_ratio"] < 1.0:
        raise ValueError(f"mask_ratio={opts['mask_ratio']!r}: expected a number in (0, 1)")
    return opts


_CHECKS: dict[str, Callable[[Mapping[str, object]], dict[str, object]]] = {
    DECODER: _check_decoder,
    SELF_DISTILLATION: _check_self_distillation,
    MASKED_PREDICTION: _check_masked_prediction,
}


def check_options(name: str, raw: Mapping[str, object] | None) -> dict[str, object]:
    """The options of objective `name` with defaults filled in; ValueError naming an unknown
    objective or a bad option."""
    if name not in _CHECKS:
        raise ValueError(f"unknown objective {name!r} (known: {sorted(_CHECKS)})")
    return _CHECKS[name](dict(raw or {}))
