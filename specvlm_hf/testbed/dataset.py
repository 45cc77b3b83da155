"""The testbed's data: training conversations drawn from a seed, the fixed held-out prompt set, and a LLaVA JSONL export.

Training scenes never coincide with a held-out scene (compared by `Scene.key`), so held-out accuracy measures
generalisation to unseen object layouts.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from PIL import Image

from .grammar import CARD_CATEGORIES, SHORT_CATEGORIES, Turn, caption_turn, conversation, long_turn, short_turn
from .scenes import Scene, render_scene, sample_card, sample_scene

DEFAULT_IMAGE_SIZE = 144
HELDOUT_SCENES = 120  # shapes on the grid
HELDOUT_CARDS = 40  # half digits, half words; after the shape scenes
_HELDOUT_SEED = "specvlm-testbed-heldout-v1"


@dataclass(frozen=True)
class Conversation:
    """An image, its scene and several independent question/answer turns about it."""

    image: Image.Image
    turns: tuple[Turn, ...]
    scene: Scene


@dataclass(frozen=True)
class TestbedPrompt:
    """A held-out prompt: an image, one question and the grammar's reference answer.

    `kind` is "short" (a visual question or a caption) or "long" (a detailed description, 130-250 tokens);
    `category` names the question type and `key` the canonical answer that `quality.py` scores (None for free text).
    """

    image: Image.Image
    question: str
    kind: str
    reference: str
    category: str
    key: str | None
    scene: Scene

    def messages(self) -> list[dict]:
        """The prompt as chat messages for `processor.apply_chat_template`."""
        return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.question}]}]

    def inputs(self, processor, return_tensors: str = "pt"):
        """Model inputs (`input_ids`, `attention_mask`, `pixel_values`) ending with the generation prompt."""
        text = processor.apply_chat_template(self.messages(), add_generation_prompt=True)
        return processor(images=self.image, text=text, return_tensors=return_tensors)


@lru_cache(maxsize=1)
def _heldout_scenes() -> tuple[Scene, ...]:
    rng, card_rng = random.Random(_HELDOUT_SEED), random.Random(_HELDOUT_SEED + "-cards")
    scenes, keys = [], set()
    while len(scenes) < HELDOUT_SCENES + HELDOUT_CARDS:
        if len(scenes) < HELDOUT_SCENES:
            scene = sample_scene(rng)
        else:
            scene = sample_card(card_rng, ("digit", "word")[len(scenes) % 2])
        if scene.key not in keys:
            keys.add(scene.key)
            scenes.append(scene)
    return tuple(scenes)


@lru_cache(maxsize=1)
def _heldout_keys() -> frozenset:
    return frozenset(s.key for s in _heldout_scenes())


@lru_cache(maxsize=4)
def _heldout_prompts(image_size: int) -> tuple[TestbedPrompt, ...]:
    prompts = []
    rng = random.Random(_HELDOUT_SEED + "-text")
    for scene in _heldout_scenes():
        image = render_scene(scene, image_size)
        turns = [short_turn(scene, c, rng) for c in SHORT_CATEGORIES + CARD_CATEGORIES] + [
            caption_turn(scene, rng),
            long_turn(scene, rng),
        ]
        for t in turns:
            if t is not None:
                kind = "long" if t.category == "long" else "short"
                prompts.append(TestbedPrompt(image, t.question, kind, t.answer, t.category, t.key, scene))
    return tuple(prompts)


def heldout_prompts(
    kind: str | None = None, n: int | None = None, *, image_size: int = DEFAULT_IMAGE_SIZE, cards: bool = False
) -> list[TestbedPrompt]:
    """The fixed held-out prompt set (the same on every machine), optionally filtered by `kind` and cut to `n`.

    Args:
        kind (`str`, *optional*): "short" or "long"; None keeps both.
        n (`int`, *optional*): keep the first `n` prompts (scenes come in a fixed order).
        image_size (`int`): side of the rendered images in pixels; the testbed's own size by default.
        cards (`bool`): also the `HELDOUT_CARDS` digit and word cards, after the shape scenes (for a testbed
            built with `card_share > 0`).
    """
    if kind not in (None, "short", "long"):
        raise ValueError(f"kind must be None, 'short' or 'long', got {kind!r}")
    prompts = [
        p for p in _heldout_prompts(image_size) if (kind is None or p.kind == kind) and (cards or p.scene.text is None)
    ]
    return prompts if n is None else prompts[:n]


def sample_conversation(
    seed: int,
    index: int,
    *,
    with_long: bool,
    image_size: int = DEFAULT_IMAGE_SIZE,
    max_short: int = 8,
    card_share: float = 0.0,
) -> Conversation:
    """The `index`-th training conversation of `seed`: about a card (a digit or a word) with odds `card_share`,
    else about shapes; up to `max_short` short turns (at least `max_short // 2` about shapes), maybe a caption,
    maybe a long description.

    Deterministic in `(seed, index, card_share > 0)`; the scene is redrawn while it coincides with a held-out
    scene.
    """
    rng = random.Random(f"specvlm-testbed-train-{seed}-{index}")
    sample = sample_card if card_share > 0 and rng.random() < card_share else sample_scene
    scene = sample(rng)
    while scene.key in _heldout_keys():
        scene = sample(rng)
    turns = conversation(scene, rng, with_long=with_long, n_short=rng.randint(max_short // 2, max_short))
    return Conversation(render_scene(scene, image_size), tuple(turns), scene)


def training_conversations(
    n: int,
    seed: int = 0,
    *,
    long_fraction: float = 0.5,
    image_size: int = DEFAULT_IMAGE_SIZE,
    card_share: float = 0.0,
) -> Iterator[Conversation]:
    """`n` conversations from the testbed's training distribution. Each turn is an independent question about the
    image (the target is trained on every turn as a single-turn prompt), so `(conv.image, turn.question,
    turn.answer)` are (image, question, answer) triples; `card_share` of them are about a digit or word card. Use a
    seed other than the testbed's own for fresh data."""
    rng = random.Random(f"specvlm-testbed-long-{seed}")
    for index in range(n):
        with_long = rng.random() < long_fraction
        yield sample_conversation(seed, index, with_long=with_long, image_size=image_size, card_share=card_share)


def export_llava_jsonl(
    out_dir: str | Path, n: int, seed: int = 0, *, image_size: int = DEFAULT_IMAGE_SIZE, card_share: float = 0.0
) -> Path:
    """Writes `n` training conversations in LLaVA's format under `out_dir`: `images/*.png` and `data.jsonl`, one
    line per (image, question, answer) triple, e.g. `{"image": "images/000000.png", "conversations":
    [{"from": "human", "value": "<image>\n..."}, {"from": "gpt", "value": "..."}]}`. Returns the JSONL path."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    path = out_dir / "data.jsonl"
    with path.open("w") as f:
        for i, conv in enumerate(training_conversations(n, seed, image_size=image_size, card_share=card_share)):
            rel = f"images/{i:06d}.png"
            conv.image.save(out_dir / rel)
            for turn in conv.turns:
                turns = [
                    {"from": "human", "value": "<image>\n" + turn.question},
                    {"from": "gpt", "value": turn.answer},
                ]
                f.write(json.dumps({"image": rel, "conversations": turns}) + "\n")
    return path
