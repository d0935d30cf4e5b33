"""The config schema: every recipe parses; defaults, checks and one-line errors live here."""

import dataclasses
import re
from pathlib import Path

import pytest

from siglip_jax import schema
from siglip_jax.config import ConfigError, load_config
from siglip_jax.experiment import check_batch
from siglip_jax.sharding import axis_sizes, batch_shard_count

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs" / "demo.py")


def _demo(*overrides):
    return schema.parse(load_config(DEMO, list(overrides)))


NEEDS_ARGS = {"finetune_csv.py": "needs init="}  # Reads its checkpoint: see test_docs.


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.py")))
def test_every_config_file_parses_into_frozen_records(name):
    if name in NEEDS_ARGS:
        with pytest.raises(ConfigError, match=NEEDS_ARGS[name]):
            load_config(str(REPO / "configs" / name))
        return
    run = schema.parse(load_config(str(REPO / "configs" / name)))
    assert run.total_steps >= 1 and run.input.global_batch >= 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.total_steps = 5
    assert schema.parse(run) is run  # Parsing is idempotent.


def test_defaults_fill_what_the_config_leaves_out():
    config = load_config(DEMO)
    config.unlock()
    for key in ("grad_accum_steps", "on_nonfinite", "peak_flops", "time_budget_s", "model_init"):
        del config[key]
    run = schema.parse(config)
    assert (run.grad_accum_steps, run.on_nonfinite, run.peak_flops) == (1, "stop", None)
    assert run.time_budget_s == 0.0 and run.model_init.parts() == {}
    assert run.optim.hparams["eps"] == 1e-8  # Adam's default, with the config's b2.
    assert run.optim.hparams["b2"] == 0.95


@pytest.mark.parametrize("override, message", [
    ("log_every=0", "log_every must be >= 1, got 0"),
    ("total_steps=-5", "total_steps must be >= 1, got -5"),
    ("on_nonfinite='ignore'", "on_nonfinite 'ignore' is not one of ('stop', 'skip')"),
    ("batch_axes=('model',)", "batch_axes names 'model', which is not a mesh axis (data)"),
    ("checkpoint.keep=0", "checkpoint.keep must be >= 1, got 0"),
    ("input.data.name='webdataset'", "input.data.name 'webdataset' is not one of"),
    ("input.data={'name': 'demo_shapes', 'colour': 1}", "unknown config key input.data.colour"),
    ("loss.impl='ringg'", "config.loss: unknown loss impl 'ringg'"),
    ("optim.name='lamb'", "optim.name 'lamb' is not one of"),
    ("schedule.decay_type='cosin'", "schedule.decay_type 'cosin' is not one of"),
    ("model.image={'variant': 'mu/8', 'colour': 1}",
     "config.model: unknown image config key(s) ['colour']"),
    ("evals.zeroshot.type='linear'", "evals.zeroshot.type 'linear' is not one of"),
    ("tokenizer.eos='maybe'", "tokenizer.eos 'maybe' is not one of ('sticky', 'yes', 'none')"),
])
def test_bad_values_are_one_line_config_errors(override, message):
    with pytest.raises(ConfigError) as error:
        _demo(override)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_tpu_compiler_options_are_a_dict_of_plain_values():
    raw = dict(load_config(DEMO))
    assert schema.parse(raw).tpu_compiler_options == {}
    assert dict(schema.parse(dict(raw, tpu_compiler_options={"xla_a": False})
                             ).tpu_compiler_options) == {"xla_a": False}
    for bad, message in (([1], "expects a dict of XLA options"),
                         ({"xla_a": [1]}, "tpu_compiler_options.xla_a: expected an option")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            schema.parse(dict(raw, tpu_compiler_options=bad))


def test_batch_layout_is_checked_in_one_place():
    run = _demo("input.global_batch=96", "grad_accum_steps=4")
    check_batch(run, 8, 1)  # 96 = 8 shards × 4 micro-batches × 3.
    with pytest.raises(ConfigError, match="does not divide over the 36 batch shards"):
        check_batch(run, 36, 1)
    with pytest.raises(ConfigError, match="grad_accum_steps=4 micro-batches over 16 shards"):
        check_batch(run, 16, 1)
    with pytest.raises(ConfigError, match="does not divide over the 5 processes"):
        check_batch(run, 2, 5)


def test_mesh_travels_with_batch_axes_and_rules():
    run = _demo("mesh=[('data', -1), ('fsdp', 2)]", "batch_axes=('data', 'fsdp')",
                "sharding_rules=[('img/.*', 'fsdp'), ('.*', 'replicate')]")
    assert axis_sizes(run.mesh, 8) == {"data": 4, "fsdp": 2}
    assert batch_shard_count(run.mesh, 8) == 8
    assert run.mesh.rules == (("img/.*", "fsdp"), (".*", "replicate"))
    with pytest.raises(ConfigError, match="does not divide the 5 devices"):
        axis_sizes(run.mesh, 5)


def test_config_json_round_trips_through_the_schema(tmp_path):
    import json

    run = _demo("input.global_batch=64")
    path = tmp_path / "config.json"
    path.write_text(json.dumps(run.to_dict()))
    again = schema.parse(load_config(str(path)))
    assert again == run
