"""The export CLI (siglip_jax/export.py, checkpoints/parts.py) on one tiny SigLIP 2 run.

The run is the session's shared one (tests/conftest.py `siglip2_run`, tests/tiny.py
`siglip2_config`): configs/demo_siglip2.py shrunk to width 32, a MAP-pooled image tower
without head (so it is HF-representable), the LocCa decoder and both self-supervised objectives
(an EMA teacher, heads, mask token) switched on at step 2 of 4, a checkpoint at each step.
Every export is reopened with `open_model` and must give the embeddings of the run itself
(the run opened with `open_model`); the HF directory is also loaded by transformers.
"""

import json
import os
import re

import jax
import numpy as np
import pytest

from siglip_jax import export as cli
from siglip_jax.checkpoints import big_vision as bv
from siglip_jax.checkpoints import hf, loader, parts
from siglip_jax.checkpoints.open import open_model
from siglip_jax.data.tokenizer import Tokenizer
from siglip_jax.models.build import make_model

TEXT_VOCAB, BINS, TEXT_LEN, EMA = 64, 32, 18, 0.996  # demo_siglip2's vocab/bins/length; EMA.


@pytest.fixture(scope="module")
def run(siglip2_run):
    """The shared run's workdir: 4 steps, all saved, the teacher lagging from step 2 on."""
    assert siglip2_run.summary["step"] == 4
    return siglip2_run.workdir


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    image = rng.uniform(-1, 1, (3, 64, 64, 3)).astype(np.float32)
    text = rng.integers(2, TEXT_VOCAB, (3, TEXT_LEN)).astype(np.int32)
    text[:, -4:] = 1  # Sticky EOS padding.
    return image, text


def _embed(opened, image, text):
    """(zimg, ztxt, t, b) of an opened checkpoint's own model on the inputs."""
    params = opened.fitted_params()
    zimg, ztxt, out = jax.jit(make_model(opened.model).apply)({"params": params}, image, text)
    return tuple(np.asarray(x) for x in (zimg, ztxt, out["t"], out["b"]))


@pytest.fixture(scope="module")
def reference(run):
    """The run's own embeddings (open_model on the workdir) and its raw params."""
    image, text = _inputs()
    opened = open_model(run)
    return {"embeddings": _embed(opened, image, text), "opened": opened,
            "params": loader.load_params(run)[0]}


def _export(run, out, *args):
    code = cli.main(["--checkpoint", run, "--out", str(out), *args])
    assert code == 0
    return str(out)


def _assert_same_embeddings(got, want):
    for g, w, name in zip(got, want, ("zimg", "ztxt", "t", "b"), strict=True):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-6, err_msg=name)
    assert np.abs(want[0]).max() > 0.05 and np.abs(want[0] - want[0][::-1]).max() > 1e-3


def test_the_run_holds_decoder_heads_and_teacher(run, reference):
    params = reference["params"]
    assert {"dec", "distill_head", "masked_head", "mask_token"} <= set(params)
    assert loader.saved_steps(run) == [1, 2, 3, 4]
    teacher = loader.load_state_entry(run, "teacher")
    assert set(teacher) == {"img", "distill_head", "masked_head"}


def test_towers_npz_has_only_tower_keys_and_reopens_with_the_runs_embeddings(
        run, reference, tmp_path, capsys):
    out = _export(run, tmp_path / "towers.npz", "--format", "npz")
    log = capsys.readouterr().out
    assert "dropped dec, distill_head, mask_token, masked_head" in log
    want = {k: v for k, v in bv.flatten(reference["params"]).items()
            if k.split("/")[1] in ("img", "txt", "t", "b")}
    with np.load(out, allow_pickle=False) as data:
        assert sorted(data.files) == sorted(want)
        for k in want:
            np.testing.assert_array_equal(data[k], want[k], err_msg=k)
    opened = open_model(out)
    assert opened.format == "npz" and opened.image_size == (64, 64)
    assert opened.text_len == TEXT_LEN
    _assert_same_embeddings(_embed(opened, *_inputs()), reference["embeddings"])


def test_towers_hf_reopens_with_the_runs_embeddings_and_tokenizer(run, reference, tmp_path):
    out = _export(run, tmp_path / "hf", "--format", "hf")
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors",
                                       "preprocessor_config.json", "spiece.model",
                                       "tokenizer_config.json"]  # tests/test_api.py opens them.
    run_tokenizer = reference["opened"].tokenizer
    with open(run_tokenizer, "rb") as a, open(os.path.join(out, "spiece.model"), "rb") as b:
        assert a.read() == b.read()
    opened = open_model(out)
    assert opened.format == "hf" and opened.convention == "siglip"
    _assert_same_embeddings(_embed(opened, *_inputs()), reference["embeddings"])
    # The run (tokenizer.eos "sticky", no convention) and the HF directory tokenize alike.
    prompts = ["a large red circle.", "Two BLUE squares,  and a star"]
    tok = Tokenizer(run_tokenizer)
    np.testing.assert_array_equal(opened.encode_texts(tok, prompts),
                                  reference["opened"].encode_texts(tok, prompts))


def test_towers_hf_is_what_transformers_loads(run, reference, tmp_path):
    from extras import require

    torch = require("torch")
    transformers = require("transformers")
    out = _export(run, tmp_path / "hf", "--format", "hf")
    model, info = transformers.SiglipModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    image, text = _inputs(1)
    with torch.no_grad():
        got = model.eval()(input_ids=torch.from_numpy(text.astype(np.int64)),
                           pixel_values=torch.from_numpy(image.transpose(0, 3, 1, 2)))
    zimg, ztxt, _, _ = _embed(reference["opened"], image, text)
    np.testing.assert_allclose(got.image_embeds.numpy(), zimg, atol=1e-5)
    np.testing.assert_allclose(got.text_embeds.numpy(), ztxt, atol=1e-5)


def test_decoder_export_reloads_and_decodes_like_the_run(run, reference, tmp_path):
    out = _export(run, tmp_path / "dec.npz", "--format", "npz", "--part", "decoder")
    with np.load(out, allow_pickle=False) as data:
        want = {k for k in bv.flatten(reference["params"]) if k.startswith("params/dec/")}
        assert sorted(data.files) == sorted(want)
    with open(parts.sidecar_path(out)) as f:
        side = json.load(f)
    # The layout by hand: 64 text ids, 32 bins from 64, then cap, aref, gcap, then the mask.
    assert side["vocab"] == {"text_vocab": 64, "num_bins": 32, "eos_id": 1, "pad_id": 0,
                             "loc_start": 64, "task_ids": {"cap": 96, "aref": 97, "gcap": 98},
                             "mask_id": 99, "size": 100}
    assert side["image_width"] == 32 and side["decoder"]["max_len"] == 20
    dec = parts.load_decoder(out)
    assert dec.tokenizer and os.path.exists(dec.tokenizer)
    # The run's decoder logits on its own image tokens.
    run_opened = reference["opened"]
    model, params = make_model(run_opened.model), run_opened.fitted_params()
    image, _ = _inputs(2)
    _, _, enc = jax.jit(model.apply)({"params": params}, image, None)
    tokens = np.random.default_rng(3).integers(0, dec.vocab.size, (3, 20)).astype(np.int32)
    parallel = np.array([True, False, True])
    want = model.apply({"params": params}, enc["img/encoded"], tokens, parallel=parallel,
                       method="decode")
    got = dec.make_decoder().apply({"params": dec.params}, tokens, enc["img/encoded"],
                                   parallel=parallel)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-6)
    assert np.abs(np.asarray(want)).max() > 1e-3  # The trained head is no longer zero.
    # Towers .npz + decoder export = the run's full model again.
    towers = open_model(_export(run, tmp_path / "towers.npz", "--format", "npz"))
    from siglip_jax.models.two_towers import Model

    full = Model(**towers.model_config, decoder=dec.decoder)
    full_params = {**towers.params, "dec": dec.params}
    _, _, enc2 = full.apply({"params": full_params}, image, None)
    again = full.apply({"params": full_params}, enc2["img/encoded"], tokens, parallel=parallel,
                       method="decode")
    np.testing.assert_allclose(np.asarray(again), np.asarray(want), rtol=0, atol=1e-5)


def test_decoder_export_errors(run, tmp_path):
    out = _export(run, tmp_path / "dec.npz", "--format", "npz", "--part", "decoder")
    side = parts.sidecar_path(out)
    with open(side) as f:
        spec = json.load(f)
    spec["vocab"].update(num_bins=31, size=99, mask_id=98)  # A sidecar that lies about bins.
    with open(side, "w") as f:
        json.dump(spec, f)
    with pytest.raises(parts.ExportError, match="decoder.num_bins=32 but vocab.num_bins=31"):
        parts.load_decoder(out)
    spec["decoder"]["num_bins"] = 31
    with open(side, "w") as f:
        json.dump(spec, f)
    with pytest.raises(bv.CheckpointMismatchError, match=r"embed/embedding: file \(100, 32\) "
                                                          r"vs model \(99, 32\)"):
        parts.load_decoder(out)
    os.remove(side)
    with pytest.raises(parts.ExportError, match="sidecar .* is missing"):
        parts.load_decoder(out)


def test_teacher_export_is_the_ema_of_the_saved_steps(run, reference, tmp_path):
    t1 = bv.read_npz(_export(run, tmp_path / "t3.npz", "--format", "npz", "--part", "teacher",
                             "--step", "3"))
    t2 = bv.read_npz(_export(run, tmp_path / "t4.npz", "--format", "npz", "--part", "teacher"))
    student = reference["params"]
    assert sorted(t2) == ["b", "img", "t", "txt"]
    for k, v in bv.flatten(t2, "").items():
        if not k.startswith("img/"):  # Text tower, t, b: the student's.
            np.testing.assert_array_equal(v, bv.flatten(student, "")[k], err_msg=k)
    # Step 4's teacher = 0.996 · step 3's teacher + 0.004 · step 4's student (on from step 2).
    s_img, t1_img = bv.flatten(student["img"], ""), bv.flatten(t1["img"], "")
    lag = 0.0
    for k, v in bv.flatten(t2["img"], "").items():
        np.testing.assert_allclose(v, EMA * t1_img[k] + (1 - EMA) * s_img[k], rtol=1e-6,
                                   atol=1e-7, err_msg=k)
        lag = max(lag, float(np.abs(v - s_img[k]).max()))
    assert lag > 1e-5  # The teacher is not the student.


def test_step_flag_and_conversions(run, reference, tmp_path):
    step1 = bv.read_npz(_export(run, tmp_path / "s1.npz", "--format", "npz", "--step", "1"))
    last = bv.flatten(reference["params"]["img"], "")
    assert any(np.abs(v - last[k]).max() > 0 for k, v in bv.flatten(step1["img"], "").items())
    # .npz -> HF -> .npz: the towers come back exactly (HF is the unscanned layout).
    npz = _export(run, tmp_path / "towers.npz", "--format", "npz")
    hf_dir = _export(npz, tmp_path / "hf", "--format", "hf", "--tokenizer",
                     reference["opened"].tokenizer)
    assert os.path.exists(os.path.join(hf_dir, "spiece.model"))
    back = bv.read_npz(_export(hf_dir, tmp_path / "back.npz", "--format", "npz"))
    want = bv.to_layout(parts.tower_params(reference["params"])[0], scanned=False)
    assert sorted(bv.flatten(back)) == sorted(bv.flatten(want))
    for k, v in bv.flatten(want).items():
        np.testing.assert_array_equal(bv.flatten(back)[k], v, err_msg=k)


@pytest.mark.parametrize("args, out_name, message", [
    (["--format", "hf", "--part", "decoder"], "x", "--part decoder is written as --format npz"),
    (["--format", "npz", "--step", "7"], "x.npz", r"no saved step 7 \(saved: \[1, 2, 3, 4\]\)"),
    (["--format", "npz"], "x.txt", "an npz export is a file ending in .npz"),
])
def test_bad_arguments_are_one_line_errors(run, tmp_path, capsys, args, out_name, message):
    assert cli.main(["--checkpoint", run, "--out", str(tmp_path / out_name), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert re.search(message, err), err
    assert not os.listdir(tmp_path)  # Nothing was written.


def test_bad_inputs_are_one_line_errors(run, tmp_path, capsys):
    def fails(args, code, message):
        assert cli.main(args) == code
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and message in err, err

    npz = _export(run, tmp_path / "towers.npz", "--format", "npz")
    capsys.readouterr()
    fails(["--checkpoint", npz, "--format", "npz", "--part", "teacher", "--out",
           str(tmp_path / "t.npz")], 2, "has no EMA teacher image tower")
    fails(["--checkpoint", npz, "--format", "npz", "--part", "decoder", "--out",
           str(tmp_path / "d.npz")], 2, "has no decoder params 'dec'")
    fails(["--checkpoint", npz, "--format", "npz", "--step", "1", "--out",
           str(tmp_path / "s.npz")], 2, "--step 1 needs a workdir")
    fails(["--checkpoint", str(tmp_path / "missing"), "--format", "npz", "--out",
           str(tmp_path / "m.npz")], 1, "does not exist")
    fails(["--checkpoint", run, "--format", "npz", "--out", npz], 2,
          "exists; pass --force to overwrite it")
    # A GAP-pooled image tower has no HF SiglipModel form: the export says why.
    flat = {k: v for k, v in bv.flatten(bv.read_npz(npz)).items() if "/MAPHead_0/" not in k}
    gap = str(tmp_path / "gap.npz")
    np.savez(gap, **flat)
    fails(["--checkpoint", gap, "--format", "hf", "--out", str(tmp_path / "gap_hf")], 2,
          "image pool_type must be 'map'")
    assert cli.main(["--checkpoint", run, "--format", "npz", "--out", npz, "--force"]) == 0


def test_naflex_towers_export_as_siglip2_with_the_gemma_tokenizer_name(reference, tmp_path):
    """A NaFlex image tower is written as a Siglip2Model directory with `tokenizer.model`, so
    it reopens as NaFlex with the "siglip2" text convention and the same embeddings."""
    from siglip_jax.models import naflex
    from siglip_jax.models.two_towers import Model

    kw = dict(image=dict(kind="naflex", variant="mu/4", posemb_grid=4, pool_type="map"),
              text=dict(variant="mu", vocab_size=TEXT_VOCAB), out_dim=(None, 32))
    rng = np.random.default_rng(4)
    image = {"patches": rng.uniform(-1, 1, (2, 20, 48)).astype(np.float32),
             "mask": np.arange(20)[None].repeat(2, 0) < np.array([[16], [12]]),
             "spatial_shapes": np.array([[4, 4], [3, 4]], np.int32)}
    text = _inputs()[1][:2, :8]
    shapes = jax.eval_shape(Model(**kw).init, jax.random.key(0), naflex.example_input(1, 20, 4),
                            jax.ShapeDtypeStruct((1, 8), np.int32))["params"]
    params = jax.tree.map(lambda s: rng.normal(0, 0.1, s.shape).astype(np.float32), shapes)
    want = Model(**kw).apply({"params": params}, image, text)
    convention = parts.hf_convention(kw, "")
    assert convention == "siglip2"
    files = parts.save_towers(str(tmp_path / "hf"), params, "hf", model_config=kw,
                              text_len=8, tokenizer=reference["opened"].tokenizer,
                              convention=convention)
    assert sorted(os.path.basename(f) for f in files) == [
        "config.json", "model.safetensors", "tokenizer.model"]
    with open(tmp_path / "hf" / "config.json") as f:
        assert json.load(f)["architectures"] == ["Siglip2Model"]
    opened = open_model(tmp_path / "hf")
    assert opened.is_naflex and opened.convention == "siglip2" and opened.text_len == 8
    got = Model(**opened.model_config).apply({"params": opened.params}, image, text)
    for g, w in zip(got[:2], want[:2], strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=0, atol=1e-6)
    assert hf.is_naflex(hf.read_hf_config(tmp_path / "hf"))
