"""Online-logit distillation of a draft against its live, frozen target (SpecVLM §3.5): a TRL-style config/trainer
pair on `transformers.Trainer`, so single-GPU, multi-GPU (`accelerate launch`, torchrun) and DeepSpeed/FSDP runs need
no code of their own."""

from .config import DistillationConfig
from .data import (
    ConversationRow,
    DistillationCollator,
    DistillationDataset,
    RowEncoder,
    load_rows,
    read_llava_jsonl,
    rows_from_dataset,
)
from .losses import DistillationLoss, distillation_loss, feature_loss, soft_cross_entropy
from .pipeline import train_draft
from .selfdistill import regenerate_answers, write_llava_jsonl
from .trainer import DistillationTrainer

__all__ = [
    "ConversationRow",
    "DistillationCollator",
    "DistillationConfig",
    "DistillationDataset",
    "DistillationLoss",
    "DistillationTrainer",
    "RowEncoder",
    "distillation_loss",
    "feature_loss",
    "load_rows",
    "read_llava_jsonl",
    "regenerate_answers",
    "rows_from_dataset",
    "soft_cross_entropy",
    "train_draft",
    "write_llava_jsonl",
]
