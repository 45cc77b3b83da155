"""`specvlm-hf train`: distil a draft against a frozen target (the testbed by default). Rerunning the same command
after an interruption resumes from the last checkpoint in `--output`."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path

import torch

from ..lora import DEFAULT_LORA_MODULES
from ..testbed.store import DEFAULT, is_testbed

TESTBED = DEFAULT


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="Train a draft by online-logit distillation against a frozen target.",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--target",
        default=TESTBED,
        help="Target model directory, or 'testbed' (the built-in LLaVA testbed) or 'testbed-qwen2-vl' (the Qwen2-VL one).",
    )
    p.add_argument(
        "--data",
        default=TESTBED,
        help="LLaVA-format .jsonl (+ --image-folder), a datasets.save_to_disk directory, or 'testbed'.",
    )
    p.add_argument(
        "--image-folder", default=None, help="Root of the JSONL's relative image paths (default: its folder)."
    )
    p.add_argument("--num-samples", type=int, default=4000, help="Rows drawn from the testbed when --data testbed.")
    p.add_argument(
        "--data-seed", type=int, default=1, help="Seed of the testbed rows (the testbed trained on seed 0)."
    )
    p.add_argument(
        "--eval-data",
        default=None,
        help="JSONL of held-out prompts for the accepted-length curve (default: the testbed's held-out set).",
    )
    p.add_argument(
        "--self-distill",
        action="store_true",
        help="Replace every answer with the target's own greedy answer before training (cached in --output).",
    )
    p.add_argument(
        "--self-distill-draft",
        default=None,
        help="With --self-distill: a draft of the target (folder or shipped name, e.g. 'draft') that decodes the "
        "answers one prompt at a time through the lossless loop, faster than plain padded batches on CPU.",
    )
    p.add_argument(
        "--self-distill-temperature",
        type=float,
        default=0.0,
        help="With --self-distill: sample the target's answers at this temperature (its whole distribution, seeded "
        "by --seed) instead of taking its greedy answers (0). Answers sampled at T = 1 are the contexts a draft "
        "meets when decoding at T = 1.",
    )
    p.add_argument("--output", required=True, help="Directory for checkpoints, the trained draft and the curve.")
    p.add_argument(
        "--target-adapter",
        default=None,
        help="A peft adapter folder (e.g. a LoRA fine-tune of the target) applied to --target; the draft is "
        "distilled against the adapted target.",
    )
    p.add_argument(
        "--init-draft",
        "--init",
        dest="init",
        default=None,
        help="Start from this saved draft (a folder, or a shipped draft's name) instead of a fresh one.",
    )
    p.add_argument(
        "--lora",
        action="store_true",
        help="Train only a LoRA adapter on --init-draft (saved alone, small) instead of the whole draft.",
    )
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank (with --lora).")
    p.add_argument("--lora-alpha", type=int, default=32, help="LoRA alpha (with --lora).")
    p.add_argument(
        "--lora-modules",
        default=",".join(DEFAULT_LORA_MODULES),
        help="Comma-separated names of the draft's linear layers that get LoRA (with --lora).",
    )
    p.add_argument(
        "--family",
        default="eagle",
        choices=["eagle", "eagle3"],
        help="Draft family of a fresh draft: 'eagle' (EagleVLM/SpecVLM: EAGLE-2-style head on the target's features, "
        "with an optional visual compressor) or 'eagle3' (EAGLE-3: fuses three target layers; the layout vLLM runs).",
    )
    p.add_argument(
        "--aux-layers",
        type=_layer_ids,
        default=None,
        help="EAGLE-3: comma-separated target layers the draft fuses (default: EAGLE-3's low, middle, high).",
    )
    p.add_argument(
        "--ttt-steps",
        type=int,
        default=1,
        help="Training-time test: draft steps unrolled per batch on the draft's own outputs (1 = teacher forcing).",
    )
    p.add_argument("--ttt-decay", type=float, default=0.8, help="Loss weight of unrolled step j: decay ** j.")
    p.add_argument(
        "--parallel-depth",
        type=int,
        default=1,
        help="Parallel drafting (--family eagle): above 1, the draft learns to draft depths 2..N in one forward from "
        "mask entries (one unrolled step per depth, weighted by --ttt-decay); 1 = one forward per depth.",
    )
    p.add_argument(
        "--compressor",
        default="none",
        choices=["none", "elastic", "prune", "prune_importance", "pool", "conv", "resampler", "text"],
        help="Elastic visual compressor trained jointly with the draft: SpecVLM's selector (elastic), one primitive, "
        "or none (EagleVLM: the draft sees every visual token).",
    )
    p.add_argument(
        "--compressor-branches",
        default=None,
        help="Comma-separated branches replacing the preset's, e.g. 'pool:3' or 'prune:5,pool:5,conv:5'.",
    )
    p.add_argument(
        "--compressor-mode", default="select", choices=["select", "weight", "concat"], help="How branches combine."
    )
    p.add_argument("--epochs", type=float, default=4.0)
    p.add_argument("--max-steps", type=int, default=-1, help="Stop after this many steps (overrides --epochs).")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument(
        "--global-batch-size",
        type=int,
        default=None,
        help="Rows per optimizer step over all processes; sets --grad-accum (batch-size x processes x grad-accum).",
    )
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-ratio", type=float, default=0.03)
    p.add_argument("--lambda-logit", type=float, default=0.1)
    p.add_argument("--lambda-feat", type=float, default=1.0)
    p.add_argument("--feature-noise", type=float, default=0.0)
    p.add_argument("--save-steps", type=int, default=50, help="Checkpoint every N steps (resume point).")
    p.add_argument("--eval-prompts", type=int, default=16)
    p.add_argument("--eval-max-new-tokens", type=int, default=128)
    p.add_argument("--no-eval-at-start", action="store_true", help="Skip the untrained (epoch 0) measurement.")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16", help="Training autocast precision.")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
    p.add_argument("--fail-fast", action="store_true", help="Stop at the first bad data row instead of skipping it.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--hub-model-id", default=None, help="Where the draft is or will be published; names it in its model card."
    )
    p.set_defaults(func=run)


def _load_target(name: str, adapter: str | None = None):
    """The target (with the peft adapter at `adapter` applied, if given) and its processor."""
    if is_testbed(name):
        from ..testbed import load_testbed

        target, processor = load_testbed(name)
    else:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        target = AutoModelForImageTextToText.from_pretrained(name, dtype=torch.float32)
        processor = AutoProcessor.from_pretrained(name)
    if adapter is not None:
        from peft import PeftModel

        target = PeftModel.from_pretrained(target, adapter).eval()
    return target, processor


def _testbed_rows(output: Path, n: int, seed: int, testbed: str = TESTBED):
    """Single-turn testbed rows (each conversation's long description, caption and one short question), as
    image files + JSONL under `output/data`, written once; with digit and word cards if the testbed was built
    with them."""
    from ..testbed import resolve, training_conversations
    from ..testbed.store import card_share
    from .data import ConversationRow, read_llava_jsonl
    from .selfdistill import write_llava_jsonl

    path = output / "data" / "data.jsonl"
    if not path.exists():
        (output / "data" / "images").mkdir(parents=True, exist_ok=True)
        rows, share = [], card_share(resolve(testbed)[0])
        for index, conv in enumerate(training_conversations(n, seed, long_fraction=0.7, card_share=share)):
            image = output / "data" / "images" / f"{index:06d}.png"
            conv.image.save(image)
            long = [t for t in conv.turns if t.category in ("long", "caption")]
            short = [t for t in conv.turns if t.category not in ("long", "caption")]
            for turn in long + short[:1]:
                rows.append(ConversationRow(str(image), [(turn.question, turn.answer)], f"testbed {index}"))
        write_llava_jsonl(rows, path)
    return read_llava_jsonl(path)


def _initial_draft(args, target, resuming: bool):
    """The draft to train: `--init-draft`'s or a fresh one, with `--compressor`'s compressor (a resumed run restores
    its own from the checkpoint's config) and `--parallel-depth`'s mask inputs (fresh where it has none); with
    `--lora`, `--init-draft`'s wrapped in a fresh LoRA adapter."""
    from ..adapters import get_adapter
    from ..compressor import compressor_for
    from ..modeling_draft import SpecVLMDraftModel
    from ..testbed.store import draft_location

    branches = args.compressor_branches.split(",") if args.compressor_branches else None
    if args.lora:  # the base draft always loads: a checkpoint holds the adapter alone
        from ..lora import add_lora

        draft = SpecVLMDraftModel.from_pretrained(draft_location(args.init), target=target)
        return add_lora(draft, args.lora_r, args.lora_alpha, args.lora_modules.split(","))
    if args.init and not resuming:
        draft = SpecVLMDraftModel.from_pretrained(draft_location(args.init), target=target)
    elif args.family == "eagle3":
        from ..modeling_eagle3 import SpecVLMEagle3DraftModel

        layers = [int(i) for i in args.aux_layers.split(",")] if args.aux_layers else None
        draft = SpecVLMEagle3DraftModel.from_target(
            target, **({"aux_hidden_state_layer_ids": layers} if layers else {})
        )
    else:
        draft = SpecVLMDraftModel.from_target(target)
    compressor = compressor_for(
        args.compressor, draft.config.hidden_size, get_adapter(target).patch_grid(), branches, args.compressor_mode
    )
    if compressor is not None or args.compressor_branches:
        draft.set_compressor(compressor)
    if args.parallel_depth > 1:
        draft.enable_parallel_drafting(args.parallel_depth)
    return draft


def _layer_ids(text: str) -> list[int]:
    """`--aux-layers`: three comma-separated layer indices."""
    try:
        ids = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three comma-separated layer indices, got {text!r}") from None
    if len(ids) != 3 or min(ids) < 0:
        raise argparse.ArgumentTypeError(f"expected three layer indices >= 0, got {text!r}")
    return ids


def _self_distill_draft(name: str | None, target):
    """The draft that speeds up self-distillation (`--self-distill-draft`), bound to `target`, or `None`."""
    if name is None:
        return None
    from ..modeling_draft import SpecVLMDraftModel
    from ..testbed.store import draft_location

    return SpecVLMDraftModel.from_pretrained(draft_location(name), target=target)


def run(args) -> int:
    from accelerate import PartialState

    from .config import DistillationConfig
    from .data import load_rows, read_llava_jsonl
    from .pipeline import eval_inputs, last_complete_checkpoint, train_draft
    from .selfdistill import regenerate_answers, write_llava_jsonl

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if args.lora and not args.init:
        raise SystemExit("--lora adapts an existing draft: give it with --init-draft DIR.")
    if args.lora and (args.compressor != "none" or args.compressor_branches):
        raise SystemExit("--lora keeps the base draft's compressor frozen; drop --compressor / --compressor-branches.")
    if args.family == "eagle3" and (args.compressor != "none" or args.compressor_branches):
        raise SystemExit(
            "--family eagle3 sees the image through the target's hidden states and takes no compressor; drop "
            "--compressor / --compressor-branches (or train --family eagle)."
        )
    if args.self_distill_draft and not args.self_distill:
        raise SystemExit("--self-distill-draft speeds up --self-distill; add --self-distill.")
    if args.self_distill_temperature and not args.self_distill:
        raise SystemExit("--self-distill-temperature samples the answers of --self-distill; add --self-distill.")
    if args.self_distill_temperature < 0:
        raise SystemExit(
            f"--self-distill-temperature must be 0 (greedy) or positive, got {args.self_distill_temperature}"
        )
    if args.aux_layers and args.family != "eagle3":
        raise SystemExit("--aux-layers sets the target layers of an EAGLE-3 draft; add --family eagle3.")
    if args.ttt_steps > 1 and (args.compressor != "none" or args.compressor_branches):
        raise SystemExit(
            "--ttt-steps unrolls the draft over uncompressed positions; train a draft with a compressor with "
            "--ttt-steps 1."
        )
    if args.parallel_depth > 1 and (args.family != "eagle" or args.ttt_steps > 1 or args.lora):
        raise SystemExit(
            "--parallel-depth trains an EAGLE-2-style draft (--family eagle) as a whole, one unrolled step per "
            "depth: drop --ttt-steps, --lora and --family eagle3."
        )
    if args.parallel_depth > 1 and (args.compressor != "none" or args.compressor_branches):
        raise SystemExit("--parallel-depth unrolls the draft over uncompressed positions; drop --compressor.")
    if args.parallel_depth < 1:
        raise SystemExit(f"--parallel-depth must be >= 1, got {args.parallel_depth}.")
    if args.threads:
        torch.set_num_threads(args.threads)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    target, processor = _load_target(args.target, args.target_adapter)

    state = PartialState(cpu=not torch.cuda.is_available())  # as DistillationConfig(use_cpu=...) sets it up
    with state.main_process_first():  # one process writes the rows (and their cached answers); the others read them
        rows, problems = (
            _testbed_rows(
                output, args.num_samples, args.data_seed, args.target if is_testbed(args.target) else TESTBED
            )
            if args.data == TESTBED
            else load_rows(args.data, args.image_folder)
        )
        if problems and state.is_main_process:
            print(f"unparsable data rows: {dict(problems)}")
        if args.self_distill:
            temperature = args.self_distill_temperature
            # sampled answers depend on the seed too: another --seed samples afresh instead of reading these
            name = "data.jsonl" if not temperature else f"data-t{temperature:g}-seed{args.seed}.jsonl"
            cached = output / "self_distill" / name
            if not cached.exists():
                helper = _self_distill_draft(args.self_distill_draft, target)
                rows = regenerate_answers(
                    target, processor, rows, max_new_tokens=args.eval_max_new_tokens * 3, draft=helper,
                    temperature=temperature, seed=args.seed,
                )  # fmt: skip
                write_llava_jsonl(rows, cached)
            rows, _ = read_llava_jsonl(cached)

    if args.eval_data:
        eval_rows, _ = read_llava_jsonl(args.eval_data)
        eval_prompts = eval_inputs(processor, eval_rows[: args.eval_prompts])
    elif is_testbed(args.target):
        from ..testbed import heldout_prompts

        eval_prompts = [dict(p.inputs(processor)) for p in heldout_prompts(kind="long", n=args.eval_prompts)]
    else:
        eval_prompts = []

    try:
        config = DistillationConfig(
            output_dir=str(output),
            num_train_epochs=args.epochs,
            max_steps=args.max_steps,
            per_device_train_batch_size=args.batch_size,
            gradient_accumulation_steps=args.grad_accum,
            global_batch_size=args.global_batch_size,
            learning_rate=args.lr,
            lr_scheduler_type="cosine",
            warmup_steps=args.warmup_ratio,
            weight_decay=0.0,
            adam_beta1=0.9,
            adam_beta2=0.95,
            max_grad_norm=0.5,
            bf16=args.precision == "bf16",
            use_cpu=not torch.cuda.is_available(),
            save_steps=args.save_steps,
            save_total_limit=2,
            logging_steps=10,
            report_to=[],
            seed=args.seed,
            dataloader_num_workers=0,
            lambda_logit=args.lambda_logit,
            lambda_feat=args.lambda_feat,
            feature_noise=args.feature_noise,
            ttt_steps=args.ttt_steps,
            ttt_decay=args.ttt_decay,
            fail_fast=args.fail_fast,
            eval_prompts=args.eval_prompts,
            eval_max_new_tokens=args.eval_max_new_tokens,
            eval_at_start=not args.no_eval_at_start,
            hub_model_id=args.hub_model_id,
        )
    except ValueError as err:  # e.g. a global batch that does not divide: say which, without a traceback
        raise SystemExit(f"specvlm-hf train: {err}") from None
    draft = _initial_draft(args, target, resuming=bool(last_complete_checkpoint(output)))
    name = f"specvlm_hf {args.target}" if is_testbed(args.target) else args.target  # what the model card names
    if args.target_adapter:
        name += f" + adapter {args.target_adapter}"
    command = shlex.join(["specvlm-hf", *sys.argv[1:]])  # the card records how the draft was trained
    _, summary = train_draft(
        target, processor, rows, config, eval_prompts=eval_prompts, draft=draft, target_name=name,
        training_command=command,
    )  # fmt: skip
    if state.is_main_process:
        print(json.dumps({k: v for k, v in summary.items() if k != "curve"}, indent=2))
        for point in summary["curve"]:
            print(f"epoch {point['epoch']:>5}: mean accepted length {point['mean_accepted_length']:.3f}")
        print(f"draft saved to {output}; curve: {output / 'acceptance_curve.png'}")
    # Under several processes, close the process group before exit: left to interpreter teardown, gloo's threads
    # occasionally abort the process ("terminate called without an active exception") after training finished.
    state.destroy_process_group()
    return 0
