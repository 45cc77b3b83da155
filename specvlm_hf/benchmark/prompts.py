"""Benchmark prompts: the testbed's held-out set (default), a local JSONL with images (LLaVA's conversation format or a
simple `{"image", "prompt"}` form), or a `datasets` dataset; and their conversion to model inputs.

JSONL rows (image paths relative to `image_root`, by default the file's folder; a row without "image" is text-only):
    {"image": "img/0.png", "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
                                             {"from": "gpt", "value": "A red circle."}]}
    {"image": "img/0.png", "prompt": "What is this?", "reference": "A red circle.", "kind": "short"}
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import zip_longest
from pathlib import Path

import torch
from PIL import Image

DATASET_PREFIX = "datasets:"
_HUMAN_ROLES = ("human", "user")
_ASSISTANT_ROLES = ("gpt", "assistant")


class PromptFileError(ValueError):
    """A prompt source with bad rows; the message names every bad row (`path:line: reason`)."""


@dataclass(frozen=True)
class Prompt:
    """
    One benchmark prompt.

    Attributes:
        id (`str`): stable name (`file:line`, `heldout:index`, `dataset:row`).
        question (`str`): the user's text.
        image (`PIL.Image.Image`, *optional*): the image; `None` for a text-only prompt.
        kind (`str`): a label to group and balance samples by (the testbed's "short" / "long"; "" when unknown).
        reference (`str`, *optional*): a reference answer, kept for the record (not scored).
        messages (`tuple`, *optional*): chat messages to render; by default one user turn with the image then the text.
    """

    id: str
    question: str
    image: Image.Image | None = None
    kind: str = ""
    reference: str | None = None
    messages: tuple = field(default=(), repr=False)

    def chat(self) -> list[dict]:
        if self.messages:
            return list(self.messages)
        content = ([{"type": "image"}] if self.image is not None else []) + [{"type": "text", "text": self.question}]
        return [{"role": "user", "content": content}]

    def inputs(self, processor) -> dict[str, torch.Tensor]:
        """`input_ids`, `attention_mask` (and `pixel_values`) ending with the generation prompt."""
        text = processor.apply_chat_template(self.chat(), add_generation_prompt=True)
        images = [self.image] if self.image is not None else None
        return dict(processor(images=images, text=text, return_tensors="pt"))


@dataclass(frozen=True)
class Sample:
    """A prompt turned into model inputs on the benchmark's device. `inputs` go to `generate(**inputs)`."""

    id: str
    kind: str
    inputs: dict[str, torch.Tensor]

    @property
    def prompt_len(self) -> int:
        return self.inputs["input_ids"].shape[1]


def prepare_samples(prompts: Iterable[Prompt], processor, device: torch.device, dtype: torch.dtype) -> list[Sample]:
    """Processor outputs moved to `device` (pixel values cast to `dtype`)."""
    return [Sample(p.id, p.kind, _on_device(p.inputs(processor), device, dtype)) for p in prompts]


def _on_device(inputs: dict, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(device=device, dtype=dtype) if k == "pixel_values" else v.to(device) for k, v in inputs.items()}


@dataclass(frozen=True)
class Batch:
    """
    Prompts decoded together: the processor's left-padded inputs on the benchmark's device.

    Attributes:
        id (`str`): `batch<B>:<index>`.
        rows (`tuple[str, ...]`): each row's prompt id; a prompt repeated to fill the batch is `<id>#<n>` (its n-th
            appearance in the batch sweep).
    """

    id: str
    rows: tuple[str, ...]
    inputs: dict[str, torch.Tensor]


def batch_inputs(prompts: Sequence[Prompt], processor) -> dict[str, torch.Tensor]:
    """The processor's inputs for `prompts` as one batch, left-padded (the tokenizer's `padding_side` is restored
    afterwards): `input_ids`, `attention_mask` (and `pixel_values` of every row's image, in row order)."""
    texts = [processor.apply_chat_template(p.chat(), add_generation_prompt=True) for p in prompts]
    images = [p.image for p in prompts if p.image is not None] or None
    tokenizer = getattr(processor, "tokenizer", processor)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        return dict(processor(images=images, text=texts, padding=True, return_tensors="pt"))
    finally:
        tokenizer.padding_side = side


def prepare_batches(
    prompts: Sequence[Prompt], processor, batch_size: int, device: torch.device, dtype: torch.dtype
) -> list[Batch]:
    """`prompts` in order, in batches of `batch_size` rows; the last batch (or the only one, with fewer prompts than
    rows) is filled by cycling through the prompts again from the first. Pixel values are cast to `dtype`."""
    if not prompts:
        return []
    count = -(-len(prompts) // batch_size) * batch_size
    rows = [(prompts[i % len(prompts)], i // len(prompts)) for i in range(count)]
    batches = []
    for start in range(0, count, batch_size):
        chunk = rows[start : start + batch_size]
        inputs = _on_device(batch_inputs([p for p, _ in chunk], processor), device, dtype)
        ids = tuple(p.id if n == 0 else f"{p.id}#{n + 1}" for p, n in chunk)
        batches.append(Batch(f"batch{batch_size}:{start // batch_size}", ids, inputs))
    return batches


def select_prompts(prompts: Sequence[Prompt], n: int | None, kind: str | None = None) -> list[Prompt]:
    """
    Up to `n` prompts (all when `None`), optionally of one `kind`, taken round-robin across kinds in the source's
    order so that a short selection mixes short and long answers.
    """
    pool = [p for p in prompts if kind is None or p.kind == kind]
    if kind is None:
        groups: dict[str, list[Prompt]] = {}
        for p in pool:
            groups.setdefault(p.kind, []).append(p)
        pool = [p for row in zip_longest(*groups.values()) for p in row if p is not None]
    return pool if n is None else pool[:n]


def load_prompts(source: str | None = None, *, image_root: str | Path | None = None) -> list[Prompt]:
    """
    Args:
        source (`str`, *optional*): `None` or "testbed" (the testbed's held-out shape scenes), "testbed-cards"
            (its held-out digit and word cards), "testbed-text" (the shape scenes' questions without their images:
            text-only prompts, whose answers the testbed never learned to give), a `.jsonl` file, a folder holding a dataset saved with
            `save_to_disk`, or `"datasets:NAME[:SPLIT]"` (`datasets.load_dataset`).
        image_root (`str` or `Path`, *optional*): folder JSONL image paths are relative to (default: the file's).

    Raises:
        `PromptFileError` naming every bad row (line numbers for JSONL), `FileNotFoundError` for a missing source.
    """
    if source in (None, "testbed", "testbed-cards"):
        return heldout_set(cards=source == "testbed-cards")
    if source == "testbed-text":  # the same questions without their images: text-only prompts
        return [Prompt(f"{p.id}:text", p.question, None, p.kind, None) for p in heldout_set()]
    if source.startswith(DATASET_PREFIX):
        name, _, split = source[len(DATASET_PREFIX) :].partition(":")
        from datasets import load_dataset

        return dataset_prompts(load_dataset(name, split=split or "test"), name)
    path = Path(source)
    if path.is_dir():
        from datasets import load_from_disk

        dataset = load_from_disk(str(path))
        if hasattr(dataset, "keys"):  # a DatasetDict: its first split
            dataset = dataset[next(iter(dataset.keys()))]
        return dataset_prompts(dataset, path.name)
    if not path.is_file():
        raise FileNotFoundError(f"prompt source {source!r} is neither a file, a saved dataset nor 'datasets:NAME'")
    return jsonl_prompts(path, image_root=image_root)


def heldout_set(*, cards: bool = False) -> list[Prompt]:
    """The testbed's fixed held-out prompts about shape scenes, or with `cards` those about its digit and word
    cards, rendered with the testbed's own chat messages. Ids index `heldout_prompts(cards=True)`, where the cards
    follow the shape scenes, so a prompt keeps its id either way."""
    from ..testbed import heldout_prompts

    return [
        Prompt(f"heldout:{i}", p.question, p.image, p.kind, p.reference, tuple(p.messages()))
        for i, p in enumerate(heldout_prompts(cards=True))
        if (p.scene.text is not None) == cards
    ]


def _strip_image_tag(text: str) -> str:
    return text.replace("<image>", "").strip()


def _question_and_reference(row: dict) -> tuple[str, str | None]:
    if "conversations" in row:
        turns = row["conversations"]
        if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
            raise ValueError('"conversations" must be a list of {"from", "value"} objects')
        human = [t.get("value") for t in turns if t.get("from") in _HUMAN_ROLES]
        answers = [t.get("value") for t in turns if t.get("from") in _ASSISTANT_ROLES]
        if not human or not isinstance(human[0], str):
            raise ValueError('no human turn with a text value in "conversations"')
        return _strip_image_tag(human[0]), answers[0] if answers else None
    for key in ("prompt", "question"):
        if isinstance(row.get(key), str):
            return _strip_image_tag(row[key]), row.get("reference", row.get("answer"))
    raise ValueError('a row needs "conversations" or a "prompt" (or "question") string')


def _open_image(path: Path) -> Image.Image:
    if not path.is_file():
        raise ValueError(f"image not found: {path}")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except OSError as err:
        raise ValueError(f"unreadable image {path}: {err}") from err


def jsonl_prompts(path: str | Path, *, image_root: str | Path | None = None) -> list[Prompt]:
    """Reads a JSONL prompt file; raises `PromptFileError` listing every bad row as `path:line: reason`."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    prompts, errors = [], []
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            errors.append(f"{path}:{line_no}: malformed JSON ({err.msg} at column {err.colno})")
            continue
        try:
            if not isinstance(row, dict):
                raise ValueError(f"expected a JSON object, got {type(row).__name__}")
            question, reference = _question_and_reference(row)
            image = _open_image(root / row["image"]) if row.get("image") is not None else None
        except ValueError as err:
            errors.append(f"{path}:{line_no}: {err}")
            continue
        prompts.append(Prompt(f"{path.name}:{line_no}", question, image, str(row.get("kind", "")), reference))
    if errors:
        raise PromptFileError(f"{len(errors)} bad row(s) in {path}:\n" + "\n".join(errors))
    if not prompts:
        raise PromptFileError(f"{path}: no prompts")
    return prompts


def dataset_prompts(dataset, name: str) -> list[Prompt]:
    """Prompts from a `datasets.Dataset` with an "image" column (PIL images) and a "conversations", "prompt" or
    "question" column; bad rows are named by index."""
    prompts, errors = [], []
    for index, row in enumerate(dataset):
        try:
            question, reference = _question_and_reference(row)
            image = row.get("image")
            if image is not None and not isinstance(image, Image.Image):
                raise ValueError(f'"image" must be a PIL image (an Image feature), got {type(image).__name__}')
        except ValueError as err:
            errors.append(f"{name} row {index}: {err}")
            continue
        image = image.convert("RGB") if image is not None else None
        prompts.append(Prompt(f"{name}:{index}", question, image, str(row.get("kind") or ""), reference))
    if errors:
        raise PromptFileError(f"{len(errors)} bad row(s) in dataset {name}:\n" + "\n".join(errors))
    return prompts
