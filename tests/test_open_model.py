"""open_model: one opener for every format; a big_vision .npz opens with no tower config, and
the config read off its arrays equals the one it was saved from (B, So400m and tiny shapes,
scanned and unscanned); relative and ~ paths work."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from siglip_jax.checkpoints import big_vision as bv
from siglip_jax.checkpoints.open import infer_model_config, open_model, resolve_path
from siglip_jax.models import variants
from siglip_jax.models.build import make_model
from siglip_jax.models.config import image_kwargs, text_kwargs
from siglip_jax.models.params import param_shapes
from siglip_jax.models.two_towers import Model

STRUCTURAL = ("width", "depth", "mlp_dim", "num_heads", "patch_size", "pool_type", "scan",
              "vocab_size", "posemb")


def _structure(model_kwargs):
    """The keys shapes can fix, resolved through the variant tables (as the towers see them)."""
    from siglip_jax.models.text import TextTransformer
    from siglip_jax.models.vit import ViT

    image = image_kwargs(model_kwargs["image"])
    text = text_kwargs(model_kwargs["text"])
    patch = image.get("patch_size", ViT.patch_size)
    image["patch_size"] = (patch, patch) if isinstance(patch, int) else tuple(patch)
    defaults = {"image": ViT(), "text": TextTransformer()}
    out = {}
    for tower, kw in (("image", image), ("text", text)):
        for key in STRUCTURAL:
            if hasattr(defaults[tower], key):
                out[f"{tower}.{key}"] = kw.get(key, getattr(defaults[tower], key))
    out_dim = model_kwargs["out_dim"]
    out["out_dim"] = tuple(out_dim) if isinstance(out_dim, (list, tuple)) else (out_dim, out_dim)
    out["bias"] = model_kwargs.get("bias_init", -10.0) is not None
    return out


@pytest.mark.parametrize("name, scan", [("siglip-base-patch16-224", True),
                                         ("siglip-base-patch16-224", False),
                                         ("siglip-so400m-patch14-384", True)])
def test_published_shapes_give_back_their_config(name, scan):
    seed = variants.SIGLIP_SEEDS[name]
    kwargs = {"image": {**seed["image"], "scan": scan}, "text": {**seed["text"], "scan": scan},
              "out_dim": seed["out_dim"]}
    shapes = param_shapes(Model(**kwargs), seed["image_size"], seed["text_len"])
    inferred = infer_model_config(shapes)
    assert _structure(inferred["model"]) == _structure(kwargs)
    # The position embedding fixes the patch grid; So400m/14 at 384 px has a 27×27 grid
    # (the convolution drops the last 6 pixels), so 378 px is the exact size of that grid.
    patch = inferred["model"]["image"]["patch_size"][0]
    assert inferred["image_size"] == ((seed["image_size"] // patch) * patch,) * 2
    assert inferred["text_len"] == seed["text_len"]


TINY = {"image": {"variant": "mu/8", "pool_type": "map"},
        "text": {"variant": "mu", "vocab_size": 50, "pool_type": "last"},
        "out_dim": (None, 32), "bias_init": -10.0}


@pytest.mark.parametrize("scanned", [True, False])
def test_tiny_npz_opens_without_config_and_computes_the_same(tmp_path, scanned, monkeypatch):
    model = Model(**{**TINY, "image": {**TINY["image"], "scan": not scanned}})
    image = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3), minval=-1, maxval=1)
    text = jax.random.randint(jax.random.key(2), (2, 8), 2, 50)
    params = jax.jit(model.init)(jax.random.key(0), image, text)["params"]
    bv.save_npz(tmp_path / "tiny.npz", params, scanned=scanned)

    monkeypatch.chdir(tmp_path)
    opened = open_model("tiny.npz")  # Relative path, no config.
    assert opened.format == "npz" and opened.path == str(tmp_path / "tiny.npz")
    assert opened.image_size == (32, 32) and opened.text_len == 8
    assert _structure(opened.model_config) == _structure(
        {**TINY, "image": {**TINY["image"], "scan": scanned},
         "text": {**TINY["text"], "scan": scanned}})
    ours = make_model(opened.model).apply({"params": opened.fitted_params()}, image, text)
    want = model.apply({"params": params}, image, text)
    np.testing.assert_allclose(ours[0], want[0], atol=1e-6)
    np.testing.assert_allclose(ours[1], want[1], atol=1e-6)


def test_overrides_beat_the_checkpoint_and_defaults_only_fill_gaps(tmp_path):
    model = Model(**TINY)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                                 jnp.zeros((1, 8), jnp.int32))["params"]
    bv.save_npz(tmp_path / "p.npz", params)
    opened = open_model(tmp_path / "p.npz", overrides={"text_len": 9, "tokenizer": "sp.model"},
                        defaults={"image_size": (64, 64), "text_len": 7})
    assert opened.text_len == 9 and opened.tokenizer == "sp.model"
    assert opened.image_size == (64, 64)  # The .npz stores none: the default fills the gap.
    with pytest.raises(ValueError, match="unknown key 'colour'"):
        open_model(tmp_path / "p.npz", overrides={"colour": 1})


def test_paths_resolve_from_home_and_cwd(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert resolve_path("~/a/b.npz") == str(tmp_path / "a" / "b.npz")
    assert resolve_path("c") == str(tmp_path / "c")
    assert resolve_path("gs://bucket/x") == "gs://bucket/x"


NAFLEX = {"image": {"kind": "naflex", "variant": "mu/8", "posemb_grid": 4, "pool_type": "map"},
          "text": {"variant": "mu", "vocab_size": 50, "pool_type": "last"},
          "out_dim": (None, 32), "bias_init": -10.0}


def test_naflex_npz_opens_as_naflex_and_computes_the_same(tmp_path):
    """big_vision publishes SigLIP 2 NaFlex checkpoints as .npz: the patch embedding is a
    Dense [p·p·3, D] and the position embedding a [G, G, D] grid (naflex_vit.py). Saved
    scanned from an unscanned model (the layouts are tested both ways on the ViT above)."""
    scanned = True
    model = Model(**{**NAFLEX, "image": {**NAFLEX["image"], "scan": not scanned}})
    rng = np.random.default_rng(0)
    shapes = np.array([[3, 4], [2, 5]], np.int32)  # Two aspect ratios, 16-patch budget.
    mask = np.arange(16)[None, :] < shapes.prod(axis=1)[:, None]
    image = {"patches": rng.uniform(-1, 1, (2, 16, 8 * 8 * 3)).astype(np.float32),
             "mask": mask, "spatial_shapes": shapes}
    text = rng.integers(2, 50, (2, 8)).astype(np.int32)
    params = jax.jit(model.init)(jax.random.key(0), image, text)["params"]
    assert np.shape(params["img"]["embedding"]["kernel"]) == (192, 32)
    bv.save_npz(tmp_path / "naflex.npz", params, scanned=scanned)

    opened = open_model(tmp_path / "naflex.npz")
    assert opened.is_naflex and opened.format == "npz"
    assert opened.model.image.patch_size == (8, 8) and opened.model.image.width == 32
    assert opened.image_size is None and opened.text_len == 8
    image_kw = opened.model_config["image"]
    assert image_kw["posemb_grid"] == 4 and image_kw["pool_type"] == "map"
    assert image_kw["scan"] == scanned
    got = make_model(opened.model).apply({"params": opened.fitted_params()}, image, text)
    want = model.apply({"params": params}, image, text)
    np.testing.assert_allclose(got[0], want[0], atol=1e-6)
    np.testing.assert_allclose(got[1], want[1], atol=1e-6)


def test_run_paths_are_stored_absolute(tmp_path, monkeypatch):
    """What the trainer writes to config.json: relative local paths made absolute from the
    current directory (so `predict` or `export` open the run from anywhere); gs:// and ""
    kept; other strings untouched."""
    from siglip_jax.checkpoints.open import absolute_run_paths

    monkeypatch.chdir(tmp_path)
    config = {"tokenizer": {"model": "tok/spiece.model", "eos": "sticky"},
              "model_init": {"img": "", "txt": "gs://b/t.npz", "full": "~/ckpt"},
              "input": {"data": {"name": "tar", "pattern": ["a/*.tar", "gs://b/*.tar"]},
                        "pp": "decode"},
              "evals": {"zs": {"data": {"name": "csv", "path": "e.csv", "image_col": "img"}}}}
    got = absolute_run_paths(config)
    assert got["tokenizer"] == {"model": str(tmp_path / "tok/spiece.model"), "eos": "sticky"}
    assert got["model_init"] == {"img": "", "txt": "gs://b/t.npz",
                                 "full": os.path.join(os.path.expanduser("~"), "ckpt")}
    assert got["input"] == {"data": {"name": "tar", "pattern": [str(tmp_path / "a/*.tar"),
                                                                "gs://b/*.tar"]},
                            "pp": "decode"}
    assert got["evals"]["zs"]["data"] == {"name": "csv", "path": str(tmp_path / "e.csv"),
                                          "image_col": "img"}
