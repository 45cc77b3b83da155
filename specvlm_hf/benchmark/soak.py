"""Soak test: many consecutive `target.generate(assistant_model=draft)` calls in one process, on a deterministic mix
of long-answer, short-answer and text-only prompts, greedy and sampling in turn. At checkpoints (calls 1, 10 and
every 100th) it records resident memory, live torch tensors, the auto tree's tuners, the module-level caches
(measured costs, packed draft kernels) and throughput since the previous checkpoint; some greedy calls are also
compared with plain `generate()`. Writes `soak.json` and `README.md` under `--out`.

    python -m specvlm_hf.benchmark.soak --calls 1000 --out results/soak-testbed-cpu
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import random
import resource
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .. import draft_step, tuning
from ..clock import time_call
from .report import environment
from .stats import first_mismatch

logger = logging.getLogger(__name__)

KINDS = ("long", "short", "text")  # cycled call by call; "text" is the testbed's questions without their images
FIXED_CHECKPOINTS = (1, 10)
BASELINE_CALLS = (100, 10, 1)  # the flatness verdicts compare with the first of these checkpoints before the last call
# Thresholds of the verdict booleans; the measured values are reported beside them.
RSS_GROWTH_PCT = 5.0
TENSOR_GROWTH = 0
THROUGHPUT_RATIO = 0.9
MB = 2**20


@dataclass(frozen=True)
class Call:
    """
    One scheduled `generate()` call.

    Attributes:
        number (`int`): 1-based position in the run.
        kind (`str`): one of `KINDS`.
        prompt (`int`): index into that kind's prompt list.
        do_sample (`bool`): sampling at T = 1 (seeded with `seed`), else greedy.
        seed (`int`): `torch.manual_seed` before a sampling call.
        check (`bool`): a greedy call also compared with plain `generate()`.
    """

    number: int
    kind: str
    prompt: int
    do_sample: bool
    seed: int
    check: bool


def schedule(calls: int, prompt_counts: dict[str, int], seed: int, check_every: int) -> list[Call]:
    """
    The run's calls, deterministic in `seed`: kinds cycle through `KINDS`, greedy and sampling alternate (3 and 2 are
    coprime, so every kind meets both modes every 6 calls), and each kind walks a seeded permutation of its prompts,
    starting over when it is used up. The first greedy call of each block of `check_every` calls is checked (greedy
    and sampling alternate, so every block of two or more calls holds one).
    """
    rng = random.Random(seed)
    orders = {kind: rng.sample(range(count), count) for kind, count in prompt_counts.items()}
    plan = []
    for i in range(calls):
        kind, do_sample = KINDS[i % len(KINDS)], i % 2 == 1
        order = orders[kind]
        prompt = order[(i // len(KINDS)) % len(order)]
        check = not do_sample and i % check_every < 2
        plan.append(Call(i + 1, kind, prompt, do_sample, rng.randrange(2**31), check))
    return plan


def checkpoints(calls: int, every: int) -> list[int]:
    """Calls after which a sample is taken: 1, 10, every `every`-th, and the last."""
    return sorted({c for c in (*FIXED_CHECKPOINTS, *range(every, calls + 1, every), calls) if 1 <= c <= calls})


def load_prompt_sets() -> dict[str, list]:
    """Every prompt of each kind, loaded (and the testbed's images rendered) once, before the first call: long and
    short held-out shape scenes, and their questions without images (`testbed-text`)."""
    from ..testbed import heldout_prompts
    from .prompts import load_prompts

    return {"long": heldout_prompts("long"), "short": heldout_prompts("short"), "text": load_prompts("testbed-text")}


def rss_bytes() -> int | None:
    """Resident set size now, from `/proc/self/statm` (Linux); `None` where it cannot be read."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """The process's resident high-water mark (`ru_maxrss`: kilobytes on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def tuner_state(draft) -> list[dict]:
    """Each auto-tree tuner of `draft` (one per device, dtype, decoding mode, batch size and numerics): its numpy
    count arrays (this prompt class's running and per-call counts, and the other class's once seen) and `steps`."""
    states = []
    for key, tuner in getattr(draft, "_tuners", {}).items():
        counts = [tuner.reached, tuner.accepted, tuner.call_reached, tuner.call_accepted]
        if tuner._other_class is not None:  # the other prompt class's state: (reached, accepted, ...)
            counts += tuner._other_class[:2]
        arrays = [array for count in counts for array in count.values()]
        states.append(
            {
                "key": "/".join(map(str, key)),
                "count_arrays": len(arrays),
                "count_elements": sum(array.size for array in arrays),
                "count_bytes": sum(array.nbytes for array in arrays),
                "steps": tuner.steps,
            }
        )
    return states


def cache_state() -> dict[str, int]:
    """Module-level caches: measured device costs (`tuning._MEMORY`) and packed draft kernels
    (`draft_step._KERNELS`, a weak dictionary: drafts, and numerics entries over all drafts)."""
    kernels = list(draft_step._KERNELS.values())
    return {
        "cost_entries": len(tuning._MEMORY),
        "kernel_drafts": len(kernels),
        "kernel_entries": sum(len(entry) for entry in kernels),
    }


def live_objects() -> dict[str, int]:
    """Python objects and torch tensors the garbage collector tracks, after a full collection."""
    gc.collect()
    objects = gc.get_objects()
    # `type(o)`, not `isinstance`: isinstance falls back to `o.__class__`, which on a deprecated module attribute
    # (`torch.distributed.reduce_op`) raises a FutureWarning.
    return {"objects": len(objects), "tensors": sum(issubclass(type(o), torch.Tensor) for o in objects)}


def throughput(records: Sequence[dict]) -> dict[str, float | None]:
    """New tokens per second of generation time over `records`: all of them, per kind and per decoding mode
    (`None` for a group without calls)."""
    groups: dict[str, Callable[[dict], bool]] = {"all": lambda r: True}
    groups |= {kind: (lambda r, k=kind: r["kind"] == k) for kind in KINDS}
    groups |= {"greedy": lambda r: not r["do_sample"], "sampling": lambda r: r["do_sample"]}
    rates = {}
    for name, member in groups.items():
        chosen = [r for r in records if member(r)]
        seconds = sum(r["seconds"] for r in chosen)
        rates[name] = sum(r["new_tokens"] for r in chosen) / seconds if seconds > 0 else None
    return rates


def take_sample(call: int, draft, records: Sequence[dict], previous: int, started: float) -> dict:
    """The checkpoint after `call`: RSS (after a full collection), its high-water mark, live objects, tuners,
    caches, and throughput over the calls since checkpoint `previous`."""
    live = live_objects()
    rss = rss_bytes()
    return {
        "call": call,
        "elapsed_s": time.perf_counter() - started,
        "rss_mb": None if rss is None else rss / MB,
        "peak_rss_mb": peak_rss_bytes() / MB,
        **live,
        "tuners": tuner_state(draft),
        "caches": cache_state(),
        "window": [previous + 1, call],
        "tokens_per_s": throughput(records[previous:call]),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def run_call(call: Call, prompt, target, draft, processor, max_new_tokens: int) -> dict:
    """One `generate(assistant_model=draft)` call, timed; a checked call is also decoded by plain `generate()`."""
    inputs = {k: v.to(target.device) for k, v in prompt.inputs(processor).items()}
    prompt_len = inputs["input_ids"].shape[1]
    options = {"max_new_tokens": max_new_tokens, "do_sample": call.do_sample}
    if call.do_sample:
        options["temperature"] = 1.0
        torch.manual_seed(call.seed)
    out, seconds = time_call(lambda: target.generate(**inputs, assistant_model=draft, **options), target.device)
    tokens = out[0, prompt_len:].tolist()
    record = {**asdict(call), "prompt_len": prompt_len, "new_tokens": len(tokens), "seconds": seconds}
    if call.check:
        plain = target.generate(**inputs, **options)[0, prompt_len:].tolist()
        record["mismatch_at"] = first_mismatch(tokens, plain)
    return record


def _structure(sample: dict) -> tuple:
    """What must stay fixed once the run is warm: tuner keys and their count-array sizes, and the caches' sizes
    (`steps` is a counter and is left out)."""
    tuners = tuple((t["key"], t["count_arrays"], t["count_elements"]) for t in sample["tuners"])
    return tuners, tuple(sorted(sample["caches"].items()))


def _ratio(late: float | None, early: float | None) -> float | None:
    return None if late is None or not early else late / early


def verdicts(samples: Sequence[dict], records: Sequence[dict], window: int) -> dict:
    """
    Measured growth from the baseline checkpoint (the first of `BASELINE_CALLS` before the last call) to the last
    one, and throughput of the last `window` calls against calls `window + 1 .. 2 * window` (the first window holds
    the one-off warm-up and cost measurement), each with a boolean whose threshold is stated beside it.
    """
    last = samples[-1]
    by_call = {s["call"]: s for s in samples}
    baseline = next((by_call[c] for c in BASELINE_CALLS if c in by_call and c < last["call"]), None)
    found: dict = {"baseline_call": None if baseline is None else baseline["call"], "last_call": last["call"]}
    if baseline is not None:
        growth = None if last["rss_mb"] is None else last["rss_mb"] - baseline["rss_mb"]
        fixed = _structure(baseline)
        changed = [s["call"] for s in samples if s["call"] > baseline["call"] and _structure(s) != fixed]
        found |= {
            "rss_growth_mb": growth,
            "rss_growth_pct": None if growth is None else 100 * growth / baseline["rss_mb"],
            "peak_rss_growth_mb": last["peak_rss_mb"] - baseline["peak_rss_mb"],
            "tensor_growth": last["tensors"] - baseline["tensors"],
            "object_growth": last["objects"] - baseline["objects"],
            "state_changed_at": changed,
        }
        found["rss_flat"] = growth is not None and found["rss_growth_pct"] < RSS_GROWTH_PCT
        found["rss_flat_threshold"] = f"RSS growth from the baseline to the last call below {RSS_GROWTH_PCT}%"
        found["tensors_flat"] = found["tensor_growth"] <= TENSOR_GROWTH
        found["tensors_flat_threshold"] = f"live tensors grow by at most {TENSOR_GROWTH} after the baseline"
        found["state_flat"] = not changed
        found["state_flat_threshold"] = "tuner keys, count-array sizes and cache sizes unchanged after the baseline"
    if window and len(records) >= 3 * window:  # the second and the last window must not overlap
        second, latest = throughput(records[window : 2 * window]), throughput(records[-window:])
        ratios = {name: _ratio(latest[name], second[name]) for name in second}
        found |= {"throughput_window": window, "throughput_second_window": second, "throughput_last_window": latest}
        found["throughput_ratio"] = ratios
        found["throughput_held"] = all(r >= THROUGHPUT_RATIO for r in ratios.values() if r is not None)
        found["throughput_held_threshold"] = (
            f"last-window tokens/s at least {THROUGHPUT_RATIO} of the second window's, overall, per kind and per mode"
        )
    return found


def _commit() -> str | None:
    """The checkout's commit, when the package runs from a git checkout."""
    try:
        command = ["git", "rev-parse", "--short", "HEAD"]
        done = subprocess.run(command, cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def _fmt(value: float | None, pattern: str = "{:.1f}") -> str:
    return "-" if value is None else pattern.format(value)


def _rounded(value):
    """`value` with its floats (also inside dicts) to 3 significant digits, for reading."""
    if isinstance(value, float):
        return float(f"{value:.3g}")
    if isinstance(value, dict):
        return {key: _rounded(item) for key, item in value.items()}
    return value


def _tuner_cell(tuners: Sequence[dict]) -> str:
    return "<br>".join(f"{t['count_elements']} ({t['steps']} steps)" for t in tuners) or "-"


def _rates_cell(rates: dict) -> str:
    kinds = " / ".join(_fmt(rates[kind]) for kind in KINDS)
    return f"{_fmt(rates['all'])} ({kinds})"


def markdown(report: dict) -> str:
    """`README.md`: command, machine, the checkpoint table, the verdicts and the greedy checks."""
    env, found = report["environment"], report["verdicts"]
    lines = [
        "# Soak: consecutive `generate(assistant_model=draft)` calls in one process",
        "",
        "```bash",
        report["command"],
        "```",
        "",
        f"- **Commit**: {report['commit'] or 'unknown'}.",
        f"- **Machine**: {env['device_name']}, {env['cpu_count']} CPUs, {env['torch_threads']} torch threads, "
        f"{env['device']} {env['dtype']}, torch {env['torch']}, transformers {env['transformers']}, "
        f"Python {env['python']}; load average at the start {env['load_average']}.",
        f"- **Run**: {report['config']['calls']} calls, `max_new_tokens={report['config']['max_new_tokens']}`, "
        f"seed {report['config']['seed']}, kinds cycled {' / '.join(KINDS)}, greedy and sampling (T = 1) in turn, "
        f"one greedy call in every {report['config']['check_every']} checked; {report['wall_s']:.0f} s wall.",
        "",
        "RSS is read after a full garbage collection. Tuners: count-array elements per tuner (greedy, sampling). "
        "Caches: cost entries / drafts with packed kernels / kernel entries. Tokens/s: new tokens per second of "
        "`generate()` since the previous checkpoint, all (long / short / text).",
        "",
        "| call | RSS MB | peak RSS MB | tensors | objects | tuners | caches | tokens/s | load |",
        "|---:|---:|---:|---:|---:|---|---|---|---|",
    ]
    for s in report["samples"]:
        caches = "{cost_entries} / {kernel_drafts} / {kernel_entries}".format(**s["caches"])
        load = _fmt(s["load_average"][0], "{:.2f}") if s["load_average"] else "-"
        lines.append(
            f"| {s['call']} | {_fmt(s['rss_mb'])} | {_fmt(s['peak_rss_mb'])} | {s['tensors']} | {s['objects']} | "
            f"{_tuner_cell(s['tuners'])} | {caches} | {_rates_cell(s['tokens_per_s'])} | {load} |"
        )
    lines += ["", "## Verdicts", ""]
    lines += [f"- `{name}`: {json.dumps(_rounded(value))}" for name, value in found.items()]
    checks, mismatches = report["greedy_checks"], report["mismatches"]
    lines += ["", "## Greedy checks", ""]
    lines.append(f"{checks} greedy calls compared with plain `generate()`: {len(mismatches)} mismatches.")
    lines += [f"- call {m['number']} ({m['kind']} prompt {m['prompt']}): first difference at token "
              f"{m['mismatch_at']}" for m in mismatches]  # fmt: skip
    return "\n".join(lines) + "\n"


def load_models(target_name: str, draft_name: str):
    """The testbed target and processor, and its draft: a shipped draft's name or a draft directory."""
    from ..modeling_draft import SpecVLMDraftModel
    from ..testbed import load_testbed, load_testbed_draft
    from ..testbed.store import SHIPPED_DRAFTS

    target, processor = load_testbed(target_name)
    if draft_name in SHIPPED_DRAFTS:
        return target, processor, load_testbed_draft(draft_name, target)
    return target, processor, SpecVLMDraftModel.from_pretrained(draft_name, target=target)


def run_soak(args: argparse.Namespace, command: str) -> dict:
    """Runs the soak described by the parsed `args` and writes `soak.json` and `README.md` under `args.out`."""
    target, processor, draft = load_models(args.target, args.draft)
    prompts = load_prompt_sets()
    plan = schedule(args.calls, {kind: len(p) for kind, p in prompts.items()}, args.seed, args.check_every)
    marks = checkpoints(args.calls, args.checkpoint_every)
    records, samples, previous = [], [], 0
    started = time.perf_counter()
    for call in plan:
        records.append(run_call(call, prompts[call.kind][call.prompt], target, draft, processor, args.max_new_tokens))
        if call.number in marks:
            samples.append(take_sample(call.number, draft, records, previous, started))
            previous = call.number
            _log_sample(samples[-1], args.calls)
    wall = time.perf_counter() - started
    # With fewer calls than three windows, a third of the run per window keeps the second and last apart.
    window = min(args.window, args.calls // 3)
    mismatches = [r for r in records if r.get("mismatch_at") is not None]
    report = {
        "command": command,
        "commit": _commit(),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "environment": environment(target.device, target.dtype),
        "wall_s": wall,
        "greedy_checks": sum(r["check"] for r in records),
        "mismatches": mismatches,
        "verdicts": verdicts(samples, records, window),
        "samples": samples,
        "calls": records,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "README.md").write_text(markdown(report))
    return report


def _log_sample(sample: dict, calls: int) -> None:
    """Progress at a checkpoint, with the time the remaining calls should take at the pace so far."""
    done, elapsed = sample["call"], sample["elapsed_s"]
    logger.info(
        "call %d/%d: RSS %s MB, %d tensors, %s tokens/s; %.0f s so far, about %.0f s to go",
        done, calls, _fmt(sample["rss_mb"]), sample["tensors"], _fmt(sample["tokens_per_s"]["all"]), elapsed,
        elapsed / done * (calls - done),
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """The command line; exits 1 when a checked greedy call differs from plain `generate()`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=1000, help="Consecutive generate() calls.")
    parser.add_argument("--out", required=True, type=Path, help="Directory for soak.json and README.md.")
    parser.add_argument("--target", default="testbed", help="Testbed name or directory (load_testbed).")
    parser.add_argument("--draft", default="draft", help="Shipped draft name or draft directory.")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="max_new_tokens of every call.")
    parser.add_argument("--seed", type=int, default=0, help="Seeds the prompt order and the sampling calls.")
    parser.add_argument("--check-every", type=int, default=50, help="Check one greedy call per this many calls.")
    parser.add_argument("--checkpoint-every", type=int, default=100, help="Sample every this many calls.")
    parser.add_argument("--window", type=int, default=100, help="Calls per throughput window in the verdict.")
    args = parser.parse_args(argv)
    if min(args.calls, args.max_new_tokens, args.check_every, args.checkpoint_every, args.window) < 1:
        parser.error("--calls, --max-new-tokens, --check-every, --checkpoint-every and --window must be positive")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    report = run_soak(args, shlex.join(["python", "-m", "specvlm_hf.benchmark.soak", *argv]))
    found = report["verdicts"]
    logger.info(
        "wrote %s/soak.json and README.md: %d calls in %.0f s; RSS growth %s MB (%s%%) from call %s; tensor growth "
        "%s; state_flat %s; throughput ratio %s; %d greedy checks, %d mismatches",
        args.out, args.calls, report["wall_s"], _fmt(found.get("rss_growth_mb"), "{:.2f}"),
        _fmt(found.get("rss_growth_pct"), "{:.2f}"), found["baseline_call"], found.get("tensor_growth"),
        found.get("state_flat"), _fmt(found.get("throughput_ratio", {}).get("all"), "{:.2f}"), report["greedy_checks"],
        len(report["mismatches"]),
    )  # fmt: skip
    return 1 if report["mismatches"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
