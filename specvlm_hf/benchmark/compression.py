"""What the elastic visual compressor saves the draft: its prefill time and KV cache against the number of visual
tokens (`specvlm-hf compression scaling`), and the paper's Tables 3/4 on the testbed: each primitive alone at several
ratios and the three combination modes, each trained jointly with its draft (`specvlm-hf compression ablation`).

The draft's *prefill* is its first call in a generation: the compressor over the prompt's visual pairs, then one
draft forward over the (compressed) prompt into the draft's KV cache (`draft_prefill`, the same calls `TreeDrafter`
makes). The draft's visual KV bytes are what its cache holds for the visual pairs that reach it.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import DynamicCache

from ..clock import time_call
from ..compressor import SpecVLMCompressor, SpecVLMCompressorConfig
from ..configuration import SpecVLMDraftConfig
from ..draft_step import LeanDraftForward
from ..modeling_draft import SpecVLMDraftModel
from ..tree import causal_attention_mask

logger = logging.getLogger(__name__)

# Text shapes of the scaling study: the testbed's and LLaVA-1.5-7B's (Vicuna-7B: 4096 wide, 32 heads, MLP 11008).
SHAPES = {
    "testbed": dict(hidden_size=384, intermediate_size=1024, num_attention_heads=6, num_key_value_heads=2),
    "llava-1.5-7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32),
}
# 81 = the testbed's 9x9 image; 576 = LLaVA-1.5's 24x24; 2,880 = LLaVA-NeXT AnyRes at 5 tiles of 24x24; 11,520 =
# 20 images (or video frames) of 24x24.
VISUAL_TOKENS = {81: (9, 9, 1), 576: (24, 24, 1), 2880: (24, 24, 5), 11520: (24, 24, 20)}
TEXT_TOKENS = 48  # a question's worth of text around the image(s)
SCALING_BRANCHES = ("none", "prune:20", "pool:10", "conv:3", "resampler:2", "text")


@dataclass(frozen=True)
class PrefillCost:
    """One draft prefill: `seconds` (median of the repeats), cache `entries`, of which `visual_entries` from the
    image(s), and `visual_kv_bytes` (keys and values of those entries over all layers)."""

    seconds: float
    entries: int
    visual_entries: int
    visual_kv_bytes: int


def kv_bytes_per_entry(config: SpecVLMDraftConfig, dtype: torch.dtype) -> int:
    """Bytes one cache entry takes: keys and values of every layer."""
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * element


@torch.no_grad()
def draft_prefill(draft, inputs_embeds, features, position_ids, image_mask, repeats: int = 3) -> PrefillCost:
    """
    Times the draft's prefill as `TreeDrafter.propose` runs it: the compressor, then one lean forward over the prompt
    into a fresh static cache.

    Args:
        inputs_embeds, features (`torch.FloatTensor` of shape `(1, n, hidden_size)`), position_ids
            (`torch.LongTensor` of shape `(1, n)`), image_mask (`torch.BoolTensor` of shape `(n,)`): the draft's
            prompt state (`loop.prompt_draft_state`).
    """
    times, entries = [], 0

    def run():
        embeds, feats, positions = draft.compressor(inputs_embeds, features, position_ids, image_mask)
        forward = LeanDraftForward(draft, capacity=embeds.shape[1])
        forward.reserve_positions(inputs_embeds.shape[1])  # compressed pairs keep positions below the prompt's length
        mask = causal_attention_mask(embeds.shape[1], 0, embeds.dtype, embeds.device)
        forward(embeds, feats, positions, mask)
        return forward.cache.length

    for _ in range(repeats):
        entries, seconds = time_call(run, inputs_embeds.device)
        times.append(seconds)
    visual = entries - int((~image_mask).sum())
    weight = draft.fc.weight
    return PrefillCost(
        statistics.median(times), entries, visual, visual * kv_bytes_per_entry(draft.config, weight.dtype)
    )


def _random_draft(shape: dict, branch: str, grid: tuple[int, int], device, dtype) -> SpecVLMDraftModel:
    """A one-layer draft of `shape` with random weights (cost only), with the compressor `branch` (or none)."""
    config = SpecVLMDraftConfig(vocab_size=32, max_position_embeddings=16384, **shape)
    draft = SpecVLMDraftModel(config).eval()
    if branch != "none":
        compressor = SpecVLMCompressor(
            SpecVLMCompressorConfig(hidden_size=shape["hidden_size"], grid=list(grid), branches=[branch])
        )
        draft.compressor = compressor.eval()  # unbound draft: set directly, no target to check the grid against
    return draft.to(device=device, dtype=dtype)


def scaling_study(shapes=tuple(SHAPES), visual_tokens=tuple(VISUAL_TOKENS), branches=SCALING_BRANCHES,
                  repeats: int = 3, max_seconds: float = 60.0, device="cpu", dtype=torch.float32) -> list[dict]:  # fmt: skip
    """
    Draft prefill time and visual KV bytes per (text shape, visual tokens, branch), random weights, on `device` in
    `dtype`. A configuration whose uncompressed prefill took longer than `max_seconds` runs once.
    """
    rows = []
    for shape_name in shapes:
        shape = SHAPES[shape_name]
        for n_visual in visual_tokens:
            height, width, images = VISUAL_TOKENS[n_visual]
            n = TEXT_TOKENS + n_visual
            generator = torch.Generator().manual_seed(0)
            embeds = torch.randn(1, n, shape["hidden_size"], generator=generator).to(device, dtype)
            features = torch.randn(1, n, shape["hidden_size"], generator=generator).to(device, dtype)
            positions = torch.arange(n, device=device)[None]
            image_mask = torch.zeros(n, dtype=torch.bool, device=device)
            image_mask[TEXT_TOKENS // 2 : TEXT_TOKENS // 2 + n_visual] = True
            baseline = None
            for branch in branches:
                torch.manual_seed(0)
                draft = _random_draft(shape, branch, (height, width), device, dtype)
                slow = baseline is not None and baseline.seconds > max_seconds
                cost = draft_prefill(draft, embeds, features, positions, image_mask, 1 if slow else repeats)
                baseline = baseline or cost
                rows.append(
                    dict(shape=shape_name, visual_tokens=n_visual, images=images, branch=branch, **asdict(cost),
                         prefill_share=cost.seconds / baseline.seconds,
                         kv_share=cost.visual_kv_bytes / baseline.visual_kv_bytes)
                )  # fmt: skip
                logger.warning(
                    "%s, %d visual tokens, %s: %.1f ms, %d visual entries", shape_name, n_visual, branch,
                    1e3 * cost.seconds, cost.visual_entries,
                )  # fmt: skip
                del draft
    return rows


def scaling_markdown(rows: list[dict]) -> str:
    lines = [
        "| text shape | visual tokens | branch | draft prefill | of uncompressed | visual KV entries | visual KV |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['visual_tokens']:,} | {r['branch']} | {1e3 * r['seconds']:.1f} ms | "
            f"{100 * r['prefill_share']:.0f}% | {r['visual_entries']:,} | {r['visual_kv_bytes'] / 2**20:.2f} MiB |"
        )
    return "\n".join(lines)


def plot_scaling(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    fig, axes = plt.subplots(1, len(shapes), figsize=(5.5 * len(shapes), 4), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        for branch in dict.fromkeys(r["branch"] for r in rows):
            points = [
                (r["visual_tokens"], 1e3 * r["seconds"]) for r in rows if r["shape"] == shape and r["branch"] == branch
            ]
            ax.plot(*zip(*points), marker="o", label=branch)
        ax.set(xscale="log", yscale="log", xlabel="visual tokens", ylabel="draft prefill (ms)", title=f"{shape} shape")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Draft prefill vs visual tokens, with each compressor branch (random weights, CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------- ablation
ABLATION = (  # (name, branches, mode): the paper's Table 4 primitives at several sizes, then Table 3's modes
    ("eaglevlm", None, "select"),
    ("text", ["text"], "select"),
    ("prune:5", ["prune:5"], "select"),
    ("prune:20", ["prune:20"], "select"),
    ("prune_importance:20", ["prune_importance:20"], "select"),
    ("pool:3", ["pool:3"], "select"),
    ("pool:20", ["pool:20"], "select"),
    ("conv:3", ["conv:3"], "select"),
    ("resampler:2", ["resampler:2"], "select"),
    ("resampler:8", ["resampler:8"], "select"),
    ("select", ["prune:20", "pool:10", "conv:3", "resampler:2", "text"], "select"),
    ("weight", ["prune:3", "pool:3", "conv:3"], "weight"),
    ("concat", ["prune:20", "pool:20", "conv:3", "resampler:2"], "concat"),
)


def ablation(output: Path, steps: int, prompts: int, max_new_tokens: int, only: list[str] | None = None) -> list[dict]:
    """
    Trains one draft per `ABLATION` entry for `steps` steps on the testbed's self-distilled rows (generated once
    into `output`, as `specvlm-hf train --self-distill` does), then measures each on `prompts` held-out long prompts at
    T = 0 with a depth-5 chain against plain `generate()`, interleaved: tau (total vanilla time / total draft time),
    sigma, equality with vanilla, draft prefill time and visual KV bytes on the first prompt, and training time.
    """
    from ..adapters import get_adapter
    from ..generation import speculative_generate
    from ..loop import prefill, prompt_draft_state
    from ..testbed import heldout_prompts, load_testbed
    from ..training.cli import _testbed_rows
    from ..training.config import DistillationConfig
    from ..training.data import read_llava_jsonl
    from ..training.pipeline import train_draft
    from ..training.selfdistill import regenerate_answers, write_llava_jsonl

    torch.manual_seed(0)
    target, processor = load_testbed()
    adapter = get_adapter(target)
    grid = adapter.patch_grid()
    cached = output / "self_distill" / "data.jsonl"
    if not cached.exists():
        rows, _ = _testbed_rows(output, 1600, 1)
        write_llava_jsonl(regenerate_answers(target, processor, rows, max_new_tokens=384), cached)
    rows, _ = read_llava_jsonl(cached)
    samples = [dict(p.inputs(processor)) for p in heldout_prompts(kind="long", n=prompts)]
    first = samples[0]
    layout = adapter.layout(first["input_ids"], first)
    embeds, features, _ = prefill(adapter, first["input_ids"], layout, DynamicCache())
    state = prompt_draft_state(
        adapter,
        torch.cat([first["input_ids"], first["input_ids"][:, -1:]], 1),
        embeds,
        features,
        layout.visual_mask[0],
    )

    results = []
    for name, branches, mode in ABLATION:
        if only and name not in only:
            continue
        torch.manual_seed(0)
        draft = SpecVLMDraftModel.from_target(target)
        if branches is not None:
            draft.set_compressor(SpecVLMCompressor(SpecVLMCompressorConfig(
                hidden_size=draft.config.hidden_size, grid=list(grid), branches=branches, mode=mode
            )))  # fmt: skip
        args = DistillationConfig(
            output_dir=str(output / "drafts" / name.replace(":", "-")), max_steps=steps, per_device_train_batch_size=16,
            learning_rate=1e-3, lr_scheduler_type="cosine", warmup_steps=0.03, adam_beta2=0.95, max_grad_norm=0.5,
            bf16=True, use_cpu=True, save_steps=10**6, logging_steps=10, report_to=[], seed=0,
            dataloader_num_workers=0, eval_prompts=0, eval_at_start=False, disable_tqdm=True,
        )  # fmt: skip
        draft, summary = train_draft(target, processor, rows, args, draft=draft)
        draft.eval()
        cost = draft_prefill(draft, state.inputs_embeds, state.features, state.position_ids, state.image_mask, 5)
        vanilla_time = draft_time = 0.0
        tokens = forwards = equal = 0
        for sample in samples:
            start = time.perf_counter()
            plain = target.generate(**sample, max_new_tokens=max_new_tokens, do_sample=False)
            vanilla_time += time.perf_counter() - start
            out = speculative_generate(target, draft, **sample, max_new_tokens=max_new_tokens, depth=5, tree_top_k=1,
                                       total_tokens=6)  # fmt: skip
            draft_time += out.stats.wall_time
            tokens += out.stats.new_tokens
            forwards += out.stats.target_forwards
            equal += int(torch.equal(out.sequences, plain))
        result = dict(
            name=name, branches=branches, mode=mode, tau=vanilla_time / draft_time, sigma=tokens / forwards,
            equal=f"{equal}/{len(samples)}", draft_prefill_ms=1e3 * cost.seconds,
            visual_entries=cost.visual_entries, visual_kv_bytes=cost.visual_kv_bytes,
            train_seconds=summary["wall_seconds"], branches_chosen=summary.get("compressor_branches"),
            inference_branches=dict(getattr(draft.compressor, "branch_counts", {})),
        )  # fmt: skip
        logger.warning("%s", json.dumps(result))
        results.append(result)
        (output / "ablation.json").write_text(json.dumps(results, indent=2))
    return results


def ablation_markdown(results: list[dict]) -> str:
    lines = [
        "| draft | tau | sigma | = vanilla | draft prefill | visual KV entries | visual KV | train time | branches (train) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        chosen = r.get("branches_chosen") or {}
        total = sum(chosen.values()) or 1
        shares = ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in sorted(chosen.items(), key=lambda kv: -kv[1]))
        lines.append(
            f"| {r['name']} | {r['tau']:.2f}x | {r['sigma']:.2f} | {r['equal']} | {r['draft_prefill_ms']:.2f} ms | "
            f"{r['visual_entries']} | {r['visual_kv_bytes'] / 1024:.0f} KiB | {r['train_seconds']:.0f} s | "
            f"{shares if len(chosen) > 1 else '-'} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------- CLI
def register(subparsers) -> None:
    p = subparsers.add_parser(
        "compression",
        help="The compressor's savings: draft prefill / KV vs visual tokens, and the primitive ablation.",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sub = p.add_subparsers(dest="study", required=True)
    s = sub.add_parser("scaling", help="Draft prefill time and visual KV bytes vs visual tokens (random weights).")
    s.add_argument("--shapes", default=",".join(SHAPES), help=f"Comma-separated text shapes: {', '.join(SHAPES)}.")
    s.add_argument("--visual-tokens", default=",".join(map(str, VISUAL_TOKENS)))
    s.add_argument("--repeats", type=int, default=3)
    s.add_argument("--output", required=True, help="Directory for scaling.json, scaling.md and scaling.png.")
    s.set_defaults(func=_run_scaling)
    a = sub.add_parser("ablation", help="Each primitive and mode trained jointly with its draft on the testbed.")
    a.add_argument("--steps", type=int, default=120, help="Training steps per draft (the shipped drafts: 760).")
    a.add_argument("--prompts", type=int, default=6, help="Held-out long prompts measured per draft.")
    a.add_argument("--max-new-tokens", type=int, default=160)
    a.add_argument("--only", default=None, help=f"Comma-separated entries of: {', '.join(n for n, _, _ in ABLATION)}.")
    a.add_argument("--output", required=True, help="Directory for the data, the drafts and ablation.json/.md.")
    a.set_defaults(func=_run_ablation)


def _run_scaling(args) -> int:
    shapes = [s for s in args.shapes.split(",") if s]
    unknown = sorted(set(shapes) - set(SHAPES))
    tokens = [int(t) for t in args.visual_tokens.split(",") if t]
    if unknown or set(tokens) - set(VISUAL_TOKENS):
        raise SystemExit(
            f"--shapes from {', '.join(SHAPES)}; --visual-tokens from {', '.join(map(str, VISUAL_TOKENS))}"
        )
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    rows = scaling_study(shapes, tokens, repeats=args.repeats)
    (output / "scaling.json").write_text(json.dumps(rows, indent=2))
    table = scaling_markdown(rows)
    (output / "scaling.md").write_text(table + "\n")
    plot_scaling(rows, output / "scaling.png")
    return 0


def _run_ablation(args) -> int:
    names = [n for n, _, _ in ABLATION]
    only = args.only.split(",") if args.only else None
    if only and set(only) - set(names):
        raise SystemExit(f"--only takes entries of: {', '.join(names)}")
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    results = ablation(output, args.steps, args.prompts, args.max_new_tokens, only)
    table = ablation_markdown(results)
    (output / "ablation.md").write_text(table + "\n")
    return 0
