"""The LocCa decoder's vocabulary: text pieces, location bins and task tokens in one id space.

The caption decoder (SigLIP 2 / LocCa) predicts sequences mixing words and box coordinates.
Its ids are laid out as

    [0, text_vocab)                         the sentencepiece ids of the text tokenizer (0 = pad)
    [text_vocab, text_vocab + num_bins)     location bins: a coordinate in [0, 1] quantised
    then one id per task in TASKS           the task prompt at position 0 of every sequence
    then mask_id                            the input at positions predicted in parallel

so the decoder's embedding and output layer have `size` rows.
"""

from __future__ import annotations

import dataclasses

TASKS: tuple[str, ...] = ("cap", "aref", "gcap")  # captioning, referring, grounded captioning


@dataclasses.dataclass(frozen=True)
class DecoderVocab:
    """Id layout of the decoder vocabulary (see the module docstring)."""

    text_vocab: int
    num_bins: int = 100

    def __post_init__(self) -> None:
        if self.text_vocab < 2 or self.num_bins < 2:
            raise ValueError(f"decoder vocabulary needs text_vocab >= 2 and num_bins >= 2, got "
                             f"text_vocab={self.text_vocab}, num_bins={self.num_bins}")

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

    @property
    def size(self) -> int:
        """Number of ids (rows of the decoder's embedding and output layer)."""
        return self.mask_id + 1
