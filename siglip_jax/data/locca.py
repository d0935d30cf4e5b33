"""The LocCa decoder's vocabulary: text pieces, location bins and task tokens in one id space.

The caption decoder (SigLIP 2 / LocCa) predicts sequences mixing words and box coordinates.
Its ids are laid out as

    [0, text_vocab)                         the sentencepiece ids of the text tokenizer (0 = pad)
    [text_vocab, text_vocab + num_bins)     location bins: a coordinate in [0, 1] quantised
    then one id per task in TASKS           the task prompt at position 0 of every sequence
    then mask_id                            the input at positions predicted in parallel

so the decoder's embedding has `size` rows; its output layer has `size - 1` (= mask_id:
the mask id is an input only, as in big_vision CapPa). Text id 0 pads a sequence and
`eos_id` (the tokenizer's EOS, 1 in the T5 and Gemma layouts) ends it.

Boxes are (ymin, xmin, ymax, xmax) in [0, 1] (the TFDS detection convention). Each
coordinate c becomes bin `min(floor(c * num_bins), num_bins - 1)` (c clipped to [0, 1]) and
location id `loc_start + bin`; a location id maps back to the bin centre
`(bin + 0.5) / num_bins`, so a round trip moves a coordinate by at most half a bin,
`0.5 / num_bins`. `box_to_tokens` / `tokens_to_box` are the numpy versions;
ops_locca.tf_box_to_tokens is the TF one for pp (this module stays free of TensorFlow: the
model side imports it).
"""

from __future__ import annotations

import dataclasses

import numpy as np

TASKS: tuple[str, ...] = ("cap", "aref", "gcap")  # captioning, referring, grounded captioning
DEFAULT_NUM_BINS = 100  # Location bins of a box coordinate.
DEFAULT_MAX_LEN = 64  # A decoder sequence's length: SigLIP 2's text length.


@dataclasses.dataclass(frozen=True)
class DecoderVocab:
    """Id layout of the decoder vocabulary (see the module docstring)."""

    text_vocab: int
    num_bins: int = DEFAULT_NUM_BINS
    eos_id: int = 1

    def __post_init__(self) -> None:
        if self.text_vocab < 2 or self.num_bins < 2:
            raise ValueError(f"decoder vocabulary needs text_vocab >= 2 and num_bins >= 2, got "
                             f"text_vocab={self.text_vocab}, num_bins={self.num_bins}")
        if not 0 < self.eos_id < self.text_vocab:
            raise ValueError(f"decoder vocabulary: eos_id={self.eos_id} must be a text id in "
                             f"[1, {self.text_vocab})")

    @property
    def pad_id(self) -> int:
        """Id padding a sequence after its EOS (the text tokenizer's <pad>, 0)."""
        return 0

    @property
    def loc_start(self) -> int:
        """Id of location bin 0."""
        return self.text_vocab

    def task_id(self, task: str) -> int:
        """Id of a task's prompt token."""
        if task not in TASKS:
            raise ValueError(f"unknown decoder task {task!r} (known: {list(TASKS)})")
        return self.text_vocab + self.num_bins + TASKS.index(task)

    @property
    def mask_id(self) -> int:
        """Id fed at target positions predicted in parallel."""
        return self.text_vocab + self.num_bins + len(TASKS)

    def is_location(self, ids: np.ndarray) -> np.ndarray:
        """Boolean mask of the location ids in `ids` (numpy or jax arrays)."""
        return (ids >= self.loc_start) & (ids < self.loc_start + self.num_bins)

    @property
    def size(self) -> int:
        """Number of ids (rows of the decoder's embedding; the logits cover the first
        `mask_id` = size - 1)."""
        return self.mask_id + 1


def coords_to_bins(coords: np.ndarray, num_bins: int) -> np.ndarray:
    """Bin index (int32) of each coordinate in [0, 1] (values outside are clipped)."""
    coords = np.clip(np.asarray(coords, np.float64), 0.0, 1.0)
    return np.minimum(np.floor(coords * num_bins), num_bins - 1).astype(np.int32)


def box_to_tokens(boxes: np.ndarray, vocab: DecoderVocab) -> np.ndarray:
    """Location ids int32 [..., 4] of boxes [..., 4] (ymin, xmin, ymax, xmax) in [0, 1]."""
    boxes = np.asarray(boxes)
    if boxes.shape[-1:] != (4,):
        raise ValueError(f"box_to_tokens: boxes must have a last axis of 4 (ymin, xmin, ymax, "
                         f"xmax), got shape {boxes.shape}")
    return (vocab.loc_start + coords_to_bins(boxes, vocab.num_bins)).astype(np.int32)


def tokens_to_box(tokens: np.ndarray, vocab: DecoderVocab) -> np.ndarray:
    """Boxes float32 [..., 4] (bin centres) of location ids [..., 4]; NaN where an id is not a
    location id (e.g. a model that answered with a word)."""
    tokens = np.asarray(tokens)
    if tokens.shape[-1:] != (4,):
        raise ValueError(f"tokens_to_box: tokens must have a last axis of 4, got shape "
                         f"{tokens.shape}")
    centres = (tokens.astype(np.float64) - vocab.loc_start + 0.5) / vocab.num_bins
    return np.where(vocab.is_location(tokens), centres, np.nan).astype(np.float32)
