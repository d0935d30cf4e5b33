"""The planner (siglip_jax/planner.py, the CLI and report in plan.py): slice table, exact
sharded bytes against real allocations, and every loud failure. The analytic FLOPs and
activations against XLA's own numbers: tests/test_cost_model.py."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece as spm

from siglip_jax import experiment, plan, planner
from siglip_jax.config import load_config
from siglip_jax.experiment import infer_image_size, make_model
from siglip_jax.optim import make_optimizer
from siglip_jax.schema import parse
from siglip_jax.sharding import make_mesh, mesh_of
from siglip_jax.step import init_state

DEMO = "configs/demo.py"


def demo_plan(overrides=(), topology="cpu-8", **kw):
    """The planner's verdict on the demo config with `overrides`."""
    config = load_config(DEMO, list(overrides))
    return planner.make_plan(config, planner.parse_topology(topology, cpu_memory_bytes=16 * 2**30),
                          config_name=DEMO, **kw)


# ----------------------------------------------------------------------------- slices


@pytest.mark.parametrize("name, chips, hosts, hbm, peak", [
    ("v4-8", 4, 1, 32 * 2**30, 275e12),          # cloud.google.com/tpu/docs/v4
    ("v4-256", 128, 32, 32 * 2**30, 275e12),
    ("v5litepod-16", 16, 2, 16e9, 197e12),       # .../v5e: 16 GB, 197 TFLOPs, 8 chips/host
    ("v5e-256", 256, 32, 16e9, 197e12),
    ("v5p-128", 64, 16, 95e9, 459e12),           # .../v5p: v5p-N counts TensorCores
    ("v6e-64", 64, 8, 32e9, 918e12),             # .../v6e
])
def test_topologies_follow_the_cloud_tpu_documentation(name, chips, hosts, hbm, peak):
    t = planner.parse_topology(name)
    assert (t.chips, t.hosts, t.hbm_bytes, t.peak_flops) == (chips, hosts, hbm, peak)


@pytest.mark.parametrize("name, message", [
    ("v4-3", "multiple of 2"), ("v9-8", "unknown TPU generation"), ("tpu", "not of the form"),
])
def test_bad_topologies_are_rejected(name, message):
    with pytest.raises(planner.PlanError, match=message):
        planner.parse_topology(name)


def test_mesh_resolution():
    assert planner.resolve_mesh([("data", -1), ("fsdp", 16)], 128) == {"data": 8, "fsdp": 16}
    with pytest.raises(planner.PlanError, match="does not divide the 4 chips"):
        planner.resolve_mesh([("data", -1), ("fsdp", 16)], 4)


# ----------------------------------------------------------------------------- exact bytes


@pytest.mark.parametrize("mesh, rules", [
    ("[('data', 4), ('fsdp', 2)]", "[('.*', 'fsdp')]"),
    ("[('data', 2), ('fsdp', 4)]", "[('img/.*', 'fsdp'), ('.*', 'replicate')]"),
])
def test_param_and_optimizer_bytes_equal_a_real_sharded_allocation(mesh, rules):
    """The planner's abstract bytes per chip == the bytes device 0 really holds after init."""
    overrides = [f"mesh={mesh}", f"sharding_rules={rules}", "batch_axes=('data',)"]
    p = demo_plan(overrides)
    assert not p.errors, p.errors
    config = load_config(DEMO, overrides)
    run = parse(config)
    model = make_model(run.model)
    shapes = {"image": (8, 32, 32, 3), "labels": (8, 8)}
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shapes["image"]),
                              jnp.zeros(shapes["labels"], jnp.int32))["params"]
    tx, _ = make_optimizer(run.optim, abstract, 10)
    real_mesh = make_mesh(run.mesh.axes)
    state, _ = init_state(model, tx, shapes, real_mesh, run.mesh.rules, 0)
    device = real_mesh.devices.flat[0]

    def on_device(tree):
        return sum(s.data.nbytes for leaf in jax.tree.leaves(tree)
                   for s in leaf.addressable_shards if s.device == device)

    assert p.bytes["params"] == on_device(state["params"])
    assert p.bytes["optimizer state"] == on_device(state["opt_state"])
    assert p.params["total"] == sum(x.size for x in jax.tree.leaves(state["params"]))


# ----------------------------------------------------------------------------- the verdicts


def test_demo_plans_cleanly_with_the_numbers_it_should_have():
    p = demo_plan(dataset_size=9000)
    assert p.errors == []
    assert p.mesh == {"data": 8} and p.per_device_batch == 16
    assert p.image_hw == (32, 32) and p.text_len == 8
    text = plan.format_plan(p)
    assert "70 steps per epoch" in text  # 9000 / 128 = 70.3
    assert "ok: no problem found" in text


def _errors(overrides, topology="cpu-8"):
    return demo_plan(overrides, topology).errors


def test_batch_that_does_not_divide_over_the_data_axes_fails():
    errors = _errors(["input.global_batch=100"])
    assert errors == ["input.global_batch=100 does not divide over the 8 batch shards "
                      "(data=8) of cpu-8"]


def test_batch_that_does_not_split_into_accumulation_steps_fails():
    config = load_config("configs/siglip_b16_224.py:data=/tmp,accum=3,batch=4096")
    errors = planner.make_plan(config, planner.parse_topology("v4-64")).errors
    assert errors == ["input.global_batch=4096 does not split into grad_accum_steps=3 "
                      "micro-batches over 32 shards"]


def test_sharding_rule_that_matches_nothing_fails():
    errors = _errors(["sharding_rules=[('img/nonexistent/.*', 'fsdp'), ('.*', 'replicate')]",
                      "mesh=[('data', 4), ('fsdp', 2)]"])
    assert len(errors) == 1
    assert errors[0].startswith("sharding_rules: sharding rule regex 'img/nonexistent/.*' "
                                "matches no parameter")


def test_frozen_group_that_an_earlier_group_trains_fails():
    config = load_config("configs/lit_b16.py:data=/tmp,img=/dev/null", [
        "schedule=[('img/Transformer/.*', {'decay_type': 'cosine'}), ('img/.*', None), "
        "('.*', {'decay_type': 'cosine'})]"])
    errors = planner.make_plan(config, planner.parse_topology("v4-32")).errors
    assert len(errors) == 1 and errors[0].startswith("schedule: group 'img/.*' is frozen (None)")
    assert "get the schedule of the earlier group 'img/Transformer/.*'" in errors[0]


def test_frozen_tower_without_a_checkpoint_fails():
    config = load_config("configs/lit_b16.py:data=/tmp,img=")
    errors = planner.make_plan(config, planner.parse_topology("v4-32")).errors
    assert errors == ["schedule freezes the whole img tower but model_init.img (and "
                      "model_init.full) is empty: it would stay at its random init"]


def test_missing_checkpoint_fails(tmp_path):
    missing = tmp_path / "no_such_checkpoint.npz"
    config = load_config(f"configs/lit_b16.py:data={tmp_path},img={missing}")
    errors = planner.make_plan(config, planner.parse_topology("v4-32")).errors
    assert errors == [f"model_init.img checkpoint: not found: '{missing}'"]
    missing.write_bytes(b"")  # Exists now: the planner only checks presence.
    assert planner.make_plan(config, planner.parse_topology("v4-32")).errors == []


def test_placeholder_and_missing_data_fail(tmp_path):
    config = load_config("configs/siglip_b16_224.py")
    errors = planner.make_plan(config, planner.parse_topology("v4-64")).errors
    assert errors == ["input.data.pattern is the placeholder 'gs://YOUR_BUCKET/webli/*.tar': "
                      "pass the real path as a config argument (see the config's docstring)"]
    config = load_config(f"configs/siglip_b16_224.py:data={tmp_path}/*.tar")
    errors = planner.make_plan(config, planner.parse_topology("v4-64")).errors
    assert errors == [f"input.data.pattern: no file matches '{tmp_path}/*.tar'"]


def test_memory_over_hbm_fails():
    config = load_config("configs/siglip_b16_224.py:data=/tmp")
    p = planner.make_plan(config, planner.parse_topology("v4-8"))  # 4 chips: 8192 examples each.
    assert len(p.errors) == 1
    assert p.errors[0].startswith("estimated memory per chip ")
    assert "exceeds the 32.00 GiB HBM of a TPU v4 chip (params " in p.errors[0]
    assert p.memory_total > 32 * 2**30


def test_tokenizer_larger_than_the_embedding_table_fails(tmp_path):
    words = [f"word{i}" for i in range(200)]
    (tmp_path / "corpus.txt").write_text("\n".join(" ".join(words[i:i + 9]) for i in range(190)))
    spm.SentencePieceTrainer.train(
        input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "sp"), vocab_size=80,
        model_type="word", pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
    tok = tmp_path / "sp.model"
    ok = demo_plan([f"tokenizer.model={tok}", "model.text.vocab_size=80"])
    assert ok.errors == []
    errors = _errors([f"tokenizer.model={tok}", "model.text.vocab_size=64"])
    assert errors == [f"tokenizer.model '{tok}' has 80 pieces but model.text.vocab_size is 64: "
                      "ids past it have no embedding"]


def test_image_size_comes_from_the_last_resize_or_crop_op():
    pp = ('decode|resize((256, 320))|copy("texts", "x|y")|central_crop(size=224)|'
          'tokenize(max_len=8, inkey="x|y")|keep("image", "labels")')
    config = load_config(DEMO, [f"input.pp={pp}"])
    assert infer_image_size(parse(config)) == (224, 224)
    config = load_config(DEMO, ["input.pp=decode|resize((256, 320))"])
    assert infer_image_size(parse(config)) == (256, 320)
    config = load_config(DEMO, ["input.pp=decode"])
    assert infer_image_size(parse(config)) == (32, 32)  # The demo source's image_size.


def test_pp_strings_with_unknown_ops_or_bad_arguments_fail():
    errors = _errors(["input.pp=decode|flatten|value_range(-1, 1)",
                      "evals.zeroshot.pp=resize(32, colour=1)|keep('image', 'label')"])
    assert len(errors) == 2
    assert errors[0].startswith("input.pp: pp op #2 'flatten': unknown op 'flatten'; "
                                "registered ops: central_crop, ")
    assert errors[1] == ("evals.zeroshot.pp: pp op #1 'resize(32, colour=1)': got an unexpected "
                         "keyword argument 'colour'")


def test_mesh_that_does_not_fit_the_slice_fails():
    assert _errors(["mesh=[('data', -1), ('fsdp', 3)]"]) == [
        "mesh [('data', -1), ('fsdp', 3)] does not divide the 8 chips"]


def test_unknown_top_level_key_fails():
    config = load_config(DEMO)
    config.unlock()
    config.learning_rate = 0.1
    errors = planner.make_plan(config, planner.parse_topology("cpu-8")).errors
    assert len(errors) == 1 and errors[0].startswith("unknown config key config.learning_rate")


def test_cli_exit_codes_and_one_line_errors(capsys):
    assert plan.main(["--config", DEMO, "--topology", "cpu-8"]) == 0
    assert "ok: no problem found" in capsys.readouterr().out

    code = plan.main(["--config", DEMO, "--topology=cpu-8", "--config.input.global_batch=100",
                      "--config.sharding_rules", "[('nope', 'replicate'), ('.*', 'replicate')]"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert [line.split(":")[0] for line in err] == ["error", "error"]
    assert "does not divide over the 8 batch shards" in err[0]
    assert "sharding rule regex 'nope' matches no parameter" in err[1]

    assert plan.main(["--config", DEMO, "--topology", "v4-7"]) == 2
    assert capsys.readouterr().err.startswith("error: topology 'v4-7'")
    assert plan.main(["--config", DEMO, "--topology", "cpu-8", "--config.nope=1"]) == 2
    assert "unknown config key 'nope'" in capsys.readouterr().err


def test_time_estimate_follows_flops_peak_and_mfu():
    p = demo_plan(mfu=0.5)
    expected = p.flops["model"] / (8 * p.topology.peak_flops * 0.5)
    assert math.isclose(p.step_seconds, expected)
    # FLOPs scale linearly with the batch (the loss term quadratically, but it is tiny here).
    p2 = demo_plan(["input.global_batch=256"])
    assert np.isclose(p2.flops["model"] / p.flops["model"], 2.0, rtol=0.01)


def test_planner_bytes_are_the_trainers_sharded_abstract_state():
    """Params/optimizer bytes of the plan == per-device bytes of experiment.build_step's
    abstract state on a real 4 × 2 mesh (the planner builds through the trainer's code)."""
    overrides = ["mesh=[('data', 4), ('fsdp', 2)]", "sharding_rules=[('.*', 'fsdp')]"]
    p = demo_plan(overrides)
    run = parse(load_config(DEMO, overrides))
    mesh = mesh_of(run.mesh)
    parts = experiment.build_step(run, mesh, experiment.input_shapes(run))
    device = mesh.devices.flat[0]

    def device_bytes(abstract):
        total = 0
        for leaf in jax.tree.leaves(abstract):
            index = leaf.sharding.devices_indices_map(leaf.shape)[device]
            shard = [len(range(*s.indices(n))) for s, n in zip(index, leaf.shape, strict=True)]
            total += math.prod(shard) * leaf.dtype.itemsize
        return total

    assert p.bytes["params"] == device_bytes(parts.abstract_state["params"])
    assert p.bytes["optimizer state"] == device_bytes(parts.abstract_state["opt_state"])
    assert p.bytes["params"] < device_bytes(jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=jax.sharding.NamedSharding(
            mesh, jax.sharding.PartitionSpec())), parts.abstract_state["params"]))
