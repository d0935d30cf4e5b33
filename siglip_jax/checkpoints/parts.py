"""Parts of a checkpoint as standalone files: the towers, the LocCa decoder, the EMA teacher.

A run of ours may hold more than the two towers: the caption decoder `dec`, the
self-distillation heads `distill_head`, `masked_head`, `mask_token` (params) and the EMA
`teacher` (a separate entry of the train state). Released SigLIP / SigLIP 2 checkpoints hold
the towers only (arXiv:2502.14786 §2.2: the decoder is dropped after training).

- **towers** (`tower_params`, `save_towers`): `img`, `txt`, `t`, `b` as a big_vision `.npz`
  (`params/...` keys, the run's block layout) or a Hugging Face directory (`hf.save_hf`:
  `SiglipModel` for a FixRes image tower, `Siglip2Model` for NaFlex) plus the run's
  sentencepiece file under the name that selects the text convention when the directory is
  reopened: `tokenizer.model` (SigLIP 2, Gemma) or `spiece.model` (SigLIP).
- **teacher** (`teacher_towers`): the towers with the image tower taken from the EMA
  teacher (text tower, `t` and `b` from the student, which the teacher does not copy).
- **decoder** (`save_decoder`, `load_decoder`): `params/dec/...` in a `.npz` plus a JSON
  sidecar (same name, `.json`) with the resolved decoder config, the vocabulary layout
  (`data/locca.DecoderVocab`: text ids, location bins, task ids, mask id) and the width of
  the image tokens it cross-attends to.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Mapping

import jax
import numpy as np
from flax.typing import VariableDict

from siglip_jax.checkpoints import big_vision as bv
from siglip_jax.checkpoints import hf
from siglip_jax.data.locca import TASKS, DecoderVocab
from siglip_jax.models.config import ModelConfig, decoder_dict, decoder_vocab
from siglip_jax.models.decoder import Decoder
from siglip_jax.models.two_towers import make_decoder

TOWER_PARTS = ("img", "txt", "t", "b")
PARTS = ("towers", "decoder", "teacher")
FORMATS = ("npz", "hf")
DECODER_FORMAT = "siglip_jax.decoder"
DECODER_VERSION = 2  # 2: big_vision CapPa layout (no attention biases, head without the mask id).
TOKENIZER_FILES = {"siglip": "spiece.model", "siglip2": "tokenizer.model"}


class ExportError(ValueError):
    """A part or format that this checkpoint cannot give; the message names what and why."""


def tower_params(params: VariableDict) -> tuple[dict[str, object], list[str]]:
    """(the towers' params {img, txt, t[, b]}, the names of the dropped top-level parts)."""
    missing = [k for k in ("img", "txt", "t") if k not in params]
    if missing:
        raise ExportError(f"the params have no {missing[0]!r} (top-level names: "
                          f"{sorted(params)}); a towers export needs img, txt and t")
    kept = {k: params[k] for k in TOWER_PARTS if k in params}
    return kept, sorted(k for k in params if k not in TOWER_PARTS)


def teacher_towers(params: VariableDict, teacher: VariableDict | None,
                   source: str = "checkpoint") -> dict[str, object]:
    """The towers with `img` from the EMA teacher and txt, t, b from the student."""
    if teacher is None or "img" not in teacher:
        raise ExportError(f"{source} has no EMA teacher image tower (only runs trained with "
                          "loss.self_distillation or loss.masked_prediction have one)")
    towers, _ = tower_params(params)
    return {**towers, "img": teacher["img"]}


def hf_convention(model_config: Mapping[str, object], convention: str) -> str:
    """The text convention ("siglip" | "siglip2") a HF directory of this model reopens with:
    SigLIP 2 for a NaFlex image tower or a run tokenized with the "siglip2" convention."""
    naflex = ModelConfig.parse(model_config).image.kind == "naflex"
    return "siglip2" if naflex or convention == "siglip2" else "siglip"


def run_convention(convention: str, eos: str) -> str | None:
    """The named convention equal to how a checkpoint tokenizes prompts, None if none is:
    our runs without a convention use their eos mode + canonicalisation, which is "siglip"
    exactly when eos is "sticky" (EOS-padded, lower-cased, punctuation stripped)."""
    if convention:
        return convention
    return "siglip" if eos == "sticky" else None


def _copy(src: str, dst: str) -> None:
    if "://" in src or "://" in dst:
        import tensorflow as tf  # Deliberately late: only remote paths need TensorFlow.

        tf.io.gfile.copy(src, dst, overwrite=True)
    else:
        shutil.copyfile(src, dst)


def save_towers(out: str, towers: VariableDict, fmt: str, *,
                model_config: Mapping[str, object] | None = None,
                image_size: tuple[int, int] | None = None, text_len: int | None = None,
                tokenizer: str | None = None, convention: str = "siglip") -> list[str]:
    """Writes the towers as a big_vision .npz (`out` ends in .npz) or a HF directory; returns
    the files written. HF needs the model config (decoder key ignored), the image size
    (FixRes) and text length; `tokenizer` is copied in as TOKENIZER_FILES[convention]."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: expected one of {FORMATS}")
    extra = sorted(set(towers) - set(TOWER_PARTS))
    if extra:
        raise ExportError(f"towers export got non-tower params {extra}")
    if fmt == "npz":
        bv.save_npz(out, towers)
        return [out]
    if model_config is None or text_len is None:
        raise ExportError("a HF export needs the model config and text length of the "
                          "checkpoint")
    model_kwargs = {k: v for k, v in model_config.items() if k != "decoder"}
    if ModelConfig.parse(model_kwargs).image.kind != "naflex" and image_size is None:
        raise ExportError("a HF SiglipModel export needs a square image size, and the "
                          "checkpoint does not say it (non-square position embedding?)")
    try:
        hf.save_hf(out, towers, model_kwargs, image_size, int(text_len))
    except hf.HFCheckpointError as e:
        raise ExportError(str(e)) from None
    written = [os.path.join(out, hf.CONFIG_FILE), os.path.join(out, hf.WEIGHTS_FILE)]
    if tokenizer:
        target = os.path.join(out, TOKENIZER_FILES[convention])
        _copy(tokenizer, target)
        written.append(target)
    return written


# ----------------------------------------------------------------------------- the decoder


@dataclasses.dataclass(frozen=True)
class DecoderExport:
    """A reloaded decoder export: config, vocabulary, params and the image width it reads."""

    decoder: dict[str, object]  # Resolved `model.decoder` dict (every key set; dtype a name).
    vocab: DecoderVocab
    params: VariableDict  # The `dec` tree (numpy), in the saved block layout.
    image_width: int  # Width W of the image tokens [B, N, W] it cross-attends to.
    tokenizer: str | None = None  # The sentencepiece file copied next to it, if any.

    def make_decoder(self) -> Decoder:
        """The flax Decoder module (apply it to {"params": self.params})."""
        return make_decoder(self.decoder, {}, self.vocab.text_vocab)


def sidecar_path(out: str) -> str:
    """The JSON sidecar of a decoder .npz: the same name with .json."""
    return out[:-len(".npz")] + ".json" if out.endswith(".npz") else out + ".json"


def decoder_spec(params: VariableDict, model_config: Mapping[str, object] | None,
                 source: str = "checkpoint") -> dict[str, object]:
    """The sidecar dict of a checkpoint's decoder: its resolved config, the vocabulary layout
    and the image width; ExportError when the checkpoint has no decoder or no config for it."""
    if "dec" not in params:
        raise ExportError(f"{source} has no decoder params 'dec' (top-level names: "
                          f"{sorted(params)}); train with model.decoder and loss.decoder")
    model = ModelConfig.parse(model_config or {})
    vocab = decoder_vocab(model)
    if model.decoder is None or vocab is None:
        raise ExportError(f"{source} has decoder params but no model.decoder config (only "
                          "our runs' config.json carries it): export the decoder from the run")
    kw = decoder_dict(model.decoder)
    text_vocab = int(np.shape(params["txt"]["Embed_0"]["embedding"])[0])
    if text_vocab != vocab.text_vocab:
        raise ExportError(f"{source}: txt/Embed_0 has {text_vocab} rows but model.text."
                          f"vocab_size is {vocab.text_vocab}")
    rows = int(np.shape(params["dec"]["embed"]["embedding"])[0])
    if rows != vocab.size:
        raise ExportError(f"{source}: dec/embed has {rows} rows but the decoder vocabulary "
                          f"(text {text_vocab} + {vocab.num_bins} bins + tasks + mask) has "
                          f"{vocab.size}")
    return {
        "format": DECODER_FORMAT, "version": DECODER_VERSION, "decoder": kw,
        "vocab": {"text_vocab": vocab.text_vocab, "num_bins": vocab.num_bins,
                  "eos_id": vocab.eos_id, "pad_id": vocab.pad_id, "loc_start": vocab.loc_start,
                  "task_ids": {t: vocab.task_id(t) for t in TASKS},
                  "mask_id": vocab.mask_id, "size": vocab.size},
        "image_width": int(np.shape(params["img"]["embedding"]["kernel"])[-1]),
        "tokenizer": None,
    }


def save_decoder(out: str, params: VariableDict, model_config: Mapping[str, object] | None,
                 *, tokenizer: str | None = None, source: str = "checkpoint") -> list[str]:
    """Writes `params/dec/...` to `out` (.npz) and the sidecar JSON (decoder_spec); copies
    `tokenizer` next to them as `<name>.tokenizer.model`. Returns the files written."""
    if not out.endswith(".npz"):
        raise ExportError(f"--out {out!r}: a decoder export is a .npz file")
    spec = decoder_spec(params, model_config, source)
    written = [out, sidecar_path(out)]
    if tokenizer:
        target = out[:-len(".npz")] + ".tokenizer.model"
        _copy(tokenizer, target)
        spec["tokenizer"] = os.path.basename(target)
        written.append(target)
    bv.save_npz(out, {"dec": params["dec"]})
    with open(written[1], "w") as f:
        json.dump(spec, f, indent=2)
    return written


def load_decoder(path: str | os.PathLike) -> DecoderExport:
    """Reads a decoder export (.npz + sidecar), checking every name and shape against the
    decoder its sidecar describes; one-line ExportError otherwise."""
    path = os.fspath(path)
    side = sidecar_path(path)
    if not os.path.exists(side):
        raise ExportError(f"decoder export {path!r}: its sidecar {side!r} is missing")
    with open(side) as f:
        spec = json.load(f)
    if spec.get("format") != DECODER_FORMAT or spec.get("version") != DECODER_VERSION:
        raise ExportError(f"{side!r}: format {spec.get('format')!r} version "
                          f"{spec.get('version')!r}, expected {DECODER_FORMAT!r} version "
                          f"{DECODER_VERSION}")
    v = spec["vocab"]
    vocab = DecoderVocab(int(v["text_vocab"]), int(v["num_bins"]), int(v["eos_id"]))
    if vocab.size != v["size"] or vocab.mask_id != v["mask_id"]:
        raise ExportError(f"{side!r}: vocab size {v['size']} / mask id {v['mask_id']} do not "
                          f"match DecoderVocab({vocab.text_vocab}, {vocab.num_bins}) "
                          f"({vocab.size} / {vocab.mask_id})")
    bins = spec["decoder"].get("num_bins")
    if bins != vocab.num_bins:
        raise ExportError(f"{side!r}: decoder.num_bins={bins!r} but vocab.num_bins="
                          f"{vocab.num_bins}")
    tree = bv.read_npz(path)
    if set(tree) != {"dec"}:
        raise ExportError(f"decoder export {path!r}: expected only params/dec/..., found "
                          f"top-level names {sorted(tree)}")
    tok = spec.get("tokenizer")
    found = DecoderExport(dict(spec["decoder"]), vocab, tree["dec"], int(spec["image_width"]),
                          os.path.join(os.path.dirname(path), tok) if tok else None)
    module = found.make_decoder()
    shapes = jax.eval_shape(lambda: module.init(
        jax.random.key(0), np.zeros((1, 2), np.int32),
        np.zeros((1, 1, found.image_width), np.float32), parallel=False))["params"]
    bv.check_match(bv.flatten(found.params, ""), bv.flatten(dict(shapes), ""), path)
    return found
