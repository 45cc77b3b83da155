"""Greedy tree decoding against plain greedy `generate()` in a low precision, on the shipped testbed: how often the
outputs are identical, where the first divergence falls, and the target's top-1/top-2 logit gap there.

In float32 the two are identical (tested). In bfloat16 or float16 a tree verification forward (q tokens, a tree
mask) and a one-token forward reduce in different orders, so where the target's two best logits are nearly tied the
rounding can pick the other token; from there the outputs go separate ways, each a valid greedy continuation of its
own rounding. Plain decoding in the low precision is also compared with float32 plain decoding, as the scale of what
the precision alone changes.

    python -m specvlm_hf.benchmark.precision --dtype bfloat16 --num-samples 24 --out results/testbed-cpu-bf16
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from ..configuration import SpeculativeConfig
from .gpu_check import compare_greedy
from .report import environment
from .stats import first_mismatch

logger = logging.getLogger(__name__)

TREES = {
    "auto": SpeculativeConfig(),
    "chain": SpeculativeConfig(depth=5, top_k=1, total_tokens=6),
    "eagle2": SpeculativeConfig(depth=5, top_k=8, total_tokens=32),
}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def _inputs(prompt, processor, dtype: torch.dtype) -> dict:
    """The processor's tensors, pixel values in `dtype`."""
    return {k: v.to(dtype) if k == "pixel_values" else v for k, v in prompt.inputs(processor).items()}


def measure(dtype_name: str, num_samples: int, max_new_tokens: int, draft_name: str) -> dict:
    """Every held-out prompt of both kinds (`num_samples` in all, half long, half short) decoded greedily in
    `dtype_name`: plain vs float32 plain, and plain vs tree decoding with each of `TREES`."""
    from ..testbed import heldout_prompts, load_testbed, load_testbed_draft

    dtype = DTYPES[dtype_name]
    low, processor = load_testbed(dtype=dtype)
    reference, _ = load_testbed(dtype=torch.float32)
    draft = load_testbed_draft(draft_name, low)
    prompts = heldout_prompts("long", n=num_samples - num_samples // 2) + heldout_prompts("short", n=num_samples // 2)
    runs = []
    for index, prompt in enumerate(prompts):
        inputs = _inputs(prompt, processor, dtype)
        prompt_len = inputs["input_ids"].shape[1]
        full = reference.generate(**_inputs(prompt, processor, torch.float32), max_new_tokens=max_new_tokens,
                                  do_sample=False)  # fmt: skip
        plain = low.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        run = {
            "prompt": index,
            "kind": prompt.kind,
            "new_tokens": plain.shape[1] - prompt_len,
            "plain_vs_float32": first_mismatch(plain[0, prompt_len:].tolist(), full[0, prompt_len:].tolist()),
        }
        for name, tree in TREES.items():
            run[name] = compare_greedy(low, draft, inputs, tree, max_new_tokens)
        runs.append(run)
        logger.info("%s prompt %d: %s", prompt.kind, index, {name: run[name]["equal"] for name in TREES})
    return {"dtype": dtype_name, "draft": draft_name, "runs": runs, "summary": summarize(runs)}


def summarize(runs: list[dict]) -> dict:
    """Per tree: exact outputs over compared, the divergences' positions and logit gaps; and plain vs float32."""
    found = {"plain_vs_float32": {"exact": sum(r["plain_vs_float32"] is None for r in runs), "compared": len(runs)}}
    for name in TREES:
        diverged = [r[name] for r in runs if not r[name]["equal"]]
        found[name] = {
            "exact": len(runs) - len(diverged),
            "compared": len(runs),
            "first_divergence": [d["first_divergence"] for d in diverged],
            "margin": [d.get("margin") for d in diverged],
            "sigma": sum(r[name]["sigma"] for r in runs) / len(runs),
        }
    return found


def markdown(report: dict) -> str:
    summary = report["summary"]
    lines = [
        f"# Greedy tree decoding in {report['dtype']} on the LLaVA testbed",
        "",
        f"Command: `{report['command']}`",
        f"Machine: {report['environment']['cpu_model']}, {report['environment']['torch_threads']} threads; "
        f"torch {report['environment']['torch']}, transformers {report['environment']['transformers']}; "
        f"{report['seconds']:.0f} s.",
        "",
        "| compared with plain greedy in the same dtype | identical | first divergence (new-token index) "
        "| target's top-1 minus top-2 logit there | sigma |",
        "|---|---|---|---|---|",
    ]
    for name in TREES:
        row = summary[name]
        positions = ", ".join(str(p) for p in row["first_divergence"]) or "-"
        margins = ", ".join(f"{m:.3g}" for m in row["margin"] if m is not None) or "-"
        lines.append(f"| {name} tree | {row['exact']}/{row['compared']} | {positions} | {margins} | "
                     f"{row['sigma']:.2f} |")  # fmt: skip
    plain = summary["plain_vs_float32"]
    lines += [
        "",
        f"Plain greedy in {report['dtype']} against plain greedy in float32: {plain['exact']}/{plain['compared']} "
        "identical.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--num-samples", type=int, default=24, help="Held-out prompts, half long, half short.")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--draft", default="draft", help="Shipped draft name (default: draft).")
    parser.add_argument("--out", required=True, help="Directory for precision.json and README.md.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    started = time.perf_counter()
    report = measure(args.dtype, args.num_samples, args.max_new_tokens, args.draft)
    report["seconds"] = time.perf_counter() - started
    report["environment"] = environment(torch.device("cpu"), DTYPES[args.dtype])
    report["command"] = "python -m specvlm_hf.benchmark.precision " + " ".join(sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "precision.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "README.md").write_text(markdown(report))
    print(markdown(report))  # noqa: T201 (the command's output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
