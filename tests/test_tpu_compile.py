"""What the TPU compiler does with our programs, on compile-only TPU devices (libtpu, no TPU).

The compiles are tiny (seconds each on a TPU-less machine): v4:2x2x1 megacore (4 chips, a
v4-8) and v5e:2x2 (4 chips). The HLO parsing, the loop correction and the roofline arithmetic
are checked against hand-written HLO and hand-computed numbers; those tests need no compiler.
The loop-corrected FLOPs and bytes of a scanned step are checked against the same step
compiled with no loop at all (ground truth: the compiler then counts everything). The tests that
compile require libtpu (the test extra) through tests/extras.py: skipped without it, failed
when CI sets SIGLIP_REQUIRE_EXTRAS=1.
"""

import dataclasses
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from extras import require
from jax.experimental.compilation_cache import compilation_cache

from siglip_jax import compiled_step as cs
from siglip_jax import experiment, losses, plan, planner
from siglip_jax import sharding as sh
from siglip_jax.config import load_config
from siglip_jax.models.common import Encoder, batch_sharded_activations
from siglip_jax.schema import parse
from siglip_jax.tpu_slices import (
    CHIPS,
    SliceError,
    compile_only_devices,
    cpu_backend_flags_hidden,
    parse_slice,
)

GiB = 1024**3


# ----------------------------------------------------------------------- no compiler needed


@pytest.mark.parametrize("name, chips, topology, config", [
    ("v4-8", 4, "v4:2x2x1", "megacore"), ("v4-32", 16, "v4:2x2x4", "megacore"),
    ("v4-256", 128, "v4:4x4x8", "megacore"), ("v4-512", 256, "v4:4x8x8", "megacore"),
    ("v5litepod-16", 16, "v5e:4x4", None), ("v5e-4", 4, "v5e:2x2", None),
    ("v5p-128", 64, "v5p:4x4x4", "megacore"), ("v6e-64", 64, "v6e:8x8", None),
    ("v4:2x2x3", 12, "v4:2x2x3", "megacore"),
])
def test_slice_names_map_to_gcloud_topologies(name, chips, topology, config):
    s = parse_slice(name)
    assert (s.chips, s.topology, s.chip_config) == (chips, topology, config)


@pytest.mark.parametrize("name, says", [("v4-7", "multiple of 2"), ("v9-8", "unknown TPU"),
                                        ("tpu", "not of the form"), ("v4-24", "power of two"),
                                        ("v5e:2x2x2", "2 positive")])
def test_bad_slice_names_say_what_is_wrong(name, says):
    with pytest.raises(SliceError, match=says):
        parse_slice(name)


def test_libtpu_is_not_shown_the_cpu_backends_flags(monkeypatch):
    # libtpu aborts the process on an XLA flag it does not define (tests/conftest.py sets a
    # CPU one); the TPU compiler gets the rest, and the variable is whole again afterwards.
    flags = ("--xla_force_host_platform_device_count=8 --xla_cpu_use_fusion_emitters=false "
             "--xla_backend_optimization_level=0 --xla_cpu_multi_thread_eigen=false")
    monkeypatch.setenv("XLA_FLAGS", flags)
    with cpu_backend_flags_hidden():
        assert os.environ["XLA_FLAGS"] == ("--xla_force_host_platform_device_count=8 "
                                           "--xla_backend_optimization_level=0")
    assert os.environ["XLA_FLAGS"] == flags
    monkeypatch.delenv("XLA_FLAGS")
    with cpu_backend_flags_hidden():
        assert "XLA_FLAGS" not in os.environ


def test_chip_facts_are_the_published_ones():
    # Cloud TPU docs: v4 32 GiB / 1200 GB/s / 275 TFLOP/s; v5e 16 GB / 819 GB/s / 197 TFLOP/s.
    assert CHIPS["v4"].hbm_bytes == 32 * GiB and CHIPS["v4"].hbm_bytes_per_s == 1.2e12
    assert CHIPS["v4"].peak_flops == 275e12 and CHIPS["v5e"].peak_flops == 197e12
    assert CHIPS["v5e"].hbm_bytes == 16e9 and CHIPS["v5e"].ici_bytes_per_s == 1600e9 / 8


HLO = """HloModule m, entry_computation_layout={(f32[8,32]{1,0})->f32[8,32]{1,0}}

%body (p: (s32[], bf16[4,128])) -> (s32[], bf16[4,128]) {
  %p = (s32[], bf16[4,128]{1,0}) parameter(0)
  %x = bf16[4,128]{1,0:T(8,128)} get-tuple-element(%p), index=1
  %ag = bf16[16,128]{1,0} all-gather(%x), channel_id=1, dimensions={0}
  ROOT %t = (s32[], bf16[4,128]{1,0}) tuple(%i, %x)
}

%cond (p: (s32[], bf16[4,128])) -> pred[] {
  %p = (s32[], bf16[4,128]{1,0}) parameter(0)
  %c = s32[] constant(5)
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}

ENTRY %main (a: f32[8,32], /*index=1*/b: bf16[4,128]) -> f32[8,32] {
  %a = f32[8,32]{1,0} parameter(0)
  %b = bf16[4,128]{1,0} parameter(1)
  %w = (s32[], bf16[4,128]{1,0}) while(%tup), condition=%cond, body=%body, TRIP12
  %w2 = (s32[], bf16[4,128]{1,0}) while(%tup), condition=%cond, body=%body2
  %cps = (f32[8,32]{1,0}, f32[8,32]{1,0}, u32[], u32[]) collective-permute-start(%a), PAIRS
  %cpd = f32[8,32]{1,0} collective-permute-done(%cps)
  ROOT %ar = f32[8,32]{1,0} all-reduce(%cpd), to_apply=%add
}

%body2 (p: (s32[], bf16[4,128])) -> (s32[], bf16[4,128]) {
  %q = (s32[], bf16[4,128]{1,0}) parameter(0)
  %y = bf16[4,128]{1,0} get-tuple-element(%q), index=1
  %rs = bf16[1,128]{1,0} reduce-scatter(%y), channel_id=2, dimensions={0}
  ROOT %t2 = (s32[], bf16[4,128]{1,0}) tuple(%i, %y)
}
""".replace("TRIP12", 'backend_config={"known_trip_count":{"n":"12"}}').replace(
    "PAIRS", "source_target_pairs={{0,1},{1,0}}")


def test_collective_bytes_count_operands_once_per_loop_trip():
    got = cs.collective_bytes(HLO)
    # all-gather: operand bf16[4,128] = 1024 B, 12 trips (the compiler's known trip count);
    # reduce-scatter: 1024 B, 5 trips (read from `i < 5` in the loop condition);
    # collective-permute: f32[8,32] = 1024 B once (start only); all-reduce 1024 B once.
    assert got == {"all-gather": 12 * 1024, "reduce-scatter": 5 * 1024, "all-reduce": 1024,
                   "collective-permute": 1024, "all-to-all": 0}


STACKED = """HloModule m

%fused_update (p0: f32[12,256,64], p1: s32[], p2: f32[256,64]) -> f32[12,256,64] {
  %p0 = f32[12,256,64]{2,1,0} parameter(0)
  %p1 = s32[] parameter(1)
  %p2 = f32[256,64]{2,1,0} parameter(2)
  %b = f32[1,256,64]{2,1,0} bitcast(%p2)
  %z = s32[] constant(0)
  ROOT %dus = f32[12,256,64]{2,1,0} dynamic-update-slice(%p0, %b, %p1, %z, %z)
}

%fused_layer (q0: f32[12,64,64], q1: s32[], q2: f32[256,64]) -> f32[256,64] {
  %q0 = f32[12,64,64]{2,1,0} parameter(0)
  %q1 = s32[] parameter(1)
  %z = s32[] constant(0)
  %w = f32[1,64,64]{2,1,0} dynamic-slice(%q0, %q1, %z, %z), dynamic_slice_sizes={1,64,64}
  %wb = f32[64,64]{1,0} bitcast(%w)
  %q2 = f32[256,64]{1,0} parameter(2)
  ROOT %d = f32[256,64]{1,0} dot(%q2, %wb), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%body (p: STATE) -> STATE {
  %p = STATE parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[256,64]{1,0} get-tuple-element(%p), index=1
  %ws = f32[12,64,64]{2,1,0} get-tuple-element(%p), index=2
  %res = f32[12,256,64]{2,1,0} get-tuple-element(%p), index=3
  %y = f32[256,64]{1,0} fusion(%ws, %i, %x), kind=kOutput, calls=%fused_layer
  %saved = f32[12,256,64]{2,1,0} fusion(%res, %i, %y), kind=kLoop, calls=%fused_update
  ROOT %t = STATE tuple(%i, %y, %ws, %saved)
}

%cond (p: STATE) -> pred[] {
  %p = STATE parameter(0)
  %c = s32[] constant(12)
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}

ENTRY %main (a: f32[256,64], w: f32[12,64,64]) -> f32[12,64,64] {
  %a = f32[256,64]{1,0} parameter(0)
  %w = f32[12,64,64]{2,1,0} parameter(1)
  %n = f32[12,64,64]{2,1,0} negate(%w)
  %w0 = STATE while(%tup), condition=%cond, body=%body
  ROOT %r = f32[12,64,64]{2,1,0} add(%n, %n)
}
""".replace("STATE", "(s32[], f32[256,64]{1,0}, f32[12,64,64]{2,1,0}, f32[12,256,64]{2,1,0})")


def test_loop_counts_weigh_loop_bodies_by_their_trips_and_read_slices_of_stacked_arrays():
    got = cs.loop_counts(STACKED)  # A 12-trip loop (the bound read from its condition).
    layer = 2 * 256 * 64 * 64  # One scanned layer's matmul: x[256,64] · w_i[64,64].
    assert got.flops_once == layer and got.flops_weighted == 12 * layer
    # Bytes of one trip: the layer reads its 64×64 weight slice (not the stacked 12×64×64)
    # and x, writes y; the in-place update writes one 256×64 slice (not the 12×256×64
    # buffer) and reads y; both read the 4-byte loop index; the condition compares two
    # s32 into a pred (9 B). Outside the loop: negate reads and writes 12×64×64 floats,
    # add reads two and writes one.
    trip = 4 * (64 * 64 + 256 * 64 + 256 * 64) + 4 * (256 * 64 + 256 * 64) + 2 * 4 + 9
    outside = 5 * 4 * 12 * 64 * 64
    assert got.bytes_once == trip + outside
    assert got.bytes_weighted == 12 * trip + outside
    # Other arithmetic (elements produced): negate and add outside the loop, the loop
    # condition's compare (a pred[]) once per trip.
    assert (got.other_once, got.other_weighted) == (2 * 12 * 64 * 64 + 1, 2 * 12 * 64 * 64 + 12)
    # The compiler's counts (loop bodies once) corrected: the matmuls per trip plus the
    # compiler's other FLOPs scaled by the other arithmetic's trips; the extra trips' bytes
    # added to its bytes.
    flops, accessed = got.correct(layer + 1000.0, 5e6)
    assert flops == pytest.approx(12 * layer + 1000.0 * (2 * 12 * 64 * 64 + 12)
                                  / (2 * 12 * 64 * 64 + 1))
    assert accessed == 5e6 + 11 * trip


def test_a_batched_convolution_counts_only_the_taps_on_real_elements():
    # The TPU compiler writes a batched matmul [2,8] × ([16,32] · [32,64]) as a convolution
    # over the batch dims, dilated so that one tap of each window meets a real element:
    # 2 × 8 × 16 × 64 × 32 multiply-adds, not 2 × 8 times as many.
    hlo = """HloModule m

ENTRY %main (k: f32[2,8,16,32], v: f32[2,8,32,64]) -> f32[2,8,16,64] {
  %k = f32[2,8,16,32]{3,2,1,0} parameter(0)
  %v = f32[2,8,32,64]{3,2,1,0} parameter(1)
  ROOT %c = f32[2,8,16,64]{3,2,1,0} convolution(%k, %v), WINDOW, dim_labels=01bf_01io->01bf
}
""".replace("WINDOW", "window={size=2x8 stride=1x7 lhs_dilate=2x8}")
    assert cs.loop_counts(hlo).flops_once == 2 * (2 * 8 * 16 * 64 * 32)


def test_roofline_names_its_bound_and_drops_an_insane_compiler_estimate():
    chip = CHIPS["v4"]  # 275e12 FLOP/s, 1.2e12 B/s HBM, 3e11 B/s ICI.
    r = cs.CompiledReport("v4-8", 4, chip, examples_per_step=1000, compile_seconds=1.0,
                          argument_bytes=3 * GiB, output_bytes=2 * GiB, alias_bytes=2 * GiB,
                          temp_bytes=10 * GiB, flops=550e12, bytes_accessed=1.2e12,
                          collectives={"all-reduce": int(3e11)}, compiler_optimal_seconds=-32.7,
                          model_flops=275e12)
    assert r.bounds() == pytest.approx({"compute": 2.0, "memory": 1.0, "collectives": 1.0})
    assert (r.step_seconds, r.bound) == (pytest.approx(2.0), "compute")
    assert r.optimal_seconds is None  # Negative: not reported as an estimate.
    assert r.total_bytes == 13 * GiB and r.fits
    assert r.examples_per_second == pytest.approx(500.0)
    assert r.mfu == pytest.approx(0.5)  # Model FLOPs, not the compiler's (remat included).
    text = cs.format_report(r)
    assert "ESTIMATE" in text and "not usable" in text and "13.00 GiB" in text
    assert not r.model_flops_exceed and "exceed" not in text
    # Model FLOPs above what the program holds (work in a lax.cond): capped, and said.
    over = dataclasses.replace(r, model_flops=660e12)
    assert over.model_flops_exceed and over.mfu == pytest.approx(1.0)  # 550e12 / (2 s × peak).
    assert "exceed the compiled step's" in cs.format_report(over)


# ----------------------------------------------------------------------- the TPU compiler

@pytest.fixture(scope="module")
def tpu_compiler():
    """libtpu, the TPU compiler (test extra); the test is skipped without it, unless
    SIGLIP_REQUIRE_EXTRAS=1. Compile-only TPU executables cannot be read back from the
    session's compilation cache (tests/conftest.py): it is off while these tests run, so each
    compile is a plain one."""
    libtpu = require("libtpu")
    enabled = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    yield libtpu
    jax.config.update("jax_enable_compilation_cache", enabled)
    compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def v5e(tpu_compiler):
    return compile_only_devices("v5e:2x2")


@pytest.fixture(scope="module")
def v4(tpu_compiler):
    return compile_only_devices("v4:2x2x1")


def _loss_hlo(devices, impl, per_chip=64, dim=128):
    mesh = sh.make_mesh([("data", -1)], devices)
    loss_fn = losses.make_loss(impl, mesh, ("data",))
    spec = jax.ShapeDtypeStruct((per_chip * len(devices), dim), jnp.float32,
                                sharding=sh.batch_sharding(mesh, ("data",)))

    def f(zimg, ztxt):
        return loss_fn(zimg, ztxt, jnp.log(10.0), -10.0)[0]

    return jax.jit(jax.grad(f, argnums=(0, 1))).lower(spec, spec).compile()


@pytest.mark.parametrize("impl", ["ring", "bidirectional"])
def test_ring_losses_pass_blocks_round_and_gather_nothing(v4, impl):
    compiled = _loss_hlo(v4, impl)
    got = cs.collective_bytes(compiled.as_text())
    assert got["collective-permute"] > 0 and got["all-gather"] == 0
    # 64 x 128 float32 text blocks = 32 KiB per hop; at least the N-1 = 3 hops forward.
    assert got["collective-permute"] >= 3 * 64 * 128 * 4 // (2 if impl == "bidirectional" else 1)


def test_all_gather_loss_gathers_the_texts(v5e):
    compiled = _loss_hlo(v5e, "all_gather")
    got = cs.collective_bytes(compiled.as_text())
    assert got["all-gather"] >= 64 * 128 * 2  # At least the local text block (bf16 or f32).
    assert got["collective-permute"] == 0


BIG = dict(width=256, seq=64)  # Smaller programs keep everything on chip: 0 temp bytes.
_COMPILED = {}


def _encoder_grad(devices, mesh_spec, rules, batch, **kw):
    """The compiled gradient of a 2-block Encoder (cached: several tests share programs)."""
    key = (tuple(d.id for d in devices), devices[0].device_kind, repr(mesh_spec), repr(rules),
           batch, repr(sorted(kw.items())))
    if key not in _COMPILED:
        _COMPILED[key] = _compile_encoder_grad(devices, mesh_spec, rules, batch, **kw)
    return _COMPILED[key]


def _compile_encoder_grad(devices, mesh_spec, rules, batch, *, scan=True, remat="none",
                          dtype=None, width=128, seq=32):
    mesh = sh.make_mesh(mesh_spec, devices)
    axes = tuple(mesh.axis_names)
    model = Encoder(depth=2, mlp_dim=4 * width, num_heads=2, scan=scan, remat_policy=remat,
                    dtype=dtype)
    x = jax.ShapeDtypeStruct((batch, seq, width), jnp.float32)
    params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    pshard = sh.param_shardings(params, rules, mesh)
    params = jax.tree_util.tree_map(
        lambda p, s: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=s), params, pshard)
    x = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh.batch_sharding(mesh, axes))

    def loss(p, x):
        with batch_sharded_activations(mesh, axes):
            y = model.apply({"params": p}, x)
        return jnp.mean(jnp.square(y.astype(jnp.float32)))

    return jax.jit(jax.grad(loss), out_shardings=pshard).lower(params, x).compile()


def test_fsdp_rules_gather_parameters_and_shard_their_memory(v5e):
    dp = _encoder_grad(v5e, [("data", -1)], [(".*", "replicate")], 64)
    fsdp = _encoder_grad(v5e, [("fsdp", -1)], [(".*", "fsdp")], 64)
    dp_c, fsdp_c = (cs.collective_bytes(c.as_text()) for c in (dp, fsdp))
    assert dp_c["all-gather"] == 0 and fsdp_c["all-gather"] > 0
    assert dp_c["all-reduce"] > 0  # Data parallel: gradients summed over the chips.
    # Parameters (the arguments besides the 64/4 x 32 x 128 float32 inputs) split 4 ways.
    inputs = 16 * 32 * 128 * 4
    dp_params = dp.memory_analysis().argument_size_in_bytes - inputs
    fsdp_params = fsdp.memory_analysis().argument_size_in_bytes - inputs
    assert fsdp_params < 0.5 * dp_params  # Not 0.25: small arrays are padded to TPU tiles.


def test_activations_stay_batch_sharded_under_fsdp(v5e):
    # The same per-chip batch (32 of 128) on 4 chips, data parallel or FSDP: the temporaries
    # are the activations of 32 examples either way, not of the global 128.
    dp = _encoder_grad(v5e, [("data", -1)], [(".*", "replicate")], 128, **BIG)
    fsdp = _encoder_grad(v5e, [("fsdp", -1)], [(".*", "fsdp")], 128, **BIG)
    one = dp.memory_analysis().temp_size_in_bytes
    assert one > 0 and fsdp.memory_analysis().temp_size_in_bytes < 1.5 * one


def test_scan_with_nothing_saveable_remat_lowers_temporaries(v5e):
    plain = _encoder_grad(v5e, [("data", -1)], [(".*", "replicate")], 128, **BIG)
    remat = _encoder_grad(v5e, [("data", -1)], [(".*", "replicate")], 128, **BIG,
                          remat="nothing_saveable")
    assert (remat.memory_analysis().temp_size_in_bytes
            < 0.8 * plain.memory_analysis().temp_size_in_bytes)


def test_bf16_towers_do_bf16_matmuls(v5e):
    f32 = _encoder_grad(v5e, [("data", -1)], [(".*", "replicate")], 64)
    bf16 = _encoder_grad(v5e, [("data", -1)], [(".*", "replicate")], 64, dtype=jnp.bfloat16)
    f32_types = cs.hlo_op_dtypes(f32.as_text(), "convolution")
    bf16_types = cs.hlo_op_dtypes(bf16.as_text(), "convolution")
    # float32 towers: float32 matmuls (the compiler may lower a few to bf16 passes itself).
    assert f32_types and f32_types.count("f32") >= 0.75 * len(f32_types)
    assert bf16_types and set(bf16_types) == {"bf16"}


def test_analyse_reads_the_compiled_program(v5e):
    compiled = _encoder_grad(v5e, [("data", -1)], [(".*", "replicate")], 64)
    r = cs.analyse(compiled, CHIPS["v5e"], slice_name="v5e:2x2", chips=4, examples_per_step=64)
    mem = compiled.memory_analysis()
    assert r.temp_bytes == mem.temp_size_in_bytes and r.argument_bytes > 0
    # Matmul FLOPs per chip of the 2 scanned blocks, forward + backward (3x forward), from
    # the shapes: 16 x 32 tokens, width 128, MLP 512 (q,k,v,o + 2 MLP + attention products).
    tokens, d = 16 * 32, 128
    forward = 2 * tokens * (4 * d * d + 2 * d * 4 * d) + 2 * 2 * 16 * 32 * 32 * d
    assert 0.7 * 3 * 2 * forward < r.flops < 2.0 * 3 * 2 * forward
    assert np.isfinite(r.step_seconds) and r.bound in ("compute", "memory", "collectives")


def _tiny_step(scan, fsdp):
    """A tiny SigLIP train step (image 3 blocks, text 2, width 32, ring loss, batch 32)
    scanned with the ring's hops in a loop (scan), or with no loop at all (blocks and
    hops unrolled): the same step, whose compiler cost analysis then needs no correction."""
    c = load_config("configs/demo.py", ["input.global_batch=32"])
    for tower, depth in (("image", 3), ("text", 2)):
        c.model[tower] = dict(c.model[tower], width=32, depth=depth, mlp_dim=128, num_heads=2,
                              scan=scan)
    c.model.out_dim = 32
    c.loss = dict(impl="ring", unroll=not scan)
    c.evals = {}
    if fsdp:
        c.mesh, c.batch_axes, c.sharding_rules = [("fsdp", -1)], ("fsdp",), [(".*", "fsdp")]
    return c


@pytest.mark.parametrize("fsdp", [False, True], ids=["data_parallel", "fsdp"])
def test_loop_corrected_cost_matches_the_step_compiled_without_loops(tpu_compiler, fsdp):
    looped, unrolled = (cs.compile_train_step(parse(_tiny_step(scan, fsdp)), "v4-8")
                        for scan in (True, False))
    # The scanned step's loops really are counted once by the compiler (5 blocks → ~1/3).
    assert looped.compiler_flops < 0.5 * unrolled.compiler_flops
    assert looped.flops == pytest.approx(unrolled.compiler_flops, rel=0.05)
    assert looped.bytes_accessed == pytest.approx(unrolled.compiler_bytes_accessed, rel=0.20)
    assert unrolled.flops == unrolled.compiler_flops  # No loop: nothing to correct.
    # The analytic model FLOPs (cost_model: 3 × forward matmuls, no remat) per chip against
    # the matmuls in the compiled HLO (which also holds the loss and the heads).
    plan = planner.make_plan(_tiny_step(True, fsdp), planner.parse_topology("v4-8"))
    assert plan.flops["model"] / 4 == pytest.approx(looped.matmul_flops, rel=0.10)


def test_tpu_compiler_options_reach_the_tpu_compiler_and_only_it(tpu_compiler):
    """`tpu_compiler_options` go to the train step's compile on TPU devices (an option the TPU
    compiler does not know fails there, by name) and nowhere else: on the CPU the same step
    compiles. (The recipes' FSDP options change nothing at this size: XLA writes collective
    matmuls only for large operands; docs/tpu.md has the B/16 and L/16 numbers.)"""
    c = _tiny_step(True, False)
    with c.unlocked():
        c.tpu_compiler_options = {"xla_tpu_no_such_option": 1}
    run = parse(c)
    with pytest.raises(Exception, match="xla_tpu_no_such_option"):
        cs.compile_train_step(run, "v4-8")
    shapes = experiment.input_shapes(run)
    parts = experiment.build_step(run, sh.mesh_of(run.mesh), shapes)
    parts.step_fn.lower(parts.abstract_state,
                        experiment.abstract_batch(parts, shapes, run)).compile()


_TRAIN_REPORTS = {}


@pytest.fixture
def train_step_compiled_once(monkeypatch, tpu_compiler):
    """The plan tests below compile the same train step (the demo at batch 64 on v4-8; their
    evaluator settings differ, which the train step does not read): the first compiles it,
    the others reuse its report. Each still builds the step and compiles its own eval steps."""
    compile_train_step = cs.SliceBuild.compile_train_step

    def once(self, *, model_flops=None):
        key = (repr(dataclasses.replace(self.run, evals=())), self.spec.name)
        if key not in _TRAIN_REPORTS:
            _TRAIN_REPORTS[key] = compile_train_step(self)
        return dataclasses.replace(_TRAIN_REPORTS[key], model_flops=model_flops)

    monkeypatch.setattr(cs.SliceBuild, "compile_train_step", once)


@pytest.mark.usefixtures("train_step_compiled_once")
def test_plan_compile_reports_the_trainers_compiled_step(capsys, monkeypatch):
    """`plan --compile` compiles experiment.build_step's step for the slice: the compiler's
    exact bytes per chip sit next to the analytic estimate; one build serves the train step
    and the evaluator's image step; a CPU topology is refused."""
    builds = []
    build_step = experiment.build_step

    def counted(*args, **kwargs):
        builds.append(args)
        return build_step(*args, **kwargs)

    for module in (planner, cs):  # Both build through experiment.build_step.
        monkeypatch.setattr(module, "build_step", counted)
    assert plan.main(["--config", "configs/demo.py", "--topology", "v4-8", "--compile",
                      "--config.input.global_batch=64"]) == 0
    out = capsys.readouterr().out
    assert "memory per chip (compiler, exact)" in out and "compiled for v4-8 (4 × TPU v4)" in out
    assert re.search(r"analytic vs compiled: .* estimated, .* compiled per chip", out)
    assert re.search(r"eval zeroshot +image step at batch 240: .* per chip \(compiler\)", out)
    # make_plan builds once on an abstract mesh; the compile builds once on the slice's devices.
    assert len([a for a in builds if not isinstance(a[1], jax.sharding.AbstractMesh)]) == 1
    assert plan.main(["--config", "configs/demo.py", "--topology", "cpu-8", "--compile"]) == 2
    assert "--compile needs a TPU slice" in capsys.readouterr().err


@pytest.mark.usefixtures("train_step_compiled_once")
def test_plan_compile_fails_in_one_line_when_an_evaluator_step_does_not_fit(capsys):
    """An evaluation batch too large for the chip: the evaluator's compiled image step is
    over HBM, so the plan fails naming the key to change."""
    assert plan.main(["--config", "configs/demo.py", "--topology", "v4-8", "--compile",
                      "--config.input.global_batch=64",
                      "--config.evals.zeroshot.batch_size=4194304"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: evals.zeroshot: the compiled image step at batch 4194304 does not "
                   "fit the 32.00 GiB HBM of a TPU v4 chip; lower evals.zeroshot.batch_size"]


@pytest.mark.usefixtures("train_step_compiled_once")
def test_a_compiled_step_that_fits_overrules_the_analytic_memory_error(capsys):
    """The analytic activation estimate is conservative: with --compile, a step that the
    compiler fits within the chip's HBM clears the analytic 'estimated memory' error."""
    config = load_config("configs/demo.py", ["input.global_batch=64"])
    tiny_hbm = dataclasses.replace(planner.parse_topology("v4-8"), hbm_bytes=2**20)  # 1 MiB.
    p = planner.make_plan(config, tiny_hbm)
    assert len(p.errors) == 1 and p.errors[0].startswith(planner.MEMORY_ERROR)
    assert plan.compile_and_compare(p, "v4-8") is None  # Real v4 chips: it fits.
    assert p.errors == []
    assert "the compiled step fits" in capsys.readouterr().out
