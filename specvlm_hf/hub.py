"""Model cards for trained drafts, rendered offline from the package's Jinja template. Publishing is the stock
`draft.push_to_hub(repo_id)` (weights and config; the borrowed target weights are never included) plus
`card.push_to_hub(repo_id)`."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

logger = logging.getLogger(__name__)
TEMPLATE = Path(__file__).parent / "templates" / "draft_model_card.md"


# The benchmark rows a card reports, in this order: a draft's plain `generate(assistant_model=draft)` and the chosen
# tree, or for a draft with an elastic visual compressor the same two rows of the `specvlm` methods. Records written
# before the methods' renaming (`benchmark.methods.OLD_METHOD_NAMES`) are read under the new names.
SPEEDUP_METHODS = ("eaglevlm-auto", "eaglevlm-fixed")
COMPRESSOR_SPEEDUP_METHODS = ("specvlm-auto", "specvlm-fixed")
EAGLE3_SPEEDUP_METHODS = ("eagle3-auto", "eagle3-fixed")


def hub_id_or_none(name: str | None) -> str | None:
    """`name` if it can be a Hub model id (namespace/name, not an existing local path), else `None`."""
    if not name or Path(name).exists() or name.count("/") != 1:
        return None
    return name


def benchmark_results(
    benchmark: dict, *, model_name: str, methods: tuple[str, ...] = SPEEDUP_METHODS
) -> tuple[list[EvalResult], str]:
    """
    `model-index` results and a markdown table from a benchmark JSON (`specvlm-hf bench --output`): per temperature,
    tau (median wall-clock speedup over plain `generate()`), sigma (mean accepted length) and the greedy exact-match
    count, for the benchmark rows `methods`, with the hardware named.
    """
    from .benchmark.methods import OLD_METHOD_NAMES

    environment, config = benchmark["environment"], benchmark["config"]
    hardware = (
        f"{environment.get('device_name') or environment.get('device')}, {environment.get('torch_threads')} threads"
    )
    dataset = str(config.get("prompts") or "testbed held-out prompts")
    results, rows = [], []
    for summary in benchmark["summary"]:
        method = OLD_METHOD_NAMES.get(summary["method"], summary["method"])
        if method not in methods or summary["speedup"] is None:
            continue
        t = summary["temperature"]
        setting = f"{method}, T={t:g}, {config.get('kind') or 'all'} prompts, {hardware}, {environment.get('dtype')}"
        for metric, value, name in (
            ("speedup", summary["speedup"]["median"], "tau: wall-clock speedup over generate()"),
            ("mean_accepted_length", summary["mean_accepted_length"], "sigma: tokens per target forward"),
        ):
            results.append(EvalResult(
                task_type="image-text-to-text", dataset_type=dataset, dataset_name=dataset, metric_type=metric,
                metric_value=round(float(value), 3), metric_name=f"{name} ({setting})",
            ))  # fmt: skip
        equal = f"{summary['exact_match']}/{summary['compared']}" if t == 0 and summary["compared"] else "-"
        rows.append(
            f"| {method} | {t:g} | {summary['speedup']['median']:.2f}x | {summary['mean_accepted_length']:.2f} | {equal} |"
        )
    table = "\n".join(
        [f"Measured with `specvlm-hf bench` on {hardware} ({environment.get('dtype')}, batch 1, {dataset}):", "",
         "| method | T | tau (median) | sigma | = plain generate() |", "|---|---|---|---|---|", *rows]
    )  # fmt: skip
    return results, table


def create_model_card(
    draft_dir: str | Path,
    *,
    target_name: str,
    base_model: str | None = None,
    repo_id: str | None = None,
    benchmark: dict | str | Path | None = None,
    training_command: str | None = None,
    usage: str | None = None,
    license: str = "apache-2.0",
) -> ModelCard:
    """
    Renders the card of the draft saved in `draft_dir`, reading when present its `training_summary.json` and
    `acceptance_curve.json` (written by `specvlm-hf train`).

    Args:
        target_name (`str`): the target as the card's text names it.
        base_model (`str`, *optional*): the target's Hub id (the card's `base_model`); never a local path.
        repo_id (`str`, *optional*): where the draft is (or will be) published; defaults to the folder name.
        benchmark (`dict` or path, *optional*): a benchmark JSON (`specvlm-hf bench --output`): its speed figures
            become the card's `model-index` and speed table.
        training_command (`str`, *optional*): the command that trained the draft.
        usage (`str`, *optional*): a usage snippet that runs; the generic one (a target loaded by the reader)
            otherwise.
    """
    draft_dir = Path(draft_dir)
    if not (draft_dir / "config.json").exists():
        raise FileNotFoundError(f"{draft_dir} holds no saved draft (config.json missing)")
    if base_model is not None and hub_id_or_none(base_model) is None:
        raise ValueError(f"base_model must be the target's Hub id (namespace/name), not a local path: {base_model!r}")
    summary_path, curve_path = draft_dir / "training_summary.json", draft_dir / "acceptance_curve.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
    curve = json.loads(curve_path.read_text()) if curve_path.exists() else None
    weights = draft_dir / "model.safetensors"
    num_parameters = "unknown"
    if weights.exists():
        from safetensors import safe_open

        with safe_open(str(weights), "pt") as handle:
            num_parameters = f"{sum(_numel(handle.get_slice(key).get_shape()) for key in handle.keys()):,}"
    model_name = repo_id or draft_dir.name
    config = json.loads((draft_dir / "config.json").read_text())
    compressor = config.get("compressor")
    eagle3 = config.get("model_type") == "specvlm_eagle3_draft"
    results, speed_table = None, None
    if benchmark is not None:
        if not isinstance(benchmark, dict):
            benchmark = json.loads(Path(benchmark).read_text())
        methods = EAGLE3_SPEEDUP_METHODS if eagle3 else COMPRESSOR_SPEEDUP_METHODS if compressor else SPEEDUP_METHODS
        results, speed_table = benchmark_results(benchmark, model_name=model_name, methods=methods)
    card_data = ModelCardData(
        library_name="transformers",
        license=license,
        base_model=base_model,
        pipeline_tag="image-text-to-text",
        tags=["speculative-decoding", "eagle3" if eagle3 else "eagle", "specvlm", "draft-model", "vision-language"]
        + (["vllm"] if eagle3 else []),
        model_name=model_name if results else None,
        eval_results=results or None,
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE),
        model_name=model_name,
        repo_id=repo_id or str(draft_dir),
        target_name=target_name,
        num_parameters=num_parameters,
        lambda_logit=(summary or {}).get("lambda_logit", 0.1),
        lambda_feat=(summary or {}).get("lambda_feat", 1.0),
        summary=summary,
        curve=curve,
        benchmark=speed_table,
        training_command=training_command,
        usage=usage,
        compressor=compressor,
        eagle3=eagle3,
        aux_layers=config.get("aux_hidden_state_layer_ids"),
        parallel_depth=config.get("parallel_depth", 1),
    )


def _numel(shape) -> int:
    total = 1
    for size in shape:
        total *= size
    return total


def _card_command(args) -> int:
    card = create_model_card(
        args.draft,
        target_name=args.target_name,
        base_model=args.base_model,
        repo_id=args.repo_id,
        benchmark=args.benchmark,
        training_command=args.training_command,
        usage=Path(args.usage).read_text() if args.usage else None,
    )
    card.save(args.output)
    logger.info("card written to %s", args.output)
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "card",
        help="Render a draft's model card (README.md) from its folder and a benchmark JSON.",
        description="Renders the model card of a saved draft: training figures from its folder, speed figures "
        "(model-index) from a `specvlm-hf bench --output` JSON.",
    )
    parser.add_argument("--draft", required=True, help="Folder of the saved draft.")
    parser.add_argument("--target-name", required=True, help="The target as the card names it.")
    parser.add_argument("--base-model", help="The target's Hub id (the card's base_model).")
    parser.add_argument("--repo-id", help="Where the draft is published.")
    parser.add_argument("--benchmark", help="benchmark.json written by `specvlm-hf bench --output`.")
    parser.add_argument("--training-command", help="The command that trained the draft.")
    parser.add_argument("--usage", help="A file with a usage snippet that runs.")
    parser.add_argument("--output", required=True, help="Where to write the card (README.md).")
    parser.set_defaults(func=_card_command)
