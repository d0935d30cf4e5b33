"""The demo dataset's classes: six colours (name -> RGB) × six shapes; class = colour · 6 + shape.

Apart from demo_shapes.py, which draws and caches the pictures (and trains their tokenizer),
so that config records can name the classes (the dense probe's label sets) without loading it.
"""

from __future__ import annotations

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 80, 235),
    "yellow": (235, 225, 50),
    "cyan": (50, 220, 225),
    "magenta": (225, 50, 215),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring", "diamond")
