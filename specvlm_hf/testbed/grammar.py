"""A stochastic grammar that writes questions, short answers, captions and long descriptions about a `Scene`
(shapes on a grid, or a card with one digit or word).

Every fact has several phrasings, chosen by the caller's `random.Random`, so the text has real entropy; every
answer is true of the scene, so it can only be predicted from the image. Short questions name an object by its
colour or its grid cell (what every image token of the object carries), never by its shape alone (which a
single image token does not show). Short answers carry a `key` (the
canonical answer among `options`) that `quality.py` scores.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

from .scenes import COLOURS, DIGITS, GRID, SHAPES, SIZES, TEXT_CELLS, WORDS, Scene, SceneObject, Text

NUMBERS = DIGITS
ORDINALS = ("first", "second", "third", "fourth")
POSITIONS = (
    ("top left", "top middle", "top right"),
    ("middle left", "center", "middle right"),
    ("bottom left", "bottom middle", "bottom right"),
)
SHORT_CATEGORIES = ("count", "colour", "shape", "position", "size", "exists", "relation")  # about shapes
CARD_CATEGORIES = ("digit", "word", "text_colour")  # about a card's text
# how often each category is drawn into a training conversation: the lookups by grid cell and the relations
# need more examples than counting or naming a colour's shape
TRAIN_WEIGHTS = {"count": 1, "colour": 3, "shape": 1, "position": 2, "size": 2, "exists": 1, "relation": 3,
                 "digit": 2, "word": 2, "text_colour": 1}  # fmt: skip
OPTIONS = {
    "count": NUMBERS[1:5],
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "position": tuple(p for row in POSITIONS for p in row),
    "size": SIZES,
    "exists": ("yes", "no"),
    "relation": ("yes", "no"),
    "digit": DIGITS,
    "word": WORDS,
    "text_colour": tuple(COLOURS),
}
SINGLE_WORD = "Answer with a single word or phrase."
LONG_QUESTIONS = (
    "Describe the image in detail.",
    "Give a detailed description of this picture.",
    "What do you see in this image? Please describe everything.",
    "Describe this scene thoroughly.",
)
CAPTION_QUESTIONS = (
    "Write a short caption for this image.",
    "Give a brief caption for the picture.",
    "Summarize the image in one sentence.",
)


@dataclass(frozen=True)
class Turn:
    """One question and its answer; `key` is the scored answer of a short question (None for free text)."""

    question: str
    answer: str
    category: str
    key: str | None = None


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def position(obj: SceneObject) -> str:
    """The canonical name of the object's cell, e.g. "top left" or "center"."""
    return POSITIONS[obj.row][obj.col]


def describe(obj: SceneObject, scene: Scene, with_size: bool = False) -> str:
    """The shortest "colour shape" phrase that singles the object out ("small red circle" when needed)."""
    same = [o for o in scene.objects if (o.colour, o.shape) == (obj.colour, obj.shape)]
    if with_size or len(same) > 1:
        return f"{obj.size} {obj.colour} {obj.shape}"
    return f"{obj.colour} {obj.shape}"


def _unique(scene: Scene, obj: SceneObject, attrs: tuple[str, ...]) -> bool:
    values = tuple(getattr(obj, a) for a in attrs)
    return sum(tuple(getattr(o, a) for a in attrs) == values for o in scene.objects) == 1


def _short(rng: random.Random, category: str, question: str, key: str, phrasings: list[str]) -> Turn:
    if rng.random() < 0.3:  # the LLaVA-1.5 VQA format: an instruction and a bare answer
        return Turn(f"{question}\n{SINGLE_WORD}", _cap(key), category, key)
    return Turn(question, rng.choice(phrasings), category, key)


def _relation_turn(scene: Scene, rng: random.Random) -> Turn | None:
    named = [o for o in scene.objects if _unique(scene, o, ("colour",))]
    if len(named) < 2:
        return None
    a, b = rng.sample(named, 2)
    axes = [ax for ax, da in (("col", a.col - b.col), ("row", a.row - b.row)) if da != 0]
    axis = rng.choice(axes)
    if axis == "col":
        word, holds = rng.choice((("to the left of", a.col < b.col), ("to the right of", a.col > b.col)))
    else:
        word, holds = rng.choice((("above", a.row < b.row), ("below", a.row > b.row)))
    da, db = f"{a.colour} {rng.choice(('object', a.shape))}", f"{b.colour} {rng.choice(('object', b.shape))}"
    question = rng.choice((f"Is the {da} {word} the {db}?", f"Is the {da} located {word} the {db}?"))
    key = "yes" if holds else "no"
    phrasings = ["Yes.", f"Yes, it is {word} the {db}."] if holds else ["No.", f"No, it is not {word} the {db}."]
    return _short(rng, "relation", question, key, phrasings)


def _card_turn(scene: Scene, category: str, rng: random.Random) -> Turn | None:
    text = scene.text
    if category == "text_colour":
        noun = rng.choice(("text", text.kind))
        question = rng.choice((f"What colour is the {noun}?", f"In which colour is the {noun} written?"))
        phrasings = [f"{_cap(text.colour)}.", f"It is written in {text.colour}.", f"The {noun} is {text.colour}."]
        return _short(rng, category, question, text.colour, phrasings)
    if category != text.kind:
        return None
    if category == "digit":
        question = rng.choice(
            (
                "What digit is shown in the image?",
                "Which number is written here?",
                "What number do you see?",
                "Read the digit in the picture.",
            )
        )
        phrasings = [
            f"{_cap(text.content)}.",
            f"It is the digit {text.content}.",
            f"The number {text.content} is written.",
        ]
    else:
        question = rng.choice(
            (
                "What word is written in the image?",
                "What does the text say?",
                "Read the word in the picture.",
                "Which word can you see?",
            )
        )
        phrasings = [f"{_cap(text.content)}.", f"It says {text.content}.", f"The word is {text.content}."]
    return _short(rng, category, question, text.content, phrasings)


def short_turn(scene: Scene, category: str, rng: random.Random) -> Turn | None:
    """One short question of `category` about the scene, or None when the category does not apply to it (a shape
    question about a card, a card question about shapes, a digit question about a word); None draws nothing
    from `rng`."""
    if (scene.text is not None) != (category in CARD_CATEGORIES):
        return None
    if scene.text is not None:
        return _card_turn(scene, category, rng)
    objects = scene.objects
    if category == "count":
        n = NUMBERS[len(objects)]
        noun = rng.choice(("object", "shape"))
        question = rng.choice(
            (
                f"How many {noun}s are there?",
                f"How many {noun}s are in the image?",
                f"Count the {noun}s in the picture.",
            )
        )
        plural = "There are" if len(objects) > 1 else "There is"
        phrasings = [f"{_cap(n)}.", f"{plural} {n} {noun}{'s' if len(objects) > 1 else ''}.", f"I can see {n}."]
        return _short(rng, category, question, n, phrasings)
    if category == "relation":
        return _relation_turn(scene, rng) if len(objects) > 1 else None
    if category == "exists":
        present_colours = {o.colour for o in objects}
        if rng.random() < 0.5:
            colour, present = rng.choice(sorted(present_colours)), True
        else:
            absent = [c for c in COLOURS if c not in present_colours]
            colour, present = rng.choice(absent), False
        noun = rng.choice(("object", "shape"))
        question = rng.choice(
            (
                f"Is there a {colour} {noun} in the image?",
                f"Can you see a {colour} {noun}?",
                f"Does the picture contain anything {colour}?",
            )
        )
        key = "yes" if present else "no"
        phrasings = ["Yes.", "Yes, there is."] if present else ["No.", "No, there is not."]
        return _short(rng, category, question, key, phrasings)
    if category == "colour":
        obj = rng.choice(objects)
        p = position(obj)
        question = rng.choice(
            (f"What colour is the object in the {p}?", f"What is the colour of the shape in the {p}?")
        )
        phrasings = [f"{_cap(obj.colour)}.", f"It is {obj.colour}.", f"The {obj.shape} in the {p} is {obj.colour}."]
        return _short(rng, category, question, obj.colour, phrasings)
    if category == "shape":
        candidates = [o for o in objects if _unique(scene, o, ("colour",))]
        if not candidates:
            return None
        obj = rng.choice(candidates)
        question = rng.choice((f"What shape is the {obj.colour} object?", f"Which shape is {obj.colour}?"))
        phrasings = [f"A {obj.shape}.", f"It is a {obj.shape}.", f"The {obj.colour} object is a {obj.shape}."]
        return _short(rng, category, question, obj.shape, phrasings)
    if category == "position":
        candidates = [o for o in objects if _unique(scene, o, ("colour",))]
        if not candidates:
            return None
        obj = rng.choice(candidates)
        d, p = f"{obj.colour} {rng.choice(('object', obj.shape))}", position(obj)
        question = rng.choice((f"Where is the {d}?", f"In which part of the image is the {d}?"))
        phrasings = [f"{_cap(p)}.", f"In the {p}.", f"It is in the {p}."]
        return _short(rng, category, question, p, phrasings)
    if category == "size":
        candidates = [o for o in objects if _unique(scene, o, ("colour", "shape"))]
        if not candidates:
            return None
        obj = rng.choice(candidates)
        d = f"{obj.colour} {obj.shape}"
        question = rng.choice((f"Is the {d} small or large?", f"What size is the {d}?"))
        phrasings = [f"{_cap(obj.size)}.", f"It is {obj.size}.", f"The {d} is {obj.size}."]
        return _short(rng, category, question, obj.size, phrasings)
    raise ValueError(f"unknown short category {category!r}")


def text_position(text: Text) -> str:
    """The grid cell (as in `POSITIONS`) under the centre of a card's text."""
    row = text.row * GRID // TEXT_CELLS
    col = int((text.col + len(text.characters) / 2) * GRID / TEXT_CELLS)
    return POSITIONS[row][min(col, GRID - 1)]


def caption_turn(scene: Scene, rng: random.Random) -> Turn:
    """A one-sentence caption naming every object (size, colour, shape) in reading order, or a card's text."""
    if scene.text is not None:
        text = scene.text
        what, where = f"the {text.kind} {text.content}", text_position(text)
        caption = rng.choice(
            (
                f"{_cap(what)} written in small {text.colour} characters in the {where}.",
                f"A white canvas with {what} written in {text.colour}.",
                f"{_cap(_article(text.colour))} {text.colour} {text.kind}, {text.content}, in the {where} of a white canvas.",
            )
        )
        return Turn(rng.choice(CAPTION_QUESTIONS), caption, "caption")
    items = [f"a {o.size} {o.colour} {o.shape}" for o in scene.objects]
    n = len(items)
    head = rng.choice(
        (
            f"{_cap(NUMBERS[n])} shape{'s' if n > 1 else ''} on a white background: ",
            "A white canvas with ",
            "A simple drawing of ",
        )
    )
    return Turn(rng.choice(CAPTION_QUESTIONS), head + _join(items) + ".", "caption")


# Detail phrasings, indexed by kind (0 shape, 1 colour, 2 size, 3 position). A description never uses one
# phrasing twice (`_fresh`), as a writer varies their wording: greedy decoding picks the likeliest phrasing every
# time, and without this rule a detail said of several objects reads as one sentence said over and over.
_SHAPE_DETAILS = {
    "circle": (
        "It is perfectly round, with a smooth outline.",
        "Its outline is a smooth curve without any corners.",
        "Being a circle, it has no corners at all.",
    ),
    "square": (
        "It has four equal sides and four sharp corners.",
        "Its sides are straight and meet at right angles.",
        "Being a square, it has four corners of the same size.",
    ),
    "triangle": (
        "It has three straight sides and points upwards.",
        "Its tip points towards the top of the image.",
        "Being a triangle, it has exactly three corners.",
    ),
    "diamond": (
        "It looks like a square turned onto one of its corners.",
        "Its four corners point up, down, left and right.",
        "Being a diamond, it stands on one of its points.",
    ),
}
_SIZE_DETAILS = {
    "small": (
        "It is fairly small and takes up only a little of its cell.",
        "Compared with the whole picture, it is quite small.",
        "Drawn at a reduced size, it leaves plenty of white space around it.",
    ),
    "large": (
        "It is large and fills most of its cell.",
        "Compared with the whole picture, it is quite large.",
        "Drawn at full size, it reaches almost to the borders of its cell.",
    ),
}
_COLOUR_DETAILS = (
    "Its {colour} colour is bright and solid.",
    "The {colour} fill is even, with no pattern or outline.",
    "The shape is filled with a flat {colour} colour.",
)
_EDGE_DETAILS = ("It sits close to the {where} of the image.", "It is placed near the {where} of the canvas.")
_CENTER_DETAILS = ("It is right in the middle of the picture.", "It sits at the very center of the canvas.")


def _fresh(rng: random.Random, kind: str, phrasings: tuple[str, ...], used: set) -> str:
    """A phrasing of `kind` that the description has not used yet (any, once all are used); marks it used."""
    fresh = [i for i in range(len(phrasings)) if (kind, i) not in used] or list(range(len(phrasings)))
    i = rng.choice(fresh)
    used.add((kind, i))
    return phrasings[i]


def _detail(obj: SceneObject, kind: int, rng: random.Random, used: set) -> str:
    """The detail sentence of `kind` (0 shape, 1 colour, 2 size, 3 position) about `obj`."""
    if kind == 0:
        return _fresh(rng, "shape", _SHAPE_DETAILS[obj.shape], used)
    if kind == 1:
        return _fresh(rng, "colour", _COLOUR_DETAILS, used).format(colour=obj.colour)
    if kind == 2:
        return _fresh(rng, "size", _SIZE_DETAILS[obj.size], used)
    edges = [e for e in (("top", None, "bottom")[obj.row], ("left", None, "right")[obj.col]) if e]
    if not edges:
        return _fresh(rng, "center", _CENTER_DETAILS, used)
    where = _join(edges) + (" edges" if len(edges) > 1 else " edge")
    return _fresh(rng, "edge", _EDGE_DETAILS, used).format(where=where)


def _object_sentences(scene: Scene, index: int, kinds: list[int], rng: random.Random, used: set) -> list[str]:
    """The intro of object `index` and its detail sentences of `kinds` (0 shape, 1 colour, 2 size, 3 position),
    said in that fixed order, so a description never comes back to a detail it has passed. `used` holds the
    phrasings the description has used so far."""
    obj = scene.objects[index]
    what, where = f"{obj.size} {obj.colour} {obj.shape}", position(obj)
    if len(scene.objects) == 1:
        intro = rng.choice(
            (f"The only object is a {what} in the {where}.", f"In the {where} there is a single {what}.")
        )
    elif index == 0:
        intro = rng.choice(
            (
                f"Starting in the {where}, there is a {what}.",
                f"In the {where} there is a {what}.",
                f"The first object, in the {where}, is a {what}.",
            )
        )
    else:
        intro = rng.choice(
            (
                f"Next, in the {where}, we find a {what}.",
                f"In the {where} there is a {what}.",
                f"The {ORDINALS[index]} object is a {what} located in the {where}.",
                f"Moving on, a {what} sits in the {where}.",
            )
        )
    return [intro, *(_detail(obj, k, rng, used) for k in sorted(kinds))]


def _relation_sentence(scene: Scene, a: SceneObject, b: SceneObject, rng: random.Random) -> str:
    vertical = "above" if a.row < b.row else "below" if a.row > b.row else ""
    horizontal = "to the left of" if a.col < b.col else "to the right of" if a.col > b.col else ""
    rel = f"{vertical} and {horizontal}" if vertical and horizontal else vertical or horizontal
    da, db = describe(a, scene), describe(b, scene)
    return rng.choice((f"The {da} is {rel} the {db}.", f"The {da} sits {rel} the {db}."))


def _grid_sentence(scene: Scene, rng: random.Random) -> str:
    empty_rows = [("top", "middle", "bottom")[r] for r in range(GRID) if all(o.row != r for o in scene.objects)]
    grid = rng.choice(
        (
            "If the picture is split into a three by three grid, each object fills one cell of it.",
            "Seen as a three by three grid, the picture has most of its cells empty.",
        )
    )
    if not empty_rows:
        return grid
    rows = _join(empty_rows) + (" rows are" if len(empty_rows) > 1 else " row is")
    return grid + " " + rng.choice((f"The {rows} completely empty.", f"Nothing at all is drawn in the {rows[:-4]}."))


def _shape_counts(scene: Scene) -> str:
    counts = Counter(o.shape for o in scene.objects)
    return _join([f"{NUMBERS[c]} {s}{'s' if c > 1 else ''}" for s, c in sorted(counts.items())])


_DIGIT_FORMS = (
    "A zero is drawn as a tall closed oval.",
    "A one is a single upright stroke with a small flag at its top.",
    "A two has a curved top and a flat stroke along its base.",
    "A three is made of two bumps that open towards the left.",
    "A four has a crossing bar and a tall upright stroke on its right side.",
    "A five has a flat bar at its top and a round belly at its bottom.",
    "A six curls down into a closed loop at its bottom.",
    "A seven has a flat bar at its top and a slanting stroke below it.",
    "An eight is made of two loops stacked on top of each other.",
    "A nine has a closed loop at its top and a tail below it.",
)
_WORD_MEANINGS = {
    "cat": "A cat is a small furry animal that likes to sleep.",
    "owl": "An owl is a bird that hunts at night.",
    "sun": "The sun is the bright star of the daytime sky.",
    "box": "A box is a container with flat sides.",
    "car": "A car is a vehicle with four wheels.",
    "hat": "A hat is something you wear on your head.",
    "cow": "A cow is a farm animal that gives milk.",
    "tree": "A tree is a tall plant with a trunk and leaves.",
    "fish": "A fish is an animal that lives in water.",
    "bird": "A bird is an animal with feathers and wings.",
    "star": "A star is a point of light in the night sky.",
    "moon": "The moon shines in the sky at night.",
}


def _digit_sentences(content: str, rng: random.Random) -> list[str]:
    value = DIGITS.index(content)
    parity = "even" if value % 2 == 0 else "odd"
    if value == 0:
        neighbours = "It is the smallest digit, and one comes right after it."
    elif value == 9:
        neighbours = "It is the largest digit, and it comes right after eight."
    else:
        neighbours = f"It comes right after {DIGITS[value - 1]} and right before {DIGITS[value + 1]}."
    return [
        rng.choice((f"The digit is {content}.", f"It is the number {content}, written as a single numeral.")),
        _DIGIT_FORMS[value],
        rng.choice((f"{_cap(content)} is an {parity} number.", f"As a number, {content} is {parity}.")),
        neighbours,
    ]


def _word_sentences(content: str, rng: random.Random) -> list[str]:
    letters = _join(list(content))
    return [
        rng.choice((f"The word is {content}.", f"It spells the word {content}.")),
        rng.choice(
            (
                f"It has {NUMBERS[len(content)]} letters: {letters}.",
                f"Spelled out, its {NUMBERS[len(content)]} letters are {letters}.",
            )
        ),
        f"It begins with the letter {content[0]} and ends with the letter {content[-1]}.",
        _WORD_MEANINGS[content],
    ]


def _card_long(scene: Scene, rng: random.Random) -> Turn:
    text = scene.text
    thing = "a single digit" if text.kind == "digit" else "a single short word"
    sentences = [
        rng.choice(
            (
                f"The image shows {thing} written on a plain white background.",
                f"This picture contains no shapes, only {thing} written on a white canvas.",
            )
        ),
        *(_digit_sentences if text.kind == "digit" else _word_sentences)(text.content, rng),
        rng.choice(
            (
                f"It is written in {text.colour}, with thick blocky strokes.",
                f"The {text.colour} characters are drawn in a pixel font with square corners.",
            )
        ),
        "Every stroke is built from small square blocks, like the text on an old computer screen.",
        rng.choice(
            (
                "The characters are small, so most of the picture stays white.",
                "The text is printed at a small size, leaving wide white margins around it.",
            )
        ),
        rng.choice(
            (
                f"The text sits in the {text_position(text)} of the image.",
                f"It is placed in the {text_position(text)} part of the picture.",
            )
        ),
        rng.choice(
            (
                "There are no shapes or other objects in the picture.",
                "Apart from the text, the canvas is completely empty.",
            )
        ),
        rng.choice(
            (
                f"So the {text.kind} {text.content} is the only thing to read in this image.",
                f"Nothing else is drawn, so reading the {text.kind} is all there is to do.",
            )
        ),
    ]
    return Turn(rng.choice(LONG_QUESTIONS), " ".join(sentences), "long")


def long_turn(scene: Scene, rng: random.Random) -> Turn:
    """A detailed description: for shapes (~150-250 tokens) an overview, every object in reading order, relations
    and a summary; for a card (~130-160 tokens) what is written, its form, colour and place."""
    if scene.text is not None:
        return _card_long(scene, rng)
    objects = scene.objects
    n = len(objects)
    noun = rng.choice(("object", "shape"))
    many = f"{NUMBERS[n]} {noun}s"
    if n == 1:
        opening = rng.choice(
            (
                f"The image shows a single {noun} on a plain white background.",
                f"This picture contains just one {noun}.",
            )
        )
        layout = rng.choice(("It stands alone, with nothing else around it.", "The rest of the canvas is empty."))
    else:
        opening = rng.choice(
            (
                f"The image shows {many} on a plain white background.",
                f"This is a simple picture with {many} drawn on a white canvas.",
                f"In this image, {many} are arranged on a clean white background.",
            )
        )
        rows = sorted({o.row for o in objects})
        where = _join([("top", "middle", "bottom")[r] for r in rows]) + (" rows" if len(rows) > 1 else " row")
        layout = rng.choice(
            (f"They are spread over the {where} of the canvas.", f"The {noun}s occupy the {where} of the picture.")
        )
    sentences = [opening, layout]
    # detail kinds rotate over the objects in a fixed cycle (shape, colour, size, position), so the kinds said of
    # an object follow from its ordinal alone, no kind is said more than twice, and each kind has more phrasings
    # than that (no phrasing is said twice)
    n_details, used = {1: 4, 2: 3, 3: 2, 4: 1}[n], set()
    for i in range(n):
        kinds = [(i * n_details + j) % 4 for j in range(n_details)]
        sentences += _object_sentences(scene, i, kinds, rng, used)
    if n <= 2:
        sentences.append(_grid_sentence(scene, rng))
    if n == 1:
        sentences.append("Because there is only one shape, there is nothing to compare it with.")
        sentences.append(
            rng.choice(
                (
                    f"Apart from this {objects[0].shape}, the canvas is plain white.",
                    f"The {objects[0].colour} {objects[0].shape} is the only thing that stands out.",
                )
            )
        )
    for a, b in zip(objects, objects[1:]):
        sentences.append(_relation_sentence(scene, a, b, rng))
    colours = list(dict.fromkeys(o.colour for o in objects))
    if len(colours) == 1:
        sentences.append(f"The only colour besides white is {colours[0]}.")
    else:
        sentences.append(
            rng.choice(
                (
                    f"Altogether, the colours in the picture are {_join(colours)}.",
                    f"The picture uses {NUMBERS[len(colours)]} colours: {_join(colours)}.",
                )
            )
        )
    sentences.append(
        rng.choice(
            (
                f"Counting by shape, the picture has {_shape_counts(scene)}.",
                f"In terms of shapes, the image contains {_shape_counts(scene)}.",
            )
        )
    )
    empty = GRID * GRID - n
    sentences.append(
        rng.choice(
            (
                f"The remaining {NUMBERS[empty]} cells of the grid are empty.",
                "The other parts of the canvas are left empty.",
                "There is no text or other detail in the picture.",
            )
        )
    )
    return Turn(rng.choice(LONG_QUESTIONS), " ".join(sentences), "long")


def conversation(scene: Scene, rng: random.Random, *, with_long: bool, n_short: int) -> list[Turn]:
    """A multi-turn conversation: up to `n_short` distinct short questions (each category at most its
    `TRAIN_WEIGHTS` times), sometimes a caption, and optionally a long description, in random order."""
    applicable = CARD_CATEGORIES if scene.text is not None else SHORT_CATEGORIES
    categories = [c for c in applicable for _ in range(TRAIN_WEIGHTS[c])]
    rng.shuffle(categories)
    turns = []
    for c in categories:
        turn = short_turn(scene, c, rng)
        if turn is not None and len(turns) < n_short and all(turn.question != t.question for t in turns):
            turns.append(turn)
    if rng.random() < 0.2:
        turns.append(caption_turn(scene, rng))
    if with_long:
        turns.append(long_turn(scene, rng))
    rng.shuffle(turns)
    return turns
