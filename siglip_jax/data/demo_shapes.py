"""The embedded demo dataset: coloured shapes with captions, generated offline and cached.

Images are `size`×`size` RGB pictures of one shape (circle, square, triangle, cross, ring,
diamond) in one colour (red, green, blue, yellow, cyan, magenta) on a noisy dark background,
with captions such as "a small red circle". The 36 colour×shape pairs are the classes of the
zero-shot evaluation. The train and test splits are drawn from different seeds, so held-out
images are never trained on. Splits are stored as `.npz` files (no pickles) next to a small
sentencepiece model trained on the caption vocabulary.

With `objects=True` (multi-object mode) each 64×64 image holds 2–4 shapes of distinct
classes, the main one drawn largest, with a box, a phrase ("small red circle") and a
per-pixel class map for each, and a caption naming them all, main object first ("a large
red circle with a blue square and a green cross"); see make_objects_split.

To draw one picture the demo model knows (a PNG of one class), for `siglip_jax.predict`:

    python -m siglip_jax.data.demo_shapes --colour red --shape circle --out red_circle.png
    python -m siglip_jax.data.demo_shapes --objects --seed 3 --out objects.png
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
from PIL import Image

from siglip_jax.console import add_verbose_flag, quiet_startup
from siglip_jax.data.config import DemoShapesData, given_fields, required_field
from siglip_jax.data.demo_classes import COLOURS, SHAPES
from siglip_jax.data.tokenizer_training import train_sentencepiece

if TYPE_CHECKING:
    import tensorflow as tf

# TensorFlow is imported inside the functions that use it, deliberately: this module's CLI
# (`main`) quiets TensorFlow's start-up notices first.

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

# Multi-object mode (DemoShapes(objects=True)): 2–4 shapes of distinct classes per image.
MAX_OBJECTS = 4
OBJECTS_IMAGE_SIZE = 64  # Default side in objects mode: patch 8 → an 8×8 token grid.
OBJECT_CAPTION_TEMPLATES: tuple[str, ...] = (
    "a {main} with {rest}",
    "{main} with {rest}",
    "a {main} and {rest}",
)
MAIN_RADIUS = (0.14, 0.21)  # The main object's radius as a fraction of the image side.
OTHER_RADIUS_MIN = 0.07     # Other objects: radius in [0.07·side, main radius / MAIN_RATIO].
MAIN_RATIO = 1.3            # Radius ratio that makes the main object the largest in pixels.
LARGE_RADIUS = 0.13         # Radius / side at or above which a phrase says "large".
EXTENT = 1.1                # Every shape lies within ±EXTENT·r of its centre on both axes.
_OBJECTS_VERSION = "v1"


def class_names() -> list[str]:
    """The 36 class names, "colour shape", in label order (label = colour * 6 + shape)."""
    return [f"{c} {s}" for c in COLOURS for s in SHAPES]


def shape_masks(dy: np.ndarray, dx: np.ndarray, r: np.ndarray) -> list[np.ndarray]:
    """Masks of the SHAPES (in order) of radius r at offsets (dy, dx) from their centres."""
    dist = np.sqrt(dx**2 + dy**2)
    return [
        dist <= r,                                                          # circle
        np.maximum(np.abs(dx), np.abs(dy)) <= 0.8 * r,                      # square
        (dy <= 0.75 * r) & (dy >= -r) & (np.abs(dx) <= 0.62 * (dy + r)),    # triangle
        ((np.abs(dx) <= r / 3) & (np.abs(dy) <= r))
        | ((np.abs(dy) <= r / 3) & (np.abs(dx) <= r)),                      # cross
        (dist <= r) & (dist >= 0.55 * r),                                   # ring
        np.abs(dx) + np.abs(dy) <= 1.1 * r,                                 # diamond
    ]


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
    masks = np.stack(shape_masks(dy, dx, r), axis=1)  # [N, num_shapes, H, W]
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


def object_phrase(label: int, radius: float, size: int, scale: float = 1.0) -> str:
    """The referring phrase of one shape: "{small|large} {colour} {shape}" ("large" from a
    radius of LARGE_RADIUS · scale · size)."""
    word = "large" if radius >= LARGE_RADIUS * scale * size else "small"
    return f"{word} {list(COLOURS)[label // len(SHAPES)]} {SHAPES[label % len(SHAPES)]}"


def object_caption(phrases: Sequence[str], template: int) -> str:
    """Whole-image caption: the main object's phrase first, then "a {colour} {shape}" each."""
    rest = " and ".join("a " + p.split(" ", 1)[1] for p in phrases[1:])
    return OBJECT_CAPTION_TEMPLATES[template].format(main=phrases[0], rest=rest)


def _layout(rng: np.random.Generator, size: int, count: int, scale: float = 1.0
            ) -> tuple[np.ndarray, np.ndarray]:
    """Centres [count, 2] (y, x) and radii [count] (main first and largest) of shapes whose
    ±EXTENT·r boxes lie inside the image and are at least one pixel apart; `scale`
    multiplies the radius ranges."""
    for attempt in range(200):
        shrink = 0.98 ** attempt * scale
        main = rng.uniform(*MAIN_RADIUS) * size * shrink
        radii = np.concatenate([[main], rng.uniform(OTHER_RADIUS_MIN * size * shrink,
                                                    main / MAIN_RATIO, count - 1)])
        centres: list[np.ndarray] = []
        for r in radii:
            half = EXTENT * r
            for _ in range(50):
                c = rng.uniform(half, size - half, 2)
                if all(np.max(np.abs(c - c2)) >= half + EXTENT * r2 + 1.0
                       for c2, r2 in zip(centres, radii, strict=False)):
                    centres.append(c)
                    break
            else:
                break
        if len(centres) == count:
            return np.array(centres), radii
    raise RuntimeError(f"could not place {count} shapes in {size}×{size} pixels")


def draw_objects(rng: np.random.Generator, labels: Sequence[int], size: int,
                 scale: float = 1.0) -> dict[str, np.ndarray]:
    """Draws shapes of the given classes (labels[0] the main, largest one) on one image.

    Returns "image" uint8 [size, size, 3], "segmentation" uint8 [size, size] (0 background,
    1 + class), "boxes" float32 [n, 4] (ymin, xmin, ymax, xmax in [0, 1], the tight box of
    the shape's pixels) and "radii" [n]. Layouts where the main shape does not cover strictly
    the most pixels are redrawn. `scale` multiplies the radii (1: the default sizes).
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    palette = np.array(list(COLOURS.values()), np.float32)
    while True:
        centres, radii = _layout(rng, size, len(labels), scale)
        segmentation = np.zeros((size, size), np.uint8)
        for label, (cy, cx), r in zip(labels, centres, radii, strict=True):
            mask = shape_masks(yy - cy, xx - cx, r)[label % len(SHAPES)]
            segmentation[mask] = 1 + label
        counts = [(segmentation == 1 + label).sum() for label in labels]
        if min(counts) > 0 and counts[0] > max(counts[1:]):
            break
    colours = palette[np.asarray(labels) // len(SHAPES)] + rng.normal(0, 12, (len(labels), 3))
    image = rng.uniform(0, 70) + rng.normal(0, 8, (size, size, 3))
    for label, colour in zip(labels, colours, strict=True):
        image[segmentation == 1 + label] = colour
    image = image + rng.normal(0, 6, image.shape)
    boxes = np.zeros((len(labels), 4), np.float32)
    for k, label in enumerate(labels):
        rows = np.flatnonzero((segmentation == 1 + label).any(axis=1))
        cols = np.flatnonzero((segmentation == 1 + label).any(axis=0))
        boxes[k] = (rows[0] / size, cols[0] / size, (rows[-1] + 1) / size, (cols[-1] + 1) / size)
    return {"image": np.clip(np.round(image), 0, 255).astype(np.uint8),
            "segmentation": segmentation, "boxes": boxes, "radii": radii}


def used_classes(num_colours: int | None = None, num_shapes: int | None = None) -> np.ndarray:
    """The labels (colour · 6 + shape) of the first `num_colours` COLOURS × the first
    `num_shapes` SHAPES (None: all), ascending."""
    nc, ns = num_colours or len(COLOURS), num_shapes or len(SHAPES)
    if not (1 <= nc <= len(COLOURS) and 1 <= ns <= len(SHAPES)):
        raise ValueError(f"num_colours={num_colours}, num_shapes={num_shapes}; expected "
                         f"1..{len(COLOURS)} and 1..{len(SHAPES)}")
    return np.array([c * len(SHAPES) + s for c in range(nc) for s in range(ns)])


def make_objects_split(num_per_class: int, seed: int, size: int = OBJECTS_IMAGE_SIZE,
                       classes: Sequence[int] | None = None, max_objects: int = MAX_OBJECTS,
                       scale: float = 1.0) -> dict[str, np.ndarray]:
    """A split of multi-object images, balanced over the main object's class.

    Each image has 2–max_objects shapes of distinct classes among `classes` (default all
    36); the main one (the "label") is drawn largest; `scale` multiplies the radii. Fields:
    image, label, texts (caption), boxes [MAX_OBJECTS, 4], box_texts [MAX_OBJECTS] (""
    padding), box_labels [MAX_OBJECTS] (-1 padding), num_boxes, segmentation [size, size].
    """
    rng = np.random.default_rng(seed)
    classes = np.arange(len(COLOURS) * len(SHAPES)) if classes is None else np.asarray(classes)
    if not 2 <= max_objects <= min(MAX_OBJECTS, len(classes)):
        raise ValueError(f"max_objects={max_objects}; expected 2..{MAX_OBJECTS} and at most "
                         f"the {len(classes)} classes")
    mains = rng.permutation(np.repeat(classes, num_per_class))
    n = len(mains)
    out = {"image": np.zeros((n, size, size, 3), np.uint8),
           "segmentation": np.zeros((n, size, size), np.uint8),
           "boxes": np.zeros((n, MAX_OBJECTS, 4), np.float32),
           "box_labels": np.full((n, MAX_OBJECTS), -1, np.int32),
           "num_boxes": np.zeros(n, np.int32)}
    box_texts = np.full((n, MAX_OBJECTS), "", dtype=object)
    captions = []
    for i, main in enumerate(mains):
        count = int(rng.integers(2, max_objects + 1))
        others = rng.choice(classes[classes != main], count - 1, replace=False)
        labels = [int(main), *(int(o) for o in others)]
        drawn = draw_objects(rng, labels, size, scale)
        phrases = [object_phrase(c, r, size, scale) for c, r in zip(labels, drawn["radii"],
                                                                      strict=True)]
        captions.append(object_caption(phrases, int(rng.integers(len(OBJECT_CAPTION_TEMPLATES)))))
        out["image"][i], out["segmentation"][i] = drawn["image"], drawn["segmentation"]
        out["boxes"][i, :count], out["box_labels"][i, :count] = drawn["boxes"], labels
        out["num_boxes"][i] = count
        box_texts[i, :count] = phrases
    return {**out, "label": mains.astype(np.int32), "texts": np.array(captions),
            "box_texts": box_texts.astype(str)}


def objects_tokenizer_corpus() -> list[str]:
    """tokenizer_corpus() plus every word of the multi-object captions and phrases."""
    lines = tokenizer_corpus()
    names = class_names()
    for k, name in enumerate(names):
        others = [f"small {names[(k + 7) % len(names)]}", f"large {names[(k + 13) % len(names)]}"]
        for word in ("small", "large"):
            lines.append(f"{word} {name}")
            for t in range(len(OBJECT_CAPTION_TEMPLATES)):
                lines.append(object_caption([f"{word} {name}", *others[:1 + t % 2]], t))
    return lines


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
      objects: 2–4 shapes per image with boxes, phrases and a segmentation map (see
        make_objects_split); "label" is the class of the main (largest) shape.
      num_colours / num_shapes (objects mode): draw only the first N COLOURS / SHAPES
        (labels keep their 36-class numbering); None: all six.
      max_objects (objects mode): 2–max_objects shapes per image; None: MAX_OBJECTS.
      object_scale (objects mode): multiplies every radius (and the "large" threshold);
        None: 1.

    `image_size` None means 32, or OBJECTS_IMAGE_SIZE (64) with objects=True. The objects-
    mode options left at None keep the default data and its cache folder.
    """

    data_dir: str
    split: str = "train"
    image_size: int | None = None
    train_per_class: int = 250
    test_per_class: int = 20
    vocab_size: int = 64
    aspect: bool = False
    objects: bool = False
    num_colours: int | None = None
    num_shapes: int | None = None
    max_objects: int | None = None
    object_scale: float | None = None

    skips = None  # Generated data has no bad examples to skip.

    def __post_init__(self):
        if self.split not in ("train", "test"):
            raise ValueError(f"demo_shapes has splits 'train' and 'test', not {self.split!r}")
        if self.objects and self.aspect:
            raise ValueError("demo_shapes: objects=True does not support aspect=True")
        if self.image_size is None:
            object.__setattr__(self, "image_size", OBJECTS_IMAGE_SIZE if self.objects else 32)
        if self.objects and self.image_size < 32:
            raise ValueError(f"demo_shapes: image_size={self.image_size} with objects=True; "
                             "expected at least 32 pixels")
        options = {k: getattr(self, k) for k in ("num_colours", "num_shapes", "max_objects",
                                                 "object_scale")}
        if not self.objects and any(v is not None for v in options.values()):
            raise ValueError(f"demo_shapes: {sorted(k for k, v in options.items() if v)} "
                             "need objects=True")
        try:
            classes = used_classes(self.num_colours, self.num_shapes)
        except ValueError as e:
            raise ValueError(f"demo_shapes: {e}") from None
        most = min(MAX_OBJECTS, len(classes))
        if self.max_objects is not None and not 2 <= self.max_objects <= most:
            raise ValueError(f"demo_shapes: max_objects={self.max_objects}; expected 2..{most}")
        scale = self.object_scale
        if scale is not None and not 0.5 <= scale <= 2.0:
            raise ValueError(f"demo_shapes: object_scale={scale}; expected 0.5..2")

    @property
    def _object_options(self) -> dict[str, object]:
        """make_objects_split's keyword arguments for this source's objects-mode options."""
        return {"classes": used_classes(self.num_colours, self.num_shapes),
                "max_objects": self.max_objects or MAX_OBJECTS,
                "scale": float(self.object_scale or 1.0)}

    @property
    def root(self) -> str:
        """The folder holding this configuration's files."""
        if self.objects:
            name = (f"demo_objects_{_OBJECTS_VERSION}_{self.image_size}px_"
                    f"{self.train_per_class}_{self.test_per_class}")
            if self.num_colours or self.num_shapes:
                name += f"_c{self.num_colours or len(COLOURS)}s{self.num_shapes or len(SHAPES)}"
            if self.max_objects:
                name += f"_o{self.max_objects}"
            if self.object_scale:
                name += f"_x{self.object_scale:g}"
        else:
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
        os.makedirs(self.root, exist_ok=True)
        for split, per_class, seed in (("train", self.train_per_class, 0),
                                       ("test", self.test_per_class, 1)):
            path = self.split_path(split)
            if not os.path.exists(path):
                if self.objects:
                    arrays = make_objects_split(per_class, seed, self.image_size,
                                                **self._object_options)
                else:
                    arrays = make_split(per_class, seed, self.image_size, self.aspect)
                tmp = f"{path}.{os.getpid()}.tmp.npz"
                np.savez(tmp, **arrays)
                os.replace(tmp, path)
        if not os.path.exists(self.tokenizer_path):
            tmp = f"{self.tokenizer_path}.{os.getpid()}.tmp"
            corpus = objects_tokenizer_corpus() if self.objects else tokenizer_corpus()
            train_sentencepiece(corpus, self.vocab_size, tmp, model_type="word")
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
        if self.objects:
            return per_class * len(self._object_options["classes"])
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
        import tensorflow as tf  # Deliberately late: see the top of the module.

        del shuffle_files, seed  # One file; the pipeline shuffles examples.
        share = {k: v[process_index::process_count] for k, v in self._arrays.items()}
        ds = tf.data.Dataset.from_tensor_slices(share)
        if "hw" in share:  # aspect: cut each image out of its canvas
            ds = ds.map(_crop_to_hw, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return ds


def prepared_source(record: DemoShapesData, where: str) -> DemoShapes:
    """The demo split a `demo_shapes` source record describes (its unset fields keep
    DemoShapes' defaults), generated and its tokenizer trained unless cached already;
    ConfigError (naming `where`) without a `data_dir`."""
    required_field(record, "data_dir", where)
    source = DemoShapes(**given_fields(record))
    source.prepare()
    return source


def _crop_to_hw(example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """{"image" canvas, "hw", ...} → {"image" [h, w, 3], ...} (drops "hw")."""
    example = dict(example)
    hw = example.pop("hw")
    example["image"] = example["image"][: hw[0], : hw[1]]
    return example


def write_png(path: str, colour: str, shape: str, size: int = 32, seed: int = 0) -> np.ndarray:
    """Draws one `colour` `shape` as the demo's data does and writes it as a PNG; returns it."""

    if colour not in COLOURS:
        raise ValueError(f"colour {colour!r} is not one of the demo's: {', '.join(COLOURS)}")
    if shape not in SHAPES:
        raise ValueError(f"shape {shape!r} is not one of the demo's: {', '.join(SHAPES)}")
    rng = np.random.default_rng(seed)
    image = render(np.array([list(COLOURS).index(colour)]), np.array([SHAPES.index(shape)]),
                   rng, size)[0]
    Image.fromarray(image).save(path, format="PNG")
    return image


def write_objects_png(path: str, size: int = OBJECTS_IMAGE_SIZE, seed: int = 0,
                      main: int | None = None) -> dict[str, object]:
    """Draws one multi-object picture as objects mode does and writes it as a PNG.

    `main` is the main object's class (default: drawn from the seed). Returns the fields of
    the example: image, segmentation, boxes [n, 4], box_texts [n], texts, label.
    """
    rng = np.random.default_rng(seed)
    num_classes = len(COLOURS) * len(SHAPES)
    main = int(rng.integers(num_classes)) if main is None else main
    count = int(rng.integers(2, MAX_OBJECTS + 1))
    others = rng.choice(np.delete(np.arange(num_classes), main), count - 1, replace=False)
    labels = [main, *(int(o) for o in others)]
    drawn = draw_objects(rng, labels, size)
    phrases = [object_phrase(c, r, size) for c, r in zip(labels, drawn["radii"], strict=True)]
    caption = object_caption(phrases, int(rng.integers(len(OBJECT_CAPTION_TEMPLATES))))
    Image.fromarray(drawn["image"]).save(path, format="PNG")
    return {"image": drawn["image"], "segmentation": drawn["segmentation"],
            "boxes": drawn["boxes"], "box_texts": phrases, "texts": caption, "label": main}


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: writes one demo picture as a PNG."""
    argv = quiet_startup(argv)
    parser = argparse.ArgumentParser(
        prog="python -m siglip_jax.data.demo_shapes",
        description="Write a PNG of one demo class (a coloured shape on a dark background), "
                    "or with --objects a multi-object picture (its caption and boxes are "
                    "printed).")
    parser.add_argument("--colour", choices=list(COLOURS),
                        help="colour of the shape (with --objects: of the main shape)")
    parser.add_argument("--shape", choices=list(SHAPES))
    parser.add_argument("--objects", action="store_true",
                        help="draw 2-4 shapes, the main one largest (objects mode)")
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--size", type=int, default=None,
                        help="side in pixels (default 32, with --objects 64)")
    parser.add_argument("--seed", type=int, default=0, help="position, size and noise")
    add_verbose_flag(parser)
    args = parser.parse_args(argv)
    if (args.colour is None) != (args.shape is None) or (args.colour is None
                                                          and not args.objects):
        parser.error("give --colour and --shape together (optional only with --objects)")
    if args.objects:
        size = args.size or OBJECTS_IMAGE_SIZE
        if size < 32:
            parser.error(f"--size {size} with --objects; expected at least 32")
        main_class = (None if args.colour is None else
                      list(COLOURS).index(args.colour) * len(SHAPES) + SHAPES.index(args.shape))
        example = write_objects_png(args.out, size, args.seed, main_class)
        print(f"wrote {args.out}: {size}×{size} px, \"{example['texts']}\"")
        for phrase, box in zip(example["box_texts"], example["boxes"], strict=True):
            coords = ", ".join(f"{v:.3f}" for v in box)
            print(f"  {phrase:<24} box (ymin, xmin, ymax, xmax) = ({coords})")
        return 0
    size = args.size or 32
    write_png(args.out, args.colour, args.shape, size, args.seed)
    print(f"wrote {args.out}: a {args.colour} {args.shape}, {size}×{size} px")
    return 0


if __name__ == "__main__":
    sys.exit(main())
