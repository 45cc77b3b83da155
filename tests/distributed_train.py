"""A small distillation run that `tests/test_distributed.py` starts in one or two processes (`accelerate launch
--config_file specvlm_hf/training/launch/cpu_2proc.yaml`), or calls in-process as the single-process reference.

It trains a fresh draft (seed 0) on a saved testbed with `train_draft`, the pipeline the CLI uses, so a relaunch in
the same output directory resumes from its last complete checkpoint. Rank 0 writes `progress.txt` (one line per
optimizer step) and, at the end, `run.json` (backend, world size, the step the run started from, losses, summary).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from specvlm_hf import SpecVLMDraftModel
from specvlm_hf.adapters import get_adapter
from specvlm_hf.compressor import compressor_for
from specvlm_hf.testbed.dataset import heldout_prompts, training_conversations
from specvlm_hf.testbed.store import load_testbed
from specvlm_hf.training import ConversationRow, DistillationConfig, train_draft


class Progress(TrainerCallback):
    """Records where the run started and each step's loss on rank 0; sleeps `delay` s per step on every rank (so a
    test can kill a run mid-way)."""

    def __init__(self, output: Path, delay: float):
        self.output, self.delay = output, delay
        self.start_step, self.losses = None, []

    def on_train_begin(self, args, state, control, **kwargs):
        self.start_step = state.global_step  # after a resumed checkpoint's state is loaded

    def on_step_end(self, args, state, control, **kwargs):
        time.sleep(self.delay)
        if state.is_world_process_zero:
            with (self.output / "progress.txt").open("a") as handle:
                handle.write(f"{state.global_step}\n")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--testbed", required=True, help="A testbed directory (`build_testbed(..., BuildConfig.tiny())`).")
    p.add_argument("--output", required=True)
    p.add_argument("--rows", type=int, default=24)
    p.add_argument("--max-steps", type=int, default=6)
    p.add_argument("--save-steps", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=2, help="Per-device batch.")
    p.add_argument("--global-batch-size", type=int, default=None, help="Sets the gradient accumulation steps.")
    p.add_argument("--compressor", default="none", help="'none', or 'elastic' with a conv and a resampler branch.")
    p.add_argument("--eval-prompts", type=int, default=0, help="Held-out prompts of the accepted-length curve.")
    p.add_argument("--step-delay", type=float, default=0.0, help="Seconds of sleep after each optimizer step.")
    return p.parse_args(argv)


def training_rows(n: int) -> list[ConversationRow]:
    rows = []
    for i, conv in enumerate(training_conversations(n, seed=1, image_size=48)):
        rows.append(ConversationRow(conv.image, [(t.question, t.answer) for t in conv.turns[:2]], f"row {i}"))
    return rows


def main(argv=None) -> dict:
    options = parse_args(argv)
    torch.set_num_threads(1)
    output = Path(options.output)
    target, processor = load_testbed(options.testbed, build_if_missing=False)
    torch.manual_seed(0)
    draft = SpecVLMDraftModel.from_target(target)
    if options.compressor != "none":
        grid = get_adapter(target).patch_grid()
        branches = ["conv:3", "resampler:2"]  # both with weights: a step trains only the branches its rows chose
        draft.set_compressor(compressor_for(options.compressor, draft.config.hidden_size, grid, branches))
    args = DistillationConfig(
        output_dir=str(output),
        max_steps=options.max_steps,
        per_device_train_batch_size=options.batch_size,
        global_batch_size=options.global_batch_size,
        learning_rate=1e-3,
        save_steps=options.save_steps,
        logging_steps=1,
        use_cpu=True,
        report_to=[],
        seed=0,
        dataloader_num_workers=0,
        eval_prompts=options.eval_prompts,
        eval_max_new_tokens=6,
        eval_at_start=True,
        disable_tqdm=True,
    )
    prompts = [dict(p.inputs(processor)) for p in heldout_prompts(kind="long", n=options.eval_prompts, image_size=48)]
    progress = Progress(output, options.step_delay)
    _, summary = train_draft(
        target, processor, training_rows(options.rows), args, eval_prompts=prompts, draft=draft, callbacks=[progress]
    )
    run = {
        "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
        "world_size": args.world_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "start_step": progress.start_step,
        "losses": progress.losses,
        "summary": summary,
    }
    if args.process_index == 0:
        (output / "run.json").write_text(json.dumps(run, indent=2))
    return run


if __name__ == "__main__":
    main()
    # As `specvlm-hf train` does: close the process group before exit; left to interpreter teardown, gloo's threads
    # occasionally abort a finished run ("terminate called without an active exception").
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
