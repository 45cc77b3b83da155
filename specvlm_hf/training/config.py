"""`DistillationConfig`: `TrainingArguments` plus the online-distillation knobs (SpecVLM §3.5, EAGLE's loss)."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments


@dataclass
class DistillationConfig(TrainingArguments):
    """
    Training arguments for `DistillationTrainer`. Everything of `TrainingArguments` applies (precision, schedule,
    checkpoints, `accelerate launch` / torchrun / DeepSpeed / FSDP); the fields below are the distillation's own.

    Args:
        lambda_logit (`float`, defaults to 0.1): weight of the cross-entropy between the draft's and the target's
            next-token distributions.
        lambda_feat (`float`, defaults to 1.0): weight of the Smooth L1 regression of the target's features.
        feature_noise (`float`, defaults to 0.0): half-width of uniform noise added to the target features fed to
            the draft (EAGLE's augmentation against its own feature errors at depth > 1; 0 disables).
        max_length (`int`, *optional*): rows longer than this (tokens, image included) are skipped; defaults to the
            target's context length.
        fail_fast (`bool`, defaults to False): stop at the first bad row, naming it, instead of skipping and counting.
        eval_prompts (`int`, defaults to 16): held-out prompts for the per-epoch accepted-length measurement.
        eval_max_new_tokens (`int`, defaults to 128): tokens generated per held-out prompt.
        eval_depth, eval_top_k, eval_total_tokens (`int`): tree of that measurement (defaults 5, 4, 16).
        eval_at_start (`bool`, defaults to True): also measure the untrained draft (epoch 0 of the curve).
    """

    lambda_logit: float = field(default=0.1, metadata={"help": "Weight of CE(draft logits, softmax(target logits))."})
    lambda_feat: float = field(default=1.0, metadata={"help": "Weight of SmoothL1(draft features, target features)."})
    feature_noise: float = field(
        default=0.0,
        metadata={"help": "Half-width of uniform noise on the target features fed to the draft (0 = off)."},
    )
    max_length: int | None = field(default=None, metadata={"help": "Skip rows longer than this many tokens."})
    fail_fast: bool = field(default=False, metadata={"help": "Fail on the first bad row instead of skipping it."})
    eval_prompts: int = field(default=16, metadata={"help": "Held-out prompts for the accepted-length curve."})
    eval_max_new_tokens: int = field(default=128, metadata={"help": "New tokens per held-out prompt."})
    eval_depth: int = field(default=5, metadata={"help": "Tree depth of the accepted-length measurement."})
    eval_top_k: int = field(default=4, metadata={"help": "Tree top_k of the accepted-length measurement."})
    eval_total_tokens: int = field(default=16, metadata={"help": "Tree size of the accepted-length measurement."})
    eval_at_start: bool = field(default=True, metadata={"help": "Measure the untrained draft too (epoch 0)."})

    def __post_init__(self):
        for name in ("lambda_logit", "lambda_feat", "feature_noise"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lambda_logit == 0 and self.lambda_feat == 0:
            raise ValueError("lambda_logit and lambda_feat are both 0: nothing to train.")
        for name in ("eval_prompts", "eval_max_new_tokens", "eval_depth", "eval_top_k", "eval_total_tokens"):
            if getattr(self, name) < (2 if name == "eval_total_tokens" else 0 if name == "eval_prompts" else 1):
                raise ValueError(f"{name} is out of range: {getattr(self, name)}")
        self.remove_unused_columns = False  # the collator's keys are not the draft's forward arguments
        super().__post_init__()
