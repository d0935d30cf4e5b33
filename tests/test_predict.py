"""predict(): equals the Hugging Face SigLIP pipeline (processor + SiglipModel) on a tiny random
model with its own sentencepiece tokenizer; works on our orbax checkpoints and on .npz files.
Needs the `parity` extra (torch==2.13.0, transformers)."""

import json
import os

import jax
import numpy as np
import pytest
from extras import require
from PIL import Image

from siglip_jax.checkpoints import big_vision as bv
from siglip_jax.data.tokenizer import Tokenizer, train_sentencepiece
from siglip_jax.models.two_towers import Model
from siglip_jax.predict import PredictError, Predictor, main, predict

torch = require("torch")
transformers = require("transformers")

LABELS = ["2 cats", "2 dogs", "A red car!"]
TEMPLATE = "This is a photo of {}."


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random SiglipModel (32 px, patch 8, text length 32) + spiece.model + image files."""
    path = tmp_path_factory.mktemp("hf_predict")
    words = ["this is a photo of", "2 cats", "2 dogs", "a red car", "a blue bird", "three"]
    sents = [f"{a} {b}" for a in words for b in words]
    train_sentencepiece(sents, 48, str(path / "spiece.model"))
    vocab = Tokenizer(str(path / "spiece.model")).vocab_size
    text = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=32, projection_size=32,
                bos_token_id=None, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=2, image_size=32, patch_size=8)
    torch.manual_seed(0)
    model = transformers.SiglipModel(
        transformers.SiglipConfig(text_config=text, vision_config=vision)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
        model.logit_scale.fill_(np.log(10.0))
        model.logit_bias.fill_(-2.0)
    model.save_pretrained(path)
    rng = np.random.default_rng(0)
    images = []
    for i, (h, w) in enumerate([(48, 64), (32, 32), (20, 90)]):
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        images.append(str(path / f"img{i}.png"))
        Image.fromarray(pixels).save(images[-1])
    return path, model, images


def _hf_logits(path, model, images, resample):
    tokenizer = transformers.SiglipTokenizer(str(path / "spiece.model"))
    image_processor = transformers.SiglipImageProcessor(size={"height": 32, "width": 32},
                                                        resample=resample)
    processor = transformers.SiglipProcessor(image_processor=image_processor,
                                             tokenizer=tokenizer)
    inputs = processor(text=[TEMPLATE.format(label) for label in LABELS],
                       images=[Image.open(p) for p in images], padding="max_length",
                       max_length=32, return_tensors="pt")
    assert (inputs["input_ids"][:, -1] == 1).all()  # Every text fits: nothing truncated.
    with torch.no_grad():
        return model(input_ids=inputs["input_ids"],
                     pixel_values=inputs["pixel_values"]).logits_per_image.numpy()


@pytest.mark.parametrize("resample", [2, 3])  # PIL bilinear, bicubic
def test_matches_hf_pipeline(hf_dir, resample):
    path, model, images = hf_dir
    transformers.SiglipImageProcessor(size={"height": 32, "width": 32},
                                      resample=resample).save_pretrained(path)
    try:
        result = predict(images, LABELS, checkpoint=str(path))
    finally:
        os.remove(path / "preprocessor_config.json")
    want = _hf_logits(path, model, images, resample)
    assert result["logits"].shape == result["probs"].shape == (3, 3)
    np.testing.assert_allclose(result["logits"], want, atol=1e-5)
    np.testing.assert_allclose(result["probs"], 1 / (1 + np.exp(-want.astype(np.float64))),
                               atol=1e-5)
    assert result["texts"][2] == "This is a photo of A red car!."
    assert 1e-3 < result["probs"].min() and result["probs"].max() < 0.999  # Not saturated.
    # The resampling filter matters at this tolerance: the config's choice was followed.
    other = _hf_logits(path, model, images, 5 - resample)
    assert np.abs(other - want).max() > 1e-3


def test_defaults_without_processor_config_are_bilinear_and_cli_prints_table(hf_dir, capsys,
                                                                             tmp_path):
    path, model, images = hf_dir
    assert not (path / "preprocessor_config.json").exists()
    predictor = Predictor(str(path))
    result = predictor(images, LABELS)
    want = _hf_logits(path, model, images, resample=2)
    np.testing.assert_allclose(result["logits"], want, atol=1e-5)
    # One image given as an array and one label: the same row and column.
    single = predictor(np.asarray(Image.open(images[1])), LABELS[1])
    np.testing.assert_allclose(single["logits"], want[1:2, 1:2], atol=1e-5)

    out = tmp_path / "p.json"
    assert main(["--checkpoint", str(path), *images, "--labels", *LABELS,
                 "--json", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["image", "2", "cats", "2", "dogs", "A", "red", "car!"]
    for line, name, row in zip(lines[1:], images, result["probs"], strict=True):
        assert line.split() == [os.path.basename(name), *(f"{100 * p:.1f}%" for p in row)]
    np.testing.assert_allclose(json.loads(out.read_text())["probs"], result["probs"])


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["--checkpoint", str(tmp_path / "none"), "a.png", "--labels", "x"]) == 1
    assert capsys.readouterr().err == f"error: checkpoint '{tmp_path / 'none'}' does not exist\n"


MODEL = dict(image=dict(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=8,
                        pool_type="gap"),
             text=dict(vocab_size=48, width=32, depth=1, mlp_dim=64, num_heads=2),
             out_dim=16, bias_init=-3.0)


def _reference(params, spiece, images, text_len):
    """exp(t)·zimg·ztxtᵀ + b in float64 from the model outputs; images already model-sized."""
    tokens = Tokenizer(spiece).encode([TEMPLATE.format(x) for x in LABELS], text_len,
                                      canonicalize=True)
    pixels = np.stack(images).astype(np.float32) / 127.5 - 1
    zimg, ztxt, out = jax.jit(Model(**MODEL).apply)({"params": params}, pixels, tokens)
    sims = np.asarray(zimg, np.float64) @ np.asarray(ztxt, np.float64).T
    return np.exp(float(params["t"][0])) * sims + float(params["b"][0])


def test_our_orbax_workdir_and_npz(hf_dir, tmp_path):
    from siglip_jax.checkpoints.orbax_io import Checkpointer

    spiece = str(hf_dir[0] / "spiece.model")
    params = jax.jit(Model(**MODEL).init)(jax.random.key(3), np.zeros((1, 32, 32, 3), np.float32),
                                          np.zeros((1, 8), np.int32))["params"]
    workdir = tmp_path / "run"
    checkpointer = Checkpointer(str(workdir), 0, use_async=False)
    checkpointer.maybe_save(7, {"params": params, "opt_state": {"count": np.zeros(())},
                                "step": np.int32(7)}, force=True)
    checkpointer.close()
    (workdir / "config.json").write_text(json.dumps(
        {"model": MODEL, "tokenizer": {"model": spiece, "max_len": 8, "eos": "sticky"}}))
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(2)]
    want = _reference(params, spiece, images, 8)

    result = predict(images, LABELS, checkpoint=str(workdir))  # Image size from posemb.
    np.testing.assert_allclose(result["logits"], want, atol=1e-4)

    npz = str(tmp_path / "p.npz")
    bv.save_npz(npz, params)
    with pytest.raises(PredictError, match="has no tokenizer"):  # The model: from the arrays.
        predict(images, LABELS, checkpoint=npz)
    result = predict(images, LABELS, checkpoint=npz, model_config=MODEL, text_len=8,
                     tokenizer=spiece)
    np.testing.assert_allclose(result["logits"], want, atol=1e-4)


def test_evaluate_cli_on_hf_directory_matches_torch_zero_shot(hf_dir, tmp_path):
    """siglip_jax.evaluate on a HF directory: model and tokenizer come from the directory."""
    from pathlib import Path

    from siglip_jax.config import load_config
    from siglip_jax.data.builder import make_source
    from siglip_jax.data.config import parse_source
    from siglip_jax.evaluation import evaluate

    path, model, _ = hf_dir
    demo = str(Path(__file__).resolve().parents[1] / "configs" / "demo.py")
    data = str(tmp_path / "data")
    config = load_config(demo, [f"input.data.data_dir={data}", "input.data.train_per_class=1",
                                f"evals.zeroshot.data.data_dir={data}",
                                "evals.zeroshot.data.train_per_class=1",
                                "evals.zeroshot.data.test_per_class=2",
                                "tokenizer.max_len=32"])
    results = evaluate(config, str(path), log=lambda *_: None)

    test = make_source(parse_source(config.evals.zeroshot.data, "evals.zeroshot.data"))
    examples = test.load()
    tokenizer = transformers.SiglipTokenizer(str(path / "spiece.model"))
    ids = tokenizer([f"a photo of a {n}" for n in test.class_names], padding="max_length",
                    max_length=32).input_ids
    pixels = examples["image"].astype(np.float32) / 127.5 - 1
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(ids),
                       pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2))
                       ).logits_per_image.numpy()
    label_logit = np.take_along_axis(logits, examples["label"][:, None].astype(int), 1)
    rank = (logits > label_logit).sum(1)
    assert results["zeroshot/num_examples"] == 72
    assert results["zeroshot/top1"] == pytest.approx(np.mean(rank == 0))
    assert results["zeroshot/top5"] == pytest.approx(np.mean(rank < 5))
    assert 0 < results["zeroshot/top1"] < results["zeroshot/top5"]  # Not a vacuous match.
