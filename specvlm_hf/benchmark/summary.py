"""Per-method figures of a sweep: paired speedup spread, throughput, sigma, forwards, equality with vanilla, peak
memory against vanilla's, the tree loop's overhead share, the free-draft bound and the share of it reached, and
failures."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from ..metrics import free_draft_bound, mean_accepted_length, overhead_share
from ..tuning import CostCurve
from .methods import Vanilla
from .stats import Spread, paired_speedup, spread
from .sweep import RunRecord


@dataclass(frozen=True)
class MethodSummary:
    """
    Attributes:
        speedup (`Spread`): tau paired per sample and repeat with vanilla (`stats.paired_speedup`).
        speedup_by_kind (`dict[str, Spread]`): the same per prompt kind, when the samples have several kinds
            (short answers are dominated by image encoding and prefill, long ones by decoding).
        tokens_per_second (`Spread`): per run.
        mean_accepted_length (`float`): sigma = all new tokens / all target forwards.
        exact_match (`int`), compared (`int`): runs whose output equals vanilla's, out of the runs compared.
        mismatches (`list[str]`): `sample@repeat:first differing token` for each unequal run.
        peak_memory_bytes (`int`): median over runs of the peak (weights + the call's transient peak, `timing.py`);
            the median keeps a one-off allocation (a lazy import, a first-call buffer) from standing for the method.
            memory_ratio: that over vanilla's. peak_memory_max_bytes: the largest peak of any run.
        overhead_share (`float`): loop time outside target and draft forwards, over all runs (tree loop only).
        free_draft_bound (`float`): the speedup this method's verification forwards would give if drafting and the
            loop cost nothing (`metrics.free_draft_bound` over all runs, with the run's measured T(q)).
        bound_efficiency (`float`): median tau over `free_draft_bound`.
        errors (`list[str]`): `sample@repeat: message` for each failed run.
    """

    method: str
    temperature: float
    runs: int
    failed: int
    speedup: Spread | None
    speedup_by_kind: dict[str, Spread]
    tokens_per_second: Spread | None
    mean_accepted_length: float | None
    mean_target_forwards: float | None
    mean_new_tokens: float | None
    exact_match: int
    compared: int
    mismatches: list[str]
    peak_memory_bytes: int | None
    peak_memory_max_bytes: int | None
    memory_ratio: float | None
    overhead_share: float | None
    free_draft_bound: float | None
    bound_efficiency: float | None
    errors: list[str]

    @property
    def exact_match_rate(self) -> float | None:
        return self.exact_match / self.compared if self.compared else None

    def to_dict(self) -> dict:
        data = asdict(self)
        data["exact_match_rate"] = self.exact_match_rate
        return data


def paired_speedups(
    records: Sequence[RunRecord], method: str, temperature: float, kind: str | None = None
) -> list[float]:
    """tau for every (sample, repeat) where both `method` and vanilla succeeded with at least one token (only samples
    of `kind` when given)."""
    reference = {
        (r.sample, r.repeat): r
        for r in records
        if r.method == Vanilla.name and r.temperature == temperature and r.ok and r.new_tokens
    }
    taus = []
    for r in records:
        ref = reference.get((r.sample, r.repeat))
        if r.method != method or r.temperature != temperature or (kind is not None and r.kind != kind):
            continue
        if r.ok and r.new_tokens and ref is not None:
            taus.append(paired_speedup(r.wall_time, r.new_tokens, ref.wall_time, ref.new_tokens))
    return taus


def _bound(runs: Sequence[RunRecord], curve: CostCurve | None) -> float | None:
    """`metrics.free_draft_bound` over `runs`: the tokens of every forward after the first, against those forwards."""
    if curve is None or not runs or any(r.forward_sizes is None for r in runs):
        return None
    decoded = sum(sum(r.tokens_per_forward[1:]) for r in runs)
    sizes = [q for r in runs for q in r.forward_sizes[1:]]
    return free_draft_bound(decoded, [curve.at(q) for q in sizes], curve.at(1))


def _summarize_one(
    records: Sequence[RunRecord], method: str, temperature: float, vanilla_peak: int | None, curve: CostCurve | None
):
    runs = [r for r in records if r.method == method and r.temperature == temperature]
    ok = [r for r in runs if r.ok]
    kinds = sorted({r.kind for r in runs})
    forwards = sum(r.target_forwards for r in ok)
    compared = [r for r in ok if r.matches_vanilla is not None]
    peaks = [r.peak_memory_bytes for r in ok if r.peak_memory_bytes is not None]
    peak = int(np.median(peaks)) if peaks else None
    profiled = [r for r in ok if r.step_time is not None]
    speedup = spread(paired_speedups(records, method, temperature))
    bound = _bound(ok, curve)
    return MethodSummary(
        method=method,
        temperature=temperature,
        runs=len(runs),
        failed=len(runs) - len(ok),
        speedup=speedup,
        speedup_by_kind={k: spread(paired_speedups(records, method, temperature, k)) for k in kinds if len(kinds) > 1},
        tokens_per_second=spread([r.tokens_per_second for r in ok if r.tokens_per_second is not None]),
        mean_accepted_length=mean_accepted_length(sum(r.new_tokens for r in ok), forwards),
        mean_target_forwards=float(np.mean([r.target_forwards for r in ok])) if ok else None,
        mean_new_tokens=float(np.mean([r.new_tokens for r in ok])) if ok else None,
        exact_match=sum(r.matches_vanilla for r in compared),
        compared=len(compared),
        mismatches=[f"{r.sample}@{r.repeat}:{r.first_mismatch}" for r in compared if not r.matches_vanilla],
        peak_memory_bytes=peak,
        peak_memory_max_bytes=max(peaks) if peaks else None,
        memory_ratio=peak / vanilla_peak if peak is not None and vanilla_peak else None,
        overhead_share=overhead_share(
            sum(r.step_time for r in profiled),
            sum(r.verify_time for r in profiled),
            sum(r.draft_time for r in profiled),
        )
        if profiled
        else None,
        free_draft_bound=bound,
        bound_efficiency=speedup.median / bound if speedup and bound else None,
        errors=[f"{r.sample}@{r.repeat}: {r.error}" for r in runs if not r.ok],
    )


def summarize(records: Sequence[RunRecord], curve: CostCurve | None = None) -> list[MethodSummary]:
    """One `MethodSummary` per (method, temperature), in the order they first appear (vanilla first); with the run's
    verification cost curve, each method's free-draft bound."""
    keys = list(dict.fromkeys((r.method, r.temperature) for r in records))
    keys.sort(key=lambda k: (k[1], k[0] != Vanilla.name))
    summaries = []
    for temperature in dict.fromkeys(t for _, t in keys):
        vanilla = _summarize_one(records, Vanilla.name, temperature, None, curve)
        for method, t in keys:
            if t == temperature:
                summaries.append(_summarize_one(records, method, temperature, vanilla.peak_memory_bytes, curve))
    return summaries
