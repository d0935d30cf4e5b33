"""A NaFlex model exported for Hugging Face, read back by transformers itself (not by our own
reader): a tiny NaFlex two-tower model with random weights saved as a big_vision .npz (the
format big_vision publishes SigLIP 2 NaFlex checkpoints in), exported with the export CLI
(`python -m siglip_jax.export --format hf`), loaded with `transformers.Siglip2Model`, and run
on inputs made by transformers' own `Siglip2ImageProcessorPil` from images of mixed aspect
ratios (padded to the patch budget): image and text embeddings and logits equal siglip_jax's
on the same inputs.

Needs the `parity` extra (torch, transformers).
"""

import json

import jax
import numpy as np
from extras import require
from PIL import Image

from siglip_jax import export as cli
from siglip_jax.checkpoints import big_vision as bv
from siglip_jax.models import naflex
from siglip_jax.models.two_towers import Model

torch = require("torch")
transformers = require("transformers")

VOCAB, TEXT_LEN, PATCH, BUDGET = 64, 8, 4, 20
MODEL = dict(image=dict(kind="naflex", variant="mu/4", posemb_grid=4, pool_type="map"),
             text=dict(variant="mu", vocab_size=VOCAB, pool_type="last"), out_dim=(None, 32),
             bias_init=-10.0)
SIZES_HW = [(16, 16), (8, 32), (40, 12)]  # Square (4×4 patches), wide, tall (padded).


def _params(seed=0):
    """Random weights of MODEL's shapes (scale 0.1; t = log 10, b = −3)."""
    shapes = jax.eval_shape(Model(**MODEL).init, jax.random.key(0),
                            naflex.example_input(1, BUDGET, 4),
                            jax.ShapeDtypeStruct((1, TEXT_LEN), np.int32))["params"]
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda s: rng.normal(0, 0.1, s.shape).astype(np.float32), shapes)
    params["t"] = np.full(np.shape(params["t"]), np.log(10.0), np.float32)
    params["b"] = np.full(np.shape(params["b"]), -3.0, np.float32)
    return params


def _inputs():
    """transformers' processor outputs for 3 images of mixed aspect ratios, and token ids
    with sticky-EOS padding."""
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
              for h, w in SIZES_HW]
    proc = transformers.Siglip2ImageProcessorPil(patch_size=PATCH, max_num_patches=BUDGET)
    feats = proc(images, return_tensors="np")
    text = rng.integers(2, VOCAB, (len(SIZES_HW), TEXT_LEN)).astype(np.int64)
    text[:, -3:] = 1
    return feats, text


def test_exported_naflex_npz_loads_in_transformers_with_the_same_embeddings(tmp_path):
    params = _params()
    npz = str(tmp_path / "naflex.npz")
    bv.save_npz(npz, params)
    out = tmp_path / "hf"
    assert cli.main(["--checkpoint", npz, "--format", "hf", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Siglip2Model"]
    hf_model, info = transformers.Siglip2Model.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info  # No missing, unexpected or mismatched weights.
    hf_model.eval()

    feats, text = _inputs()
    assert [tuple(s) for s in feats["spatial_shapes"]] == [(4, 4), (2, 8), (7, 2)]
    assert list(feats["pixel_attention_mask"].sum(1)) == [16, 16, 14]  # Padded to 20.
    with torch.no_grad():
        got = hf_model(input_ids=torch.from_numpy(text),
                       pixel_values=torch.from_numpy(feats["pixel_values"]),
                       pixel_attention_mask=torch.from_numpy(feats["pixel_attention_mask"]),
                       spatial_shapes=torch.from_numpy(feats["spatial_shapes"]))
    image = {"patches": np.asarray(feats["pixel_values"], np.float32),
             "mask": np.asarray(feats["pixel_attention_mask"]).astype(bool),
             "spatial_shapes": np.asarray(feats["spatial_shapes"], np.int32)}
    zimg, ztxt, extra = jax.jit(Model(**MODEL).apply)({"params": params}, image,
                                                       text.astype(np.int32))
    zimg, ztxt = np.asarray(zimg), np.asarray(ztxt)
    np.testing.assert_allclose(got.image_embeds.numpy(), zimg, rtol=0, atol=1e-5)
    np.testing.assert_allclose(got.text_embeds.numpy(), ztxt, rtol=0, atol=1e-5)
    logits = float(extra["t"]) * zimg @ ztxt.T + float(extra["b"])
    np.testing.assert_allclose(got.logits_per_image.numpy(), logits, rtol=0, atol=1e-4)
    # Not a degenerate agreement: the images' embeddings differ from each other.
    assert np.abs(zimg[0] - zimg[1]).max() > 1e-2 and np.abs(zimg[1] - zimg[2]).max() > 1e-2
