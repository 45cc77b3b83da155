"""The `specvlm-hf` command line: one sub-command per job, each defined next to the code it drives."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> module exposing `register(subparsers)`; each registered parser sets `func(args) -> int`.
COMMANDS = {
    "testbed": "specvlm_hf.testbed.cli",
    "train": "specvlm_hf.training.cli",
    "launch-config": "specvlm_hf.training.launch_config",
    "bench": "specvlm_hf.benchmark.cli",
    "compression": "specvlm_hf.benchmark.compression",
    "card": "specvlm_hf.hub",
    "export": "specvlm_hf.export_cli",
    "serve-check": "specvlm_hf.serving.cli",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="specvlm-hf",
        description="Lossless tree speculative decoding for vision-language models (SpecVLM / EagleVLM).",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMANDS.values():
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
