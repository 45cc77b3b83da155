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
        lambda_feat (`float`, defaults to 1.0): weight of the Smooth L1 regression of the target's features (drafts
            whose output predicts them: EAGLE-2-style; an EAGLE-3 draft has no feature term).
        ttt_steps (`int`, defaults to 1): training-time test (EAGLE-3): each batch is unrolled this many draft steps,
            step j feeding the draft its own outputs of step j - 1 where decoding would (1: teacher forcing only).
        ttt_decay (`float`, defaults to 0.8): weight of step j's loss is `ttt_decay ** j`.
        feature_noise (`float`, defaults to 0.0): half-width of uniform noise added to the target features fed to
            the draft (EAGLE's augmentation against its own feature errors at depth > 1; 0 disables).
        max_length (`int`, *optional*): rows longer than this (tokens, image included) are skipped; defaults to the
            target's context length.
        fail_fast (`bool`, defaults to False): stop at the first bad row, naming it, instead of skipping and counting.
        eval_prompts (`int`, defaults to 16): held-out prompts for the per-epoch accepted-length measurement.
        eval_max_new_tokens (`int`, defaults to 128): tokens generated per held-out prompt.
        eval_depth, eval_top_k, eval_total_tokens (`int`): tree of that measurement (defaults 5, 4, 16).
        eval_at_start (`bool`, defaults to True): also measure the untrained draft (epoch 0 of the curve).
        global_batch_size (`int`, *optional*): rows per optimizer step over all processes. When set,
            `gradient_accumulation_steps` is derived so that `per_device_train_batch_size x processes x
            gradient_accumulation_steps == global_batch_size`, and a global batch that does not divide raises
            `ValueError` (`accumulation_steps`). The run then trains the same way on any number of processes.
    """

    lambda_logit: float = field(default=0.1, metadata={"help": "Weight of CE(draft logits, softmax(target logits))."})
    lambda_feat: float = field(default=1.0, metadata={"help": "Weight of SmoothL1(draft features, target features)."})
    feature_noise: float = field(
        default=0.0,
        metadata={"help": "Half-width of uniform noise on the target features fed to the draft (0 = off)."},
    )
    ttt_steps: int = field(
        default=1, metadata={"help": "Training-time test: draft steps unrolled per batch (1 = teacher forcing)."}
    )
    ttt_decay: float = field(default=0.8, metadata={"help": "Loss weight of unrolled step j is ttt_decay ** j."})
    max_length: int | None = field(default=None, metadata={"help": "Skip rows longer than this many tokens."})
    fail_fast: bool = field(default=False, metadata={"help": "Fail on the first bad row instead of skipping it."})
    eval_prompts: int = field(default=16, metadata={"help": "Held-out prompts for the accepted-length curve."})
    eval_max_new_tokens: int = field(default=128, metadata={"help": "New tokens per held-out prompt."})
    eval_depth: int = field(default=5, metadata={"help": "Tree depth of the accepted-length measurement."})
    eval_top_k: int = field(default=4, metadata={"help": "Tree top_k of the accepted-length measurement."})
    eval_total_tokens: int = field(default=16, metadata={"help": "Tree size of the accepted-length measurement."})
    eval_at_start: bool = field(default=True, metadata={"help": "Measure the untrained draft too (epoch 0)."})
    global_batch_size: int | None = field(
        default=None,
        metadata={"help": "Rows per optimizer step over all processes; sets gradient_accumulation_steps."},
    )

    def __post_init__(self):
        for name in ("lambda_logit", "lambda_feat", "feature_noise"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.ttt_steps < 1 or not 0 < self.ttt_decay <= 1:
            raise ValueError(f"ttt_steps must be >= 1 and ttt_decay in (0, 1]; got {self.ttt_steps}, {self.ttt_decay}")
        if self.lambda_logit == 0 and self.lambda_feat == 0:
            raise ValueError("lambda_logit and lambda_feat are both 0: nothing to train.")
        for name in ("eval_prompts", "eval_max_new_tokens", "eval_depth", "eval_top_k", "eval_total_tokens"):
            if getattr(self, name) < (2 if name == "eval_total_tokens" else 0 if name == "eval_prompts" else 1):
                raise ValueError(f"{name} is out of range: {getattr(self, name)}")
        self.remove_unused_columns = False  # the collator's keys are not the draft's forward arguments
        # Set before `TrainingArguments.__post_init__`, which fills a DeepSpeed config's "auto" batch values from it.
        processes = launched_processes()
        if self.global_batch_size is not None:
            steps = accumulation_steps(self.global_batch_size, self.per_device_train_batch_size, processes)
            if self.gradient_accumulation_steps not in (1, steps):
                raise ValueError(
                    f"global_batch_size={self.global_batch_size} needs gradient_accumulation_steps={steps}, but "
                    f"{self.gradient_accumulation_steps} was given; set only one of the two."
                )
            self.gradient_accumulation_steps = steps
        super().__post_init__()
        if self.global_batch_size is not None and self.n_gpu > 1:
            raise ValueError(
                f"global_batch_size with {self.n_gpu} GPUs in one process (the Trainer's DataParallel) would train on "
                f"{self.n_gpu}x the rows asked for; launch one process per GPU (`accelerate launch`, torchrun)."
            )
        if self.global_batch_size is not None and self.world_size != processes:
            raise ValueError(
                f"The launcher started {processes} processes but training sees {self.world_size} (on a CPU-only "
                "machine, multi-process training needs use_cpu=True); global_batch_size cannot be split."
            )


def launched_processes() -> int:
    """The number of processes the launcher (`accelerate launch`, torchrun, deepspeed, mpirun) started, from its
    environment; 1 for a plain `python` run."""
    from accelerate.utils import get_int_from_env

    return get_int_from_env(["WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"], 1)


def accumulation_steps(global_batch_size: int, per_device_batch_size: int, num_processes: int) -> int:
    """
    The gradient-accumulation steps that make `per_device_batch_size x num_processes x steps == global_batch_size`.

    Raises:
        `ValueError`, naming the numbers and the nearest valid global batches, when `global_batch_size` is not a
        positive multiple of `per_device_batch_size x num_processes`.
    """
    per_step = per_device_batch_size * num_processes
    if global_batch_size < 1 or global_batch_size % per_step:
        below = global_batch_size // per_step * per_step
        nearest = " or ".join(str(n) for n in (below, below + per_step) if n > 0)
        raise ValueError(
            f"A global batch of {global_batch_size} rows does not divide into {num_processes} process(es) x "
            f"{per_device_batch_size} rows per device ({per_step} rows per accumulation step): use a multiple of "
            f"{per_step} (e.g. {nearest}) or change the per-device batch size."
        )
    return global_batch_size // per_step
