"""What a benchmark run leaves behind: the environment it ran in, a markdown table, a JSON file with every figure, and
PNG plots (speedup per method; histogram of tokens per target forward); with the batch axis, a second table."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers

from .. import __version__
from . import batches
from .summary import MethodSummary, paired_speedups
from .sweep import RunRecord

SCHEMA_VERSION = 2
LEGEND = (
    "tau: throughput over vanilla's on the same sample, repeat and seed (median [IQR] (min-max), end to end: image "
    "encoding and prefill included); sigma: new tokens / target forwards; = vanilla: identical outputs; peak: "
    "weights used + the call's transient peak (CPU: resident-set high-water mark, CUDA: max_memory_allocated), median "
    "over runs; loop overhead: share of the tree loop's step time outside target and draft forwards; free-draft "
    "bound: the speedup if drafting and the loop cost nothing (plain step T(1) x decoded tokens / the T(q) of every "
    "verification forward, T(q) measured in this run); of bound: tau median / that bound."
)
JSON_NAME = "benchmark.json"
SPEEDUP_PLOT = "speedup.png"
ACCEPTED_PLOT = "accepted_lengths.png"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device, dtype: torch.dtype) -> dict:
    """Device, dtype, threads, versions and the machine's load average (other jobs on shared cores distort CPU
    timings): what the figures depend on besides the models."""
    device = torch.device(device)
    env = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "dtype": str(dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "specvlm_hf": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    return env


def _fmt(value: float | None, pattern: str = "{:.2f}") -> str:
    return "-" if value is None else pattern.format(value)


def _speedup_cell(s: MethodSummary) -> str:
    if s.speedup is None:
        return "-"
    sp = s.speedup
    return f"{sp.median:.2f}x [{sp.q1:.2f}-{sp.q3:.2f}] ({sp.min:.2f}-{sp.max:.2f})"


def _kinds_cell(s: MethodSummary) -> str:
    return " / ".join(f"{kind or '-'} {sp.median:.2f}x" for kind, sp in s.speedup_by_kind.items() if sp) or "-"


def _memory_cell(s: MethodSummary) -> str:
    if s.peak_memory_bytes is None:
        return "-"
    return f"{s.peak_memory_bytes / 2**20:.1f} ({_fmt(s.memory_ratio)}x)"


def markdown_table(summaries: Sequence[MethodSummary]) -> str:
    """One row per method and temperature; tau = median paired speedup [IQR] (min-max)."""
    columns = (
        "method",
        "T",
        "tau median [IQR] (min-max)",
        "tau by kind",
        "tok/s",
        "sigma",
        "target fwd",
        "new tok",
        "= vanilla",
        "peak MiB (x vanilla)",
        "loop overhead",
        "free-draft bound",
        "of bound",
        "failed",
    )
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for s in summaries:
        cells = (
            s.method,
            f"{s.temperature:g}",
            _speedup_cell(s),
            _kinds_cell(s),
            _fmt(s.tokens_per_second.median if s.tokens_per_second else None, "{:.1f}"),
            _fmt(s.mean_accepted_length),
            _fmt(s.mean_target_forwards, "{:.1f}"),
            _fmt(s.mean_new_tokens, "{:.1f}"),
            f"{s.exact_match}/{s.compared}" if s.compared else "-",
            _memory_cell(s),
            _fmt(s.overhead_share, "{:.1%}"),
            _fmt(s.free_draft_bound, "{:.2f}x"),
            _fmt(s.bound_efficiency, "{:.0%}"),
            f"{s.failed}/{s.runs}",
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def tree_lines(trees: Sequence[dict]) -> list[str]:
    """One line per temperature: the tree shape used, how it was chosen, predicted vs measured speedup."""
    lines = []
    for t in trees:
        shape = f"depth={t['depth']}, top_k={t['top_k']}, total_tokens={t['total_tokens']}"
        line = f"- T={t['temperature']:g}: tree {shape} ({t['mode']})"
        if t.get("predicted_decode_speedup") is not None:
            curve = ", ".join(
                f"T({q})={r:.2f}" for q, r in t["cost_curve_relative"].items() if int(q) in (2, 8, 16, 32, 64)
            )
            line += (
                f"; predicted {t['predicted_decode_speedup']:.2f}x decoding, {_fmt(t['predicted_speedup'])}x "
                f"end to end vs measured {_fmt(t['measured_speedup'])}x; {t['tokens_per_step']:.2f} tokens/step, "
                f"plain step {t['plain_step_seconds'] * 1e3:.2f} ms, {curve} x T(1), "
                f"{t['shapes_scored']} shapes replayed"
            )
        lines.append(line)
    return lines


def failure_lines(summaries: Sequence[MethodSummary]) -> list[str]:
    lines = []
    for s in summaries:
        lines += [f"- {s.method} (T={s.temperature:g}) failed on {error}" for error in s.errors]
        lines += [
            f"- {s.method} (T={s.temperature:g}) differs from vanilla at {m}"
            for m in s.mismatches
            if s.temperature == 0
        ]
    return lines


def batch_failure_lines(summaries: Sequence[batches.BatchSummary]) -> list[str]:
    """Failures and rows unequal to vanilla's at T = 0 of batch sizes above 1 (batch size 1's are in
    `failure_lines`)."""
    lines = []
    for s in summaries:
        if s.batch_size == 1:
            continue
        lines += [f"- {s.method} (T={s.temperature:g}, batch {s.batch_size}) failed on {e}" for e in s.errors]
        if s.temperature == 0 and s.rows_equal < s.rows_compared:
            lines.append(
                f"- {s.method} (T=0, batch {s.batch_size}): {s.rows_compared - s.rows_equal} of {s.rows_compared} "
                "rows differ from vanilla's"
            )
    return lines


def plot_speedups(records: Sequence[RunRecord], summaries: Sequence[MethodSummary], path: Path) -> None:
    """Box plot of the paired speedups of each method, one panel per temperature."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    temperatures = list(dict.fromkeys(s.temperature for s in summaries))
    fig, axes = plt.subplots(1, len(temperatures), figsize=(5 * len(temperatures), 4), squeeze=False)
    for ax, temperature in zip(axes[0], temperatures):
        methods = [s.method for s in summaries if s.temperature == temperature]
        data = [paired_speedups(records, m, temperature) or [float("nan")] for m in methods]
        ax.boxplot(data, tick_labels=methods)
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
        ax.set_title(f"T = {temperature:g}")
        ax.set_ylabel("speedup over vanilla (paired)")
        ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_accepted_lengths(records: Sequence[RunRecord], path: Path) -> None:
    """Histogram of tokens per target forward (decoding forwards: the first forward of each run left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    temperatures = list(dict.fromkeys(r.temperature for r in records))
    fig, axes = plt.subplots(1, len(temperatures), figsize=(5 * len(temperatures), 4), squeeze=False)
    for ax, temperature in zip(axes[0], temperatures):
        methods = list(dict.fromkeys(r.method for r in records if r.temperature == temperature))
        lengths = {
            m: [
                n
                for r in records
                if r.method == m and r.temperature == temperature and r.ok
                for n in r.tokens_per_forward[1:]
            ]
            for m in methods
        }
        lengths = {m: v for m, v in lengths.items() if v}  # failed methods and one-token answers have no bars
        top = max((max(v) for v in lengths.values()), default=1)
        bins = [b + 0.5 for b in range(top + 1)]
        if lengths:
            ax.hist(list(lengths.values()), bins=bins, label=list(lengths), density=True)
            ax.legend()
        ax.set_title(f"T = {temperature:g}")
        ax.set_xlabel("tokens per target forward")
        ax.set_ylabel("share of forwards")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@dataclass
class BenchmarkResult:
    """
    A finished benchmark.

    Attributes:
        config (`dict`): the `BenchmarkConfig` as run.
        environment (`dict`): `environment()`.
        models (`dict`): what each model is (source, parameter count, bytes).
        trees (`list[dict]`): per temperature, the tree shape used and its calibration (`runner.tree_report`).
        cost_curve (`dict`): T(q) measured in this run (`sizes`, `seconds`, `prefix_len`), behind the free-draft bound.
        records (`list[RunRecord]`), summaries (`list[MethodSummary]`): the per-sample sweep (batch size 1).
        batch_records (`list[batches.BatchRecord]`), batch_summaries (`list[batches.BatchSummary]`), batch_notes
            (`list[str]`): the batch axis (batch sizes above 1; its summaries repeat batch size 1 from `summaries`),
            empty without it.
    """

    config: dict
    environment: dict
    models: dict
    trees: list[dict]
    cost_curve: dict
    records: list[RunRecord]
    summaries: list[MethodSummary]
    batch_records: list[batches.BatchRecord] = field(default_factory=list)
    batch_summaries: list[batches.BatchSummary] = field(default_factory=list)
    batch_notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        data = {
            "schema_version": SCHEMA_VERSION,
            "environment": self.environment,
            "config": self.config,
            "models": self.models,
            "trees": self.trees,
            "cost_curve": self.cost_curve,
            "summary": [s.to_dict() for s in self.summaries],
            "runs": [r.to_dict() for r in self.records],
        }
        if self.batch_summaries:
            data["batches"] = {
                "notes": self.batch_notes,
                "summary": [s.to_dict() for s in self.batch_summaries],
                "runs": [r.to_dict() for r in self.batch_records],
            }
        return data

    def markdown(self) -> str:
        env = self.environment
        lines = [
            f"Benchmark on {env['device_name']} ({env['device']}, {env['dtype']}, {env['torch_threads']} threads), "
            f"{len(self.config['samples'])} samples x {self.config['repeats']} repeats, "
            f"max_new_tokens={self.config['max_new_tokens']}, draft: {self.models.get('draft', {}).get('source', '-')}",
        ]
        if self.summaries:
            lines += ["", markdown_table(self.summaries), "", LEGEND]
        if self.batch_summaries:
            lines += ["", "Batches (left-padded, one call per batch):", "", batches.batch_table(self.batch_summaries)]
            lines += ["", batches.LEGEND, *(f"- {note}" for note in self.batch_notes)]
        lines += [
            "",
            *tree_lines(self.trees),
            *failure_lines(self.summaries),
            *batch_failure_lines(self.batch_summaries),
        ]
        return "\n".join(lines)

    def write(self, directory: str | Path) -> dict[str, Path]:
        """Writes the JSON and the plots into `directory`; returns their paths."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = {
            "json": directory / JSON_NAME,
            "speedup": directory / SPEEDUP_PLOT,
            "accepted": directory / ACCEPTED_PLOT,
        }
        paths["json"].write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        if not self.records:  # the batch axis alone: no per-sample plots
            return {"json": paths["json"]}
        plot_speedups(self.records, self.summaries, paths["speedup"])
        plot_accepted_lengths(self.records, paths["accepted"])
        return paths
