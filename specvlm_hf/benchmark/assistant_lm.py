"""The `hf-assisted` baseline's assistant: a small text-only `LlamaForCausalLM` on the target's vocabulary, trained with
`transformers.Trainer` on the answers of the target's training distribution (the testbed's conversations by default).

It sees exactly what transformers' assisted decoding feeds it: the target's `input_ids`, image placeholders included
(expanded as the processor expands them), never the pixels. Its token embedding and output layer start as copies of
the target's, like the draft's borrowed ones; its decoder layers start random. The default budget (`AssistantConfig`:
2 layers, at most 600 steps of 16 conversations or 5 minutes) is of the order of the draft's training budget on 2 CPU
cores; it is saved with `save_pretrained` plus `assistant.json` (what it was trained on, for how long).

Rebuild: `python -m specvlm_hf.benchmark.assistant_lm --output DIR` (or `specvlm-hf bench --rebuild-assistant`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from PIL import Image
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from ..adapters import get_adapter

logger = logging.getLogger(__name__)

RECORD = "assistant.json"

# (question, answer) turns of one conversation; the first question comes with the image when `has_image`.
Conversation = tuple[bool, Sequence[tuple[str, str]]]


@dataclass(frozen=True)
class AssistantConfig:
    """
    Args:
        num_hidden_layers (`int`): decoder layers (width, heads and MLP follow the target's text model).
        conversations (`int`): training conversations drawn from the data source.
        max_steps (`int`), batch_size (`int`), learning_rate (`float`), warmup_steps (`int`): the optimisation.
        time_budget_s (`float`): training stops after this many seconds even before `max_steps`.
        max_length (`int`): tokens per training sequence (longer conversations are cut).
        seed (`int`): seed of the data (not the testbed's own) and of the initialisation.
        bf16 (`bool`): bfloat16 autocast during training.
        save_bf16 (`bool`): store the weights in bfloat16; `load_assistant` casts them to the dtype asked for.
    """

    num_hidden_layers: int = field(default=2, metadata={"help": "Decoder layers."})
    conversations: int = field(default=6000, metadata={"help": "Training conversations."})
    max_steps: int = field(default=600, metadata={"help": "Optimizer steps at most."})
    batch_size: int = field(default=16, metadata={"help": "Conversations per step."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak AdamW learning rate (cosine decay)."})
    warmup_steps: int = field(default=20, metadata={"help": "Linear warm-up steps."})
    time_budget_s: float = field(default=300.0, metadata={"help": "Training stops after this many seconds."})
    max_length: int = field(default=768, metadata={"help": "Tokens per training sequence."})
    seed: int = field(default=1, metadata={"help": "Data and initialisation seed."})
    bf16: bool = field(default=False, metadata={"help": "bfloat16 autocast while training."})
    save_bf16: bool = field(default=False, metadata={"help": "Store the weights in bfloat16 (half the bytes)."})


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the vocabulary: an assistant is valid for any target with the same token ids."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    return hashlib.sha256(vocab.encode()).hexdigest()[:16]


def default_assistant_dir(tokenizer) -> Path:
    """`$XDG_CACHE_HOME/specvlm_hf/assistant/<tokenizer fingerprint>` (or under `~/.cache`)."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "specvlm_hf" / "assistant" / tokenizer_fingerprint(tokenizer)


def assistant_conversations(n: int, seed: int, testbed_dir: str | Path | None = None) -> list[Conversation]:
    """`n` conversations of the training distribution of the testbed at `testbed_dir` (default: the resolved one),
    with its share of digit and word cards; `seed` other than the testbed's own."""
    from ..testbed.dataset import training_conversations
    from ..testbed.store import card_share, resolve

    conversations = training_conversations(n, seed, card_share=card_share(resolve(testbed_dir)[0]))
    return [(True, [(t.question, t.answer) for t in conv.turns]) for conv in conversations]


def image_token_count(processor) -> int:
    """How many placeholder tokens the processor puts in place of one image."""
    image_token = processor.image_token
    size = getattr(processor.image_processor, "crop_size", None) or processor.image_processor.size
    side = size.get("height") or size.get("shortest_edge")
    ids = processor(images=Image.new("RGB", (side, side)), text=image_token, return_tensors="pt")["input_ids"][0]
    return int((ids == processor.tokenizer.convert_tokens_to_ids(image_token)).sum())


def encode_conversation(processor, image_tokens: int, conversation: Conversation, max_length: int) -> dict | None:
    """
    `input_ids` of a whole conversation in the target's chat format (image placeholders expanded) and `labels` that
    are -100 except on the answers and their end-of-turn tokens. `None` if a turn boundary splits a token.
    """
    has_image, turns = conversation
    tokenizer = processor.tokenizer
    image_token = processor.image_token

    def ids(text: str) -> list[int]:
        return tokenizer(text.replace(image_token, image_token * image_tokens))["input_ids"]

    messages, spans = [], []
    for i, (question, answer) in enumerate(turns):
        content = ([{"type": "image"}] if has_image and i == 0 else []) + [{"type": "text", "text": question}]
        messages.append({"role": "user", "content": content})
        prefix = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        spans.append((prefix, processor.apply_chat_template(messages, tokenize=False)))
    input_ids = ids(spans[-1][1])
    labels = [-100] * len(input_ids)
    for prefix, full in spans:
        start, full_ids = len(ids(prefix)), ids(full)
        if input_ids[: len(full_ids)] != full_ids:
            return None
        labels[start : len(full_ids)] = input_ids[start : len(full_ids)]
    return {"input_ids": input_ids[:max_length], "labels": labels[:max_length]}


def _collate(pad_id: int):
    def collate(batch: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(b["input_ids"]) for b in batch)
        out = {"input_ids": [], "labels": [], "attention_mask": []}
        for b in batch:
            pad = width - len(b["input_ids"])
            out["input_ids"].append(b["input_ids"] + [pad_id] * pad)
            out["labels"].append(b["labels"] + [-100] * pad)
            out["attention_mask"].append([1] * len(b["input_ids"]) + [0] * pad)
        return {k: torch.tensor(v) for k, v in out.items()}

    return collate


class _TimeBudget(TrainerCallback):
    def __init__(self, seconds: float):
        self.seconds = seconds
        self.start = time.monotonic()

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        if time.monotonic() - self.start > self.seconds:
            control.should_training_stop = True


def init_assistant(target, tokenizer, config: AssistantConfig) -> LlamaForCausalLM:
    """A `LlamaForCausalLM` shaped like the target's text model but `num_hidden_layers` deep, with copies of the
    target's token embedding and `lm_head`."""
    adapter = get_adapter(target)
    llama = LlamaConfig(
        **adapter.decoder_shape(),
        num_hidden_layers=config.num_hidden_layers,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(config.seed)
    model = LlamaForCausalLM(llama)
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(adapter.embed_tokens.weight.float())
        model.lm_head.weight.copy_(adapter.lm_head.weight.float())
    return model


def build_assistant(
    target, processor, conversations: Iterable[Conversation], output_dir: str | Path, config: AssistantConfig
) -> LlamaForCausalLM:
    """Trains the assistant on `conversations` and saves it (weights + `assistant.json`) atomically to `output_dir`."""
    output_dir = Path(output_dir)
    image_tokens = image_token_count(processor)
    encoded = [encode_conversation(processor, image_tokens, c, config.max_length) for c in conversations]
    dataset = [e for e in encoded if e is not None]
    if not dataset:
        raise ValueError("no usable training conversation for the assistant")
    model = init_assistant(target, processor.tokenizer, config)
    device = get_adapter(target).lm_head.weight.device
    budget = _TimeBudget(config.time_budget_s)
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as scratch:
        args = TrainingArguments(
            output_dir=scratch,
            max_steps=config.max_steps,
            per_device_train_batch_size=config.batch_size,
            learning_rate=config.learning_rate,
            warmup_steps=config.warmup_steps,
            lr_scheduler_type="cosine",
            adam_beta2=0.95,
            logging_steps=max(1, config.max_steps // 10),
            save_strategy="no",
            report_to="none",
            seed=config.seed,
            bf16=config.bf16,
            use_cpu=device.type == "cpu",
            disable_tqdm=True,
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=dataset,
            data_collator=_collate(processor.tokenizer.pad_token_id or 0),
            callbacks=[budget],
        )
        result = trainer.train()
    record = {
        "tokenizer_fingerprint": tokenizer_fingerprint(processor.tokenizer),
        "config": asdict(config),
        "conversations": len(dataset),
        "steps": trainer.state.global_step,
        "seconds": round(time.monotonic() - start, 1),
        "train_loss": result.training_loss,
        "device": str(device),
    }
    model = model.eval()
    if config.save_bf16:
        model = model.to(torch.bfloat16)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.building-", dir=output_dir.parent))
    try:
        model.save_pretrained(tmp)
        (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")
        if output_dir.exists():
            shutil.rmtree(output_dir)
        tmp.rename(output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info(
        "assistant trained: %d steps in %.0f s, loss %.3f -> %s",
        record["steps"],
        record["seconds"],
        record["train_loss"],
        output_dir,
    )
    return model


def load_assistant(path: str | Path, target, dtype: torch.dtype | None = None) -> LlamaForCausalLM:
    """Loads an assistant and checks it shares the target's vocabulary size; moved to the target's device."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    vocab = get_adapter(target).lm_head.weight.shape[0]
    if model.config.vocab_size != vocab:
        raise ValueError(f"assistant at {path} has a vocabulary of {model.config.vocab_size}, the target {vocab}")
    return model.to(get_adapter(target).lm_head.weight.device).eval()


def read_record(path: str | Path) -> dict | None:
    record = Path(path) / RECORD
    return json.loads(record.read_text()) if record.is_file() else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train the hf-assisted baseline's assistant on the testbed.")
    parser.add_argument("--output", help="Directory to save it to (default: the benchmark's cache directory).")
    parser.add_argument("--testbed", help="Testbed directory (default: load_testbed's resolution).")
    for f in AssistantConfig.__dataclass_fields__.values():
        kind = (lambda s: s.lower() in ("1", "true", "yes")) if f.type in (bool, "bool") else type(f.default)
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=f.default, help=f.metadata["help"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from ..testbed import load_testbed

    config = AssistantConfig(**{k: getattr(args, k) for k in AssistantConfig.__dataclass_fields__})
    target, processor = load_testbed(args.testbed)
    output = args.output or default_assistant_dir(processor.tokenizer)
    conversations = assistant_conversations(config.conversations, config.seed, args.testbed)
    build_assistant(target, processor, conversations, output, config)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
