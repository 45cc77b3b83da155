"""`specvlm-hf export`: write a saved draft in a serving engine's layout (`export.py`), with a README stating what
an engine will and will not reproduce."""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    from .export import FORMATS

    p = subparsers.add_parser(
        "export",
        help="Write a saved draft in the speculators layout for serving engines.",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("draft", metavar="DIR", help="Folder of the saved draft (`save_pretrained`).")
    p.add_argument("--format", choices=FORMATS, default="speculators", help="Layout to write.")
    p.add_argument("--output", required=True, help="Folder to write config.json, model.safetensors and README.md.")
    p.add_argument(
        "--target",
        default="testbed",
        help="The target the engine loads, by Hub id or directory ('testbed': the built-in testbed).",
    )
    p.add_argument("--depth", type=int, default=None, help="Draft tokens per step for the engine (default: 5).")
    p.add_argument(
        "--drop-compressor",
        action="store_true",
        help="Write a draft with a visual compressor without it (recorded in the export); refused otherwise.",
    )
    p.set_defaults(func=_export_command)


def _export_command(args) -> int:
    from .export import export_draft
    from .modeling_draft import SpecVLMDraftModel

    draft = SpecVLMDraftModel.from_pretrained(args.draft)
    try:
        out = export_draft(
            draft,
            args.output,
            format=args.format,
            target=args.target,
            depth=args.depth,
            drop_compressor=args.drop_compressor,
        )
    except ValueError as err:
        print(f"specvlm-hf export: error: {err}", file=sys.stderr)
        return 2
    dropped = " (without its compressor)" if args.drop_compressor and draft.config.compressor else ""
    print(f"wrote {out}{dropped}; see {out / 'README.md'} for what an engine reproduces")
    return 0
