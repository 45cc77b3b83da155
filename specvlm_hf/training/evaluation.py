"""The training-time scaling curve (SpecVLM Table 7): after each epoch, the mean accepted length of the draft on
held-out prompts, measured with the real speculative loop (greedy), logged, saved as JSON and drawn as a PNG."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import TrainerCallback

from ..generation import speculative_generate
from ..lora import as_draft
from ..metrics import mean_accepted_length
from .config import DistillationConfig

logger = logging.getLogger(__name__)

CURVE_JSON = "acceptance_curve.json"
CURVE_PNG = "acceptance_curve.png"


@dataclass
class CurvePoint:
    epoch: float
    step: int
    mean_accepted_length: float
    new_tokens: int
    target_forwards: int
    train_seconds: float


def measure_acceptance(target, draft, prompts: list[dict], args: DistillationConfig) -> tuple[float, int, int]:
    """Greedy speculative generation over `prompts` (processor outputs); returns `(sigma, new tokens, forwards)` with
    sigma = all new tokens / all target forwards."""
    was_training = draft.training
    draft.eval()
    drafting = as_draft(draft)  # a LoRA-wrapped draft drafts merged
    new_tokens = forwards = 0
    with torch.no_grad():
        for inputs in prompts:
            inputs = {k: v.to(draft.device) if hasattr(v, "to") else v for k, v in inputs.items()}
            out = speculative_generate(
                target, drafting, **inputs, max_new_tokens=args.eval_max_new_tokens, do_sample=False,
                depth=args.eval_depth, tree_top_k=args.eval_top_k, total_tokens=args.eval_total_tokens,
            )  # fmt: skip
            new_tokens += out.stats.new_tokens
            forwards += out.stats.target_forwards
    draft.train(was_training)
    return mean_accepted_length(new_tokens, forwards) or 0.0, new_tokens, forwards


def plot_curve(points: list[CurvePoint], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([p.epoch for p in points], [p.mean_accepted_length for p in points], marker="o")
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean accepted length (tokens / target forward)")
    ax.set_title("Training-time scaling of the draft")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def draft_is_sharded(args: DistillationConfig) -> bool:
    """Whether each process holds only a shard of the draft's weights (DeepSpeed ZeRO-3, FSDP), so that one process
    cannot run the draft alone."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    fsdp = bool(args.fsdp) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")
    return fsdp or is_deepspeed_zero3_enabled()


class AcceptanceCallback(TrainerCallback):
    """Measures the accepted length at the start (epoch 0) and after every epoch; survives resumption through its
    JSON file in the output directory. Under several processes the main process measures alone (the others go on
    to the next step and wait for it there); with a sharded draft (ZeRO-3, FSDP) nothing is measured."""

    def __init__(self, target, prompts: list[dict], args: DistillationConfig):
        self.target, self.prompts, self.args = target, prompts, args
        self.path = Path(args.output_dir) / CURVE_JSON
        self.points = [CurvePoint(**p) for p in json.loads(self.path.read_text())] if self.path.exists() else []
        self._started = 0.0
        self._eval_seconds = 0.0
        self._train_offset = 0.0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._started = time.perf_counter()
        # On resumption, continue the training clock from the last recorded point.
        done = [p for p in self.points if p.step <= state.global_step]
        self.points = done
        self._train_offset = max((p.train_seconds for p in done), default=0.0)
        if self.prompts and draft_is_sharded(args):
            logger.warning("the draft is sharded (ZeRO-3 or FSDP): no accepted-length curve; `specvlm-hf bench` it")
            self.prompts = []
        if self.args.eval_at_start and state.global_step == 0 and self.prompts and state.is_world_process_zero:
            self._record(model, epoch=0.0, step=0)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        if self.prompts and state.is_world_process_zero:
            self._record(model, epoch=round(state.epoch, 3), step=state.global_step)

    def _record(self, draft, epoch: float, step: int) -> None:
        train_seconds = self._train_offset + time.perf_counter() - self._started - self._eval_seconds
        start = time.perf_counter()
        sigma, new_tokens, forwards = measure_acceptance(self.target, draft, self.prompts, self.args)
        self._eval_seconds += time.perf_counter() - start
        self.points = [p for p in self.points if p.epoch != epoch] + [
            CurvePoint(epoch, step, round(sigma, 4), new_tokens, forwards, round(train_seconds, 1))
        ]
        self.points.sort(key=lambda p: p.epoch)
        logger.warning("epoch %.2f: mean accepted length %.3f (%d tokens / %d target forwards)",
                       epoch, sigma, new_tokens, forwards)  # fmt: skip
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps([asdict(p) for p in self.points], indent=2))
        plot_curve(self.points, self.path.with_name(CURVE_PNG))
