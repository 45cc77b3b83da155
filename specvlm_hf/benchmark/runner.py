"""`run_benchmark`: load the models and prompts a `BenchmarkConfig` names, choose the tree per temperature, run the
interleaved sweep (per sample, and per batch for `config.batch_sizes` above 1), and summarise it into a
`BenchmarkResult` (written to `config.output` when set)."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from ..adapters import get_adapter
from ..compressor import compressor_for
from ..configuration import SpeculativeConfig
from ..modeling_draft import SpecVLMDraftModel
from ..modeling_eagle3 import SpecVLMEagle3DraftModel
from ..testbed.store import draft_location, is_testbed, shipped_companion
from ..tuning import VERIFY_SIZES
from .batches import BatchRecord, BatchSummary, run_batch_sweep, summarize_batches
from .calibration import TreeCalibration, calibrate_tree, measure_cost_curve, replay_context
from .config import BenchmarkConfig
from .methods import (
    COMPRESSOR_METHODS,
    DRAFT_METHODS,
    EAGLE3_METHODS,
    METHOD_NAMES,
    PARALLEL_METHODS,
    TREE_METHODS,
    EagleVLMFixed,
    HFAssisted,
    Method,
    Vanilla,
    build_methods,
    check_method_names,
    generation_config,
)
from .prompts import Prompt, Sample, load_prompts, prepare_batches, prepare_samples, select_prompts
from .report import BenchmarkResult, environment
from .summary import MethodSummary, summarize
from .sweep import RunRecord, run_sweep
from .timing import module_bytes
from .tree_budget import predict_end_to_end

logger = logging.getLogger(__name__)


@dataclass
class Resources:
    """The models a run uses, and what each one is (for the JSON)."""

    target: torch.nn.Module
    processor: object | None = None
    draft: SpecVLMDraftModel | None = None
    assistant: torch.nn.Module | None = None
    specvlm_draft: SpecVLMDraftModel | None = None
    eagle3_draft: SpecVLMDraftModel | None = None
    parallel_draft: SpecVLMDraftModel | None = None
    info: dict = field(default_factory=dict)


def _describe(model: torch.nn.Module, source: str, **extra) -> dict:
    return {
        "source": source,
        "parameters": sum(p.numel() for p in model.parameters()),
        "bytes": module_bytes(model),
        **extra,
    }


def _str(path) -> str | None:
    return None if path is None else str(path)


def applicable_methods(config: BenchmarkConfig, target, testbed_dir=None) -> tuple[str, ...]:
    """`config.methods`, or without them every method that applies to `target`: on a testbed (`testbed_dir`) those
    whose draft or assistant is shipped beside it or given; elsewhere every method (random drafts where none is
    given), but the compressor's (`specvlm-*`) when the target's visual tokens form no patch grid and no
    `--specvlm-draft` is given. No parallel draft is shipped: on a testbed the `parallel-*` methods need
    `--parallel-draft`."""
    if config.methods is not None:
        return config.methods
    if testbed_dir is not None:
        def has(kind, given):
            return given is not None or shipped_companion(kind, testbed_dir) is not None

        available = {
            DRAFT_METHODS: has("draft", config.draft),
            COMPRESSOR_METHODS: has("specvlm-draft", config.specvlm_draft),
            EAGLE3_METHODS: has("eagle3-draft", config.eagle3_draft),
            PARALLEL_METHODS: config.parallel_draft is not None,
            (HFAssisted.name,): has("assistant", config.assistant),
        }
    else:
        grid = config.specvlm_draft is not None or get_adapter(target).patch_grid() is not None
        available = {COMPRESSOR_METHODS: grid}
    skipped = [name for group, ok in available.items() if not ok for name in group]
    if skipped:
        logger.info("methods that do not apply to this target (no draft for them): %s", ", ".join(skipped))
    return check_method_names([name for name in METHOD_NAMES if name not in skipped])


def _loaded(resources: Resources) -> tuple[str, ...]:
    """The methods whose models `resources` holds (for prepared resources and no `config.methods`)."""
    held = {
        DRAFT_METHODS: resources.draft,
        COMPRESSOR_METHODS: resources.specvlm_draft,
        EAGLE3_METHODS: resources.eagle3_draft,
        PARALLEL_METHODS: resources.parallel_draft,
        (HFAssisted.name,): resources.assistant,
    }
    skipped = {name for group, model in held.items() if model is None for name in group}
    return check_method_names([name for name in METHOD_NAMES if name not in skipped])


def load_resources(config: BenchmarkConfig) -> Resources:
    """The target (+ processor), and the draft / assistant when the chosen methods need them. On the shipped
    testbed, the draft and assistant shipped beside it are the defaults. Without `config.methods`, `resources.info
    ["methods"]` holds the methods that apply (`applicable_methods`)."""
    device, dtype = config.torch_device, config.torch_dtype
    source = config.target
    if is_testbed(config.target):
        from ..testbed import load_testbed, resolve

        target, processor = load_testbed(config.target, dtype=dtype, device=device)
        testbed_dir = resolve(config.target)[0]
        config = dataclasses.replace(config, methods=applicable_methods(config, target, testbed_dir))
        source = f"testbed at {testbed_dir}"
        config = dataclasses.replace(
            config,
            draft=config.draft or _str(shipped_companion("draft", testbed_dir)),
            specvlm_draft=config.specvlm_draft or _str(shipped_companion("specvlm-draft", testbed_dir)),
            eagle3_draft=config.eagle3_draft or _str(shipped_companion("eagle3-draft", testbed_dir)),
            assistant=config.assistant or _str(shipped_companion("assistant", testbed_dir)),
        )
    else:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        target = AutoModelForImageTextToText.from_pretrained(config.target, dtype=dtype, attn_implementation="sdpa")
        target = target.to(device).eval()
        processor = AutoProcessor.from_pretrained(config.target)
        config = dataclasses.replace(config, methods=applicable_methods(config, target))
    if config.target_adapter is not None:
        from peft import PeftModel

        target = PeftModel.from_pretrained(target, config.target_adapter).eval()
        source = f"{source} + peft adapter {config.target_adapter}"
    resources = Resources(target, processor, info={"target": _describe(target, source), "methods": config.methods})
    if set(DRAFT_METHODS) & set(config.methods):
        resources.draft, source = _draft(config.draft, target, "--draft")
        resources.info["draft"] = _describe(resources.draft, source)
    if set(COMPRESSOR_METHODS) & set(config.methods):
        resources.specvlm_draft, source = _draft(config.specvlm_draft, target, "--specvlm-draft", compressor=True)
        resources.info["specvlm-draft"] = _describe(
            resources.specvlm_draft, source, compressor=resources.specvlm_draft.config.compressor
        )
    if set(EAGLE3_METHODS) & set(config.methods):
        resources.eagle3_draft, source = _draft(config.eagle3_draft, target, "--eagle3-draft", eagle3=True)
        resources.info["eagle3-draft"] = _describe(resources.eagle3_draft, source)
    if set(PARALLEL_METHODS) & set(config.methods):
        resources.parallel_draft, source = _draft(config.parallel_draft, target, "--parallel-draft", parallel=True)
        resources.info["parallel-draft"] = _describe(
            resources.parallel_draft, source, parallel_depth=resources.parallel_draft.config.parallel_depth
        )
    if HFAssisted.name in config.methods:
        resources.assistant, resources.info["assistant"] = _assistant(config, target, processor)
    for draft in _drafts(resources).values():
        draft.speculative_config = dataclasses.replace(draft.speculative_config, draft_numerics=config.draft_numerics)
    return resources


def _drafts(resources: Resources) -> dict:
    """The loaded drafts by their `models` key."""
    drafts = {
        "draft": resources.draft,
        "specvlm-draft": resources.specvlm_draft,
        "eagle3-draft": resources.eagle3_draft,
        "parallel-draft": resources.parallel_draft,
    }
    return {name: draft for name, draft in drafts.items() if draft is not None}


def numerics_report(draft) -> dict:
    """What the draft's auto trees drafted with (`draft_numerics`: per batch size, the numerics of its costs) and a
    draft level's measured seconds per width in each numerics (`tuning.device_costs`; batch size 1 where it ran)."""
    tuners = sorted(draft._tuners.items(), key=lambda item: item[0][3])  # by batch size
    if not tuners:
        return {}
    levels = tuners[0][1].costs.levels
    return {
        "draft_numerics": {str(key[3]): tuner.costs.numerics for key, tuner in tuners},
        "draft_level_seconds": {name: {str(k): v for k, v in level.items()} for name, level in levels.items()},
    }


def _draft(
    path: str | None, target, flag: str, compressor: bool = False, eagle3: bool = False, parallel: bool = False
):
    """`(draft, source)`: the draft saved at `path`, else a randomly initialised one (with SpecVLM's elastic
    compressor when `compressor`; an EAGLE-3 one when `eagle3`; one with parallel depth 6 when `parallel`), with a
    warning."""
    if path is not None:
        draft = SpecVLMDraftModel.from_pretrained(draft_location(path), target=target)
        if eagle3 != (draft.feature_layers is not None):
            raise ValueError(f"{flag} {path} is {'not ' if eagle3 else ''}an EAGLE-3 draft.")
        depth = draft.config.parallel_depth
        if parallel and depth < 2:
            raise ValueError(
                f"{flag} {path} is not a parallel draft (parallel_depth {depth}); train one with "
                "specvlm-hf train --parallel-depth N"
            )
        return draft, path
    logger.warning("no %s given: a randomly initialised draft runs (expect sigma near 1)", flag)
    draft = (SpecVLMEagle3DraftModel if eagle3 else SpecVLMDraftModel).from_target(target)
    if parallel:
        draft.enable_parallel_drafting(6)
    if compressor:
        grid = get_adapter(target).patch_grid()
        draft.set_compressor(compressor_for("elastic", draft.config.hidden_size, grid))
    return draft, "random init (untrained)"


def _assistant(config: BenchmarkConfig, target, processor):
    from .assistant_lm import (
        AssistantConfig,
        assistant_conversations,
        build_assistant,
        default_assistant_dir,
        load_assistant,
        read_record,
    )

    path = config.assistant or default_assistant_dir(processor.tokenizer)
    if config.assistant is None and (config.rebuild_assistant or read_record(path) is None):
        if not is_testbed(config.target):
            raise ValueError("the default hf-assisted model is trained on the testbed; pass --assistant DIR")
        settings = AssistantConfig()
        logger.warning("training the hf-assisted model (at most %.0f s) into %s", settings.time_budget_s, path)
        build_assistant(
            target, processor, assistant_conversations(settings.conversations, settings.seed), path, settings
        )
    assistant = load_assistant(path, target, dtype=config.torch_dtype)
    return assistant, _describe(assistant, str(path), training=read_record(path))


def select_prompt_sets(config: BenchmarkConfig) -> tuple[list[Prompt], list[Prompt], bool]:
    """The benchmarked prompts and the tree calibration prompts (taken after them in the source when it has enough
    prompts; otherwise from the benchmarked ones, flagged by the returned `bool`).

    Calibration prefers "long" prompts, then those with the longest reference answers: a 2-5 token answer says
    almost nothing about how many drafted tokens the target accepts, and the tree matters on long answers."""
    prompts = load_prompts(config.prompts, image_root=config.image_root)
    ordered = select_prompts(prompts, None, config.kind)
    chosen, rest = ordered[: config.num_samples], ordered[config.num_samples :]
    overlap = len(rest) < config.calibration_samples
    pool = chosen if overlap else select_prompts(rest, None)
    calibration = sorted(pool, key=lambda p: (p.kind != "long", -len(p.reference or "")))
    return chosen, calibration[: config.calibration_samples], overlap


def choose_trees(config: BenchmarkConfig, resources: Resources, calibration: Sequence[Sample]):
    """The tree per temperature: the fixed `--tree`, or one `calibrate_tree` per temperature (one cost curve)."""
    fixed = config.fixed_tree
    if fixed is not None:
        return {t: fixed for t in config.temperatures}, {}
    trees, calibrations, curve = {}, {}, None
    for temperature in config.temperatures:
        found = calibrate_tree(
            resources.target,
            next(iter(_drafts(resources).values())),
            calibration,
            temperature=temperature,
            max_new_tokens=min(config.calibration_tokens, config.max_new_tokens),
            budget=config.search_budget,
            seed=config.seed,
            curve=curve,
        )
        curve = found.curve
        trees[temperature], calibrations[temperature] = found.choice.tree, found
        logger.info(
            "T=%s: chose tree depth=%d top_k=%d total_tokens=%d (predicted %.2fx decoding)",
            temperature,
            found.choice.tree.depth,
            found.choice.tree.top_k,
            found.choice.tree.total_tokens,
            found.choice.predicted_speedup,
        )
    return trees, calibrations


def tree_report(
    temperature: float,
    tree: SpeculativeConfig,
    calibration: TreeCalibration | None,
    records: Sequence[RunRecord],
    summaries: Sequence[MethodSummary],
) -> dict:
    """The tree used at `temperature`, and with `--tree search` its calibration and predicted vs measured speedup."""
    fixed = [s.speedup for s in summaries if s.method == EagleVLMFixed.name and s.temperature == temperature]
    measured = fixed[0] if fixed else None
    report = {
        "temperature": temperature,
        "mode": "search" if calibration else "fixed",
        **{k: getattr(tree, k) for k in ("depth", "top_k", "total_tokens")},
        "measured_speedup": measured.median if measured else None,
    }
    if calibration is None:
        return report
    choice = calibration.choice
    best = choice.scored[0][0]
    vanilla = [r for r in records if r.method == Vanilla.name and r.temperature == temperature and r.ok]
    e2e = [
        predict_end_to_end(
            best, calibration.loop_curve, calibration.plain_step, calibration.loop.overhead, r.wall_time, r.new_tokens
        )
        for r in vanilla
    ]
    report.update(
        predicted_decode_speedup=choice.predicted_speedup,
        predicted_speedup=float(np.median(e2e)) if e2e else None,
        tokens_per_step=best.tokens_per_step,
        draft_seconds_per_step=best.draft_seconds,
        draft_prefill_seconds=best.draft_prefill_seconds,
        plain_step_seconds=calibration.plain_step,
        first_token_seconds=calibration.first_token_seconds,
        overhead_seconds_per_step=calibration.loop.overhead,
        profiled_tree={k: getattr(calibration.loop.tree, k) for k in ("depth", "top_k", "total_tokens")},
        verify_scale=calibration.verify_scale,
        draft_scale=calibration.draft_scale,
        cost_curve_seconds=dict(zip(calibration.curve.sizes, calibration.curve.seconds)),
        cost_curve_relative=calibration.curve.relative(),
        cost_curve_prefix_len=calibration.curve.prefix_len,
        calibration_samples=list(calibration.calibration_samples),
        shapes_scored=len(choice.scored),
        scored=[
            {
                "depth": e.tree.depth,
                "top_k": e.tree.top_k,
                "total_tokens": e.tree.total_tokens,
                "tokens_per_step": e.tokens_per_step,
                "draft_seconds": e.draft_seconds,
                "predicted_speedup": p,
            }
            for e, p in choice.scored
        ],
    )
    return report


def bound_curve(config: BenchmarkConfig, resources: Resources, calibration: Sequence[Sample], calibrations: dict):
    """T(q) for the free-draft bound: the tree calibration's curve, else one measured on the first calibration
    prompt's greedy continuation (`calibration.measure_cost_curve`)."""
    for found in calibrations.values():
        return found.curve
    if not calibration:
        return None
    target, sample = resources.target, calibration[0]
    tokens = min(config.calibration_tokens, config.max_new_tokens)
    with torch.no_grad():
        sequence = target.generate(**sample.inputs, generation_config=generation_config(target, 0.0, tokens))
    context = replay_context(target, sample, sequence)
    return measure_cost_curve(target, context, VERIFY_SIZES)


def _check_load(device: torch.device) -> list[float] | None:
    """The 1/5/15-minute load average, with a warning when other jobs keep more than the CPU's cores busy: on shared
    cores every CPU timing stretches, unevenly, by large factors (thread spin-waits), whatever the pairing."""
    if not hasattr(os, "getloadavg"):
        return None
    load = list(os.getloadavg())
    if device.type == "cpu" and load[0] > (os.cpu_count() or 1):
        message = "load average %.1f on %d CPU cores: other jobs are running, timings will be distorted"
        logger.warning(message, load[0], os.cpu_count())
    return load


def _sweep_settings(config: BenchmarkConfig) -> dict:
    """The settings `run_sweep` and `run_batch_sweep` share, besides the temperature."""
    return dict(
        repeats=config.repeats,
        max_new_tokens=config.max_new_tokens,
        device=config.torch_device,
        seed=config.seed,
        warmup_tokens=config.warmup_tokens,
    )


def run_batches(
    config: BenchmarkConfig, resources: Resources, prompts: Sequence[Prompt], methods: dict[str, Method]
) -> tuple[list[BatchRecord], list[str]]:
    """The batch axis: `prompts` in left-padded batches of each size of `config.batch_sizes` above 1 (built with the
    target's processor), every method that decodes batches on them at every temperature (`batches.run_batch_sweep`).
    Returns the records and a note per batch size whose batches repeat prompts to fill their rows."""
    sizes = [b for b in config.batch_sizes if b > 1]
    if not sizes:
        return [], []
    if resources.processor is None:
        raise ValueError("batch sizes above 1 need the target's processor to build the batches")
    records, notes = [], []
    for size in sizes:
        batches = prepare_batches(prompts, resources.processor, size, config.torch_device, config.torch_dtype)
        repeated = len(batches) * size - len(prompts)
        if repeated:
            notes.append(
                f"batch size {size}: {len(prompts)} prompts fill {len(batches)} batch(es) of {size} rows, "
                f"{repeated} row(s) repeating prompts from the first (ids `<prompt>#<n>`)"
            )
        for temperature in config.temperatures:
            records += run_batch_sweep(
                resources.target, batches, methods, temperature=temperature, **_sweep_settings(config)
            )
    return records, notes


def run_benchmark(
    config: BenchmarkConfig,
    *,
    resources: Resources | None = None,
    samples: Sequence[Sample] | None = None,
    calibration: Sequence[Sample] | None = None,
) -> BenchmarkResult:
    """
    Runs the benchmark `config` describes.

    Args:
        resources (`Resources`, *optional*): models to use instead of loading those `config` names.
        samples, calibration (`Sequence[Sample]`, *optional*): prepared samples instead of `config.prompts`
            (`calibration` defaults to the first `config.calibration_samples` of `samples`); the batch axis
            (`config.batch_sizes` above 1) needs `config.prompts` instead.
    """
    if config.threads:
        torch.set_num_threads(config.threads)
    load_at_start = _check_load(config.torch_device)
    overlap, prompts = False, []
    if samples is None:  # prompt files are read (and bad rows reported) before any model loads
        prompts, calibration_prompts, overlap = select_prompt_sets(config)
    elif max(config.batch_sizes) > 1:
        raise ValueError("batch sizes above 1 build their batches from config.prompts, not from prepared samples")
    resources = resources or load_resources(config)
    config = dataclasses.replace(config, methods=config.methods or resources.info.get("methods") or _loaded(resources))
    if samples is None:
        device, dtype = config.torch_device, config.torch_dtype
        samples = prepare_samples(prompts, resources.processor, device, dtype)
        calibration = prepare_samples(calibration_prompts, resources.processor, device, dtype)
    elif calibration is None:
        calibration, overlap = samples[: config.calibration_samples], True
    trees, calibrations = {}, {}
    if set(TREE_METHODS) & set(config.methods):  # calibrated on the EagleVLM draft (if run), run by every -fixed method
        trees, calibrations = choose_trees(config, resources, calibration)
    methods = build_methods(
        config.methods,
        draft=resources.draft,
        specvlm_draft=resources.specvlm_draft,
        eagle3_draft=resources.eagle3_draft,
        parallel_draft=resources.parallel_draft,
        assistant=resources.assistant,
        trees=trees,
        prompt_lookup_tokens=config.prompt_lookup_tokens,
    )
    records = []
    for temperature in config.temperatures if 1 in config.batch_sizes else ():
        records += run_sweep(resources.target, samples, methods, temperature=temperature, **_sweep_settings(config))
    batch_records, batch_notes = run_batches(config, resources, prompts, methods)
    if resources.specvlm_draft is not None and hasattr(resources.specvlm_draft.compressor, "branch_counts"):
        # the compressor's choice per input over the whole run (warm-up runs included)
        chosen = dict(resources.specvlm_draft.compressor.branch_counts)
        resources.info.setdefault("specvlm-draft", {})["branches_chosen"] = chosen
    for name, draft in _drafts(resources).items():
        resources.info.setdefault(name, {}).update(numerics_report(draft))
    curve = bound_curve(config, resources, calibration, calibrations) if records else None
    summaries = summarize(records, curve)
    batch_summaries = []
    if batch_records:
        skipped = [name for name, method in methods.items() if not method.supports_batches]
        batch_summaries = [BatchSummary.from_method_summary(s) for s in summaries]
        batch_summaries += summarize_batches(batch_records, list(methods), skipped)
        batch_summaries.sort(key=lambda s: (s.temperature, s.batch_size))  # stable: method order kept
    run_config = {**asdict(config), "calibration_overlaps_benchmark": overlap, "samples": [s.id for s in samples]}
    result = BenchmarkResult(
        config=run_config,
        environment={**environment(config.torch_device, config.torch_dtype), "load_average_at_start": load_at_start},
        models=resources.info,
        trees=[tree_report(t, trees[t], calibrations.get(t), records, summaries) for t in trees],
        cost_curve=asdict(curve) if curve is not None else {},
        records=records,
        summaries=summaries,
        batch_records=batch_records,
        batch_summaries=batch_summaries,
        batch_notes=batch_notes,
    )
    if config.output:
        result.write(config.output)
    return result
