"""Photometric augmentations of DINO's multi-crop views (used by the view ops, ops_views.py).

Plain TF functions on one float32 image [H, W, 3] with values in [0, 1], each drawing its
randomness from a stateless seed (int64 [2]), so they give the same result eagerly and
inside tf.data. The formulas follow torchvision's, as DINO / DINOv2 call them
(dinov2/data/augmentations.py of dinov2==0.0.1.dev2):

  * `color_jitter`: with probability `p` (0.8), brightness, contrast, saturation and hue
    factors drawn uniformly (±0.4, ±0.4, ±0.2, ±0.1) and applied in a random order, as
    `ColorJitter(0.4, 0.4, 0.2, 0.1)`: brightness `x·b`, contrast `c·x + (1-c)·mean(gray(x))`,
    saturation `s·x + (1-s)·gray(x)` (each clipped to [0, 1]), hue shifted by `h` of the
    colour wheel (`tf.image.adjust_hue`);
  * `grayscale`: with probability `p` (0.2) every channel becomes 0.299 R + 0.587 G + 0.114 B
    (ITU-R 601, PIL's "L" conversion);
  * `gaussian_blur`: with probability `p`, a 9-tap Gaussian kernel, σ uniform in [0.1, 2.0],
    reflect padding (torchvision `GaussianBlur(kernel_size=9, sigma=(0.1, 2.0))`);
  * `solarize`: with probability `p` (0.2), values ≥ 128/255 become 1 - x
    (`RandomSolarize(threshold=128)` on 8-bit images).

`to_unit` / `from_unit` map an image of another value range (uint8 0..255, or the model's
float -1..1) to [0, 1] and back.
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

GRAY_WEIGHTS = (0.299, 0.587, 0.114)
SOLARIZE_THRESHOLD = 128 / 255
BLUR_TAPS = 9
BLUR_SIGMA = (0.1, 2.0)
JITTER = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue.


def _sub(seed: tf.Tensor, salt: int) -> tf.Tensor:
    return tf.random.experimental.stateless_fold_in(seed, salt)


def _coin(seed: tf.Tensor, p: float | tf.Tensor) -> tf.Tensor:
    """A bool scalar that is True with probability p."""
    return tf.random.stateless_uniform([], seed=seed) < tf.cast(p, tf.float32)


def gray(image: tf.Tensor) -> tf.Tensor:
    """Luma [H, W, 1] of an RGB image."""
    return tf.reduce_sum(image * tf.constant(GRAY_WEIGHTS, image.dtype), axis=-1, keepdims=True)


def to_unit(image: tf.Tensor, value_range: Sequence[float]) -> tf.Tensor:
    """float32 image in [0, 1] from values in `value_range` (lo, hi)."""
    lo, hi = (float(v) for v in value_range)
    return (tf.cast(image, tf.float32) - lo) / (hi - lo)


def from_unit(image: tf.Tensor, value_range: Sequence[float], dtype: tf.DType) -> tf.Tensor:
    """Back from [0, 1] to `value_range` and `dtype` (integers rounded and clipped)."""
    lo, hi = (float(v) for v in value_range)
    out = image * (hi - lo) + lo
    if dtype.is_integer:
        return tf.cast(tf.clip_by_value(tf.round(out), dtype.min, dtype.max), dtype)
    return tf.cast(out, dtype)


def _blend(a: tf.Tensor, b: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    return tf.clip_by_value(factor * a + (1.0 - factor) * b, 0.0, 1.0)


def color_jitter(image: tf.Tensor, seed: tf.Tensor, p: float = 0.8,
                 strength: Sequence[float] = JITTER) -> tf.Tensor:
    """torchvision `RandomApply([ColorJitter(*strength)], p)` on a [0, 1] image."""
    b, c, s, h = (float(v) for v in strength)
    lo = tf.constant([1 - b, 1 - c, 1 - s, -h], tf.float32)
    hi = tf.constant([1 + b, 1 + c, 1 + s, h], tf.float32)
    factors = lo + (hi - lo) * tf.random.stateless_uniform([4], seed=_sub(seed, 1))
    order = tf.argsort(tf.random.stateless_uniform([4], seed=_sub(seed, 2)))
    ops = [
        lambda x: tf.clip_by_value(x * factors[0], 0.0, 1.0),
        lambda x: _blend(x, tf.reduce_mean(gray(x)), factors[1]),
        lambda x: _blend(x, gray(x), factors[2]),
        lambda x: tf.image.adjust_hue(x, factors[3]),
    ]

    def jitter() -> tf.Tensor:
        x = image
        for i in range(4):
            x = tf.switch_case(order[i], [lambda op=op, x=x: op(x) for op in ops])
        return tf.ensure_shape(x, image.shape)

    return tf.cond(_coin(_sub(seed, 0), p), jitter, lambda: image)


def grayscale(image: tf.Tensor, seed: tf.Tensor, p: float = 0.2) -> tf.Tensor:
    """torchvision `RandomGrayscale(p)` (3 equal channels of the luma)."""
    return tf.cond(_coin(seed, p), lambda: tf.broadcast_to(gray(image), tf.shape(image)),
                   lambda: image)


def blur_kernel(sigma: tf.Tensor, taps: int = BLUR_TAPS) -> tf.Tensor:
    """The normalised 1-D Gaussian [taps] of torchvision's `gaussian_blur`."""
    half = (taps - 1) / 2
    x = tf.linspace(-half, half, taps)
    k = tf.exp(-0.5 * tf.square(tf.cast(x, tf.float32) / sigma))
    return k / tf.reduce_sum(k)


def blur(image: tf.Tensor, sigma: tf.Tensor, taps: int = BLUR_TAPS) -> tf.Tensor:
    """Separable Gaussian blur of [H, W, C] with reflect padding."""
    k = blur_kernel(sigma, taps)
    pad = taps // 2
    ch = image.shape[-1]
    x = tf.pad(image[None], [[0, 0], [pad, pad], [pad, pad], [0, 0]], mode="REFLECT")
    kh = tf.tile(tf.reshape(k, [taps, 1, 1, 1]), [1, 1, ch, 1])
    kw = tf.tile(tf.reshape(k, [1, taps, 1, 1]), [1, 1, ch, 1])
    x = tf.nn.depthwise_conv2d(x, kh, [1, 1, 1, 1], "VALID")
    x = tf.nn.depthwise_conv2d(x, kw, [1, 1, 1, 1], "VALID")
    return tf.ensure_shape(x[0], image.shape)


def gaussian_blur(image: tf.Tensor, seed: tf.Tensor, p: float | tf.Tensor) -> tf.Tensor:
    """DINO's `GaussianBlur(p)`: blur with σ ~ U(0.1, 2.0) with probability p."""
    lo, hi = BLUR_SIGMA
    sigma = tf.random.stateless_uniform([], seed=_sub(seed, 1), minval=lo, maxval=hi)
    return tf.cond(_coin(_sub(seed, 0), p), lambda: blur(image, sigma), lambda: image)


def solarize(image: tf.Tensor, seed: tf.Tensor, p: float | tf.Tensor) -> tf.Tensor:
    """torchvision `RandomSolarize(threshold=128, p)` on a [0, 1] image."""
    flipped = tf.where(image >= SOLARIZE_THRESHOLD, 1.0 - image, image)
    return tf.cond(_coin(seed, p), lambda: flipped, lambda: image)


def dino_photometric(image: tf.Tensor, seed: tf.Tensor, blur_p: float | tf.Tensor,
                     solarize_p: float | tf.Tensor, jitter_p: float = 0.8,
                     gray_p: float = 0.2) -> tf.Tensor:
    """DINO's colour pipeline on a [0, 1] image: jitter, grayscale, blur, solarize."""
    x = color_jitter(image, _sub(seed, 1), jitter_p)
    x = grayscale(x, _sub(seed, 2), gray_p)
    x = gaussian_blur(x, _sub(seed, 3), blur_p)
    return solarize(x, _sub(seed, 4), solarize_p)
