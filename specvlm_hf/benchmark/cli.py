"""`specvlm-hf bench`: parse the flags into a `BenchmarkConfig`, run it, print the markdown table."""

from __future__ import annotations

import argparse
import logging
import sys

from .config import BenchmarkConfig
from .methods import METHOD_NAMES, UnknownMethodError, check_method_names
from .prompts import PromptFileError


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(t) for t in text.split(",") if t.strip())


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(t) for t in text.split(",") if t.strip())


def _methods(text: str) -> tuple[str, ...]:
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    try:
        return check_method_names(names)
    except UnknownMethodError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


# flag -> (BenchmarkConfig field, argparse type); every flag defaults to None = "not given".
_FLAGS = {
    "--methods": ("methods", _methods),
    "--target": ("target", str),
    "--target-adapter": ("target_adapter", str),
    "--draft": ("draft", str),
    "--specvlm-draft": ("specvlm_draft", str),
    "--eagle3-draft": ("eagle3_draft", str),
    "--parallel-draft": ("parallel_draft", str),
    "--assistant": ("assistant", str),
    "--prompts": ("prompts", str),
    "--image-root": ("image_root", str),
    "--kind": ("kind", str),
    "--num-samples": ("num_samples", int),
    "--repeats": ("repeats", int),
    "--max-new-tokens": ("max_new_tokens", int),
    "--temperatures": ("temperatures", _floats),
    "--batch-size": ("batch_sizes", _ints),
    "--tree": ("tree", str),
    "--draft-numerics": ("draft_numerics", str),
    "--calibration-samples": ("calibration_samples", int),
    "--calibration-tokens": ("calibration_tokens", int),
    "--search-budget": ("search_budget", int),
    "--prompt-lookup-tokens": ("prompt_lookup_tokens", int),
    "--warmup-tokens": ("warmup_tokens", int),
    "--seed": ("seed", int),
    "--device": ("device", str),
    "--dtype": ("dtype", str),
    "--threads": ("threads", int),
    "--output": ("output", str),
}


def register(subparsers) -> None:
    help_text = BenchmarkConfig.field_help()
    parser = subparsers.add_parser(
        "bench",
        help="Speedup and accepted length of the tree loop side by side with vanilla, hf-assisted and prompt-lookup.",
        description=(
            "Runs the same prompts through several decoding methods in one process, interleaved per sample, and "
            "prints a markdown table (speedup tau paired with vanilla, sigma, target forwards, equality with vanilla, "
            "peak memory, loop overhead); with --batch-size above 1 a second table on left-padded batches; --output "
            "also writes benchmark.json and PNG plots. "
            f"Methods: {', '.join(METHOD_NAMES)} (-auto: the draft's auto tree, as generate(assistant_model=draft) "
            "runs it; -fixed: the tree --tree gives)."
        ),
    )
    defaults = BenchmarkConfig()
    for flag, (name, kind) in _FLAGS.items():
        default = getattr(defaults, name)
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        suffix = "" if default is None else f" (default: {shown})"
        parser.add_argument(flag, type=kind, default=None, help=help_text[name] + suffix)
    parser.add_argument("--quick", action="store_true", help=help_text["quick"] + " Explicit flags still apply.")
    parser.add_argument("--rebuild-assistant", action="store_true", help=help_text["rebuild_assistant"])
    parser.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> BenchmarkConfig:
    given = {name: getattr(args, flag[2:].replace("-", "_")) for flag, (name, _) in _FLAGS.items()}
    given = {k: v for k, v in given.items() if v is not None}
    given["rebuild_assistant"] = args.rebuild_assistant
    return BenchmarkConfig.quick_preset(**given) if args.quick else BenchmarkConfig(**given)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        config = config_from_args(args)
        from .runner import run_benchmark

        result = run_benchmark(config)
    except (UnknownMethodError, PromptFileError, FileNotFoundError, ValueError) as err:
        print(f"specvlm-hf bench: error: {err}", file=sys.stderr)
        return 2
    print(result.markdown())
    if config.output:
        print(f"\nJSON and plots written to {config.output}")
    return 0
