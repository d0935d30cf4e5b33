"""The files that make a Hugging Face export a full processor: `AutoProcessor`, `pipeline`.

transformers' `AutoProcessor.from_pretrained(dir)` and
`pipeline("zero-shot-image-classification", model=dir)` need, beside config.json and the
weights (hf.save_hf), an image processor config and tokenizer files:

- `preprocessor_config.json`: FixRes `SiglipImageProcessor` (resize to the model's
  resolution, bilinear, × 1/255, mean = std = 0.5: what predict.py and the released SigLIP
  processors do) or NaFlex `Siglip2ImageProcessor` (patch size and `max_num_patches`, the
  checkpoint's patch budget).
- Tokenizer, by the text convention the directory reopens with (parts.hf_convention):
  "siglip" → `spiece.model` + a `SiglipTokenizer` tokenizer_config.json (lower-casing and
  punctuation stripping are SiglipTokenizer's own; EOS `</s>` ends and pads the text; no
  attention mask, as SigLIP was trained: the text tower attends to the padding), written
  only when the sentencepiece file has the SigLIP layout (`</s>` its EOS piece); "siglip2" →
  `tokenizer.model` + a `GemmaTokenizer` tokenizer_config.json (no BOS, EOS appended, `<pad>`
  padding), which transformers converts on load; its ids were checked against siglip_jax's
  only on the layout our tests train (see docs/checkpoints.md). A tokenizer that cannot be
  expressed gets no tokenizer_config.json: the directory still loads in siglip_jax and in
  `AutoModel`, and `write_processor_files` says why in its notes.
"""

from __future__ import annotations

import json
import os
import shutil

import sentencepiece as spm

PREPROCESSOR_FILE = "preprocessor_config.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
TOKENIZER_FILES = {"siglip": "spiece.model", "siglip2": "tokenizer.model"}
_IMAGE_COMMON = {"do_convert_rgb": None, "do_resize": True, "resample": 2, "do_rescale": True,
                 "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5] * 3,
                 "image_std": [0.5] * 3}


def image_processor_config(*, naflex: bool, image_size: tuple[int, int] | None = None,
                           patch_size: int | None = None, max_num_patches: int | None = None
                           ) -> dict[str, object]:
    """preprocessor_config.json contents for a FixRes (image_size) or NaFlex (patch_size,
    max_num_patches) model."""
    if naflex:
        if not patch_size or not max_num_patches:
            raise ValueError("a NaFlex image processor needs the patch size and patch budget")
        return {"image_processor_type": "Siglip2ImageProcessor",
                "processor_class": "Siglip2Processor", **_IMAGE_COMMON,
                "patch_size": int(patch_size), "max_num_patches": int(max_num_patches)}
    if image_size is None:
        raise ValueError("a FixRes image processor needs the image size")
    return {"image_processor_type": "SiglipImageProcessor", "processor_class": "SiglipProcessor",
            **_IMAGE_COMMON, "size": {"height": int(image_size[0]), "width": int(image_size[1])}}


def tokenizer_config(tokenizer: str, convention: str, text_len: int
                     ) -> tuple[dict[str, object] | None, str]:
    """(tokenizer_config.json contents, "") or (None, why the tokenizer cannot be expressed)."""
    sp = spm.SentencePieceProcessor(model_file=tokenizer)
    eos = sp.id_to_piece(sp.eos_id()) if sp.eos_id() >= 0 else None
    if convention == "siglip":
        if eos != "</s>" or sp.unk_id() < 0:
            return None, (f"{tokenizer}: a SiglipTokenizer needs the EOS piece '</s>' and an "
                          f"unknown piece; this sentencepiece file's EOS is {eos!r}")
        return {"tokenizer_class": "SiglipTokenizer", "processor_class": "SiglipProcessor",
                "model_max_length": int(text_len), "do_lower_case": True,
                "model_input_names": ["input_ids"],  # SigLIP's text tower sees the padding.
                "eos_token": "</s>", "pad_token": "</s>",
                "unk_token": sp.id_to_piece(sp.unk_id())}, ""
    pad = sp.id_to_piece(sp.pad_id()) if sp.pad_id() >= 0 else None
    if eos is None or pad is None:
        return None, (f"{tokenizer}: a GemmaTokenizer needs EOS and padding pieces; this "
                      f"sentencepiece file has EOS {eos!r}, padding {pad!r}")
    bos = sp.id_to_piece(sp.bos_id()) if sp.bos_id() >= 0 else None
    unk = sp.id_to_piece(sp.unk_id()) if sp.unk_id() >= 0 else None
    return {"tokenizer_class": "GemmaTokenizer", "processor_class": "Siglip2Processor",
            "model_max_length": int(text_len), "add_bos_token": False, "add_eos_token": True,
            "model_input_names": ["input_ids"],
            "eos_token": eos, "pad_token": pad, "bos_token": bos, "unk_token": unk}, ""


def write_processor_files(out: str, *, image_config: dict[str, object],
                          tokenizer: str | None, convention: str, text_len: int
                          ) -> tuple[list[str], list[str]]:
    """Writes the image processor config and the tokenizer files into the HF directory
    `out`; returns (files written, notes on what could not be written)."""
    written, notes = [], []
    path = os.path.join(out, PREPROCESSOR_FILE)
    with open(path, "w") as f:
        json.dump(image_config, f, indent=2)
    written.append(path)
    if not tokenizer:  # The exporter's notes say so.
        return written, notes
    target = os.path.join(out, TOKENIZER_FILES[convention])
    if "://" in tokenizer:
        import tensorflow as tf  # Deliberately late: only a remote tokenizer needs TensorFlow.

        tf.io.gfile.copy(tokenizer, target, overwrite=True)
    else:
        shutil.copyfile(tokenizer, target)
    written.append(target)
    config, why = tokenizer_config(target, convention, text_len)
    if config is None:
        notes.append(f"no {TOKENIZER_CONFIG_FILE}: {why}; siglip_jax and AutoModel load the "
                     "directory, AutoProcessor and pipeline() do not")
        return written, notes
    path = os.path.join(out, TOKENIZER_CONFIG_FILE)
    with open(path, "w") as f:
        json.dump(config, f, indent=2)
    written.append(path)
    return written, notes
