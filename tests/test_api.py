"""The Python API (`siglip_jax.load`) against transformers on tiny random checkpoints: a
SigLIP directory (FixRes, SiglipTokenizer), a SigLIP 2 NaFlex directory (Gemma-layout
tokenizer.model) and a big_vision .npz with a tokenizer argument; and the HF export opened by
transformers' AutoProcessor, AutoModel and zero-shot pipeline. Needs the `parity` extra."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from checks import perturbed_hf_model
from extras import require
from PIL import Image

import siglip_jax
from siglip_jax.checkpoints import big_vision as bv
from siglip_jax.checkpoints import hf
from siglip_jax.data.tokenizer import Tokenizer, train_sentencepiece
from siglip_jax.exporter import export
from siglip_jax.predict import PredictError

torch = require("torch")
transformers = require("transformers")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = ["a photo of 2 cats", "a photo of 2 dogs", "A red car!"]
WORDS = ["this is a photo of", "2 cats", "2 dogs", "a red car", "a blue bird", "three"]
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=64, projection_size=32, bos_token_id=None, eos_token_id=1,
            pad_token_id=1)
VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Three image files of different sizes and aspect ratios."""
    path = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    files = []
    for i, (h, w) in enumerate([(48, 64), (32, 32), (20, 90)]):
        files.append(str(path / f"img{i}.png"))
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(files[-1])
    return files


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
    """A random SiglipModel (32 px, patch 8) saved with its SiglipProcessor, as published
    SigLIP directories are."""
    path = tmp_path_factory.mktemp("siglip")
    sents = [f"{a} {b}" for a in WORDS for b in WORDS]
    train_sentencepiece(sents, 48, str(path / "spiece.model"))
    vocab = Tokenizer(str(path / "spiece.model")).vocab_size
    cfg = transformers.SiglipConfig(text_config=dict(TEXT, vocab_size=vocab),
                                    vision_config=dict(VISION, image_size=32, patch_size=8))
    model = perturbed_hf_model(transformers.SiglipModel(cfg), seed=0, noise=0.1, bias=-2.0)
    model.save_pretrained(path)
    transformers.SiglipProcessor(
        image_processor=transformers.SiglipImageProcessor(size={"height": 32, "width": 32}),
        tokenizer=transformers.SiglipTokenizer(str(path / "spiece.model"),
                                               model_max_length=64)).save_pretrained(path)
    return path, model


def _hf_outputs(model, processor, images, texts, **text_kwargs):
    inputs = processor(text=texts, images=[Image.open(p) for p in images],
                       return_tensors="pt", **text_kwargs)
    with torch.no_grad():  # No attention mask: SigLIP's text tower attends to the padding.
        out = model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"])
    return out.image_embeds.numpy(), out.text_embeds.numpy(), out.logits_per_image.numpy()


def test_siglip_directory_by_a_relative_path_matches_transformers(siglip_dir, images,
                                                                  monkeypatch):
    path, model = siglip_dir
    processor = transformers.AutoProcessor.from_pretrained(path)
    zimg, ztxt, logits = _hf_outputs(model, processor, images, TEXTS, padding="max_length")
    monkeypatch.chdir(path.parent)
    loaded = siglip_jax.load(path.name)  # Relative to the current directory.
    assert loaded.format == "hf" and not loaded.is_naflex
    np.testing.assert_allclose(loaded.embed_images(images), zimg, atol=2e-5)
    np.testing.assert_allclose(loaded.embed_texts(TEXTS), ztxt, atol=2e-5)
    np.testing.assert_allclose(loaded.logits(images, TEXTS), logits, atol=1e-4)
    probs = loaded.probabilities(images, TEXTS)
    np.testing.assert_allclose(probs, 1 / (1 + np.exp(-logits.astype(np.float64))), atol=2e-5)
    assert 1e-3 < probs.min() and probs.max() < 0.999  # Not saturated: the check means something.
    # "~" paths: the same resolve_path, tested in tests/test_open_model.py.


def test_siglip2_naflex_directory_matches_transformers(tmp_path, images):
    path = tmp_path / "siglip2"
    words = [f"w{i}" for i in range(120)] + ["cat", "dog", "a", "photo", "of"]
    train_sentencepiece([" ".join(words[i:i + 7]) for i in range(len(words))], 299,
                        str(path / "tokenizer.model") if path.mkdir() is None else "",
                        layout="gemma")
    cfg = transformers.Siglip2Config(text_config=dict(TEXT, vocab_size=300),
                                     vision_config=dict(VISION, patch_size=4, num_patches=16))
    model = perturbed_hf_model(transformers.Siglip2Model(cfg), seed=0, noise=0.1, bias=-2.0)
    model.save_pretrained(path)
    proc = transformers.Siglip2ImageProcessorPil(patch_size=4, max_num_patches=24)
    proc.save_pretrained(path)
    loaded = siglip_jax.load(path)
    assert loaded.is_naflex
    texts = ["a photo of a cat.", "a photo of a dog."]
    feats = proc([Image.open(p) for p in images], return_tensors="pt")
    ids = Tokenizer(str(path / "tokenizer.model")).encode_as(texts, "siglip2", 64)
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(ids.astype(np.int64)), **feats)
    np.testing.assert_allclose(loaded.embed_images(images), out.image_embeds.numpy(), atol=2e-5)
    np.testing.assert_allclose(loaded.embed_texts(texts), out.text_embeds.numpy(), atol=2e-5)
    np.testing.assert_allclose(loaded.probabilities(images, texts),
                               torch.sigmoid(out.logits_per_image).numpy(), atol=2e-5)


def test_hf_export_opens_in_auto_processor_and_pipeline(siglip_dir, images, tmp_path):
    """The export writes preprocessor_config.json and SiglipTokenizer files; transformers'
    zero-shot pipeline then gives siglip_jax's probabilities (its template filled by hand on
    our side)."""
    path, _ = siglip_dir
    source = tmp_path / "source"  # Without the processor files the published dir had.
    source.mkdir()
    for name in ("config.json", "model.safetensors", "spiece.model"):
        os.link(path / name, source / name)
    out = tmp_path / "export"
    export(str(source), "hf", str(out), log=lambda line: None)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors",
                                       "preprocessor_config.json", "spiece.model",
                                       "tokenizer_config.json"]
    assert not [n for n in os.listdir(tmp_path) if "partial" in n]  # Staging removed.
    assert isinstance(transformers.AutoModel.from_pretrained(out), transformers.SiglipModel)
    processor = transformers.AutoProcessor.from_pretrained(out)
    assert processor.image_processor.size == {"height": 32, "width": 32}
    classify = transformers.pipeline("zero-shot-image-classification", model=str(out))
    labels = ["2 cats", "2 dogs", "a red car"]
    template = "This is a photo of {}."
    # The pipeline pads SigLIP texts to 64 tokens (and drops tokenizer_kwargs): the model's
    # text length is 64, as in every published SigLIP.
    got = classify(images, candidate_labels=labels, hypothesis_template=template)
    ours = siglip_jax.load(out).probabilities(images, [template.format(x) for x in labels])
    for row, result in zip(ours, got, strict=True):
        by_label = {r["label"]: r["score"] for r in result}
        np.testing.assert_allclose([by_label[x] for x in labels], row, atol=2e-5)


def test_export_of_a_run_fine_tuned_from_a_hf_directory_opens_in_pipeline(
        siglip_dir, images, tmp_path, monkeypatch):
    """The user journey of the README: fine-tune a published (here random-weight) SigLIP
    directory given by a relative path on a CSV (configs/finetune_csv.py), then export the
    run from another directory: transformers' zero-shot pipeline loads the export and gives
    the fine-tuned run's own probabilities, which moved away from the starting weights."""
    from siglip_jax.config import load_config
    from siglip_jax.trainer import train

    path, _ = siglip_dir
    rng = np.random.default_rng(1)
    rows = ["image,caption"]
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
            tmp_path / f"x{i}.png")
        rows.append(f"x{i}.png,{WORDS[1 + i % 5]}")
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    os.symlink(path, tmp_path / "published")
    monkeypatch.chdir(tmp_path)
    workdir = tmp_path / "run"
    workdir.mkdir()
    config = load_config(os.path.join(REPO, "configs/finetune_csv.py") +
                         ":init=published,csv=train.csv,steps=2,batch=8,lr=0.1,warmup=0")
    train(config, str(workdir))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # The run's recorded paths must not depend on the cwd.
    out = tmp_path / "export"
    export(str(workdir), "hf", str(out), log=lambda line: None)

    labels = ["2 cats", "2 dogs", "a red car"]
    template = "This is a photo of {}."
    texts = [template.format(x) for x in labels]
    run = siglip_jax.load(str(workdir)).probabilities(images, texts)
    start = siglip_jax.load(str(path)).probabilities(images, texts)
    assert np.abs(run - start).max() > 1e-3  # Fine-tuning changed the model.
    got = transformers.pipeline("zero-shot-image-classification", model=str(out))(
        images, candidate_labels=labels, hypothesis_template=template)
    for row, result in zip(run, got, strict=True):
        by_label = {r["label"]: r["score"] for r in result}
        np.testing.assert_allclose([by_label[x] for x in labels], row, atol=2e-5)


def test_a_failed_export_leaves_no_partial_out(siglip_dir, tmp_path, monkeypatch):
    """The export is staged next to --out and moved into place only when complete."""
    from siglip_jax.checkpoints import hf_processor

    path, _ = siglip_dir
    out = tmp_path / "export"

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hf_processor, "write_processor_files", fail)
    with pytest.raises(OSError, match="No space left"):
        export(str(path), "hf", str(out), log=lambda line: None)
    assert os.listdir(tmp_path) == []  # Neither --out nor the staging folder.
    out.mkdir()
    (out / "old.txt").write_text("kept")  # An existing --out survives a failed --force export.
    with pytest.raises(OSError, match="No space left"):
        export(str(path), "hf", str(out), force=True, log=lambda line: None)
    assert os.listdir(tmp_path) == ["export"] and os.listdir(out) == ["old.txt"]


def test_npz_needs_a_tokenizer_and_predict_cli_takes_one(siglip_dir, images, tmp_path):
    """A .npz names no tokenizer: load says so; `predict --tokenizer` (and load(tokenizer=),
    the same Predictor argument) then scores like transformers. The image already at the
    model's 32 px is used: a .npz names no resampling filter (this processor's is bicubic)."""
    from siglip_jax.predict import main

    path, model = siglip_dir
    params, _ = hf.load_hf(path)
    bv.save_npz(str(tmp_path / "m.npz"), params)
    with pytest.raises(PredictError, match="has no tokenizer"):
        siglip_jax.load(tmp_path / "m.npz")
    assert main(["--checkpoint", str(tmp_path / "m.npz"), images[1], "--labels", "2 cats",
                 "--tokenizer", str(path / "spiece.model"), "--json", str(tmp_path / "p.json")]
                ) == 0
    processor = transformers.AutoProcessor.from_pretrained(path)
    _, _, logits = _hf_outputs(model, processor, images[1:2], ["This is a photo of 2 cats."],
                               padding="max_length")
    got = json.loads((tmp_path / "p.json").read_text())["logits"]
    np.testing.assert_allclose(got, logits, atol=1e-4)


def test_import_is_light():
    """`import siglip_jax` loads neither JAX nor TensorFlow; `siglip_jax.load` is there."""
    code = ("import sys, siglip_jax\n"
            "assert 'jax' not in sys.modules and 'tensorflow' not in sys.modules\n"
            "assert 'load' in dir(siglip_jax)\n")
    result = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": REPO},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout + result.stderr == "", result.stderr


def test_load_sets_the_quiet_environment(monkeypatch):
    """The cheap twin of the slow test below: the settings that silence TensorFlow and libtpu
    (console.quiet_library) are in place when load returns or fails."""
    for key in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS", "SIGLIP_VERBOSE"):
        monkeypatch.delenv(key, raising=False)
    for key in ("TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES", "ALLOW_MULTIPLE_LIBTPU_LOAD"):
        monkeypatch.setenv(key, "")  # Restored by monkeypatch after the test.
        monkeypatch.delenv(key)
    with pytest.raises(FileNotFoundError):
        siglip_jax.load("/nonexistent/checkpoint")
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "2"
    assert os.environ["TF_ENABLE_ONEDNN_OPTS"] == "0"
    assert os.environ.get("TPU_WORKER_HOSTNAMES") in (None, "localhost")  # None: a TPU VM.


@pytest.mark.slow  # Twin in the default suite: test_load_sets_the_quiet_environment.
def test_load_is_quiet_when_jax_starts_its_backend(tmp_path):
    """With libtpu installed and no TPU, JAX's backend start prints libtpu warnings unless
    load has set the defaults first: nothing is printed."""
    code = ("import siglip_jax\n"
            "try:\n"
            f"    siglip_jax.load({str(tmp_path / 'none')!r})\n"
            "except FileNotFoundError as e:\n"
            "    assert 'does not exist' in str(e)\n"
            "import jax\n"
            "jax.devices()\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TF_", "TPU_", "SIGLIP_"))}
    env.update(PYTHONPATH=REPO, JAX_PLATFORMS="")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == ""
