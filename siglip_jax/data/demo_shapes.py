"""The embedded demo dataset: coloured shapes with captions, generated offline and cached.

Images are `size`×`size` RGB pictures of one shape (circle, square, triangle, cross, ring,
diamond) in one colour (red, green, blue, yellow, cyan, magenta) on a noisy dark background,
with captions such as "a small red circle". The 36 colour×shape pairs are the classes of the
zero-shot evaluation. The train and test splits are drawn from different seeds, so held-out
images are never trained on. Splits are stored as `.npz` files (no pickles) next to a small
sentencepiece model trained on the caption vocabulary.

To draw one picture the demo model knows (a PNG of one class), for `siglip_jax.predict`:

    python -m siglip_jax.data.demo_shapes --colour red --shape circle --out red_circle.png
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import tensorflow as tf

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 80, 235),
    "yellow": (235, 225, 50),
    "cyan": (50, 220, 225),
    "magenta": (225, 50, 215),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring", "diamond")
CAPTION_TEMPLATES: tuple[str, ...] = (
    "a {colour} {shape}",
    "a photo of a {colour} {shape}",
    "a {size} {colour} {shape}",
    "a {colour} {shape} on a dark background",
    "{colour} {shape}",
    "a picture of a {size} {colour} {shape}",
)
ZEROSHOT_TEMPLATE = "a photo of a {}"
ASPECTS: tuple[tuple[int, int], ...] = ((1, 2), (2, 3), (1, 1), (3, 2), (2, 1))  # height:width
_VERSION = "v1"


def class_names() -> list[str]:
    """The 36 class names, "colour shape", in label order (label = colour * 6 + shape)."""
    return [f"{c} {s}" for c in COLOURS for s in SHAPES]


def render(colour_ids: np.ndarray, shape_ids: np.ndarray, rng: np.random.Generator,
           size: int = 32, width: int | None = None) -> np.ndarray:
    """Draws one shape per image; returns uint8 [N, size, width (default size), 3]."""
    n = len(colour_ids)
    width = size if width is None else width
    radius = rng.uniform(0.22, 0.36, n) * min(size, width)
    room = np.array([size, width], np.float64) - 2 * radius[:, None]
    centre = rng.uniform(0.0, 1.0, (n, 2)) * room + radius[:, None]
    yy, xx = np.mgrid[0:size, 0:width].astype(np.float32) + 0.5
    dy = yy[None] - centre[:, 0, None, None]
    dx = xx[None] - centre[:, 1, None, None]
    r = radius[:, None, None]
    dist = np.sqrt(dx**2 + dy**2)
    masks = np.stack([
        dist <= r,                                                          # circle
        np.maximum(np.abs(dx), np.abs(dy)) <= 0.8 * r,                      # square
        (dy <= 0.75 * r) & (dy >= -r) & (np.abs(dx) <= 0.62 * (dy + r)),    # triangle
        ((np.abs(dx) <= r / 3) & (np.abs(dy) <= r))
        | ((np.abs(dy) <= r / 3) & (np.abs(dx) <= r)),                      # cross
        (dist <= r) & (dist >= 0.55 * r),                                   # ring
        np.abs(dx) + np.abs(dy) <= 1.1 * r,                                 # diamond
    ], axis=1)  # [N, num_shapes, H, W]
    mask = masks[np.arange(n), shape_ids][..., None]
    palette = np.array(list(COLOURS.values()), np.float32)
    colour = palette[colour_ids] + rng.normal(0, 12, (n, 3))
    background = rng.uniform(0, 70, (n, 1, 1, 1)) + rng.normal(0, 8, (n, size, width, 3))
    image = np.where(mask, colour[:, None, None, :], background)
    image = image + rng.normal(0, 6, image.shape)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def aspect_size(size: int, ah: int, aw: int) -> tuple[int, int]:
    """(height, width) with ratio ah:aw and the longer side = size."""
    scale = size / max(ah, aw)
    return max(1, round(ah * scale)), max(1, round(aw * scale))


def make_split(num_per_class: int, seed: int, size: int = 32,
               aspect: bool = False) -> dict[str, np.ndarray]:
    """Generates a balanced split: images, integer labels and one caption per image.

    With aspect=True each image gets one of ASPECTS (height:width, longer side = size); it
    is stored top-left in a size×size zero canvas with its (height, width) in "hw".
    """
    rng = np.random.default_rng(seed)
    num_classes = len(COLOURS) * len(SHAPES)
    labels = rng.permutation(np.repeat(np.arange(num_classes), num_per_class))
    colour_ids, shape_ids = labels // len(SHAPES), labels % len(SHAPES)
    extra = {}
    if not aspect:
        images = render(colour_ids, shape_ids, rng, size)
    else:
        images = np.zeros((len(labels), size, size, 3), np.uint8)
        which = rng.integers(0, len(ASPECTS), len(labels))
        hw = np.zeros((len(labels), 2), np.int32)
        for k, (ah, aw) in enumerate(ASPECTS):
            idx = np.flatnonzero(which == k)
            h, w = aspect_size(size, ah, aw)
            images[idx, :h, :w] = render(colour_ids[idx], shape_ids[idx], rng, h, w)
            hw[idx] = (h, w)
        extra["hw"] = hw
    colour_names, templates = list(COLOURS), rng.integers(0, len(CAPTION_TEMPLATES), len(labels))
    sizes = rng.choice(["small", "large"], len(labels))
    captions = [
        CAPTION_TEMPLATES[t].format(colour=colour_names[c], shape=SHAPES[s], size=z)
        for t, c, s, z in zip(templates, colour_ids, shape_ids, sizes, strict=True)
    ]
    return {"image": images, "label": labels.astype(np.int32), "texts": np.array(captions),
            **extra}


def tokenizer_corpus() -> list[str]:
    """Every word the demo's captions and prompts use, in many combinations, to train on."""
    lines = []
    for colour in COLOURS:
        for shape in SHAPES:
            for template in CAPTION_TEMPLATES:
                for size in ("small", "large"):
                    lines.append(template.format(colour=colour, shape=shape, size=size))
            lines.append(ZEROSHOT_TEMPLATE.format(f"{colour} {shape}"))
    return lines


@dataclasses.dataclass(frozen=True)
class DemoShapes:
    """One split of the cached demo dataset in `data_dir`; `prepare()` generates it once.

    Attributes:
      data_dir: cache folder; the files live in a versioned sub-folder of it.
      split: "train" or "test" (held out: drawn from another seed).
      image_size: side of the square images in pixels.
      train_per_class / test_per_class: examples per class (36 classes) in each split.
      vocab_size: size of the sentencepiece vocabulary trained on the captions.
      aspect: mixed aspect ratios (ASPECTS, longer side image_size) instead of squares:
        `dataset()` then yields images of varying shape, for NaFlex preprocessing.
    """

    data_dir: str
    split: str = "train"
    image_size: int = 32
    train_per_class: int = 250
    test_per_class: int = 20
    vocab_size: int = 64
    aspect: bool = False

    skips = None  # Generated data has no bad examples to skip.

    def __post_init__(self):
        if self.split not in ("train", "test"):
            raise ValueError(f"demo_shapes has splits 'train' and 'test', not {self.split!r}")

    @property
    def root(self) -> str:
        """The folder holding this configuration's files."""
        name = (f"demo_shapes_{_VERSION}_{self.image_size}px_{self.train_per_class}"
                f"_{self.test_per_class}{'_aspect' if self.aspect else ''}")
        return os.path.join(os.path.expanduser(self.data_dir), name)

    @property
    def tokenizer_path(self) -> str:
        """Path of the sentencepiece model trained on the caption vocabulary."""
        return os.path.join(self.root, "spm.model")

    def split_path(self, split: str) -> str:
        """Path of the `.npz` holding `split`."""
        return os.path.join(self.root, f"{split}.npz")

    def prepare(self) -> None:
        """Generates both splits and trains the tokenizer unless they are cached already."""
        from siglip_jax.data.tokenizer import train_sentencepiece

        os.makedirs(self.root, exist_ok=True)
        for split, per_class, seed in (("train", self.train_per_class, 0),
                                       ("test", self.test_per_class, 1)):
            path = self.split_path(split)
            if not os.path.exists(path):
                arrays = make_split(per_class, seed, self.image_size, self.aspect)
                tmp = f"{path}.{os.getpid()}.tmp.npz"
                np.savez(tmp, **arrays)
                os.replace(tmp, path)
        if not os.path.exists(self.tokenizer_path):
            tmp = f"{self.tokenizer_path}.{os.getpid()}.tmp"
            train_sentencepiece(tokenizer_corpus(), self.vocab_size, tmp, model_type="word")
            os.replace(tmp, self.tokenizer_path)

    def load(self) -> dict[str, np.ndarray]:
        """Reads this split from the cache (preparing it first if needed)."""
        path = self.split_path(self.split)
        if not os.path.exists(path):
            self.prepare()
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}

    @property
    def num_examples(self) -> int:
        """Number of examples in this split."""
        per_class = self.train_per_class if self.split == "train" else self.test_per_class
        return per_class * len(COLOURS) * len(SHAPES)

    @property
    def class_names(self) -> list[str]:
        """Zero-shot class names in label order."""
        return class_names()

    @functools.cached_property
    def _arrays(self) -> dict[str, np.ndarray]:
        """The split, read once: every virtual shard slices the same arrays."""
        return self.load()

    def dataset(self, process_index: int = 0, process_count: int = 1,
                shuffle_files: bool = False, seed: int = 0) -> tf.data.Dataset:
        """This process's share of the split (every process_count-th example) as tf.data."""
        import tensorflow as tf

        del shuffle_files, seed  # One file; the pipeline shuffles examples.
        share = {k: v[process_index::process_count] for k, v in self._arrays.items()}
        ds = tf.data.Dataset.from_tensor_slices(share)
        if "hw" in share:  # aspect: cut each image out of its canvas
            ds = ds.map(_crop_to_hw, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return ds


def _crop_to_hw(example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """{"image" canvas, "hw", ...} → {"image" [h, w, 3], ...} (drops "hw")."""
    example = dict(example)
    hw = example.pop("hw")
    example["image"] = example["image"][: hw[0], : hw[1]]
    return example


def write_png(path: str, colour: str, shape: str, size: int = 32, seed: int = 0) -> np.ndarray:
    """Draws one `colour` `shape` as the demo's data does and writes it as a PNG; returns it."""
    from PIL import Image

    if colour not in COLOURS:
        raise ValueError(f"colour {colour!r} is not one of the demo's: {', '.join(COLOURS)}")
    if shape not in SHAPES:
        raise ValueError(f"shape {shape!r} is not one of the demo's: {', '.join(SHAPES)}")
    rng = np.random.default_rng(seed)
    image = render(np.array([list(COLOURS).index(colour)]), np.array([SHAPES.index(shape)]),
                   rng, size)[0]
    Image.fromarray(image).save(path, format="PNG")
    return image


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: writes one demo picture as a PNG."""
    from siglip_jax.console import quiet_startup

    argv = quiet_startup(argv)
    parser = argparse.ArgumentParser(
        prog="python -m siglip_jax.data.demo_shapes",
        description="Write a PNG of one demo class: a coloured shape on a dark background.")
    parser.add_argument("--colour", required=True, choices=list(COLOURS))
    parser.add_argument("--shape", required=True, choices=list(SHAPES))
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--size", type=int, default=32, help="side in pixels (default 32)")
    parser.add_argument("--seed", type=int, default=0, help="position, size and noise")
    args = parser.parse_args(argv)
    write_png(args.out, args.colour, args.shape, args.size, args.seed)
    print(f"wrote {args.out}: a {args.colour} {args.shape}, {args.size}×{args.size} px")
    return 0


if __name__ == "__main__":
    sys.exit(main())
