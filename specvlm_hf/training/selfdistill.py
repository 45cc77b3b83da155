"""Self-distillation data: the same prompts with every answer replaced by the target's own answer: greedy, which is
exactly what the draft must predict at T = 0 (ViSpec, MASSV), or sampled at a temperature, whose contexts are the ones
the draft meets when decoding samples at that temperature. Regenerated text is cached as LLaVA JSONL."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .data import ConversationRow, messages_for, open_image


@torch.no_grad()
def regenerate_answers(
    target,
    processor,
    rows: list[ConversationRow],
    *,
    max_new_tokens: int = 256,
    batch_size: int = 16,
    progress: bool = True,
    draft=None,
    temperature: float = 0.0,
    seed: int = 0,
) -> list[ConversationRow]:
    """
    Replaces each answer, turn by turn, with the target's continuation of the conversation so far (earlier answers
    already regenerated): greedy at `temperature` 0, else sampled from the target's whole distribution at that
    temperature (no top-k or top-p), each batch drawn from torch's generator seeded with `seed` and the batch's
    index, so a run regenerates the same answers. Batched with left padding; rows without an image are batched
    separately. With a `draft` of the target (`SpecVLMDraftModel`), rows are decoded one at a time by
    `generate(assistant_model=draft)` instead: the target's own answers (lossless at any temperature), several
    times faster on CPU than padded batches.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be 0 (greedy) or positive, got {temperature}")
    decoding = (
        dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature else {"do_sample": False}
    )
    if draft is not None:
        batch_size = 1
    tokenizer = processor.tokenizer
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    new_turns = [[] for _ in rows]
    todo = [(i, t) for t in range(max(len(r.turns) for r in rows)) for i, r in enumerate(rows) if t < len(r.turns)]
    bar = tqdm(total=len(todo), desc="self-distillation answers", disable=not progress)
    batch_index = 0
    try:
        for turn in range(max(len(r.turns) for r in rows)):
            for with_image in (True, False):
                ids = [i for i, r in enumerate(rows) if turn < len(r.turns) and (r.image is not None) == with_image]
                for start in range(0, len(ids), batch_size):
                    chunk = ids[start : start + batch_size]
                    texts, images = [], []
                    for i in chunk:
                        history = new_turns[i] + [(rows[i].turns[turn][0], None)]
                        texts.append(processor.apply_chat_template(
                            messages_for(history, with_image), tokenize=False, add_generation_prompt=True
                        ))  # fmt: skip
                        if with_image:
                            images.append(open_image(rows[i].image, rows[i].source))
                    inputs = processor(text=texts, images=images or None, return_tensors="pt", padding=True)
                    inputs = inputs.to(target.device)
                    extra = {} if draft is None else {"assistant_model": draft}
                    if temperature:
                        torch.manual_seed(seed * 1_000_003 + batch_index)
                    batch_index += 1
                    out = target.generate(**inputs, max_new_tokens=max_new_tokens, **decoding, **extra)
                    answers = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
                    for i, answer in zip(chunk, answers):
                        new_turns[i].append((rows[i].turns[turn][0], answer.strip()))
                    bar.update(len(chunk))
    finally:
        tokenizer.padding_side = padding_side
        bar.close()
    return [ConversationRow(r.image, turns, r.source) for r, turns in zip(rows, new_turns)]


def write_llava_jsonl(rows: list[ConversationRow], path: str | Path) -> Path:
    """Writes rows whose images are files as LLaVA JSONL (absolute image paths)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            if row.image is not None and not isinstance(row.image, (str, Path)):
                raise ValueError(f"{row.source}: only rows with image files can be written to JSONL")
            conversations = []
            for index, (question, answer) in enumerate(row.turns):
                prefix = "<image>\n" if index == 0 and row.image is not None else ""
                conversations += [{"from": "human", "value": prefix + question}, {"from": "gpt", "value": answer}]
            record = {"image": str(Path(row.image).resolve()) if row.image else None, "conversations": conversations}
            handle.write(json.dumps(record) + "\n")
    return path
