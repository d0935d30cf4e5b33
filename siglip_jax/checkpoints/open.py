"""One way to open a checkpoint: `open_model(path)` → model, params, tokenizer, input sizes.

Every entry point that starts from a checkpoint (evaluate, predict, the trainer's
`model_init`: `load_model_init`) opens it here, so they agree on paths, formats and precedence.

Paths (`resolve_path`): absolute, relative (to the current directory), `~` and `gs://`.
Formats: our trainer's workdir / step directory, a big_vision `.npz`, a Hugging Face SigLIP
directory (see checkpoints/loader.py).

Precedence, for each of model config, tokenizer, image size, text length and eos (the keys
of `overrides` and `defaults`):
  1. `overrides` given by the caller;
  2. what the checkpoint stores about itself: our run's config.json (model, tokenizer.model,
     tokenizer.max_len, tokenizer.eos, else the run's data source's tokenizer), or a HF
     config.json + spiece.model;
  3. `defaults` given by the caller (e.g. the evaluation config's model for a .npz);
  4. what the arrays' shapes fix (`infer_model_config`; this is how a big_vision .npz, which
     stores no config, opens with none: widths, depths, heads, MLP, patch, vocabulary,
     pooling, scanned or not, head dims, bias, image size from the position embedding, text
     length); the image size of a learned square position embedding for any format;
  5. otherwise None (the caller decides whether that is an error).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence

import numpy as np
from flax.typing import VariableDict

from siglip_jax.checkpoints import loader
from siglip_jax.checkpoints.big_vision import load_params
from siglip_jax.checkpoints.hf import HFCheckpointError
from siglip_jax.checkpoints.parts import TOWER_PARTS
from siglip_jax.data.config import DemoShapesData, parse_source
from siglip_jax.data.demo_shapes import prepared_source
from siglip_jax.data.tokenizer import Tokenizer
from siglip_jax.models.build import make_model
from siglip_jax.models.config import ModelConfig
from siglip_jax.models.params import param_shapes
from siglip_jax.objectives.selfsup import HEAD_PARTS
from siglip_jax.records import ConfigError

OVERRIDE_KEYS = ("model", "tokenizer", "image_size", "text_len", "eos")


@dataclasses.dataclass(frozen=True)
class OpenedModel:
    """A checkpoint, opened: what it is, the model it holds and how to feed that model."""

    path: str
    format: str  # "orbax" | "npz" | "hf"
    model_config: dict[str, object]  # two_towers.Model keyword arguments (the checkpoint's).
    model: ModelConfig  # The same, parsed (make_model(opened.model) builds the flax Model).
    params: VariableDict | None  # numpy, in the checkpoint's own block layout; None if not read.
    tokenizer: str | None  # sentencepiece .model path.
    image_size: tuple[int, int] | None
    text_len: int | None
    eos: str = "sticky"
    run_config: Mapping[str, object] | None = None
    max_num_patches: int | None = None  # NaFlex models: the patch budget of the checkpoint.
    convention: str = ""  # Text rules for prompts: "siglip", "siglip2" or "" (eos + canonical).

    @property
    def is_naflex(self) -> bool:
        """Whether the image tower takes NaFlex patch inputs."""
        return self.model.image.kind == "naflex"

    def encode_texts(self, tokenizer: Tokenizer, texts: Sequence[str]) -> np.ndarray:
        """Token ids [N, text_len] of prompts, by this checkpoint's text convention."""
        if self.convention:
            return tokenizer.encode_as(list(texts), self.convention, self.text_len)
        return tokenizer.encode(list(texts), self.text_len, self.eos, canonicalize=True)

    def abstract_params(self) -> VariableDict:
        """The model's parameter shapes (ShapeDtypeStructs) at this checkpoint's input sizes."""
        if self.is_naflex and self.text_len is not None:  # NaFlex: sized by the patch budget.
            return param_shapes(make_model(self.model), self.max_num_patches or 256,
                                self.text_len)
        if self.image_size is None or self.text_len is None:
            raise loader.CheckpointFormatError(
                f"checkpoint {self.path!r}: image size or text length unknown; pass them as "
                "overrides (image_size=, text_len=)")
        return param_shapes(make_model(self.model), self.image_size, self.text_len)

    def fitted_params(self, target: VariableDict | None = None, resample_posemb: bool = False
                      ) -> dict[str, object]:
        """The params converted to `target`'s layout and dtypes (default: this model's)."""
        if self.params is None:
            raise ValueError(f"checkpoint {self.path!r} was opened without its params")
        target = self.abstract_params() if target is None else target
        params = {k: v for k, v in self.params.items()  # Training-only heads are dropped.
                  if k not in HEAD_PARTS or k in target}
        return load_params(params, target, source=self.path,
                           resample_posemb=resample_posemb)


def resolve_path(path: str | os.PathLike) -> str:
    """`~` expanded, relative paths made absolute; `scheme://` paths unchanged."""
    path = os.fspath(path)
    if "://" in path:
        return path
    return os.path.abspath(os.path.expanduser(path))


# Keys of a data source dict (data/config.py) that name local files or folders.
DATA_PATH_KEYS = ("path", "pattern", "root", "data_dir", "image_root")


def absolute_run_paths(config: Mapping[str, object]) -> dict[str, object]:
    """A run config dict (schema's to_dict) with its relative local paths made absolute from
    the current directory: tokenizer.model, model_init.*, and the files of every data source
    (`data` dicts: path, pattern, root, data_dir, image_root). What the trainer stores in
    config.json, so the run opens from any directory; "" and `scheme://` paths stay."""

    def fix(value: object) -> object:
        if isinstance(value, str):
            return resolve_path(value) if value else value
        if isinstance(value, (list, tuple)):
            return [fix(v) for v in value]
        return value

    def walk(node: object, key: str = "") -> object:
        if not isinstance(node, Mapping):
            return node
        out = {k: walk(v, k) for k, v in node.items()}
        if key == "data":
            out.update({k: fix(out[k]) for k in DATA_PATH_KEYS if k in out})
        return out

    result = dict(walk(config))
    if isinstance(result.get("tokenizer"), Mapping) and "model" in result["tokenizer"]:
        result["tokenizer"] = {**result["tokenizer"], "model": fix(result["tokenizer"]["model"])}
    if isinstance(result.get("model_init"), Mapping):
        result["model_init"] = {k: fix(v) for k, v in result["model_init"].items()}
    return result


def open_model(path: str | os.PathLike, overrides: Mapping[str, object] | None = None, *,
               defaults: Mapping[str, object] | None = None, read_params: bool = True
               ) -> OpenedModel:
    """Opens a checkpoint (see the module docstring for formats and precedence)."""
    overrides, defaults = dict(overrides or {}), dict(defaults or {})
    unknown = sorted((set(overrides) | set(defaults)) - set(OVERRIDE_KEYS))
    if unknown:
        raise ValueError(f"open_model: unknown key {unknown[0]!r}; valid: {OVERRIDE_KEYS}")

    path = resolve_path(path)
    info = loader.checkpoint_info(path)
    params = loader.load_params(path)[0] if read_params or info["format"] == "npz" else None
    found: dict[str, object] = {
        "model": info["model"], "tokenizer": info["tokenizer"],
        "image_size": info["image_size"], "text_len": info["text_len"], "eos": None}
    run = info["run_config"]
    if run is not None:
        found["eos"] = (run.get("tokenizer") or {}).get("eos")
        if not found["tokenizer"]:
            found["tokenizer"] = _run_data_tokenizer(run)
    if run is not None and found["tokenizer"] and overrides.get("tokenizer") is None:
        found["tokenizer"] = _run_relative(str(found["tokenizer"]), path, str(info["workdir"]))
    inferred = infer_model_config(params) if info["format"] == "npz" else {}
    chosen = {k: _first(overrides.get(k), found[k], defaults.get(k), inferred.get(k))
              for k in OVERRIDE_KEYS}
    if chosen["model"] is None:
        raise loader.CheckpointFormatError(f"checkpoint {path!r} ({info['format']}) carries no "
                                           "model config; pass overrides={'model': ...}")
    model_config = dict(chosen["model"])
    model = ModelConfig.parse(model_config)
    naflex = model.image.kind == "naflex"
    if chosen["image_size"] is None and params is not None and not naflex:
        chosen["image_size"] = _image_size_from_params(params, model)
    size = chosen["image_size"]
    if isinstance(size, int):
        size = (size, size)
    return OpenedModel(
        path=path, format=info["format"], model_config=model_config, model=model,
        params=params if read_params else None, tokenizer=chosen["tokenizer"] or None,
        image_size=None if size is None else (int(size[0]), int(size[1])),
        text_len=None if chosen["text_len"] is None else int(chosen["text_len"]),
        eos=chosen["eos"] or "sticky", run_config=run,
        max_num_patches=info.get("max_num_patches"),
        convention=_convention(info, naflex, chosen["tokenizer"]))


def _convention(info: Mapping[str, object], naflex: bool, tokenizer: str | None) -> str:
    """How the checkpoint's prompts are tokenized: our run's tokenizer.convention; for a
    Hugging Face directory "siglip2" when it is a SigLIP 2 model (Siglip2Model, or a Gemma
    `tokenizer.model`), else "siglip"; "" (the run's eos + canonicalisation) otherwise."""
    run = info.get("run_config")
    if run is not None:
        return (run.get("tokenizer") or {}).get("convention") or ""
    if info["format"] != "hf":
        return ""
    gemma = bool(tokenizer) and os.path.basename(tokenizer) == "tokenizer.model"
    return "siglip2" if gemma or naflex else "siglip"


def _run_relative(file: str, checkpoint: str, workdir: str) -> str:
    """A file named by a run's config.json: as stored when absolute (or remote); a relative
    one (runs started before paths were stored absolute) is looked up from the current
    directory, then from the run's workdir; CheckpointFormatError when neither has it."""
    if "://" in file or os.path.isabs(file):
        return file
    for base in (os.getcwd(), workdir):
        if os.path.exists(os.path.join(base, file)):
            return os.path.join(base, file)
    raise loader.CheckpointFormatError(
        f"checkpoint {checkpoint!r}: its config.json names the tokenizer {file!r}, a relative "
        "path found neither from the current directory nor from the workdir; pass the file "
        "(tokenizer=, or --tokenizer FILE)")


def _first(*values: object) -> object:
    return next((v for v in values if v is not None), None)


def _run_data_tokenizer(run: Mapping[str, object]) -> str | None:
    """The tokenizer of one of our runs whose config names none: its data source's (of the
    sources, only the generated demo data comes with one)."""
    data = (run.get("input") or {}).get("data")
    if not data:
        return None
    record = parse_source(data, "input.data")
    if not isinstance(record, DemoShapesData):
        return None
    return prepared_source(record, "input.data").tokenizer_path


def _image_size_from_params(params: VariableDict, model: ModelConfig) -> tuple[int, int] | None:
    """A square image size from a learned position embedding and the patch size."""
    posemb = (params.get("img") or {}).get("pos_embedding")
    if posemb is None:
        return None
    grid = int(round(np.sqrt(posemb.shape[1])))
    if grid * grid != posemb.shape[1]:
        return None
    ph, pw = model.image.patch_size or (16, 16)
    return grid * ph, grid * pw


# ----------------------------------------------------------------------------- .npz → config


def _encoder_shape(encoder: VariableDict, where: str) -> dict[str, object]:
    """depth, mlp_dim, num_heads and scan of an encoder's params (scanned or unscanned)."""
    if "encoderblock" in encoder:
        block, scan = encoder["encoderblock"], True
        depth = int(np.shape(block["LayerNorm_0"]["scale"])[0])
    else:
        blocks = [k for k in encoder if k.startswith("encoderblock_")]
        if not blocks:
            raise loader.CheckpointFormatError(f"{where}: no encoder blocks found")
        block, scan, depth = encoder["encoderblock_0"], False, len(blocks)
    query = np.shape(block["MultiHeadDotProductAttention_0"]["query"]["kernel"])
    mlp = np.shape(block["MlpBlock_0"]["Dense_0"]["kernel"])
    return {"depth": depth, "mlp_dim": int(mlp[-1]), "num_heads": int(query[-2]), "scan": scan}


def _head_dim(tower: VariableDict) -> int | None:
    head = tower.get("head")
    return None if head is None else int(np.shape(head["kernel"])[-1])


def _image_tower(img: VariableDict) -> dict[str, object]:
    """The image tower's config from its params: a FixRes ViT (`embedding/kernel` the patch
    convolution [ph, pw, 3, D]) or a NaFlex ViT (big_vision `naflex_vit.py`: `embedding/kernel`
    a Dense over the flattened patch [p·p·3, D], `pos_embedding` a learned [G, G, D] grid;
    the patch is taken as square, the only shape the flattened length leaves open)."""
    embed = np.shape(img["embedding"]["kernel"])
    encoder = _encoder_shape(img["Transformer"], "img/Transformer")
    if len(embed) == 2:  # NaFlex.
        patch = int(round(np.sqrt(embed[0] / 3)))
        grid = np.shape(img["pos_embedding"])
        if 3 * patch * patch != embed[0] or len(grid) != 3 or grid[0] != grid[1]:
            raise loader.CheckpointFormatError(
                f"img/embedding/kernel {tuple(embed)} with img/pos_embedding {tuple(grid)} is "
                "neither a FixRes ViT ([p, p, 3, D]) nor a NaFlex ViT ([p·p·3, D] with a "
                "[G, G, D] position grid) image tower")
        return {"kind": "naflex", "width": int(embed[-1]), "patch_size": (patch, patch),
                "posemb_grid": int(grid[0]),
                "pool_type": "map" if "MAPHead_0" in img else "gap", **encoder}
    return {"width": int(embed[-1]), "patch_size": (int(embed[0]), int(embed[1])),
            "posemb": "learn" if "pos_embedding" in img else "sincos2d",
            "pool_type": "map" if "MAPHead_0" in img else "tok" if "cls" in img else "gap",
            **encoder}


def infer_model_config(params: VariableDict) -> dict[str, object]:
    """{"model": Model kwargs, "image_size", "text_len"} from a big_vision params tree alone.

    Works on arrays or ShapeDtypeStructs (only shapes are read). The image size is the exact
    size of the position embedding's patch grid (So400m/14 at 384 px gives 378: the patch
    convolution ignores the last pixels either way). What shapes cannot tell is taken as
    SigLIP has it: an image tower without MAP head or class token pools by global
    average, a text tower without MAP head pools the last token. A NaFlex image tower (the
    format of big_vision's SigLIP 2 NaFlex checkpoints) is recognised by its 2-d patch
    embedding kernel; it has no fixed image size (None).
    """
    try:
        img, txt = params["img"], params["txt"]
        image = _image_tower(img)
        vocab, width = np.shape(txt["Embed_0"]["embedding"])
        text = {"vocab_size": int(vocab), "width": int(width),
                "pool_type": "map" if "MAPHead_0" in txt else "last",
                **_encoder_shape(txt["Encoder_0"], "txt/Encoder_0")}
        text_len = int(np.shape(txt["pos_embedding"])[1])
    except (KeyError, TypeError, IndexError) as e:
        raise loader.CheckpointFormatError(
            f"cannot infer the model from the checkpoint's arrays: missing {e}") from None
    image_size = None
    if image.get("kind") != "naflex" and "pos_embedding" in img:
        tokens = int(np.shape(img["pos_embedding"])[1])
        grid = int(round(np.sqrt(tokens)))
        if grid * grid == tokens:
            image_size = (grid * image["patch_size"][0], grid * image["patch_size"][1])
    # Only the presence of a bias matters here: its trained value comes with the params.
    model = {"image": image, "text": text, "out_dim": (_head_dim(img), _head_dim(txt)),
             "bias_init": -10.0 if "b" in params else None}
    return {"model": model, "image_size": image_size, "text_len": text_len}


def load_model_init(paths: Mapping[str, str], abstract_params: Mapping[str, VariableDict]
                    ) -> dict[str, VariableDict]:
    """Pretrained parts fitted to the model: {"img": tree, ...} from `paths` {part: checkpoint}
    (the config's `model_init` section, `ModelInitConfig.parts()`).

    Each checkpoint is opened with `open_model` (ours, big_vision .npz or HF directory),
    converted to the model's block layout (scanned or not) and dtypes, and the image position
    embedding is resampled if the resolution differs; names and shapes must otherwise match.
    `full` loads every part the model has (img, txt, t, b; the decoder `dec` only if the
    checkpoint holds one, else it keeps its random init). Errors are ConfigErrors naming the
    `model_init` key.
    """
    parts: dict[str, VariableDict] = {}
    for part, path in paths.items():
        try:
            params = open_model(path).params
        except (loader.CheckpointNotFoundError, loader.CheckpointFormatError,
                HFCheckpointError) as e:
            raise ConfigError(f"model_init.{part}: {e}") from None
        names = sorted(abstract_params) if part == "full" else [part]
        if part == "full":  # Parts beyond the towers (decoder, heads) may start fresh.
            names = [n for n in names if n in TOWER_PARTS or n in params]
        missing = [name for name in names if name not in params]
        if missing:
            raise ConfigError(f"model_init.{part}: checkpoint {path!r} has no {missing[0]!r} "
                              f"part (it has {sorted(params)})")
        try:  # Keyed by part name: t and b are leaves, and the posemb resampler looks for img.
            parts.update(load_params({n: params[n] for n in names},
                                     {n: abstract_params[n] for n in names},
                                     source=path, resample_posemb=True))
        except (ValueError, KeyError) as e:
            raise ConfigError(f"model_init.{part}: {e}") from None
    return parts
