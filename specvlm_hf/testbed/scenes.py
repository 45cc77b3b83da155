"""Synthetic scenes, sampled from a seed and rendered with PIL alone: 1-4 coloured shapes on a 3x3 grid, or a card
with one rendered digit or short word.

A `Scene` is the ground truth that every question, caption and description in `grammar.py` is written from.
Objects are large (a large one fills its cell), so each covers several image tokens: with a freshly
initialised vision tower, the share of image tokens an object covers sets how fast the language model grounds.
Text is drawn in Pillow's built-in bitmap font (the same pixels on every machine, no font file), scaled up with
nearest-neighbour resampling to one character per image token.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

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
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")  # read as words
WORDS = ("cat", "owl", "sun", "box", "car", "hat", "cow", "tree", "fish", "bird", "star", "moon")  # no descenders
GRID = 3  # the canvas is a GRID x GRID board of cells, one object per cell at most
MAX_OBJECTS = 4

RADIUS = {"small": 0.26, "large": 0.44}  # object radius as a fraction of the cell side
_JITTER = 0.04  # centre jitter, fraction of the cell side
_COLOUR_JITTER = 12  # per-channel RGB jitter
# Text is set one character per cell of a TEXT_CELLS x TEXT_CELLS board: at the testbed's 144 px and 16 px
# patches each character fills one image token, about the scale at which a real LLaVA reads small print.
TEXT_CELLS = 9


@dataclass(frozen=True, order=True)
class SceneObject:
    """One shape in one grid cell; `row` and `col` count from the top left, in `range(GRID)`."""

    row: int
    col: int
    shape: str
    colour: str
    size: str


@dataclass(frozen=True, order=True)
class Text:
    """A digit (`content` in `DIGITS`, drawn as a numeral) or a word (`content` in `WORDS`) on a card, one
    character per text cell from cell (`row`, `col`) rightwards, on a `TEXT_CELLS` x `TEXT_CELLS` board."""

    content: str
    colour: str
    row: int
    col: int

    @property
    def kind(self) -> str:
        return "digit" if self.content in DIGITS else "word"

    @property
    def characters(self) -> str:
        """What is drawn: the numeral of a digit, the word itself otherwise."""
        return str(DIGITS.index(self.content)) if self.kind == "digit" else self.content


@dataclass(frozen=True)
class Scene:
    """Objects sorted in reading order (row by row, left to right), or a card holding one `text` and no objects,
    plus the seed of the render jitter."""

    objects: tuple[SceneObject, ...]
    render_seed: int
    text: Text | None = None

    @property
    def key(self) -> tuple:
        """What the text can say about the scene; two scenes with the same key differ only in jitter."""
        return self.objects if self.text is None else (self.text,)


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


def sample_card(rng: random.Random, kind: str | None = None) -> Scene:
    """Draws a card: one digit or word (`kind` "digit" or "word"; either, at even odds, when None) with a colour,
    at a random text cell."""
    kind = kind or rng.choice(("digit", "word"))
    if kind not in ("digit", "word"):
        raise ValueError(f"kind must be 'digit', 'word' or None, got {kind!r}")
    content = rng.choice(DIGITS if kind == "digit" else WORDS)
    length = 1 if kind == "digit" else len(content)
    text = Text(content, rng.choice(list(COLOURS)), rng.randrange(TEXT_CELLS), rng.randrange(TEXT_CELLS - length + 1))
    return Scene((), rng.getrandbits(32), text)


@lru_cache(maxsize=64)
def _glyph(character: str) -> Image.Image:
    """The character in the built-in bitmap font: a 6 x 7 "L" mask (255 = ink), digits and letters on one
    baseline."""
    mask = Image.new("L", (8, 12), 0)
    ImageDraw.Draw(mask).text((0, 0), character, fill=255, font=ImageFont.load_default_imagefont())
    return mask.crop((0, 2, 6, 9))


def text_box(scene: Scene) -> tuple[float, float, float, float]:
    """`(left, top, right, bottom)` of the cells the card's text fills, as fractions of the canvas side."""
    text = scene.text
    return (
        text.col / TEXT_CELLS,
        text.row / TEXT_CELLS,
        (text.col + len(text.characters)) / TEXT_CELLS,
        (text.row + 1) / TEXT_CELLS,
    )


def _jittered(colour: str, rng: random.Random) -> tuple[int, int, int]:
    return tuple(min(255, max(0, c + rng.randint(-_COLOUR_JITTER, _COLOUR_JITTER))) for c in COLOURS[colour])


def _render_text(image: Image.Image, text: Text, rng: random.Random) -> None:
    cell = image.size[0] / TEXT_CELLS
    width, height = max(1, round(cell * 6 / 8)), max(1, round(cell * 7 / 8))  # 12 x 14 px at 144 px
    fill = _jittered(text.colour, rng)
    for i, character in enumerate(text.characters):
        mask = _glyph(character).resize((width, height), Image.Resampling.NEAREST)
        x = round((text.col + i) * cell + (cell - width) / 2)
        y = round(text.row * cell + (cell - height) / 2)
        image.paste(Image.new("RGB", mask.size, fill), (x, y), mask)


def render_scene(scene: Scene, image_size: int) -> Image.Image:
    """Draws the scene on a white RGB canvas of `image_size` x `image_size` pixels."""
    rng = random.Random(scene.render_seed)
    image = Image.new("RGB", (image_size, image_size), (255, 255, 255))
    if scene.text is not None:
        _render_text(image, scene.text, rng)
        return image
    draw = ImageDraw.Draw(image)
    cell = image_size / GRID
    for obj in scene.objects:
        cx = (obj.col + 0.5 + rng.uniform(-_JITTER, _JITTER)) * cell
        cy = (obj.row + 0.5 + rng.uniform(-_JITTER, _JITTER)) * cell
        r = RADIUS[obj.size] * cell
        fill = _jittered(obj.colour, rng)
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
