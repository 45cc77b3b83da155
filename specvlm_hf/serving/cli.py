"""`specvlm-hf serve-check`: an EAGLE-3 draft of this package served by vLLM beside this package's own loop
(`check.py` says what is compared). vLLM runs in an environment of its own, named by `--vllm-python`."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from . import check
from .check import RUNNER, compare, decode_here, readme, vllm_problem, write_prompts


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve-check",
        help="Serve an EAGLE-3 draft with vLLM and check it against this package (outputs, acceptance, throughput).",
        description=check.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--draft", required=True, help="A saved EAGLE-3 draft of the target: a folder, or 'eagle3-draft' (shipped)."
    )
    p.add_argument("--target", default="testbed", help="The draft's target: 'testbed' or a saved target folder.")
    p.add_argument(
        "--vllm-python",
        default=os.environ.get("SPECVLM_VLLM_PYTHON", "vllm-venv/bin/python"),
        help="Python of the environment vLLM is installed in ($SPECVLM_VLLM_PYTHON).",
    )
    p.add_argument("--num-prompts", type=int, default=24, help="Held-out testbed prompts (long descriptions).")
    p.add_argument("--k", type=int, default=5, help="Draft tokens per step in vLLM, and the chain depth here.")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--concurrency", default="1,4,16", help="Concurrent requests for the throughput runs.")
    p.add_argument("--served-prompts", type=int, default=2, help="Prompts also sent through `vllm serve`.")
    p.add_argument("--output", required=True, help="Folder for the export, the prompts and the record.")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..benchmark.report import cpu_model
    from ..export import check_exportable, export_draft, export_target
    from ..modeling_draft import SpecVLMDraftModel
    from ..testbed import load_testbed
    from ..testbed.store import draft_location

    problem = vllm_problem(args.vllm_python)
    if problem:
        print(f"specvlm-hf serve-check: {problem}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    out = Path(args.output)
    target, processor = load_testbed(args.target)
    draft = SpecVLMDraftModel.from_pretrained(draft_location(args.draft), target=target)
    try:
        check_exportable(draft)
    except ValueError as err:
        print(f"specvlm-hf serve-check: {err}", file=sys.stderr)
        return 2
    engine_target = export_target(args.target, out / "export" / "target").resolve()
    engine_draft = export_draft(draft, out / "export" / "draft", target=str(engine_target), depth=args.k).resolve()
    prompts = write_prompts(processor, args.num_prompts, out / "prompts")
    (out / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    print(f"decoding {len(prompts)} prompts here (plain and a depth-{args.k} chain)...", flush=True)
    here = decode_here(target, processor, draft, prompts, args.k, args.max_new_tokens)
    print("running vLLM (the target alone, then with the draft; offline and served)...", flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(os.cpu_count() or 1), SERVE_LOG_DIR=str(out.resolve()))
    iomp = Path(args.vllm_python).resolve().parent.parent / "lib" / "libiomp5.so"  # vLLM's CPU build asks for it
    if iomp.exists():
        env["LD_PRELOAD"] = str(iomp)
    command = [
        args.vllm_python, str(RUNNER), "--target", str(engine_target), "--draft", str(engine_draft),
        "--prompts", str(out / "prompts.jsonl"), "--k", str(args.k), "--max-tokens", str(args.max_new_tokens),
        "--concurrency", args.concurrency, "--served-prompts", str(args.served_prompts),
        "--out", str(out / "vllm.json"),
    ]  # fmt: skip
    with open(out / "vllm.log", "w") as log:
        if subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT).returncode:
            print(f"specvlm-hf serve-check: the vLLM run failed; see {out / 'vllm.log'}", file=sys.stderr)
            return 1
    engine = json.loads((out / "vllm.json").read_text())
    eos = target.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    record = {
        "command": "specvlm-hf serve-check " + " ".join(sys.argv[2:])
        if len(sys.argv) > 2
        else "specvlm-hf serve-check",
        "draft": str(args.draft),
        "target": args.target,
        "k": args.k,
        "max_new_tokens": args.max_new_tokens,
        "vllm_version": engine["vllm_version"],
        "machine": f"{cpu_model()}, {os.cpu_count()} CPU cores",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "summary": compare(here, engine, eos, processor.tokenizer),
        "here": here,
    }
    record["wall_seconds"] = time.perf_counter() - started
    (out / "serving.json").write_text(json.dumps(record, indent=1))
    (out / "README.md").write_text(readme(record))
    print((out / "README.md").read_text())
    return 0
