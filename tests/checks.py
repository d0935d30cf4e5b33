"""Assertions shared by test modules."""

import numpy as np

from siglip_jax.checkpoints import big_vision as bv


def assert_bit_equal(a, b):
    """Two nested param trees have the same keys, dtypes, shapes and bytes."""
    fa, fb = bv.flatten(a, ""), bv.flatten(b, "")
    assert sorted(fa) == sorted(fb)
    for k in fa:
        x, y = np.asarray(fa[k]), np.asarray(fb[k])
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), k


def load_hf_scanned(path, image, text):
    """(Model kwargs, params) of a HF SigLIP / SigLIP 2 directory loaded into our model with both
    towers scanned (blocks stacked under `encoderblock`), for inputs like `image`, `text`."""
    import jax

    from siglip_jax.checkpoints import hf
    from siglip_jax.models.two_towers import Model

    kw = hf.model_config_from_hf(path)["model"]
    kw = {**kw, "image": {**kw["image"], "scan": True}, "text": {**kw["text"], "scan": True}}
    target = jax.eval_shape(Model(**kw).init, jax.random.key(0), image,
                            np.asarray(text).astype(np.int32))
    return kw, hf.load_hf(path, target["params"])[0]


def perturbed_hf_model(model, *, seed: int, noise: float, bias: float):
    """A transformers SigLIP model with every weight moved by `noise`·N(0, 1) (random init has
    many exact zeros and ones that hide mistakes), scale 10 and the given bias, in eval mode."""
    import torch  # Only the parity tests (optional `parity` extra) call this.

    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(noise * torch.randn_like(p))
        model.logit_scale.fill_(np.log(10.0))
        model.logit_bias.fill_(bias)
    return model.eval()
