"""The planner's cost model: what one training step costs per chip, from shapes alone.

`towers_from_model`, `decoder_shape` and `objective_passes` read the dimensions that cost
depends on from the trainer's model and config; the rest is arithmetic on them and on the
abstract sharded train state (as `experiment.StepParts` holds it). Nothing is allocated or
compiled.

What is exact and what is estimated:
  * params, optimizer state, gradients: exact bytes of the sharded arrays (shapes × dtypes ÷
    the shard counts the rules give), not counting XLA's buffer padding (`sharded_bytes`);
  * activations: an ANALYTIC estimate of what the backward pass keeps (per block: residual,
    LayerNorm outputs, q/k/v, attention logits and probabilities, MLP hidden), following the
    towers' dtype and remat policy, plus the ring loss's per-device blocks; XLA may fuse some
    of these away or keep extra temporaries (the test suite compares it with XLA's own
    number for small models);
  * FLOPs: ANALYTIC matmul FLOPs (2·m·n·k per dense/attention product), training =
    3 × forward for trained towers and 1 × forward for frozen ones (the usual MFU
    convention); recomputation under remat is reported separately, not counted as useful.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import optax

from siglip_jax.models.config import text_kwargs
from siglip_jax.models.two_towers import Model, make_decoder, towers
from siglip_jax.sharding import tree_paths

TOWERS = ("img", "txt")  # Param groups of the two towers.
FLOAT32 = 4  # Bytes.


@dataclasses.dataclass(frozen=True)
class Tower:
    """The dimensions of one transformer tower that memory and FLOPs depend on."""

    name: str
    tokens: int
    width: int
    depth: int
    mlp_dim: int
    heads: int
    act_bytes: int
    remat: str
    pool: str
    out_dim: int | None
    patch_input: int = 0  # patch_h * patch_w * channels (image tower), 0 for text.
    vocab_size: int | None = None  # Text tower only.


@dataclasses.dataclass(frozen=True)
class DecoderShape:
    """The LocCa caption decoder's shape (models/decoder.py) for the estimates."""

    tokens: int  # max_len L
    image_tokens: int  # N, cross-attention keys
    image_width: int
    width: int
    depth: int
    mlp_dim: int
    heads: int
    vocab_size: int
    act_bytes: int
    remat: str
    rows: int = 1  # Decoder sequences per image (loss.decoder.tasks_per_example).
    vocab_chunk: int = 0  # Vocabulary columns per logits block (loss.decoder.vocab_chunk; 0: all).


@dataclasses.dataclass(frozen=True)
class ExtraPass:
    """An extra image-tower pass of an objective (self-distillation, masked prediction)."""

    tower: Tower  # At the pass's input size.
    per_image: int  # Tower inputs per training image (local crops per image, or 1).
    trained: bool  # False for the EMA teacher (forward only).
    head_rows: int = 0  # Rows through the projection head per training image.
    prototypes: int = 0


# ----------------------------------------------------------------------------- shapes


def _itemsize(dtype: jnp.dtype | str | None) -> int:
    return jnp.dtype(dtype or jnp.float32).itemsize


def towers_from_model(model: Model, image: tuple[int, int] | int, text_len: int
                      ) -> tuple[Tower, Tower]:
    """The image and text Tower of a two-towers model at the given input sizes (`image`: the
    (H, W) of fixed-resolution images, or a NaFlex patch budget N)."""
    vit, txt = towers(model)
    ph, pw = (vit.patch_size, vit.patch_size) if isinstance(vit.patch_size, int) \
        else tuple(vit.patch_size)
    tokens = image if isinstance(image, int) else (image[0] // ph) * (image[1] // pw)
    tokens += 1 if vit.pool_type == "tok" else 0
    img = Tower("img", tokens, vit.width, vit.depth, vit.mlp_dim or 4 * vit.width,
                vit.num_heads, _itemsize(vit.dtype), vit.remat_policy, vit.pool_type,
                vit.num_classes, ph * pw * 3)
    text = Tower("txt", text_len, txt.width, txt.depth, txt.mlp_dim or 4 * txt.width,
                 txt.num_heads, _itemsize(txt.dtype), txt.remat_policy, txt.pool_type,
                 txt.num_classes, vocab_size=txt.vocab_size)
    return img, text


def decoder_shape(model: Model, image_tokens: int, rows: int = 1, vocab_chunk: int = 0
                  ) -> DecoderShape | None:
    """The decoder of a two-towers model (None without one), at `image_tokens` keys, run on
    `rows` sequences per image, its loss over logits blocks of `vocab_chunk` columns (0: the
    full vocabulary at once)."""
    if model.decoder is None:
        return None
    vit, txt = towers(model)
    dec = make_decoder(model.decoder, text_kwargs(model.text), txt.vocab_size)
    return DecoderShape(dec.max_len, image_tokens, vit.width, dec.width, dec.depth,
                        dec.mlp_dim or 4 * dec.width, dec.num_heads, dec.vocab_size,
                        _itemsize(dec.dtype), dec.remat_policy, rows, vocab_chunk)


def objective_passes(objectives: Mapping[str, Mapping[str, object]], image: Tower
                     ) -> tuple[ExtraPass, ...]:
    """The extra passes of the configured self-distillation / masked-prediction objectives
    (`run.loss.objectives`; one teacher forward on the full image serves both)."""
    passes = []
    if "self_distillation" in objectives:
        o = objectives["self_distillation"]
        grid = int(o["local_size"]) // math.isqrt(image.patch_input // 3)  # Square patches.
        local = dataclasses.replace(image, tokens=grid * grid + (image.pool == "tok"))
        n_local, prototypes = int(o["n_local"]), int(o["prototypes"])
        passes.append(ExtraPass(local, n_local, True, n_local, prototypes))
        passes.append(ExtraPass(image, 1, False, 1, prototypes))
    if "masked_prediction" in objectives:
        o = objectives["masked_prediction"]
        rows = max(1, round(float(o["mask_ratio"]) * image.tokens))
        prototypes = int(o["prototypes"])
        passes.append(ExtraPass(image, 1, True, rows, prototypes))
        if "self_distillation" not in objectives:
            passes.append(ExtraPass(image, 1, False, 0, 0))
        passes.append(ExtraPass(image, 0, False, rows, prototypes))  # Teacher's head.
    return tuple(passes)


def embed_dim(text: Tower) -> int:
    """The width of the embeddings the contrastive loss compares (the text tower's output)."""
    return text.out_dim or text.width


# ----------------------------------------------------------------------------- FLOPs


def forward_flops(t: Tower) -> float:
    """Matmul FLOPs of one example through the tower (analytic, 2 FLOPs per multiply-add)."""
    n, d, m = t.tokens, t.width, t.mlp_dim
    per_block = 2 * n * 4 * d * d + 2 * 2 * n * n * d + 2 * 2 * n * d * m
    flops = t.depth * per_block + 2 * n * t.patch_input * d  # + patch embedding (image).
    if t.pool == "map":  # One probe query: q/out projections, k/v over n tokens, MLP.
        flops += 2 * 2 * d * d + 2 * 2 * n * d * d + 2 * 2 * n * d + 2 * 2 * d * m
    if t.out_dim:
        flops += 2 * d * t.out_dim
    return float(flops)


def decoder_forward_flops(d: DecoderShape) -> float:
    """Matmul FLOPs of one example through the decoder: per block self-attention over L
    tokens, cross-attention to N image tokens, MLP; the image projection and output layer."""
    n, k, w, m = d.tokens, d.image_tokens, d.width, d.mlp_dim
    self_attn = 2 * n * 4 * w * w + 2 * 2 * n * n * w
    cross = 2 * n * 2 * w * w + 2 * k * 2 * d.image_width * w + 2 * 2 * n * k * w
    per_block = self_attn + cross + 2 * 2 * n * w * m
    proj = 2 * k * d.image_width * w if d.image_width != w else 0
    return float(d.depth * per_block + proj + 2 * n * w * d.vocab_size)


def step_flops(towers: tuple[Tower, ...], decoder: DecoderShape | None,
               passes: tuple[ExtraPass, ...], frozen: tuple[str, ...], *, global_batch: int,
               accum: int) -> dict[str, float]:
    """Analytic FLOPs per step: {"model": 3 × forward for trained towers, 1 × for frozen, plus
    the decoder, the objectives' passes and the loss; "remat recompute": the forward passes
    remat repeats (not useful work)}."""
    model_flops = remat_flops = 0.0
    for tower in towers:
        fwd = forward_flops(tower) * global_batch
        trained = tower.name not in frozen
        model_flops += fwd * (3 if trained else 1)
        if trained and tower.remat != "none":
            remat_flops += fwd
    if decoder is not None:  # Always trained (its own or the default group).
        fwd = decoder_forward_flops(decoder) * global_batch * decoder.rows
        model_flops += 3 * fwd
        remat_flops += fwd if decoder.remat != "none" else 0.0
    for p in passes:  # Heads are not counted (small next to the tower).
        model_flops += (forward_flops(p.tower) * global_batch * p.per_image
                        * (3 if p.trained else 1))
    loss_fwd = 2.0 * global_batch * (global_batch / accum) * embed_dim(towers[1])
    return {"model": model_flops + 3 * loss_fwd, "remat recompute": remat_flops}


# ----------------------------------------------------------------------------- activations


def _block_bytes(t: Tower) -> int:
    """Bytes one block keeps for its backward pass, per example (no remat).

    Per token: the block input, both residual streams, q/k/v and the attention output at the
    activation dtype; LayerNorm normalised values and outputs in float32 (float32 scale and
    bias); the MLP hidden before and after GELU plus its tanh; attention logits and
    probabilities [heads, tokens, tokens].
    """
    a = t.act_bytes
    per_token_width = a + 3 * a + a + a + 4 * FLOAT32
    return (t.tokens * t.width * per_token_width + 3 * t.tokens * t.mlp_dim * a
            + 2 * t.heads * t.tokens * t.tokens * a)


def activation_bytes(t: Tower, batch: int, trained: bool) -> tuple[int, int]:
    """(bytes kept until the backward pass, peak working bytes) of the tower for `batch`.

    A trained tower without remat keeps every block's tensors and needs one block's worth
    more for the backward pass of a block; with `nothing_saveable` it keeps only each block's
    input and works on one recomputed block plus its backward (2 blocks); other policies save
    matmul outputs and are counted as no remat (an upper bound). A frozen tower keeps
    nothing and works on one block at a time.
    """
    block = _block_bytes(t) * batch
    embed = t.tokens * t.width * t.act_bytes * batch
    if not trained:
        return 0, block + embed
    if t.remat == "nothing_saveable":
        return t.depth * embed + embed, 2 * block
    return t.depth * block + embed, block


def decoder_activation_bytes(d: DecoderShape, batch: int) -> int:
    """Bytes the decoder keeps for its backward pass for `batch` examples: per block (as a
    tower block of L tokens, plus cross-attention q/out, k/v of N image tokens and the
    [heads, L, N] logits and probabilities), the projected image tokens, and the float32
    logits, log-probabilities and their gradient [L, V'] of the loss: V' = V for the full
    logits; with a chunked loss (`vocab_chunk` C > 0, objectives/chunked_xent.py) one block's
    worth, V' = min(C, V), plus the float32 final hidden states the backward pass recomputes
    the blocks from."""
    a, n, k, w = d.act_bytes, d.tokens, d.image_tokens, d.width
    block = _block_bytes(Tower("dec", n, w, d.depth, d.mlp_dim, d.heads, a, d.remat, "none",
                               None))
    block += n * w * (2 * a + 2 * FLOAT32) + 2 * k * w * a + 2 * d.heads * n * k * a
    embed = n * w * a
    if d.remat == "nothing_saveable":
        kept = d.depth * embed + 2 * block
    else:
        kept = d.depth * block
    if d.vocab_chunk > 0:
        loss = 3 * FLOAT32 * n * min(d.vocab_chunk, d.vocab_size) + FLOAT32 * n * w
    else:
        loss = 3 * FLOAT32 * n * d.vocab_size
    return batch * (kept + embed + k * w * a + loss)


def loss_bytes(per_device_batch: int, global_batch: int, dim: int, impl: str) -> int:
    """Per-device memory of the sigmoid loss: logits blocks and embedding blocks (float32)."""
    b = per_device_batch
    cols = global_batch if impl in ("all_gather", "softmax", "dense") else b
    return FLOAT32 * (3 * b * cols + 4 * b * dim + 2 * cols * dim)


# ----------------------------------------------------------------------------- the state


def sharded_bytes(abstract: optax.Params, shardings: optax.Params) -> int:
    """Bytes one device holds of `abstract` laid out by `shardings` (None leaves skipped)."""
    total = 0
    for leaf, sharding in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings),
                              strict=True):
        total += math.prod(sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
    return total


def count_params(tree: optax.Params) -> int:
    """Elements of all the arrays (or shape structs) of a tree."""
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))


def param_counts(params: Mapping[str, optax.Params]) -> dict[str, int]:
    """Parameters per group: img, txt, dec (0 without one), total, and "other" (t, b, heads)."""
    counts = {name: count_params(params.get(name, {})) for name in (*TOWERS, "dec")}
    counts["total"] = count_params(params)
    counts["other"] = counts["total"] - sum(counts[n] for n in (*TOWERS, "dec"))
    return counts


def frozen_towers(params: optax.Params, frozen: optax.Params | None) -> tuple[str, ...]:
    """The towers (img, txt) whose every parameter is frozen (`frozen`: a tree of bools like
    the params, None when nothing is)."""
    paths = tree_paths(params)
    flags = jax.tree.leaves(frozen) if frozen else [False] * len(paths)
    frozen_paths = {p for p, f in zip(paths, flags, strict=True) if f}
    return tuple(t for t in TOWERS
                 if any(p.startswith(t + "/") for p in paths)
                 and all(p in frozen_paths for p in paths if p.startswith(t + "/")))


def unsharded_params(params: optax.Params, shardings: optax.Params,
                     min_size: int = 1_000_000) -> list[tuple[str, tuple[int, ...]]]:
    """(path, shape) of the parameters of at least `min_size` elements that their sharding
    leaves whole on every device."""
    return [(p, tuple(x.shape)) for p, x, s in zip(tree_paths(params), jax.tree.leaves(params),
                                                    jax.tree.leaves(shardings), strict=True)
            if math.prod(x.shape) >= min_size and tuple(s.shard_shape(x.shape)) == x.shape]


def memory_bytes(state: Mapping[str, optax.Params], shardings: Mapping[str, optax.Params],
                 frozen_params: optax.Params | None, towers: tuple[Tower, ...],
                 decoder: DecoderShape | None, passes: tuple[ExtraPass, ...],
                 frozen: tuple[str, ...], *, micro: int, loss_batch: int, accum: int,
                 loss_impl: str, input_bytes: int) -> dict[str, int]:
    """Bytes per chip, in the order the planner prints them: exact for the trainer's sharded
    state (params, optimizer state, gradients, the accumulator, the EMA teacher), analytic
    for the activations of `micro` examples per device and the loss over `loss_batch`.

    `state`, `shardings` and `frozen_params` are the abstract train state, its shardings and
    the frozen-params tree (None: nothing frozen) of `experiment.StepParts`."""
    frozen_tree = frozen_params or jax.tree.map(lambda _: False, state["params"])
    out = {"params": sharded_bytes(state["params"], shardings["params"]),
           "optimizer state": sharded_bytes(state["opt_state"], shardings["opt_state"])}
    # Frozen params get no backward pass (step.py wraps them in stop_gradient).
    trained = jax.tree.map(lambda f, x: None if f else x, frozen_tree, state["params"])
    out["gradients"] = sharded_bytes(trained, jax.tree.map(
        lambda f, s: None if f else s, frozen_tree, shardings["params"]))
    if accum > 1:  # step.py accumulates the full gradient tree (zeros for frozen params).
        out["gradient accumulator"] = out["params"]

    kept, working = 0, 0
    for tower in towers:
        k, w = activation_bytes(tower, micro, trained=tower.name not in frozen)
        kept, working = kept + k, max(working, w)
    for p in passes:  # Objectives: student passes keep theirs, the teacher works.
        k, w = activation_bytes(p.tower, micro * p.per_image, trained=p.trained)
        kept, working = kept + k, max(working, w)
        kept += 3 * FLOAT32 * micro * p.head_rows * p.prototypes  # Scores, softmax, targets.
    out["activations"] = kept + working
    if decoder is not None:
        out["decoder activations"] = decoder_activation_bytes(decoder, micro * decoder.rows)
    if "teacher" in state:  # The EMA teacher: params only, no optimizer state.
        out["EMA teacher"] = sharded_bytes(state["teacher"], shardings["teacher"])
    out["loss"] = loss_bytes(micro, loss_batch, embed_dim(towers[1]), loss_impl)
    out["input batch"] = input_bytes
    return out
