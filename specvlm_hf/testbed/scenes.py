"""Synthetic scenes: 1-4 coloured shapes on a 3x3 grid, sampled from a seed and rendered with PIL alone.

A `Scene` is the ground truth that every question, caption and description in `grammar.py` is written from.
Objects are large (a large one fills its cell), so each covers several image tokens: with a freshly
initialised vision tower, the share of image tokens an object covers sets how fast the language model grounds.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 60, 190),
    "orange": (245, 130, 20),
}
SIZES = ("small", "large")
GRID = 3  # the canvas is a GRID x GRID board of cells, one object per cell at most
MAX_OBJECTS = 4

RADIUS = {"small": 0.26, "large": 0.44}  # object radius as a fraction of the cell side
_JITTER = 0.04  # centre jitter, fraction of the cell side
_COLOUR_JITTER = 12  # per-channel RGB jitter


@dataclass(frozen=True, order=True)
class SceneObject:
    """One shape in one grid cell; `row` and `col` count from the top left, in `range(GRID)`."""

    row: int
    col: int
    shape: str
    colour: str
    size: str


@dataclass(frozen=True)
class Scene:
    """Objects sorted in reading order (row by row, left to right), plus the seed of the render jitter."""

    objects: tuple[SceneObject, ...]
    render_seed: int

    @property
    def key(self) -> tuple[SceneObject, ...]:
        """What the text can say about the scene; two scenes with the same key differ only in jitter."""
        return self.objects


def sample_scene(rng: random.Random) -> Scene:
    """Draws 1-`MAX_OBJECTS` objects in distinct cells with independent shape, colour and size."""
    count = rng.randint(1, MAX_OBJECTS)
    cells = rng.sample(range(GRID * GRID), count)
    objects = tuple(
        sorted(
            SceneObject(cell // GRID, cell % GRID, rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(SIZES))
            for cell in cells
        )
    )
    return Scene(objects, rng.getrandbits(32))


def render_scene(scene: Scene, image_size: int) -> Image.Image:
    """Draws the scene on a white RGB canvas of `image_size` x `image_size` pixels."""
    rng = random.Random(scene.render_seed)
    image = Image.new("RGB", (image_size, image_size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    cell = image_size / GRID
    for obj in scene.objects:
        cx = (obj.col + 0.5 + rng.uniform(-_JITTER, _JITTER)) * cell
        cy = (obj.row + 0.5 + rng.uniform(-_JITTER, _JITTER)) * cell
        r = RADIUS[obj.size] * cell
        fill = tuple(min(255, max(0, c + rng.randint(-_COLOUR_JITTER, _COLOUR_JITTER))) for c in COLOURS[obj.colour])
        if obj.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif obj.shape == "square":
            h = 0.85 * r
            draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
        elif obj.shape == "triangle":
            draw.polygon([(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)], fill=fill)
        else:  # diamond
            draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    return image
