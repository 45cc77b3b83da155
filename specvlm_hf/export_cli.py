"""`specvlm-hf export`: write a saved EAGLE-3 draft as a speculators `eagle3` checkpoint that vLLM serves
(`export.py`), and, with `--target-output`, its target in the layout engines load."""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    from .export import FORMATS

    p = subparsers.add_parser(
        "export",
        help="Write a saved EAGLE-3 draft (and its target) in the layout serving engines load.",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "draft", metavar="DIR", help="Folder of the saved draft (`save_pretrained`), or a shipped draft's name."
    )
    p.add_argument("--format", choices=FORMATS, default="speculators", help="Layout to write.")
    p.add_argument("--output", required=True, help="Folder to write config.json, model.safetensors and README.md.")
    p.add_argument(
        "--target",
        default="testbed",
        help="The target the engine loads: a Hub id or a directory in the engines' layout; with --target-output, the "
        "target to convert ('testbed': the built-in testbed).",
    )
    p.add_argument(
        "--target-output",
        default=None,
        help="Also write --target here in the layout engines load (the Hub's key names), and name this folder as "
        "the draft's verifier. Needed for the testbeds, which are saved in transformers' layout.",
    )
    p.add_argument("--depth", type=int, default=None, help="Draft tokens per step for the engine (default: 5).")
    p.set_defaults(func=_export_command)


def _export_command(args) -> int:
    from pathlib import Path

    from .export import check_exportable, export_draft, export_target
    from .modeling_draft import SpecVLMDraftModel
    from .testbed.store import draft_location

    draft = SpecVLMDraftModel.from_pretrained(draft_location(args.draft))
    try:
        check_exportable(draft)
        target = args.target
        if args.target_output:
            target = str(export_target(args.target, args.target_output).resolve())
            print(f"wrote the target in the engines' layout to {target}")
        out = export_draft(draft, args.output, format=args.format, target=target, depth=args.depth)
    except ValueError as err:
        print(f"specvlm-hf export: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {Path(out)}; serve it with `vllm serve {Path(out).resolve()}` (see its README.md)")
    return 0
