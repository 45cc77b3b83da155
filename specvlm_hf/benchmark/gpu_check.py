"""The accelerator check, one script of at most ~8 minutes on one GPU; each part is time-boxed and a failing part is
recorded, not fatal. Writes `gpu_check.json` and `gpu_check.md` under `--out`.

1. Lossless in bfloat16 and float16: greedy tree decoding vs plain greedy `generate()` on tiny random LLaVAs (and on
   the testbed when one is installed): exact-match rate, first divergence and the target's top-1/top-2 logit margin
   there (a near-tie that the different reduction order of a q-token verification flips).
2. The quick benchmark on the testbed (float32, so T = 0 outputs must match), with `--draft` when given.
3. Costs at 7B scale (LLaVA-1.5-7B architecture, random bfloat16 weights made on the GPU): T(q)/T(1) at a ~700-token
   prefix, the draft's step cost, plain decoding's step, and the loop's overhead share (random draft: costs only).
4. The elastic visual compressor at 7B scale: the draft's prefill time and visual KV bytes for 576 / 2,880 / 11,520
   visual tokens with each compressor branch and without (`compression.scaling_study`, random bfloat16 weights).

    python -m specvlm_hf.benchmark.gpu_check --out gpu_check            # on a GPU
    python -m specvlm_hf.benchmark.gpu_check --out /tmp/gc --device cpu --tiny   # miniature, seconds
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from ..configuration import SpeculativeConfig
from ..generation import speculative_generate
from ..modeling_draft import SpecVLMDraftModel
from ..tuning import DeviceCosts, TreeTuner, measure_draft_levels
from .calibration import estimate_tree, measure_cost_curve, measure_plain_decoding, profile_loop, replay_context
from .compression import scaling_markdown, scaling_study
from .prompts import Sample
from .report import environment
from .stats import first_mismatch
from .synthetic import llava_config, random_inputs, random_llava

logger = logging.getLogger(__name__)

TREES = {
    "chain": SpeculativeConfig(depth=4, top_k=1, total_tokens=5),
    "tree": SpeculativeConfig(depth=5, top_k=4, total_tokens=24),
    "wide": SpeculativeConfig(depth=6, top_k=8, total_tokens=64),
}
COST_SIZES = (1, 2, 4, 8, 16, 32, 64, 96)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


class _Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def _part(name: str, seconds: float, fn: Callable[[_Deadline], dict]) -> dict:
    """Runs one part with its time box; an exception becomes `{"error": ...}`."""
    start = time.monotonic()
    logger.info("part %s (time box %.0f s)", name, seconds)
    try:
        result = fn(_Deadline(seconds))
    except Exception as err:  # a failed part is a result
        result = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(limit=4)}
    result["seconds"] = round(time.monotonic() - start, 1)
    return result


def compare_greedy(target, draft, inputs: dict, tree: SpeculativeConfig, max_new_tokens: int) -> dict:
    """Plain greedy vs tree decoding on one prompt: equality, first divergence and the plain logits' top-1/top-2
    margin there."""
    plain = target.generate(
        **inputs, max_new_tokens=max_new_tokens, do_sample=False, return_dict_in_generate=True, output_logits=True
    )
    prompt_len = inputs["input_ids"].shape[1]
    spec = speculative_generate(
        target,
        draft,
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        depth=tree.depth,
        tree_top_k=tree.top_k,
        total_tokens=tree.total_tokens,
    )
    reference, tokens = plain.sequences[0, prompt_len:].tolist(), spec.sequences[0, prompt_len:].tolist()
    position = first_mismatch(tokens, reference)
    found = {"equal": position is None, "first_divergence": position, "sigma": spec.mean_accepted_length}
    if position is not None and position < len(plain.logits):
        top = plain.logits[position][0].float().topk(2).values.tolist()
        found.update(top1_logit=top[0], margin=top[0] - top[1])
    return found


def check_lossless(
    device, *, models: int, prompts: int, max_new_tokens: int, deadline: _Deadline, draft_dir: str | None
) -> dict:
    """Exact-match rate of tree decoding vs plain greedy per dtype, on tiny random LLaVAs and the testbed."""
    results = {}
    for dtype_name, dtype in DTYPES.items():
        runs = []
        for seed in range(models):
            config = llava_config("tiny")
            target = random_llava(config, device, dtype, seed=seed, logit_scale=6.0)
            torch.manual_seed(seed)
            draft = SpecVLMDraftModel.from_target(target)
            for p in range(prompts):
                inputs = random_inputs(config, 4 + 3 * p, device, dtype, seed=100 * seed + p)
                for shape, tree in TREES.items():
                    if deadline.left() <= 0:
                        break
                    found = compare_greedy(target, draft, inputs, tree, max_new_tokens)
                    runs.append({"model": f"tiny-{seed}", "prompt": p, "tree": shape, **found})
        runs += _testbed_lossless(device, dtype, prompts, max_new_tokens, deadline, draft_dir)
        equal = sum(r["equal"] for r in runs if "equal" in r)
        compared = sum("equal" in r for r in runs)
        results[dtype_name] = {
            "exact": equal,
            "compared": compared,
            "rate": equal / compared if compared else None,
            "runs": runs,
        }
    return results


def _testbed_lossless(device, dtype, prompts: int, max_new_tokens: int, deadline: _Deadline, draft_dir) -> list[dict]:
    try:
        from ..testbed import heldout_prompts, load_testbed

        target, processor = load_testbed(build_if_missing=False, dtype=dtype, device=device)
    except Exception as err:  # no testbed here: say so
        return [{"model": "testbed", "skipped": f"{type(err).__name__}: {err}"}]
    draft = (
        SpecVLMDraftModel.from_pretrained(draft_dir, target=target)
        if draft_dir
        else SpecVLMDraftModel.from_target(target)
    )
    runs = []
    for i, prompt in enumerate(heldout_prompts("long", prompts)):
        if deadline.left() <= 0:
            break
        inputs = {
            k: v.to(device=device, dtype=dtype) if k == "pixel_values" else v.to(device)
            for k, v in prompt.inputs(processor).items()
        }
        found = compare_greedy(target, draft, inputs, TREES["tree"], max_new_tokens)
        runs.append({"model": "testbed", "prompt": i, "tree": "tree", **found})
    return runs


def check_benchmark(device, *, tiny: bool, draft_dir: str | None, assistant_dir: str | None, out: Path) -> dict:
    """The quick benchmark (float32) on the testbed, or on a tiny random LLaVA with `tiny`."""
    from .config import BenchmarkConfig
    from .runner import Resources, run_benchmark

    methods = ("vanilla", "prompt-lookup", "eaglevlm-fixed", "specvlm-fixed")
    methods += ("hf-assisted",) if assistant_dir else ()
    overrides = dict(
        device=str(device), dtype="float32", methods=methods, draft=draft_dir, assistant=assistant_dir, output=str(out)
    )
    if not tiny:
        from ..testbed import resolve, verify

        verify(resolve()[0])  # no testbed here: fail now rather than spend the time box building one
        return _benchmark_report(run_benchmark(BenchmarkConfig.quick_preset(**overrides)))
    config = llava_config("tiny")
    target = random_llava(config, device, torch.float32, logit_scale=6.0)
    draft = SpecVLMDraftModel.from_target(target)
    samples = [Sample(f"random:{i}", "", random_inputs(config, 6, device, torch.float32, seed=i)) for i in range(2)]
    run_config = BenchmarkConfig(
        methods=("vanilla", "prompt-lookup", "eaglevlm-fixed"),
        num_samples=2,
        repeats=1,
        max_new_tokens=16,
        calibration_tokens=16,
        search_budget=2,
        warmup_tokens=4,
        device=str(device),
        output=str(out),
    )
    resources = Resources(target, None, draft, info={"target": {"source": "tiny random LLaVA"}})
    return _benchmark_report(run_benchmark(run_config, resources=resources, samples=samples))


def _benchmark_report(result) -> dict:
    return {"markdown": result.markdown(), "summary": [s.to_dict() for s in result.summaries], "trees": result.trees}


def check_costs(
    device, *, scale: str, dtype: torch.dtype, text_len: int, new_tokens: int, deadline: _Deadline
) -> dict:
    """T(q)/T(1), draft step cost per tree shape, plain decoding step and the loop's overhead share at `scale`."""
    config = llava_config(scale)
    start = time.monotonic()
    target = random_llava(config, device, dtype)
    draft = SpecVLMDraftModel.from_target(target)
    init_seconds = time.monotonic() - start
    sample = Sample("random", "", random_inputs(config, text_len, device, dtype))
    plain = measure_plain_decoding(target, sample, 0.0, new_tokens, seed=0)
    context = replay_context(target, sample, plain.sequence)
    curve = measure_cost_curve(target, context, COST_SIZES)
    found = {
        "scale": scale,
        "dtype": str(dtype).removeprefix("torch."),
        "init_seconds": round(init_seconds, 1),
        "prompt_len": sample.prompt_len,
        "cost_curve_prefix_len": curve.prefix_len,
        "cost_curve_seconds": dict(zip(curve.sizes, curve.seconds)),
        "cost_curve_relative": curve.relative(),
        "plain_step_seconds": plain.seconds_per_token,
        "first_token_seconds": plain.first_token_seconds,
        "draft_step_seconds": {},
        "loop": {},
    }
    found["draft_level_seconds"] = measure_draft_levels(draft, curve.prefix_len)
    found["auto_tree"] = auto_tree_choices(DeviceCosts(curve, found["draft_level_seconds"]))
    for name, tree in TREES.items():
        if deadline.left() <= 0:
            break
        found["draft_step_seconds"][name] = estimate_tree(draft, target, [context], tree).draft_seconds
        found["loop"][name] = loop_split(profile_loop(target, draft, sample, tree, 0.0, new_tokens, seed=0))
    return found


def loop_split(loop) -> dict:
    """A profiled loop's seconds per step (`calibration.profile_loop`): verification, drafting, the rest, and the
    rest's share of the step."""
    step = loop.verify + loop.draft + loop.overhead
    return {
        "verify_seconds": loop.verify,
        "draft_seconds": loop.draft,
        "overhead_seconds": loop.overhead,
        "overhead_share": loop.overhead / step,
    }


# The testbed draft's level-1 probability mass in its top 1/2/4/8 tokens at T = 0 (measured by its TreeTuner on the
# held-out long prompts): the width prior `auto_tree_choices` assumes for a draft of unknown acceptance.
TESTBED_TOP_K_MASS = {1: 0.874, 2: 0.941, 4: 0.964, 8: 0.974}


def auto_tree_choices(costs: DeviceCosts, alphas=(0.6, 0.8, 0.9)) -> dict[str, str]:
    """What the auto tree (`tuning.TreeTuner`) picks with these costs for a draft whose per-depth acceptance is each
    of `alphas` (a random-weight draft has none of its own), with the testbed draft's top-k mass as width prior."""
    choices = {}
    for alpha in alphas:
        tuner = TreeTuner(costs, prior=alpha, strength=1e9, optimism=0.0)
        tuner.mass, tuner.mass_steps = dict(TESTBED_TOP_K_MASS), 1
        tree = tuner.choose()
        choices[f"alpha={alpha}"] = (
            "plain steps"
            if tree is None
            else f"depth={tree.depth}, top_k={tree.top_k}, total_tokens={tree.total_tokens}"
        )
    return choices


def markdown_summary(report: dict) -> str:
    lines = [f"# GPU check on {report['environment']['device_name']}", ""]
    lossless = report["lossless"]
    if "error" in lossless:
        lines.append(f"Lossless check failed: {lossless['error']}")
    for dtype_name, found in lossless.items():
        if not isinstance(found, dict) or "rate" not in found:
            continue
        margins = [r["margin"] for r in found["runs"] if "margin" in r]
        lines.append(
            f"- lossless {dtype_name}: {found['exact']}/{found['compared']} exact"
            + (
                f"; divergences at top-1/top-2 logit margins {', '.join(f'{m:.3g}' for m in margins)}"
                if margins
                else ""
            )
        )
        lines += [f"- {dtype_name}: {r['model']} skipped ({r['skipped']})" for r in found["runs"] if "skipped" in r]
    bench = report["benchmark"]
    lines += ["", "## Quick benchmark", "", bench.get("markdown", f"failed: {bench.get('error')}")]
    costs = report["costs"]
    lines += ["", f"## Costs at {costs.get('scale', '?')} scale (random weights)", ""]
    if "error" in costs:
        lines.append(f"failed: {costs['error']}")
    else:
        curve = ", ".join(f"T({q})={r:.2f}" for q, r in costs["cost_curve_relative"].items())
        lines.append(
            f"- prefix {costs['cost_curve_prefix_len']} tokens; T(1) = "
            f"{costs['cost_curve_seconds'][1] * 1e3:.2f} ms; {curve} x T(1)"
        )
        lines.append(f"- plain decoding {costs['plain_step_seconds'] * 1e3:.2f} ms/token")
        levels = ", ".join(f"k={k}: {t * 1e3:.2f} ms" for k, t in costs["draft_level_seconds"].items())
        lines.append(f"- one draft level (isolated): {levels}")
        lines.append(f"- auto tree picks: {'; '.join(f'{a}: {t}' for a, t in costs['auto_tree'].items())}")
        for name, loop in costs["loop"].items():
            lines.append(
                f"- {name}: draft {costs['draft_step_seconds'][name] * 1e3:.2f} ms/step (isolated), in loop "
                f"verify {loop['verify_seconds'] * 1e3:.2f} / draft {loop['draft_seconds'] * 1e3:.2f} / other "
                f"{loop['overhead_seconds'] * 1e3:.2f} ms per step, overhead share {loop['overhead_share']:.1%}"
            )
    compression = report.get("compression", {})
    lines += ["", "## The compressor: draft prefill vs visual tokens (random weights)", ""]
    lines.append(
        scaling_markdown(compression["rows"]) if "rows" in compression else f"failed: {compression.get('error')}"
    )
    return "\n".join(lines) + "\n"


def run_check(
    out: str | Path,
    *,
    device: str = "cuda",
    tiny: bool = False,
    draft_dir: str | None = None,
    assistant_dir: str | None = None,
    budget_s: float = 480.0,
) -> dict:
    """Runs the four parts (lossless 20%, benchmark 40%, costs 30%, compressor 10% of `budget_s`) and writes the
    report."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    report = {"environment": environment(device, torch.bfloat16), "tiny": tiny}
    report["lossless"] = _part(
        "lossless",
        0.2 * budget_s,
        lambda d: check_lossless(
            device,
            models=1 if tiny else 3,
            prompts=1 if tiny else 4,
            max_new_tokens=16 if tiny else 64,
            deadline=d,
            draft_dir=draft_dir,
        ),
    )
    report["benchmark"] = _part(
        "benchmark",
        0.4 * budget_s,
        lambda d: check_benchmark(
            device, tiny=tiny, draft_dir=draft_dir, assistant_dir=assistant_dir, out=out / "benchmark"
        ),
    )
    costs_dtype = torch.float32 if tiny and device.type == "cpu" else torch.bfloat16
    report["costs"] = _part(
        "costs",
        0.3 * budget_s,
        lambda d: check_costs(
            device,
            scale="tiny" if tiny else "7b",
            dtype=costs_dtype,
            text_len=8 if tiny else 124,
            new_tokens=16 if tiny else 64,
            deadline=d,
        ),
    )
    report["compression"] = _part(
        "compression",
        0.1 * budget_s,
        lambda d: {
            "rows": scaling_study(
                ("testbed",) if tiny else ("llava-1.5-7b",), (81,) if tiny else (576, 2880, 11520), device=device,
                dtype=costs_dtype, max_seconds=5.0,
            )
        },
    )  # fmt: skip
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "gpu_check.md").write_text(markdown_summary(report))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="Directory for gpu_check.json, gpu_check.md and benchmark/.")
    parser.add_argument("--device", default="cuda", help="Device (default: cuda).")
    parser.add_argument("--tiny", action="store_true", help="Miniature: tiny models everywhere (seconds, any device).")
    parser.add_argument("--draft", help="Trained draft directory for the testbed parts (default: the shipped one).")
    parser.add_argument(
        "--assistant", help="hf-assisted model directory (default: the shipped one; skipped when there is none)."
    )
    parser.add_argument("--budget-s", type=float, default=480.0, help="Total time box in seconds (default: 480).")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from ..testbed.store import resolve, shipped_companion

    testbed_dir = resolve()[0]
    draft, assistant = (shipped_companion(kind, testbed_dir) for kind in ("draft", "assistant"))
    report = run_check(
        args.out,
        device=args.device,
        tiny=args.tiny,
        draft_dir=args.draft or (None if args.tiny or draft is None else str(draft)),
        assistant_dir=args.assistant or (None if args.tiny or assistant is None else str(assistant)),
        budget_s=args.budget_s,
    )
    failed = [name for name in ("lossless", "benchmark", "costs", "compression") if "error" in report[name]]
    logger.info("wrote %s/gpu_check.{json,md}%s", args.out, f"; failed parts: {failed}" if failed else "")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
