"""A fine-tuned variant of the testbed target, for the study of drafts on fine-tunes (README "Fine-tuned targets"):
a LoRA adapter that teaches the target another way to describe an image, the *inventory* style, which walks the
3 x 3 grid cell by cell ("Top left: a large red circle. Top middle: empty. ..."), while its other answers keep
their wording. A draft distilled against the base target has learnt the base's long descriptions, so on the fine-tune
its long-answer acceptance drops; that is what a draft's own LoRA adapter (`specvlm-hf train --lora`) recovers.

`specvlm-hf testbed finetune --output DIR` writes `DIR/adapter` (the target's adapter, loadable with
`PeftModel.from_pretrained(target, DIR/adapter)` or `--target-adapter`), `DIR/data/data.jsonl` (fresh rows in the
fine-tune's style, for distilling drafts against it) and `DIR/finetune.json` (recipe, time, and how many held-out
long answers came out in the new style).
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .grammar import POSITIONS
from .scenes import DIGITS, GRID, Scene

# The language model's projections and the multimodal projector get LoRA; the vision tower stays as trained.
TARGET_LORA_MODULES = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
STYLE_PREFIX = "Seen as a three by three grid, cell by cell"


def _number(n: int) -> str:
    return DIGITS[n]


def inventory_answer(scene: Scene) -> str:
    """The fine-tune's long description of `scene`: every grid cell in reading order, then a total."""
    if scene.text is not None:
        text = scene.text
        kind = "digit" if text.kind == "digit" else "word"
        return (
            f"Seen as a card, the picture has one {kind}. The card reads {text.content}, written in "
            f"{text.colour}. Nothing else is drawn on it."
        )
    cells = {(o.row, o.col): o for o in scene.objects}
    parts = [f"{STYLE_PREFIX}:"]
    for row in range(GRID):
        for col in range(GRID):
            name = POSITIONS[row][col]
            obj = cells.get((row, col))
            label = name[0].upper() + name[1:]
            parts.append(f"{label}: {'empty' if obj is None else f'a {obj.size} {obj.colour} {obj.shape}'}.")
    colours = sorted({o.colour for o in scene.objects})
    count = len(scene.objects)
    parts.append(
        f"The picture has {_number(count)} shape{'s' if count > 1 else ''} in {_number(len(colours))} "
        f"colour{'s' if len(colours) > 1 else ''}."
    )
    return " ".join(parts)


def restyled_rows(n: int, seed: int, image_dir: Path, card_share: float = 0.0):
    """Single-turn rows from `n` testbed conversations of `seed`: each long description in the inventory style,
    the caption and one short question as the base target answers them. Images are written under `image_dir`."""
    from ..training.data import ConversationRow
    from .dataset import training_conversations

    image_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    conversations = training_conversations(n, seed, long_fraction=0.7, card_share=card_share)
    for index, conv in enumerate(conversations):
        image = image_dir / f"{index:06d}.png"
        conv.image.save(image)
        short = [t for t in conv.turns if t.category not in ("long", "caption")]
        for turn in conv.turns:
            if turn.category == "long":
                rows.append(ConversationRow(str(image), [(turn.question, inventory_answer(conv.scene))], f"{index}"))
            elif turn.category == "caption" or (short and turn is short[0]):
                rows.append(ConversationRow(str(image), [(turn.question, turn.answer)], f"{index}"))
    return rows


def finetune_target(target, processor, rows, *, steps: int, batch_size: int, lr: float, r: int, alpha: int, seed: int):
    """
    Wraps `target` in a fresh LoRA adapter (`TARGET_LORA_MODULES`) and trains it on `rows` by next-token cross
    entropy on the answer tokens (AdamW, cosine schedule, float32). Returns `(peft_model, losses)`.
    """
    from peft import LoraConfig, get_peft_model

    from ..training.data import DistillationCollator, DistillationDataset, RowEncoder

    torch.manual_seed(seed)
    model = get_peft_model(target, LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGET_LORA_MODULES))
    dataset = DistillationDataset(rows, RowEncoder(processor, target.config.get_text_config().max_position_embeddings))
    collate = DistillationCollator(processor.tokenizer.pad_token_id)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * s / steps)).item())
    )
    order = random.Random(seed)
    indices: list[int] = []
    losses = []
    model.train()
    for _ in range(steps):
        if len(indices) < batch_size:
            indices += order.sample(range(len(dataset)), len(dataset))
        batch = collate([dataset[i] for i in indices[:batch_size]])
        del indices[:batch_size]
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch.get("pixel_values"),
        ).logits
        answer = batch["loss_mask"][:, 1:]
        loss = F.cross_entropy(logits[:, :-1][answer].float(), batch["input_ids"][:, 1:][answer])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return model.eval(), losses


def style_share(model, processor, n: int = 8, max_new_tokens: int = 40) -> float:
    """The share of `n` held-out long prompts whose greedy answer starts in the inventory style (a shape scene's
    opening; the held-out long prompts are all shape scenes)."""
    from .dataset import heldout_prompts

    hits = 0
    for prompt in heldout_prompts(kind="long", n=n):
        inputs = prompt.inputs(processor)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        text = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        hits += text.strip().startswith(STYLE_PREFIX)
    return hits / n


def build_finetune(
    output: str | Path,
    *,
    rows: int = 1500,
    data_rows: int = 4000,
    steps: int = 300,
    batch_size: int = 8,
    lr: float = 2e-3,
    r: int = 8,
    alpha: int = 16,
    seed: int = 0,
) -> dict:
    """Fine-tunes the testbed target (see the module docstring) and writes `output`; returns the record."""
    from ..training.selfdistill import write_llava_jsonl
    from . import load_testbed, resolve
    from .store import card_share

    output = Path(output)
    target, processor = load_testbed()
    share = card_share(resolve()[0])
    train_rows = restyled_rows(rows, 100 + seed, output / "finetune_data" / "images", share)
    start = time.perf_counter()
    model, losses = finetune_target(
        target, processor, train_rows, steps=steps, batch_size=batch_size, lr=lr, r=r, alpha=alpha, seed=seed
    )
    seconds = time.perf_counter() - start
    model.save_pretrained(output / "adapter")
    draft_rows = restyled_rows(data_rows, 200 + seed, output / "data" / "images", share)
    write_llava_jsonl(draft_rows, output / "data" / "data.jsonl")
    record = {
        "recipe": dict(rows=rows, steps=steps, batch_size=batch_size, lr=lr, r=r, alpha=alpha, seed=seed),
        "train_seconds": round(seconds, 1),
        "loss_first_last": [round(sum(losses[:10]) / 10, 4), round(sum(losses[-10:]) / 10, 4)],
        "adapter_bytes": sum(f.stat().st_size for f in (output / "adapter").iterdir()),
        "heldout_long_in_new_style": style_share(model, processor),
        "draft_rows": len(draft_rows),
    }
    (output / "finetune.json").write_text(json.dumps(record, indent=2))
    return record
