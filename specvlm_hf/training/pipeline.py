"""`train_draft`: from a target, rows and a `DistillationConfig` to a trained, saved draft and its scaling curve,
resuming from the last checkpoint in the output directory when there is one."""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path

from transformers.trainer_callback import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..hub import create_model_card, hub_id_or_none
from ..lora import write_adapter_card, write_record
from ..modeling_draft import SpecVLMDraftModel
from ..peft_wrappers import is_peft_model, unwrap_peft
from .config import DistillationConfig
from .data import ConversationRow, DistillationCollator, DistillationDataset, RowEncoder
from .evaluation import AcceptanceCallback
from .trainer import DistillationTrainer

logger = logging.getLogger(__name__)


def eval_inputs(processor, rows: list[ConversationRow]) -> list[dict]:
    """Generation prompts (first question of each row) as processor outputs."""
    from .data import messages_for, open_image

    prompts = []
    for row in rows:
        image = open_image(row.image, row.source)
        text = processor.apply_chat_template(
            messages_for([(row.turns[0][0], None)], image is not None), tokenize=False, add_generation_prompt=True
        )
        prompts.append(dict(processor(text=text, images=image, return_tensors="pt")))
    return prompts


def last_complete_checkpoint(output_dir: str | Path) -> str | None:
    """
    The newest `checkpoint-<step>` folder in `output_dir` that a resume can use, or None. The main process writes a
    checkpoint's `trainer_state.json` last, after the weights, optimizer and scheduler, so a folder without a readable
    one is the remains of a killed save (`kill -9`, preemption) and is passed over with a warning.
    """
    steps = {}
    for folder in Path(output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        match = re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", folder.name)
        if match and folder.is_dir():
            steps[folder] = int(match[1])
    for folder in sorted(steps, key=steps.get, reverse=True):
        try:
            json.loads((folder / "trainer_state.json").read_text())
        except (OSError, ValueError):
            logger.warning("skipping %s: incomplete (no readable trainer_state.json)", folder)
            continue
        return str(folder)
    return None


def train_draft(
    target,
    processor,
    rows: list[ConversationRow],
    args: DistillationConfig,
    *,
    eval_prompts: list[dict] | None = None,
    draft: SpecVLMDraftModel | None = None,
    target_name: str | None = None,
    training_command: str | None = None,
    callbacks: list[TrainerCallback] | None = None,
) -> tuple[SpecVLMDraftModel, dict]:
    """
    Trains `draft` (a fresh `SpecVLMDraftModel.from_target(target)` by default) on `rows` against the frozen
    `target`, saves it to `args.output_dir` with `save_pretrained`, and returns it with a summary. A draft wrapped
    with a LoRA adapter (`lora.add_lora`) trains and saves the adapter alone, with the record `lora.load_lora_draft`
    checks. The target may be peft-wrapped (a fine-tune).

    A checkpoint already in `args.output_dir` (from an interrupted run) is resumed: model, optimizer, scheduler, RNG
    and data position, so nothing is lost beyond the last complete save (`last_complete_checkpoint`). `target_name`
    is what the model card calls the target (the card's `base_model` when it is a Hub id; the target's
    `_name_or_path` by default), `training_command` the command the card records, and `callbacks` are added to the
    trainer's.
    """
    draft = draft if draft is not None else SpecVLMDraftModel.from_target(target)
    if draft.target is not unwrap_peft(target):
        draft.bind(target)
    max_length = args.max_length or target.config.get_text_config().max_position_embeddings
    dataset = DistillationDataset(rows, RowEncoder(processor, max_length), fail_fast=args.fail_fast)
    callback = AcceptanceCallback(target, eval_prompts or [], args)
    trainer = DistillationTrainer(
        model=draft,
        target=target,
        args=args,
        train_dataset=dataset,
        data_collator=DistillationCollator(processor.tokenizer.pad_token_id),
        callbacks=[callback, *(callbacks or [])],
    )
    last = last_complete_checkpoint(args.output_dir)
    if last:
        logger.warning("resuming from %s", last)
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=last)
    wall = time.perf_counter() - start
    trainer.save_model(args.output_dir)
    summary = {
        "rows": len(rows),
        "rows_used": len(dataset),
        "rows_skipped": dict(dataset.skipped),
        "steps": trainer.state.global_step,
        "epochs": args.num_train_epochs,
        "train_loss": result.training_loss,
        "lambda_logit": args.lambda_logit,
        "lambda_feat": args.lambda_feat,
        "wall_seconds": round(wall, 1),
        "curve": [p.__dict__ for p in callback.points],
        "resumed_from": last,
    }
    if trainer.branch_totals or trainer._branches:
        summary["compressor_branches"] = dict(trainer.branch_totals + trainer._branches)
    if trainer.is_world_process_zero():
        (Path(args.output_dir) / "training_summary.json").write_text(json.dumps(summary, indent=2))
        target_name = target_name or getattr(target.config, "_name_or_path", "") or target.config.model_type
        if is_peft_model(draft):  # only the adapter was trained and saved
            base = draft.get_base_model().name_or_path or None  # "" for a draft never saved
            local = base is not None and Path(base).exists()
            record = write_record(draft, args.output_dir, str(Path(base).resolve()) if local else base)
            write_adapter_card(args.output_dir, record, summary, target_name, training_command)
            return draft, summary
        card = create_model_card(
            args.output_dir,
            target_name=target_name,
            base_model=hub_id_or_none(target_name),
            repo_id=args.hub_model_id,
            training_command=training_command,
        )
        card.save(Path(args.output_dir) / "README.md")
    return draft, summary
