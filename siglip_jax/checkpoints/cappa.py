"""big_vision CapPa decoder params <-> our decoder params (`dec/`, models/decoder.py).

big_vision `models/proj/cappa/cappa.py` names the decoder's params (un-scanned layout)

  EmbedTargets/embedding                  [V + 1, D]   row V: the mask token
  EncDecBlock{i}/LayerNorm{1,2,3}/{scale,bias}         pre-LN of self-attn, cross-attn, MLP
  EncDecBlock{i}/{SelfAttn,CrossAttn}/{query,key,value,out}/kernel   no biases
  EncDecBlock{i}/MLP/Dense_{0,1}/{kernel,bias}
  LayerNorm/{scale,bias}                  final LayerNorm
  LogitsDense/{kernel,bias}               [D, V], [V]

and keeps the learned position embedding [1, L, D] outside the decoder, in the CapPa model
(`pos_embedding_decoder`, passed to the decoder as `pos_emb`). Ours holds the same arrays
under other names: `embed`, `decoderblock_{i}/{ln_self,self_attn,ln_cross,cross_attn,
ln_mlp,mlp}` (or `decoderblock` stacked over depth on axis 0 when scanned), `decoder_norm`,
`head` and `pos_embedding`. `from_cappa` and `to_cappa` rename (and stack/unstack) without
touching a value, so a round trip is exact. big_vision's scanned CapPa layout (blocks stacked
on axis 1) is not read; our `img_proj` (an image width other than D) has no CapPa
counterpart and is refused on export.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

CAPPA_POSEMB = "pos_embedding_decoder"  # The CapPa model's param holding the decoder's pos_emb.
TOP = {"embed": "EmbedTargets", "decoder_norm": "LayerNorm", "head": "LogitsDense"}
BLOCK = {"ln_self": "LayerNorm1", "self_attn": "SelfAttn", "ln_cross": "LayerNorm2",
         "cross_attn": "CrossAttn", "ln_mlp": "LayerNorm3", "mlp": "MLP"}
_CAPPA_BLOCK = re.compile(r"^EncDecBlock(\d+)$")
_OUR_BLOCK = re.compile(r"^decoderblock_(\d+)$")
Tree = Mapping[str, object]


def _copy(tree: object) -> object:
    """A nested dict of numpy arrays holding the same values (no dtype change)."""
    if isinstance(tree, Mapping):
        return {k: _copy(v) for k, v in tree.items()}
    return np.array(tree)


def _rename(tree: Tree, names: Mapping[str, str], where: str) -> dict[str, object]:
    unknown = sorted(set(tree) - set(names))
    missing = sorted(set(names) - set(tree))
    if unknown or missing:
        raise ValueError(f"{where}: unexpected params {unknown}, missing {missing}")
    return {names[k]: _copy(v) for k, v in tree.items()}


def _blocks(tree: Tree, pattern: re.Pattern[str], where: str) -> list[Tree]:
    """The numbered blocks of a tree, in order (0..depth-1, none missing)."""
    found = {int(m.group(1)): tree[k] for k in tree if (m := pattern.match(k))}
    if sorted(found) != list(range(len(found))) or not found:
        raise ValueError(f"{where}: blocks must be numbered 0..depth-1, found {sorted(found)}")
    return [found[i] for i in range(len(found))]


def from_cappa(decoder: Tree, pos_emb: np.ndarray, *, scan: bool = False) -> dict[str, object]:
    """Our `dec/` params of a big_vision CapPa `Decoder`'s params and its `pos_emb` [1, L, D]
    (blocks stacked on axis 0 under `decoderblock` with `scan=True`). ValueError on a name or
    an embedding that does not fit (a CapPa decoder trained without masked prediction has no
    mask row)."""
    blocks = _blocks(decoder, _CAPPA_BLOCK, "CapPa decoder")
    rest = {k: v for k, v in decoder.items() if not _CAPPA_BLOCK.match(k)}
    out = _rename(rest, {v: k for k, v in TOP.items()}, "CapPa decoder")
    rows, vocab = np.shape(out["embed"]["embedding"])[0], np.shape(out["head"]["kernel"])[-1]
    if rows != vocab + 1:
        raise ValueError(f"CapPa decoder: EmbedTargets has {rows} rows, LogitsDense {vocab} "
                         "outputs; ours needs the mask token row (masked_pred_prob > 0)")
    ours = [_rename(b, {v: k for k, v in BLOCK.items()}, f"CapPa EncDecBlock{i}")
            for i, b in enumerate(blocks)]
    if scan:
        out["decoderblock"] = _stack(ours)
    else:
        out.update({f"decoderblock_{i}": b for i, b in enumerate(ours)})
    out["pos_embedding"] = np.array(pos_emb)
    return out


def _stack(blocks: list[object]) -> object:
    if isinstance(blocks[0], Mapping):
        return {k: _stack([b[k] for b in blocks]) for k in blocks[0]}
    return np.stack([np.asarray(b) for b in blocks])


def _unstack(tree: object, i: int) -> object:
    if isinstance(tree, Mapping):
        return {k: _unstack(v, i) for k, v in tree.items()}
    return np.array(np.asarray(tree)[i])


def to_cappa(dec: Tree) -> tuple[dict[str, object], np.ndarray]:
    """(big_vision CapPa `Decoder` params, its `pos_emb` [1, L, D]) of our `dec/` params
    (scanned or not); ValueError for an `img_proj` or an unexpected name."""
    if "img_proj" in dec:
        raise ValueError("our decoder has img_proj (image width != decoder width): CapPa's "
                         "decoder has no image projection")
    if "decoderblock" in dec:
        depth = np.shape(_leaves(dec["decoderblock"])[0])[0]
        blocks = [_unstack(dec["decoderblock"], i) for i in range(depth)]
    else:
        blocks = _blocks(dec, _OUR_BLOCK, "our decoder")
    rest = {k: v for k, v in dec.items()
            if k not in ("decoderblock", "pos_embedding") and not _OUR_BLOCK.match(k)}
    out = _rename(rest, TOP, "our decoder")
    for i, block in enumerate(blocks):
        out[f"EncDecBlock{i}"] = _rename(block, BLOCK, f"our decoder block {i}")
    if "pos_embedding" not in dec:
        raise ValueError("our decoder: missing pos_embedding")
    return out, np.array(dec["pos_embedding"])


def _leaves(tree: object) -> list[object]:
    if isinstance(tree, Mapping):
        return [x for v in tree.values() for x in _leaves(v)]
    return [tree]


def decoder_shape(decoder: Tree, pos_emb: np.ndarray) -> dict[str, int]:
    """The `models.decoder.Decoder` keyword arguments (vocab_size, width, depth, mlp_dim,
    num_heads, max_len) of a big_vision CapPa decoder's params and pos_emb."""
    blocks = _blocks(decoder, _CAPPA_BLOCK, "CapPa decoder")
    width, heads, _ = np.shape(blocks[0]["SelfAttn"]["query"]["kernel"])
    return {"vocab_size": int(np.shape(decoder["LogitsDense"]["kernel"])[-1]),
            "width": int(width), "depth": len(blocks),
            "mlp_dim": int(np.shape(blocks[0]["MLP"]["Dense_0"]["kernel"])[-1]),
            "num_heads": int(heads), "max_len": int(np.shape(pos_emb)[1])}
