"""LocCa pp op `locca_task` (registered in this module's op table `OPS`, see registry.py):
one LocCa decoder sequence per example (captioning, referring, grounded captioning), in the
ids of `data.locca.DecoderVocab`.

Input fields (a multi-object example; TFDS detection data maps to the same):
  "texts"      string [] or [N]: the whole-image caption(s) (one is picked, seeded, if N > 1);
  "boxes"      float32 [K, 4]: (ymin, xmin, ymax, xmax) in [0, 1]; rows >= num_boxes unused;
  "box_texts"  string [K]: one phrase per object;
  "num_boxes"  int32 []: valid rows (default: K).

Output (the batch contract the decoder objective reads), L = max_len:
  "dec_tokens"       int32 [L]: [task, prefix..., target..., eos, 0...]
                     cap:  no prefix, target = caption;
                     aref: prefix = phrase, target = the object's 4 location ids;
                     gcap: prefix = the object's 4 location ids, target = phrase;
  "dec_target_mask"  float32 [L]: 1.0 at the target positions and at eos (with
                     `prefix_loss=True` also at the prefix positions);
  "dec_parallel"     bool []: predict this example's targets in parallel (CapPa): True with
                     probability `parallel_frac` when the task is in `parallel_tasks`.
With `all_tasks=True` the op emits one row per task in `tasks` (in that order), T = len(tasks):
"dec_tokens" int32 [T, L], "dec_target_mask" float32 [T, L], "dec_parallel" bool [T] (each
row of a task in `parallel_tasks` is parallel with probability `parallel_frac`, drawn per row).
aref and gcap use the same object. In an example without boxes the aref/gcap rows keep their
layout (empty phrase, zero box) with an all-zero target mask, so they add nothing to the loss
or its normaliser. `weights` does not apply (every task is trained); passing it raises.
Optional extra outputs for evaluators: `box_key` -> the chosen object's box float32 [4]
(zeros for cap); `refs_key` -> every caption as a target row int32 [N, L] (caption ids, eos,
0-padded; a single caption gives [1, L]).

Per example (seeded by the example's "_seed" and the op's position, see
registry.example_seed) the op picks a task from `tasks` with probabilities `weights`, and, for
aref/gcap, one object uniformly among the first `num_boxes`. An example with no boxes, or data
without a "boxes" key, gets "cap".
Truncation keeps the task token, the 4 location ids and eos: a caption is cut to L - 2 ids,
a phrase to L - 6; so max_len must be >= 6 when aref or gcap is among the tasks.
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

from siglip_jax.data import locca
from siglip_jax.data.registry import (
    Example,
    OpContext,
    OpTable,
    PPError,
    PPFn,
    TextTokenizer,
    example_seed,
    get,
)

BOX_TOKENS = 4
_OPS = OpTable()


def _tokenize(tok: TextTokenizer, texts: tf.Tensor, max_len: int, lower: bool, canonicalize: bool
              ) -> tuple[tf.Tensor, tf.Tensor]:
    """Text ids without eos, 0-padded [..., max_len], and their lengths [...]."""
    ids = tok.tf_encode(texts, max_len, "none", pad_value=0, lower=lower,
                        canonicalize=canonicalize)
    return ids, tf.reduce_sum(tf.cast(ids != 0, tf.int32), axis=-1)


def _assemble(task_id: int, prefix: tf.Tensor, plen: tf.Tensor, target: tf.Tensor,
              tlen: tf.Tensor, eos: int, max_len: int, prefix_loss: bool
              ) -> tuple[tf.Tensor, tf.Tensor]:
    """[task, prefix[:plen], target[:tlen], eos, 0...] (length max_len) and its target mask."""
    seq = tf.concat([[task_id], prefix[:plen], target[:tlen], [eos]], axis=0)
    seq = tf.pad(seq, [[0, max_len - tf.shape(seq)[0]]])
    pos = tf.range(max_len)
    first = 1 if prefix_loss else 1 + plen
    mask = (pos >= first) & (pos <= plen + tlen + 1)  # eos sits at 1 + plen + tlen
    return tf.ensure_shape(seq, [max_len]), tf.cast(mask, tf.float32)


def tf_box_to_tokens(boxes: tf.Tensor, vocab: locca.DecoderVocab) -> tf.Tensor:
    """`locca.box_to_tokens` as TF ops: float boxes [..., 4] -> int32 location ids."""
    boxes = tf.clip_by_value(tf.cast(boxes, tf.float64), 0.0, 1.0)
    bins = tf.minimum(tf.floor(boxes * vocab.num_bins), vocab.num_bins - 1)
    return tf.cast(bins, tf.int32) + vocab.loc_start


@_OPS.register("locca_task")
def get_locca_task(
    ctx: OpContext,
    max_len: int,
    num_bins: int | None = None,
    tasks: Sequence[str] = locca.TASKS,
    weights: Sequence[float] | None = None,
    parallel_frac: float = 0.5,
    parallel_tasks: Sequence[str] = ("cap",),
    prefix_loss: bool = False,
    text_vocab: int | None = None,
    lower: bool = True,
    canonicalize: bool = False,
    text_key: str = "texts",
    boxes_key: str = "boxes",
    box_texts_key: str = "box_texts",
    num_boxes_key: str = "num_boxes",
    box_key: str | None = None,
    refs_key: str | None = None,
    all_tasks: bool = False,
) -> PPFn:
    """One LocCa decoder sequence per example: "dec_tokens", "dec_target_mask", "dec_parallel"
    (see the module docstring); with `all_tasks=True` one row per task in `tasks`. `num_bins`
    and `text_vocab` default to the model decoder's (the trainer and the evaluators pass its
    vocabulary to the pp); given explicitly they must agree with it. Without a model
    vocabulary they default to 100 and the tokenizer's size."""
    tok = ctx.tokenizer
    if tok is None:
        raise PPError("locca_task: needs the run's tokenizer (get_preprocess_fn(tokenizer=...))")
    tasks = (tasks,) if isinstance(tasks, str) else tuple(tasks)
    parallel_tasks = (parallel_tasks,) if isinstance(parallel_tasks, str) else tuple(
        parallel_tasks)
    for name, group in (("tasks", tasks), ("parallel_tasks", parallel_tasks)):
        bad = [t for t in group if t not in locca.TASKS]
        if bad or (name == "tasks" and not group):
            raise PPError(f"locca_task: {name}={group!r} must be a non-empty subset of "
                          f"{locca.TASKS}")
    if all_tasks and weights is not None:
        raise PPError(f"locca_task: weights={weights!r} has no meaning with all_tasks=True "
                      "(every task gets a row); drop it")
    weights = (1.0,) * len(tasks) if weights is None else tuple(float(w) for w in weights)
    if len(weights) != len(tasks) or min(weights) < 0 or sum(weights) <= 0:
        raise PPError(f"locca_task: weights={weights!r} must be {len(tasks)} non-negative "
                      f"numbers (one per task in {tasks}) with a positive sum")
    if not 0.0 <= parallel_frac <= 1.0:
        raise PPError(f"locca_task: parallel_frac={parallel_frac!r} must be in [0, 1]")
    needs_box = any(t != "cap" for t in tasks)
    if not isinstance(max_len, int) or max_len < (BOX_TOKENS + 2 if needs_box else 2):
        raise PPError(f"locca_task: max_len={max_len!r} must be an int >= "
                      f"{BOX_TOKENS + 2 if needs_box else 2} (task, 4 box ids, eos)")
    model_vocab = ctx.decoder_vocab
    if model_vocab is not None:
        for name, given, want in (("num_bins", num_bins, model_vocab.num_bins),
                                  ("text_vocab", text_vocab, model_vocab.text_vocab),
                                  ("the tokenizer's eos id", tok.eos_id, model_vocab.eos_id)):
            if given is not None and given != want:
                raise PPError(f"locca_task: {name}={given} but the model's decoder has {want}")
        vocab = model_vocab
    else:
        vocab = locca.DecoderVocab(int(text_vocab or tok.vocab_size),
                                   int(num_bins or locca.DecoderVocab.num_bins),
                                   eos_id=tok.eos_id)
    if tok.vocab_size > vocab.text_vocab:
        raise PPError(f"locca_task: text_vocab={vocab.text_vocab} is smaller than the "
                      f"tokenizer's {tok.vocab_size} pieces")
    probs = tf.constant([w / sum(weights) for w in weights], tf.float32)
    cum = tf.math.cumsum(probs)[:-1]
    cap_idx = len(tasks)  # The cap candidate always exists (fallback); index past `tasks`.
    parallel_ok = tf.constant([t in parallel_tasks for t in (*tasks, "cap")])
    eos = vocab.eos_id

    def apply(data: Example) -> Example:
        data = dict(data)
        seed = example_seed(data, ctx)
        draws = tf.random.stateless_uniform([4 + (len(tasks) if all_tasks else 0)], seed=seed,
                                            dtype=tf.float32)
        u_task, u_obj, u_par, u_cap = tf.unstack(draws[:4])
        texts = tf.convert_to_tensor(get(data, text_key, "locca_task"))
        all_caps = texts[None] if texts.shape.rank == 0 else texts
        n_caps = tf.shape(all_caps)[0]
        pick = tf.minimum(tf.cast(u_cap * tf.cast(n_caps, tf.float32), tf.int32),
                          tf.maximum(n_caps - 1, 0))
        caption = tf.cond(n_caps > 0, lambda: tf.gather(all_caps, pick), lambda: tf.constant(""))

        if needs_box and boxes_key in data:
            boxes = tf.reshape(tf.cast(get(data, boxes_key, "locca_task"), tf.float32), [-1, 4])
            phrases = tf.reshape(get(data, box_texts_key, "locca_task"), [-1])
            num = (tf.cast(tf.reshape(get(data, num_boxes_key, "locca_task"), []), tf.int32)
                   if num_boxes_key in data else tf.shape(boxes)[0])
            num = tf.minimum(num, tf.shape(boxes)[0])
            obj = tf.minimum(tf.cast(u_obj * tf.cast(num, tf.float32), tf.int32),
                             tf.maximum(num - 1, 0))
            has_box = num > 0
            box = tf.cond(has_box, lambda: tf.gather(boxes, obj), lambda: tf.zeros([4]))
            phrase = tf.cond(has_box, lambda: tf.gather(phrases, obj), lambda: tf.constant(""))
        else:
            has_box, box, phrase = tf.constant(False), tf.zeros([4]), tf.constant("")

        ids, lens = _tokenize(tok, tf.stack([caption, phrase]), max_len, lower, canonicalize)
        cap_ids, cap_len = ids[0], tf.minimum(lens[0], max_len - 2)
        phr_ids, phr_len = ids[1], tf.minimum(lens[1], max_len - 2 - BOX_TOKENS)
        box_ids = tf_box_to_tokens(box, vocab)
        empty = tf.zeros([0], tf.int32)
        candidates = {
            "cap": (vocab.task_id("cap"), empty, 0, cap_ids, cap_len),
            "aref": (vocab.task_id("aref"), phr_ids, phr_len, box_ids, BOX_TOKENS),
            "gcap": (vocab.task_id("gcap"), box_ids, BOX_TOKENS, phr_ids, phr_len),
        }
        built = [_assemble(*candidates[t], eos, max_len, prefix_loss) for t in (*tasks, "cap")]
        if all_tasks:
            rows = built[:-1]
            has = tf.stack([tf.constant(True) if t == "cap" else has_box for t in tasks])
            data["dec_tokens"] = tf.stack([b[0] for b in rows])
            data["dec_target_mask"] = tf.stack([b[1] for b in rows]) * tf.cast(
                has, tf.float32)[:, None]
            data["dec_parallel"] = (draws[4:] < parallel_frac) & parallel_ok[:-1]
            if box_key is not None:
                data[box_key] = box
            return _add_refs(data, all_caps) if refs_key is not None else data
        choice = tf.reduce_sum(tf.cast(u_task >= cum, tf.int32))
        if needs_box:
            choice = tf.where(has_box, choice, cap_idx)
        data["dec_tokens"] = tf.gather(tf.stack([b[0] for b in built]), choice)
        data["dec_target_mask"] = tf.gather(tf.stack([b[1] for b in built]), choice)
        data["dec_parallel"] = (u_par < parallel_frac) & tf.gather(parallel_ok, choice)
        if box_key is not None:
            chosen = tf.constant([t for t in (*tasks, "cap")])[choice]
            data[box_key] = tf.where(chosen == "cap", tf.zeros([4]), box)
        return _add_refs(data, all_caps) if refs_key is not None else data

    def _add_refs(data: Example, all_caps: tf.Tensor) -> Example:
        ref_ids, ref_lens = _tokenize(tok, all_caps, max_len, lower, canonicalize)
        ref_lens = tf.minimum(ref_lens, max_len - 2)
        pos = tf.range(max_len)[None, :]
        refs = tf.where(pos < ref_lens[:, None], ref_ids, 0)
        data[refs_key] = tf.where(pos == ref_lens[:, None], eos, refs)
        return data

    return apply


OPS = _OPS.freeze()
del _OPS
