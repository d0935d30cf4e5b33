"""Hugging Face SigLIP / SigLIP 2 checkpoints (`SiglipModel`, `Siglip2Model`): load and save,
numpy + safetensors only.

A HF SigLIP directory holds `config.json` and `model.safetensors` (or shards listed in
`model.safetensors.index.json`). Torch layout: Linear weights are (out, in); the image MAP
head is a `torch.nn.MultiheadAttention` with q, k, v packed in `in_proj_weight` (3D, D);
`logit_scale` / `logit_bias` are our `t` / `b`. Published config.json files omit default
fields, and transformers 5 writes "dtype" where 4.x wrote "torch_dtype": `read_hf_config`
fills the defaults in. `load_hf` gives our (unscanned) big_vision-layout params and the
two-tower model config; `save_hf` writes a directory `SiglipModel.from_pretrained` reads.

SigLIP 2 FixRes checkpoints are `SiglipModel` directories (model_type "siglip", 256k vocab).
SigLIP 2 NaFlex checkpoints are `Siglip2Model` directories (model_type "siglip2"): the same
tensor names except the image stem — `vision_model.embeddings.patch_embedding` is a Linear
(D, p·p·3) over patches flattened as (py, px, c) (our NaFlex `img/embedding/kernel` [p·p·3, D]
is its transpose) and `position_embedding.weight` is the (G·G, D) grid (ours: [G, G, D]);
config `vision_config.num_patches` = G·G (no image_size). They load as `image.kind="naflex"`.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Mapping, Sequence

import jax
import ml_dtypes
import numpy as np
from flax.typing import VariableDict
from safetensors.numpy import load_file, save_file

from siglip_jax.checkpoints import big_vision as bv
from siglip_jax.models.config import image_kind, image_kwargs, text_kwargs

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# transformers' SiglipTextConfig / SiglipVisionConfig defaults (google/siglip-base-patch16-224).
TEXT_DEFAULTS: dict[str, object] = dict(
    vocab_size=32000, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=64, hidden_act="gelu_pytorch_tanh",
    layer_norm_eps=1e-6, attention_dropout=0.0, projection_size=None,
)  # fmt: skip
VISION_DEFAULTS: dict[str, object] = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    num_channels=3, image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh",
    layer_norm_eps=1e-6, attention_dropout=0.0, vision_use_head=True,
)  # fmt: skip
# transformers' Siglip2VisionConfig defaults: no image_size, a num_patches position grid.
VISION2_DEFAULTS: dict[str, object] = {
    **{k: v for k, v in VISION_DEFAULTS.items() if k != "image_size"}, "num_patches": 256}
MODEL_TYPES = ("siglip", "siglip2")
_GELU_TANH = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast")


class HFCheckpointError(ValueError):
    """A Hugging Face SigLIP checkpoint/config that our model cannot represent or read."""


# ------------------------------------------------------------------------------ config.
def read_hf_config(path: str | os.PathLike | Mapping[str, object]) -> dict[str, object]:
    """Reads config.json (a directory, a file, or a dict) and fills in transformers' defaults."""
    if isinstance(path, Mapping):
        raw = dict(path)
    else:
        path = os.fspath(path)
        file = os.path.join(path, CONFIG_FILE) if os.path.isdir(path) else path
        with open(file) as f:
            raw = json.load(f)
    model_type = raw.get("model_type", "siglip")
    if model_type not in MODEL_TYPES:
        raise HFCheckpointError(f"expected model_type in {MODEL_TYPES}, got {model_type!r}")
    text = {**TEXT_DEFAULTS, **(raw.get("text_config") or {})}
    if text["projection_size"] is None:
        text["projection_size"] = text["hidden_size"]
    defaults = VISION2_DEFAULTS if model_type == "siglip2" else VISION_DEFAULTS
    vision = {**defaults, **(raw.get("vision_config") or {})}
    dtype = raw.get("dtype") or raw.get("torch_dtype") or "float32"
    return {**raw, "model_type": model_type, "text_config": text, "vision_config": vision,
            "dtype": dtype}


def is_naflex(cfg: Mapping[str, object]) -> bool:
    """True for a HF Siglip2Model (NaFlex) config, False for SiglipModel (FixRes)."""
    return cfg.get("model_type", "siglip") == "siglip2"


def _posemb_grid(num_patches: int) -> int:
    grid = int(round(np.sqrt(num_patches)))
    if grid * grid != num_patches:
        raise HFCheckpointError(f"vision_config.num_patches={num_patches} is not a square grid")
    return grid


def _check_supported(cfg: Mapping[str, object]) -> None:
    for tower in ("text_config", "vision_config"):
        c = cfg[tower]
        if c["hidden_act"] not in _GELU_TANH:
            raise HFCheckpointError(
                f"{tower}.hidden_act={c['hidden_act']!r}: only tanh-GELU {_GELU_TANH} matches"
            )
        if abs(float(c["layer_norm_eps"]) - 1e-6) > 1e-12:
            raise HFCheckpointError(f"{tower}.layer_norm_eps={c['layer_norm_eps']}, need 1e-6")
    v = cfg["vision_config"]
    if not v["vision_use_head"]:
        raise HFCheckpointError("vision_config.vision_use_head=False: SiglipModel needs the head")
    if v["num_channels"] != 3:
        raise HFCheckpointError(f"vision_config.num_channels={v['num_channels']}, need 3")


def _pair(x: int | Sequence[int]) -> tuple[int, int]:
    return (int(x), int(x)) if isinstance(x, int) else (int(x[0]), int(x[1]))


def model_config_from_hf(cfg: str | os.PathLike | Mapping[str, object]) -> dict[str, object]:
    """HF config -> {"model": two_towers.Model kwargs, "image_size": (h, w) | None,
    "max_num_patches": N | None, "text_len": L}.

    FixRes (SiglipModel): image_size set, max_num_patches None. NaFlex (Siglip2Model):
    image_size None, max_num_patches = vision_config.num_patches (the position-grid size,
    which is also the released checkpoints' default patch budget, 256).
    """
    cfg = read_hf_config(cfg)
    _check_supported(cfg)
    t, v = cfg["text_config"], cfg["vision_config"]
    image = dict(
        width=v["hidden_size"], depth=v["num_hidden_layers"], mlp_dim=v["intermediate_size"],
        num_heads=v["num_attention_heads"], patch_size=_pair(v["patch_size"]), posemb="learn",
        pool_type="map",
    )  # fmt: skip
    if is_naflex(cfg):
        p = int(v["patch_size"]) if isinstance(v["patch_size"], int) else int(v["patch_size"][0])
        image = {**image, "kind": "naflex", "patch_size": p,
                 "posemb_grid": _posemb_grid(int(v["num_patches"]))}
        del image["posemb"]
    text = dict(
        vocab_size=t["vocab_size"], width=t["hidden_size"], depth=t["num_hidden_layers"],
        mlp_dim=t["intermediate_size"], num_heads=t["num_attention_heads"], pool_type="last",
    )  # fmt: skip
    naflex = is_naflex(cfg)
    return dict(
        model=dict(image=image, text=text, out_dim=(None, t["projection_size"])),
        image_size=None if naflex else _pair(v["image_size"]),
        max_num_patches=int(v["num_patches"]) if naflex else None,
        text_len=t["max_position_embeddings"],
    )


def hf_config_from_model(
    model_kwargs: Mapping[str, object], image_size: int | tuple[int, int] | None, text_len: int
) -> dict[str, object]:
    """Our two-tower config -> a HF config.json dict: SiglipModel for a FixRes image tower,
    Siglip2Model for `kind="naflex"` (image_size is then ignored); errors if not representable.
    """
    naflex = image_kind(model_kwargs.get("image")) == "naflex"
    img = image_kwargs(model_kwargs.get("image"))
    txt = text_kwargs(model_kwargs.get("text"))
    out_dim = model_kwargs.get("out_dim")
    img_dim, txt_dim = out_dim if isinstance(out_dim, (tuple, list)) else (out_dim, out_dim)
    problems = []
    if img.get("pool_type") != "map":
        problems.append(f"image pool_type must be 'map' (got {img.get('pool_type', 'gap')!r})")
    if not naflex and img.get("posemb", "learn") != "learn":
        problems.append("image posemb must be 'learn'")
    if img_dim:
        problems.append(f"image out_dim must be None (HF has no image head), got {img_dim}")
    if txt.get("pool_type", "last") != "last":
        problems.append(f"text pool_type must be 'last' (got {txt['pool_type']!r})")
    if not txt_dim:
        problems.append("text out_dim must be set (HF text head)")
    if model_kwargs.get("bias_init", -10.0) is None:
        problems.append("bias_init must not be None (HF has logit_bias)")
    if problems:
        raise HFCheckpointError("model not representable as HF SiglipModel: " + "; ".join(problems))
    mlp_img = img.get("mlp_dim") or 4 * img["width"]
    mlp_txt = txt.get("mlp_dim") or 4 * txt["width"]
    ph, pw = _pair(img.get("patch_size", 16))
    ih, iw = (0, 0) if naflex else _pair(image_size)
    if ph != pw or ih != iw:
        raise HFCheckpointError(f"HF SigLIP needs square patches/images, got {ph}x{pw}, {ih}x{iw}")
    prefix = "siglip2" if naflex else "siglip"
    vision: dict[str, object] = {
        "model_type": f"{prefix}_vision_model", "hidden_size": img["width"],
        "intermediate_size": mlp_img, "num_hidden_layers": img["depth"],
        "num_attention_heads": img["num_heads"], "num_channels": 3, "image_size": ih,
        "patch_size": ph, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
        "attention_dropout": 0.0, "vision_use_head": True,
    }  # fmt: skip
    if naflex:
        del vision["image_size"]
        vision["num_patches"] = img.get("posemb_grid", 16) ** 2
    return {
        "architectures": ["Siglip2Model" if naflex else "SiglipModel"],
        "model_type": prefix,
        "initializer_factor": 1.0,
        "dtype": "float32",
        "text_config": {
            "model_type": f"{prefix}_text_model", "vocab_size": txt["vocab_size"],
            "hidden_size": txt["width"], "intermediate_size": mlp_txt,
            "num_hidden_layers": txt["depth"], "num_attention_heads": txt["num_heads"],
            "max_position_embeddings": text_len, "hidden_act": "gelu_pytorch_tanh",
            "layer_norm_eps": 1e-6, "attention_dropout": 0.0, "projection_size": txt_dim,
            "pad_token_id": 1, "eos_token_id": 1, "bos_token_id": None,
        },
        "vision_config": vision,
    }  # fmt: skip


# ----------------------------------------------------------------------- weight mapping.
Fn = Callable[[np.ndarray], np.ndarray]
_IN_PROJ = "vision_model.head.attention.in_proj_"
_MAP_ATTN = "img/MAPHead_0/MultiHeadDotProductAttention_0"


def _rules(cfg: Mapping[str, object]) -> list[tuple[str, str, Fn, Fn]]:
    """(hf_key, our "/"-path, hf->ours, ours->hf) for every tensor but the packed in_proj."""
    rules: list[tuple[str, str, Fn, Fn]] = []
    ident: Fn = lambda x: x
    t_: Fn = lambda x: x.T

    def linear(hf: str, ours: str) -> None:
        rules.append((f"{hf}.weight", f"{ours}/kernel", t_, t_))
        rules.append((f"{hf}.bias", f"{ours}/bias", ident, ident))

    def norm(hf: str, ours: str) -> None:
        rules.append((f"{hf}.weight", f"{ours}/scale", ident, ident))
        rules.append((f"{hf}.bias", f"{ours}/bias", ident, ident))

    def mlp(hf: str, ours: str) -> None:
        linear(f"{hf}.fc1", f"{ours}/Dense_0")
        linear(f"{hf}.fc2", f"{ours}/Dense_1")

    def attention(hf: str, ours: str, d: int, h: int) -> None:
        for name, hfname in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
            rules.append((f"{hf}.{hfname}.weight", f"{ours}/{name}/kernel",
                          lambda w, d=d, h=h: w.T.reshape(d, h, d // h),
                          lambda k, d=d: k.reshape(d, d).T))  # fmt: skip
            rules.append((f"{hf}.{hfname}.bias", f"{ours}/{name}/bias",
                          lambda b, h=h: b.reshape(h, -1), lambda b: b.reshape(-1)))  # fmt: skip
        rules.append((f"{hf}.out_proj.weight", f"{ours}/out/kernel",
                      lambda w, d=d, h=h: w.T.reshape(h, d // h, d),
                      lambda k, d=d: k.reshape(d, d).T))  # fmt: skip
        rules.append((f"{hf}.out_proj.bias", f"{ours}/out/bias", ident, ident))

    def encoder(hf: str, ours: str, c: Mapping[str, object]) -> None:
        d, h = c["hidden_size"], c["num_attention_heads"]
        for i in range(c["num_hidden_layers"]):
            src, dst = f"{hf}.layers.{i}", f"{ours}/encoderblock_{i}"
            norm(f"{src}.layer_norm1", f"{dst}/LayerNorm_0")
            attention(f"{src}.self_attn", f"{dst}/MultiHeadDotProductAttention_0", d, h)
            norm(f"{src}.layer_norm2", f"{dst}/LayerNorm_1")
            mlp(f"{src}.mlp", f"{dst}/MlpBlock_0")

    t, v = cfg["text_config"], cfg["vision_config"]
    add_dim: Fn = lambda x: x[None]
    drop_dim: Fn = lambda x: x[0]
    # Text tower.
    rules.append(("text_model.embeddings.token_embedding.weight", "txt/Embed_0/embedding",
                  ident, ident))  # fmt: skip
    rules.append(("text_model.embeddings.position_embedding.weight", "txt/pos_embedding",
                  add_dim, drop_dim))  # fmt: skip
    encoder("text_model.encoder", "txt/Encoder_0", t)
    norm("text_model.final_layer_norm", "txt/Encoder_0/encoder_norm")
    linear("text_model.head", "txt/head")
    if is_naflex(cfg):
        # NaFlex: Linear (D, p·p·C) <-> Dense kernel (p·p·C, D), both over (py, px, c) patches;
        # position grid (G·G, D) <-> (G, G, D), row-major.
        linear("vision_model.embeddings.patch_embedding", "img/embedding")
        g = _posemb_grid(int(v["num_patches"]))
        rules.append(("vision_model.embeddings.position_embedding.weight", "img/pos_embedding",
                      lambda w: w.reshape(g, g, -1), lambda p: p.reshape(g * g, -1)))  # fmt: skip
    else:
        # Image tower. Conv weight (D, C, ph, pw) <-> flax kernel (ph, pw, C, D).
        conv_to_ours: Fn = lambda w: w.transpose(2, 3, 1, 0)
        conv_to_hf: Fn = lambda k: k.transpose(3, 2, 0, 1)
        rules.append(("vision_model.embeddings.patch_embedding.weight", "img/embedding/kernel",
                      conv_to_ours, conv_to_hf))  # fmt: skip
        rules.append(("vision_model.embeddings.patch_embedding.bias", "img/embedding/bias",
                      ident, ident))  # fmt: skip
        rules.append(("vision_model.embeddings.position_embedding.weight", "img/pos_embedding",
                      add_dim, drop_dim))  # fmt: skip
    encoder("vision_model.encoder", "img/Transformer", v)
    norm("vision_model.post_layernorm", "img/Transformer/encoder_norm")
    rules.append(("vision_model.head.probe", "img/MAPHead_0/probe", ident, ident))
    vd, vh = v["hidden_size"], v["num_attention_heads"]
    rules.append(("vision_model.head.attention.out_proj.weight", f"{_MAP_ATTN}/out/kernel",
                  lambda w: w.T.reshape(vh, vd // vh, vd),
                  lambda k: k.reshape(vd, vd).T))  # fmt: skip
    rules.append(("vision_model.head.attention.out_proj.bias", f"{_MAP_ATTN}/out/bias",
                  ident, ident))  # fmt: skip
    norm("vision_model.head.layernorm", "img/MAPHead_0/LayerNorm_0")
    mlp("vision_model.head.mlp", "img/MAPHead_0/MlpBlock_0")
    rules.append(("logit_scale", "t", ident, ident))
    rules.append(("logit_bias", "b", ident, ident))
    return rules


def hf_to_params(tensors: Mapping[str, np.ndarray], cfg: Mapping[str, object]) -> dict[str, object]:
    """HF SiglipModel state dict (numpy) -> our unscanned params tree (exact re-layout)."""
    cfg = read_hf_config(cfg)
    _check_supported(cfg)
    d = cfg["vision_config"]["hidden_size"]
    h = cfg["vision_config"]["num_attention_heads"]
    flat: dict[str, np.ndarray] = {}
    missing = []
    for hf_key, ours, to_ours, _ in _rules(cfg):
        if hf_key not in tensors:
            missing.append(hf_key)
            continue
        flat[ours] = np.ascontiguousarray(to_ours(np.asarray(tensors[hf_key])))
    for part in ("weight", "bias"):
        key = _IN_PROJ + part
        if key not in tensors:
            missing.append(key)
            continue
        packed = np.asarray(tensors[key])  # (3D, D) or (3D,): q, k, v along axis 0.
        for name, chunk in zip(("query", "key", "value"), np.split(packed, 3, axis=0), strict=True):
            if part == "weight":
                flat[f"{_MAP_ATTN}/{name}/kernel"] = np.ascontiguousarray(
                    chunk.T.reshape(d, h, d // h)
                )
            else:
                flat[f"{_MAP_ATTN}/{name}/bias"] = chunk.reshape(h, d // h)
    known = {r[0] for r in _rules(cfg)} | {_IN_PROJ + "weight", _IN_PROJ + "bias"}
    extra = sorted(k for k in tensors if k not in known and not k.endswith("position_ids"))
    if missing or extra:
        raise HFCheckpointError(
            f"HF weights do not match config.json: missing {missing[:5]} "
            f"({len(missing)} total), unexpected {extra[:5]} ({len(extra)} total)"
        )
    return bv.unflatten(flat)


def params_to_hf(params: Mapping[str, object], cfg: Mapping[str, object]) -> dict[str, np.ndarray]:
    """Our params (either layout) -> HF SiglipModel state dict of numpy arrays."""
    cfg = read_hf_config(cfg)
    params = bv.to_layout(jax.device_get(params), scanned=False)
    flat = {k: np.asarray(v) for k, v in bv.flatten(params, "").items()}
    out: dict[str, np.ndarray] = {}
    used = set()
    for hf_key, ours, _, to_hf in _rules(cfg):
        if ours not in flat:
            raise HFCheckpointError(f"params have no {ours!r} (needed for HF {hf_key!r})")
        out[hf_key] = np.ascontiguousarray(to_hf(flat[ours]))
        used.add(ours)
    d = cfg["vision_config"]["hidden_size"]
    names = ("query", "key", "value")
    out[_IN_PROJ + "weight"] = np.concatenate(  # C order: see save_hf.
        [flat[f"{_MAP_ATTN}/{n}/kernel"].reshape(d, d).T for n in names], axis=0
    )
    out[_IN_PROJ + "bias"] = np.concatenate(
        [flat[f"{_MAP_ATTN}/{n}/bias"].reshape(-1) for n in names], axis=0
    )
    used |= {f"{_MAP_ATTN}/{n}/{p}" for n in names for p in ("kernel", "bias")}
    unused = sorted(set(flat) - used)
    if unused:
        raise HFCheckpointError(f"params not representable in HF "
                                f"{'Siglip2Model' if is_naflex(cfg) else 'SiglipModel'}: "
                                f"{unused[:5]}")
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


# ------------------------------------------------------------------------------ files.
_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}  # fmt: skip


def _read_safetensors_raw(path: str) -> dict[str, np.ndarray]:
    """Minimal safetensors reader (header + raw little-endian data), also handles BF16."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        dtype = ml_dtypes.bfloat16 if info["dtype"] == "BF16" else _ST_DTYPES.get(info["dtype"])
        if dtype is None:
            raise HFCheckpointError(f"{path}: unsupported safetensors dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        arr = np.frombuffer(data[begin:end], dtype=np.dtype(dtype).newbyteorder("<"))
        out[key] = arr.reshape(info["shape"]).astype(np.dtype(dtype))
    return out


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    try:
        return load_file(path)
    except TypeError:  # numpy has no bfloat16: read such files ourselves.
        return _read_safetensors_raw(path)


def read_hf_weights(directory: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a HF directory (model.safetensors or the shards of its index)."""
    directory = os.fspath(directory)
    single = os.path.join(directory, WEIGHTS_FILE)
    index = os.path.join(directory, INDEX_FILE)
    if os.path.exists(single):
        return _read_safetensors(single)
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        out: dict[str, np.ndarray] = {}
        for shard in shards:
            out.update(_read_safetensors(os.path.join(directory, shard)))
        return out
    raise FileNotFoundError(f"{directory}: neither {WEIGHTS_FILE} nor {INDEX_FILE} found")


def load_hf(
    directory: str | os.PathLike, target: VariableDict | None = None, *,
    resample_posemb: bool = False,
) -> tuple[dict[str, object], dict[str, object]]:
    """Loads a HF SigLIP directory -> (params, spec) with spec = model_config_from_hf(...).

    Without `target` the params are unscanned numpy arrays as stored. With `target` (a params
    or ShapeDtypeStruct tree, e.g. of a scanned model) they are re-laid-out, checked (names
    and shapes) and cast to it; `resample_posemb` adapts the image grid to the target's.
    """
    cfg = read_hf_config(directory)
    spec = model_config_from_hf(cfg)
    params = hf_to_params(read_hf_weights(directory), cfg)
    if target is not None:
        params = bv.load_params(
            params, target, source=os.fspath(directory), resample_posemb=resample_posemb
        )
    return params, spec


def save_hf(
    directory: str | os.PathLike,
    params: Mapping[str, object],
    model_kwargs: Mapping[str, object],
    image_size: int | tuple[int, int] | None,
    text_len: int,
) -> None:
    """Writes config.json + model.safetensors that transformers' SiglipModel (FixRes) or
    Siglip2Model (NaFlex image tower; `image_size` unused, may be None) loads."""
    cfg = hf_config_from_model(model_kwargs, image_size, text_len)
    tensors = params_to_hf(params, cfg)
    # HF config says float32 (widening is exact). safetensors writes the raw buffer, so every
    # array must be C-contiguous (np.concatenate of transposes can give Fortran order).
    tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, WEIGHTS_FILE), metadata={"format": "pt"})
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(cfg, f, indent=2)
