"""Training data for the draft: (image, conversation) rows from a LLaVA-format JSONL + image folder or a `datasets`
dataset, encoded with the target's own processor and chat template, with a loss mask over the assistant answers.
Bad rows (missing/unreadable image, empty answer, too long) are skipped and counted, or fail fast naming the row."""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

logger = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<image>"
# processor outputs with one entry per token (padded like input_ids in a batch)
PER_TOKEN_INPUTS = ("mm_token_type_ids",)


@dataclass
class ConversationRow:
    """One training example: an optional image and its (question, answer) turns. `source` names it in messages."""

    image: str | Image.Image | None
    turns: list[tuple[str, str]]
    source: str = ""


class BadRow(ValueError):
    """A row that cannot be trained on; `reason` is its category for the skip counts."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def _parse_llava_record(record: dict, image_root: Path | None, source: str) -> ConversationRow:
    conversations = record.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise BadRow("malformed row", f"{source} has no 'conversations' list")
    turns, question = [], None
    for message in conversations:
        speaker, value = message.get("from"), message.get("value")
        if not isinstance(value, str):
            raise BadRow("malformed row", f"{source} has a message without a text 'value'")
        if speaker in ("human", "user"):
            question = value
        elif speaker in ("gpt", "assistant") and question is not None:
            turns.append((question, value))
            question = None
    if not turns:
        raise BadRow("malformed row", f"{source} has no human/gpt turn pair")
    image = record.get("image")
    if isinstance(image, str) and image_root is not None:
        image = str(image_root / image)
    return ConversationRow(image=image, turns=turns, source=source)


def read_llava_jsonl(
    path: str | Path, image_folder: str | Path | None = None
) -> tuple[list[ConversationRow], Counter]:
    """
    Reads `{"image": "rel/path.png", "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt",
    "value": "..."}, ...]}` lines; images resolve against `image_folder` (default: the file's folder).

    Returns:
        `(rows, problems)`: parsed rows, and a count of unparsable lines per reason (each logged with its line number).
    """
    path = Path(path)
    root = Path(image_folder) if image_folder is not None else path.parent
    rows, problems = [], Counter()
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            source = f"{path.name}:{number}"
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise BadRow("malformed row", f"{source} is not a JSON object")
                rows.append(_parse_llava_record(record, root, source))
            except json.JSONDecodeError as error:
                problems["malformed JSON"] += 1
                logger.warning("skipping %s: malformed JSON (%s)", source, error.msg)
            except BadRow as error:
                problems[error.reason] += 1
                logger.warning("skipping %s", error)
    return rows, problems


def rows_from_dataset(dataset, image_folder: str | Path | None = None) -> tuple[list[ConversationRow], Counter]:
    """Rows from a `datasets.Dataset` with LLaVA columns `image` (PIL image or path) and `conversations`."""
    root = Path(image_folder) if image_folder is not None else None
    rows, problems = [], Counter()
    for index, record in enumerate(dataset):
        try:
            rows.append(_parse_llava_record(dict(record), root, f"row {index}"))
        except BadRow as error:
            problems[error.reason] += 1
            logger.warning("skipping %s", error)
    return rows, problems


def load_rows(data: str | Path, image_folder: str | Path | None = None) -> tuple[list[ConversationRow], Counter]:
    """A `.jsonl` file, or a directory written by `datasets.Dataset.save_to_disk`."""
    path = Path(data)
    if path.is_file():
        return read_llava_jsonl(path, image_folder)
    if path.is_dir():
        import datasets

        return rows_from_dataset(datasets.load_from_disk(str(path)), image_folder)
    raise FileNotFoundError(f"Training data {data!r} is neither a .jsonl file nor a saved datasets directory.")


def messages_for(turns: list[tuple[str, str | None]], has_image: bool) -> list[dict]:
    """Chat messages in the processor's content-list format; the image goes with the first question."""
    messages = []
    for index, (question, answer) in enumerate(turns):
        text = question.replace(IMAGE_PLACEHOLDER, "").strip()
        content = ([{"type": "image"}] if has_image and index == 0 else []) + [{"type": "text", "text": text}]
        messages.append({"role": "user", "content": content})
        if answer is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def open_image(image: str | Image.Image | None, source: str) -> Image.Image | None:
    if image is None or isinstance(image, Image.Image):
        return image.convert("RGB") if image is not None else None
    try:
        with Image.open(image) as handle:
            return handle.convert("RGB")
    except (OSError, ValueError) as error:
        raise BadRow("missing or unreadable image", f"{source}: {image} ({error})") from error


class RowEncoder:
    """
    Encodes a row as the target sees it at inference: the processor's chat template, visual tokens expanded, and a
    mask that is True on assistant tokens (each answer, its leading space and its end-of-turn token).
    """

    def __init__(self, processor, max_length: int):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.max_length = max_length
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(
            getattr(processor, "image_token", IMAGE_PLACEHOLDER)
        )

    def _render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self.processor.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def encode(self, row: ConversationRow) -> dict:
        """
        Returns:
            `dict` with `input_ids` (`torch.LongTensor` of shape `(seq_len,)`), `loss_mask` (`torch.BoolTensor` of
            shape `(seq_len,)`) and the processor's other outputs for the target (`pixel_values`, and where the
            architecture has them `image_sizes`, `image_grid_thw`, `mm_token_type_ids` of shape `(seq_len,)`, ...).
        """
        if any(not answer.strip() for _, answer in row.turns):
            raise BadRow("empty answer", row.source)
        image = open_image(row.image, row.source)
        spans, text = [], ""
        for index in range(len(row.turns)):
            prefix = self._render(
                messages_for(row.turns[:index] + [(row.turns[index][0], None)], image is not None),
                add_generation_prompt=True,
            )
            text = self._render(messages_for(row.turns[: index + 1], image is not None))
            if not text.startswith(prefix):
                raise ValueError("The chat template does not render a conversation as its generation prompt + answer.")
            spans.append((len(prefix), len(text)))
        plain = self.tokenizer(text, return_offsets_mapping=True)
        is_answer = [any(a <= start < b for a, b in spans) and end > start for start, end in plain["offset_mapping"]]
        inputs = self.processor(text=text, images=image, return_tensors="pt")
        input_ids = inputs["input_ids"][0]
        ids, mask = plain["input_ids"], is_answer
        if image is not None:
            n_slots = ids.count(self.image_token_id)
            per_image = (len(input_ids) - len(ids)) // max(n_slots, 1) + 1
            expanded_ids, expanded_mask = [], []
            for token, answer in zip(ids, mask):
                repeat = per_image if token == self.image_token_id else 1
                expanded_ids += [token] * repeat
                expanded_mask += [answer] * repeat
            ids, mask = expanded_ids, expanded_mask
        if ids != input_ids.tolist():
            raise ValueError(f"{row.source}: the tokenizer and the processor disagree on this conversation's tokens.")
        if len(ids) > self.max_length:
            raise BadRow("longer than the target's context", f"{row.source} has {len(ids)} > {self.max_length} tokens")
        visual = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask") and v is not None}
        for key in PER_TOKEN_INPUTS:
            if key in visual:
                visual[key] = visual[key][0]
        return {"input_ids": input_ids, "loss_mask": torch.tensor(mask, dtype=torch.bool), **visual}


@dataclass
class DistillationDataset(Dataset):
    """Encoded rows; bad ones are skipped and counted in `skipped` (or raise at once with `fail_fast`)."""

    rows: list[ConversationRow]
    encoder: RowEncoder
    fail_fast: bool = False
    skipped: Counter = field(default_factory=Counter)

    def __post_init__(self):
        self.examples = []
        for row in self.rows:
            try:
                self.examples.append(self.encoder.encode(row))
            except BadRow as error:
                if self.fail_fast:
                    raise
                self.skipped[error.reason] += 1
                logger.warning("skipping %s", error)
        if self.skipped:
            logger.warning("skipped %d of %d rows: %s", sum(self.skipped.values()), len(self.rows), dict(self.skipped))
        if not self.examples:
            raise ValueError(f"No usable training rows (skipped: {dict(self.skipped)}).")

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        return self.examples[index]


@dataclass
class DistillationCollator:
    """Right-pads a batch: `input_ids`/`loss_mask`/`attention_mask` (and per-token inputs such as
    `mm_token_type_ids`) of shape `(batch, max_len)`; every other input of the rows that have it (`pixel_values`,
    `image_sizes`, `image_grid_thw`, ...) is concatenated along its first axis, zero-padded in the others where rows
    differ (LLaVA-NeXT's crop counts)."""

    pad_token_id: int

    def __call__(self, examples: list[dict]) -> dict:
        length = max(len(e["input_ids"]) for e in examples)
        input_ids = torch.full((len(examples), length), self.pad_token_id, dtype=torch.long)
        loss_mask = torch.zeros(len(examples), length, dtype=torch.bool)
        attention_mask = torch.zeros(len(examples), length, dtype=torch.long)
        for i, example in enumerate(examples):
            n = len(example["input_ids"])
            input_ids[i, :n] = example["input_ids"]
            loss_mask[i, :n] = example["loss_mask"]
            attention_mask[i, :n] = 1
        batch = {"input_ids": input_ids, "loss_mask": loss_mask, "attention_mask": attention_mask}
        for key in sorted({k for e in examples for k in e} - set(batch)):
            values = [e[key] for e in examples if e.get(key) is not None]
            if key in PER_TOKEN_INPUTS:
                padded = torch.zeros(len(examples), length, dtype=values[0].dtype)
                for i, example in enumerate(examples):
                    if example.get(key) is not None:
                        padded[i, : len(example[key])] = example[key]
                batch[key] = padded
            elif values:
                batch[key] = _concatenate_padded(values)
        return batch


def _concatenate_padded(tensors: list[torch.Tensor]) -> torch.Tensor:
    """`torch.cat` along the first axis after zero-padding every other axis to the largest size."""
    shape = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim())]
    padded = []
    for t in tensors:
        pad = []
        for d in reversed(range(1, t.dim())):
            pad += [0, shape[d - 1] - t.shape[d]]
        padded.append(F.pad(t, pad) if any(pad) else t)
    return torch.cat(padded)
