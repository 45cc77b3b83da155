"""`specvlm-hf testbed {build,report,path}`: build the testbed, re-run its quality report, show where it loads from."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from .store import SHIPPED_DIR, TestbedError, card_share, default_cache_dir, resolve, verify

_SIZE_FLAGS = ("steps", "batch_size", "lr", "hidden_size", "text_layers", "attention_heads", "kv_heads",
               "intermediate_size", "vision_hidden_size", "image_size", "patch_size", "threads", "card_share")  # fmt: skip


def register(subparsers) -> None:
    from .build import BuildConfig

    parser = subparsers.add_parser("testbed", help="build or inspect the offline testbed VLM")
    commands = parser.add_subparsers(dest="testbed_command", metavar="COMMAND", required=True)

    build = commands.add_parser(
        "build",
        help="train the testbed from scratch (LLaVA: about 40 minutes on 2 CPU cores; Qwen2-VL: 85)",
        description=f"Trains the testbed and writes it atomically. Default output: {default_cache_dir()} "
        f"($XDG_CACHE_HOME honoured); the copy shipped in the package lives in {SHIPPED_DIR}.",
    )
    build.add_argument("--output", type=Path, default=None, help="testbed directory (default: the user cache)")
    build.add_argument("--seed", type=int, default=BuildConfig.seed,
                       help=f"seed of data, weights and tokenizer (default: {BuildConfig.seed}, the shipped build)")  # fmt: skip
    build.add_argument("--architecture", choices=("llava", "qwen2_vl"), default="llava",
                       help="target architecture: LLaVA-1.5 (the default testbed) or Qwen2-VL (its recipe: "
                       "BuildConfig.qwen2_vl)")  # fmt: skip
    build.add_argument("--tiny", action="store_true", help="toy sizes that build in seconds (for tests)")
    build.add_argument("--device", default="cpu", help="training device, e.g. cuda (default: cpu)")
    defaults = {f.name: f for f in dataclasses.fields(BuildConfig)}
    for name in _SIZE_FLAGS:
        f = defaults[name]
        build.add_argument(f"--{name.replace('_', '-')}", type=type(f.default), default=None,
                           help=f"{f.metadata['help']} (default: {f.default})")  # fmt: skip
    build.add_argument("--quiet", action="store_true", help="no progress bars")
    build.set_defaults(func=_build)

    report = commands.add_parser("report", help="re-run the quality report on a built testbed")
    report.add_argument("directory", type=Path, nargs="?", default=None, help="testbed directory (default: resolved)")
    report.add_argument("--json", type=Path, default=None, help="also write the report to this file")
    report.set_defaults(func=_report)

    finetune = commands.add_parser(
        "finetune",
        help="LoRA fine-tune the testbed target to another description style (a fine-tune for draft adaptation)",
        description="Writes OUTPUT/adapter (the target's LoRA adapter), OUTPUT/data/data.jsonl (rows in the "
        "fine-tune's style, for `specvlm-hf train --target-adapter OUTPUT/adapter --data ...`) and "
        "OUTPUT/finetune.json.",
    )
    finetune.add_argument("--output", type=Path, required=True)
    finetune.add_argument("--rows", type=int, default=1500, help="conversations drawn for the fine-tune")
    finetune.add_argument("--data-rows", type=int, default=4000, help="conversations written for draft training")
    finetune.add_argument("--steps", type=int, default=300)
    finetune.add_argument("--batch-size", type=int, default=8)
    finetune.add_argument("--lr", type=float, default=2e-3)
    finetune.add_argument("--lora-r", type=int, default=8)
    finetune.add_argument("--lora-alpha", type=int, default=16)
    finetune.add_argument("--seed", type=int, default=0)
    finetune.set_defaults(func=_finetune)

    path = commands.add_parser("path", help="print the directory `load_testbed()` would load from")
    path.set_defaults(func=_path)


def _build(args: argparse.Namespace) -> int:
    from .build import BuildConfig, build_testbed
    from .quality import format_report

    sizes = {name: getattr(args, name) for name in _SIZE_FLAGS if getattr(args, name) is not None}
    common = dict(seed=args.seed, device=args.device, **sizes)
    recipe = BuildConfig.qwen2_vl if args.architecture == "qwen2_vl" else BuildConfig
    try:
        cfg = BuildConfig.tiny(architecture=args.architecture, **common) if args.tiny else recipe(**common)
    except ValueError as err:  # a bad option: say which, without a traceback
        raise SystemExit(f"specvlm-hf testbed build: {err}") from None
    output = args.output or default_cache_dir()
    build_testbed(output, cfg, progress=not args.quiet)
    print(format_report(json.loads((output / "quality.json").read_text())))
    print(f"testbed written to {output}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from .quality import format_report, quality_report
    from .store import load_testbed

    directory = args.directory or resolve()[0]
    model, processor = load_testbed(directory, build_if_missing=False)
    report = quality_report(model, processor, cards=card_share(directory) > 0)
    print(format_report(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from .finetune import build_finetune

    record = build_finetune(
        args.output, rows=args.rows, data_rows=args.data_rows, steps=args.steps, batch_size=args.batch_size,
        lr=args.lr, r=args.lora_r, alpha=args.lora_alpha, seed=args.seed,
    )  # fmt: skip
    print(json.dumps(record, indent=2))
    return 0


def _path(args: argparse.Namespace) -> int:
    directory, source = resolve()
    try:
        verify(directory)
        state = "valid"
    except TestbedError as err:
        state = f"not built yet or invalid: {err}"
    print(directory)
    print(f"  ({source}; {state})")
    return 0
