"""SigLIP two-tower model: image tower `img`, text tower `txt`, log-temperature `t`, bias `b`.

`Model(image, text, out_dim, temperature_init, bias_init).apply({"params": p}, image, text,
train=False)` returns `(zimg_bxd | None, ztxt_bxd | None, out)`: the embeddings are
L2-normalised as z / (||z|| + 1e-8) in float32; out["t_prime"] is the raw log-temperature
(scalar), out["t"] = exp(t'), out["b"] the bias (scalar; only when bias_init is not None).
Logits are `exp(t') * zimg @ ztxt.T + b`. Params: img, txt, t (1,), b (1,) as in big_vision.

The image tower is picked by `image["kind"]`: "vit" (FixRes, default) takes images
[B, H, W, 3]; "naflex" (SigLIP 2 NaFlex, models/naflex.py) takes a dict {"patches"
[B, N, p·p·3], "mask" [B, N] (True = real patch), "spatial_shapes" [B, 2] (h, w)}.

`decoder` (a dict, models/decoder.py) adds the SigLIP 2 / LocCa caption decoder `dec`, used
only by the training objective (objectives/decoder.py) through `Model.decode`; `model.init`
creates its params by running it once on a dummy sequence.
"""

from __future__ import annotations

from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from siglip_jax.data.locca import DecoderVocab
from siglip_jax.models.common import ImageBatch, l2_normalize
from siglip_jax.models.config import decoder_kwargs, image_kind, image_kwargs, text_kwargs
from siglip_jax.models.decoder import Decoder
from siglip_jax.models.naflex import NaFlexViT
from siglip_jax.models.text import TextTransformer
from siglip_jax.models.vit import ViT


def out_dims(out_dim: int | tuple[int | None, int | None] | None) -> tuple[int | None, int | None]:
    """(image head dim, text head dim) from `out_dim`: one int for both, or a pair."""
    if out_dim is None or isinstance(out_dim, int):
        return (out_dim, out_dim)
    img_dim, txt_dim = out_dim
    return (img_dim, txt_dim)


def image_tower(
    cfg: Mapping[str, object] | None, out_dim: int | None, **kw: object
) -> ViT | NaFlexViT:
    """Builds the image tower (ViT or NaFlexViT, by `kind`) from an image config Mapping."""
    tower_cls = NaFlexViT if image_kind(cfg) == "naflex" else ViT
    return tower_cls(num_classes=out_dim, **image_kwargs(cfg), **kw)


def text_tower(cfg: Mapping[str, object] | None, out_dim: int | None,
               **kw: object) -> TextTransformer:
    """Builds the text transformer from a text config Mapping (variant + overrides)."""
    return TextTransformer(num_classes=out_dim, **text_kwargs(cfg), **kw)


def make_decoder(cfg: Mapping[str, object], text: Mapping[str, object], text_vocab: int,
                 **module_kw: object) -> Decoder:
    """The Decoder of a `model.decoder` dict; its vocabulary is DecoderVocab(text_vocab,
    num_bins): logits over the text ids, location bins and task tokens, and the embedding's
    extra row is the mask id (DecoderVocab.mask_id = the output vocabulary's size)."""
    kw = decoder_kwargs(cfg, text)
    vocab = DecoderVocab(int(text_vocab), kw.pop("num_bins"))
    return Decoder(vocab_size=vocab.mask_id, **kw, **module_kw)


def towers(model: Model) -> tuple[ViT, TextTransformer]:
    """The (unbound) image and text towers of a two-towers model, with every field resolved."""
    img_dim, txt_dim = out_dims(model.out_dim)
    return image_tower(model.image, img_dim), text_tower(model.text, txt_dim)


class Model(nn.Module):
    """SigLIP image-text model (big_vision `proj.image_text.two_towers` param tree)."""

    image: Mapping[str, object] | None = None
    text: Mapping[str, object] | None = None
    out_dim: int | tuple[int | None, int | None] = 128
    temperature_init: float = 10.0
    bias_init: float | None = -10.0
    decoder: Mapping[str, object] | None = None

    def setup(self) -> None:
        """Validates both tower configs up front (unknown keys raise here)."""
        self.img, self.txt = towers(self)
        if self.decoder is not None:
            text_kw = text_kwargs(self.text)
            self.dec = make_decoder(self.decoder, text_kw, self.txt.vocab_size)
        t_init = float(np.log(self.temperature_init))
        self.t = self.param("t", lambda _, s, d: jnp.full(s, t_init, d), (1,), jnp.float32)
        if self.bias_init is not None:
            b_init = float(self.bias_init)
            self.b = self.param("b", lambda _, s, d: jnp.full(s, b_init, d), (1,), jnp.float32)

    def __call__(
        self,
        image: ImageBatch | None,
        text: jax.Array | None = None,
        *,
        train: bool = False,
    ) -> tuple[jax.Array | None, jax.Array | None, dict[str, jax.Array]]:
        """Embeds images ([B,H,W,3] or a NaFlex dict) and/or token ids [B,L]; either may be None."""
        out: dict[str, jax.Array] = {}
        zimg_bxd = ztxt_bxd = None
        if image is not None:
            zimg_bxd, img_out = self.img(image, train=train)
            out.update({f"img/{k}": v for k, v in img_out.items()})
            zimg_bxd = l2_normalize(zimg_bxd)
        if text is not None:
            ztxt_bxd, txt_out = self.txt(text, train=train)
            out.update({f"txt/{k}": v for k, v in txt_out.items()})
            ztxt_bxd = l2_normalize(ztxt_bxd)
        out["t_prime"] = self.t[0]
        out["t"] = jnp.exp(self.t[0])
        if self.bias_init is not None:
            out["b"] = self.b[0]
        if self.decoder is not None and self.is_initializing():  # Creates the dec/ params.
            self.dec(jnp.zeros((1, 2), jnp.int32), jnp.zeros((1, 1, self.img.width)),
                     parallel=False)
        return zimg_bxd, ztxt_bxd, out

    def decode(
        self,
        image_tokens: jax.Array,
        dec_tokens: jax.Array,
        *,
        parallel: bool | jax.Array,
        train: bool = False,
        image_mask: jax.Array | None = None,
        return_hidden: bool = False,
    ) -> jax.Array:
        """Decoder logits [B, L, V] (float32) of ids [B, L] given un-pooled image tokens
        [B, N, W] (out["img/encoded"]); `parallel` (bool or bool [B]) picks full instead of
        causal self-attention; `image_mask` [B, N] (True = real patch) hides NaFlex padding;
        `return_hidden`: the decoder's final hidden states [B, L, D] instead of the logits
        (models/decoder.output_layer gives the layer that maps them to logits)."""
        if self.decoder is None:
            raise ValueError("Model.decode needs a decoder: set config.model.decoder")
        return self.dec(dec_tokens, image_tokens, parallel=parallel, image_mask=image_mask,
                        train=train, return_hidden=return_hidden)

    def image_features(
        self,
        image: jax.Array,
        *,
        patch_mask: jax.Array | None = None,
        mask_token: jax.Array | None = None,
        train: bool = False,
    ) -> tuple[jax.Array, jax.Array]:
        """(pooled features [B, W] before `img/head`, tokens [B, N, W]) of the ViT image tower;
        `patch_mask` [B, N] (True = masked) swaps those patch embeddings for `mask_token` [W].
        Of the params only `img` is used (setup also looks up `t` and `b`)."""
        _, img_out = self.img(image, train=train, patch_mask=patch_mask, mask_token=mask_token)
        return img_out["pre_logits"], img_out["encoded"]
