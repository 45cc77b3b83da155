"""The batch axis (`--batch-size`): vanilla and the tree-loop methods on the same left-padded batches, interleaved per
batch as the per-sample sweep interleaves per sample (`sweep.py`: warm-up first and discarded, the method order
rotating, a failing method recorded and the sweep going on), and per (method, temperature, batch size): throughput,
its ratio to vanilla's on the same batch, sigma per row and the rows equal to vanilla's."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch

from ..metrics import mean_accepted_length
from .methods import Method, RowsResult, Vanilla
from .prompts import Batch
from .stats import Spread, first_mismatch, paired_speedup, spread
from .summary import MethodSummary
from .sweep import measured_run, sample_seed
from .timing import Meter, module_bytes

logger = logging.getLogger(__name__)

SKIPPED = "skipped: decodes one prompt at a time"
LEGEND = (
    "Batches: each row's tokens up to its end (the padding after a finished row not counted); tok/s: all rows' "
    "tokens / the call's wall time, median over batches and repeats; x vanilla: that over vanilla's on the same "
    "batch, repeat and seed (median [IQR]); sigma: tokens / target forwards per row (a row counts the forwards it "
    "took part in until its end); = vanilla: rows identical to vanilla's row, token for token (T = 0). Batch size 1 "
    "rows are the per-sample sweep's."
)


@dataclass
class BatchRecord:
    """
    One timed generation of a batch (`error` set and the figures `None` when the method raised).

    Attributes:
        method, batch (`str`), temperature (`float`), batch_size, repeat, seed (`int`): what ran.
        rows (`list[str]`): each row's prompt id (`prompts.Batch.rows`).
        wall_time (`float`): seconds for the whole `generate` call (image encoding and prefill included).
        row_new_tokens, row_target_forwards (`list[int]`): per row (`methods.RowsResult`).
        peak_memory_bytes (`int`): weights of the models the method uses + the call's transient peak.
        rows_equal (`list[bool]`): per row, whether its tokens equal vanilla's row of the same batch, repeat and
            seed (meaningful at T = 0).
    """

    method: str
    temperature: float
    batch_size: int
    batch: str
    rows: list[str]
    repeat: int
    seed: int
    wall_time: float | None = None
    row_new_tokens: list[int] | None = None
    row_target_forwards: list[int] | None = None
    peak_memory_bytes: int | None = None
    rows_equal: list[bool] | None = None
    error: str | None = None
    tokens: list[list[int]] | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def new_tokens(self) -> int | None:
        return sum(self.row_new_tokens) if self.ok else None

    @property
    def tokens_per_second(self) -> float | None:
        return self.new_tokens / self.wall_time if self.ok and self.wall_time else None

    @property
    def mean_accepted_length(self) -> float | None:
        return mean_accepted_length(self.new_tokens, sum(self.row_target_forwards)) if self.ok else None

    def to_dict(self) -> dict:
        """Every figure (the generated token ids are left out)."""
        data = asdict(self)
        del data["tokens"]
        data.update(
            new_tokens=self.new_tokens,
            tokens_per_second=self.tokens_per_second,
            mean_accepted_length=self.mean_accepted_length,
        )
        return data


def _run_one(method: Method, target, batch: Batch, meter: Meter, weights: int, record: BatchRecord, max_new_tokens):
    def call():
        return method.generate_rows(target, batch.inputs, temperature=record.temperature, max_new_tokens=max_new_tokens)

    measurement = measured_run(meter, record, method.name, batch.id, call)
    if measurement is None:
        return record
    result: RowsResult = measurement.value
    record.wall_time = measurement.seconds
    record.tokens = result.tokens
    record.row_new_tokens = [len(row) for row in result.tokens]
    record.row_target_forwards = list(result.target_forwards)
    record.peak_memory_bytes = weights + (measurement.transient_bytes or 0) if meter.measures_memory else None
    return record


def run_batch_sweep(
    target,
    batches: Sequence[Batch],
    methods: Mapping[str, Method],
    *,
    temperature: float,
    repeats: int,
    max_new_tokens: int,
    device: torch.device,
    seed: int = 0,
    warmup_tokens: int = 32,
) -> list[BatchRecord]:
    """
    Runs every method that decodes batches on every batch `repeats` times at one temperature (the batch size is the
    first batch's); `methods` must hold "vanilla", the reference of the equality check and of the ratio.

    Returns:
        `list[BatchRecord]` in execution order.
    """
    methods = {name: m for name, m in methods.items() if m.supports_batches}
    if Vanilla.name not in methods:
        raise ValueError("the batch sweep needs the 'vanilla' method as its reference")
    if not batches:
        return []
    meter = Meter(device)
    weights = {name: module_bytes(target, *m.models) for name, m in methods.items()}
    size = batches[0].inputs["input_ids"].shape[0]
    if warmup_tokens:  # also measures the auto tree's costs at this batch size, once
        for method in methods.values():
            torch.manual_seed(0)
            try:
                method.generate_rows(
                    target,
                    batches[0].inputs,
                    temperature=temperature,
                    max_new_tokens=min(warmup_tokens, max_new_tokens),
                )
            except Exception as err:  # the timed runs record the failure
                logger.warning("warm-up of %s on batches of %d failed: %s", method.name, size, err)
    names = list(methods)
    records = []
    for repeat in range(repeats):
        for index, batch in enumerate(batches):
            shift = (index + repeat) % len(names)
            group = {}
            for name in names[shift:] + names[:shift]:
                record = BatchRecord(
                    name,
                    float(temperature),
                    size,
                    batch.id,
                    list(batch.rows),
                    repeat,
                    sample_seed(seed, index, repeat),
                )
                group[name] = _run_one(methods[name], target, batch, meter, weights[name], record, max_new_tokens)
            reference = group[Vanilla.name]
            for record in group.values():
                if record.ok and reference.ok:
                    record.rows_equal = [
                        first_mismatch(row, ref) is None for row, ref in zip(record.tokens, reference.tokens)
                    ]
            records += group.values()
            logger.info(
                "T=%s repeat %d %s: %s",
                temperature,
                repeat,
                batch.id,
                ", ".join(f"{r.method} {r.wall_time:.2f}s" if r.ok else f"{r.method} failed" for r in group.values()),
            )
    return records


@dataclass(frozen=True)
class BatchSummary:
    """
    Attributes:
        tokens_per_second (`Spread`): all rows' tokens over the call's wall time, per run.
        speedup (`Spread`): that over vanilla's on the same batch, repeat and seed (`stats.paired_speedup`).
        mean_accepted_length (`float`): sigma per row = all rows' tokens / all rows' target forwards.
        rows_equal (`int`), rows_compared (`int`): rows whose tokens equal vanilla's row, out of those compared.
        skipped (`str`, *optional*): why the method did not run at this batch size.
        errors (`list[str]`): `batch@repeat: message` for each failed run.
    """

    method: str
    temperature: float
    batch_size: int
    runs: int
    failed: int
    tokens_per_second: Spread | None
    speedup: Spread | None
    mean_accepted_length: float | None
    rows_equal: int
    rows_compared: int
    skipped: str | None = None
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_method_summary(cls, summary: MethodSummary) -> BatchSummary:
        """Batch size 1: the per-sample sweep's figures (a batch of one row: the same definitions)."""
        return cls(
            method=summary.method,
            temperature=summary.temperature,
            batch_size=1,
            runs=summary.runs,
            failed=summary.failed,
            tokens_per_second=summary.tokens_per_second,
            speedup=summary.speedup,
            mean_accepted_length=summary.mean_accepted_length,
            rows_equal=summary.exact_match,
            rows_compared=summary.compared,
            errors=list(summary.errors),
        )


def paired_batch_speedups(records: Sequence[BatchRecord], method: str, temperature: float, size: int) -> list[float]:
    """Throughput over vanilla's for every (batch, repeat) where both succeeded with at least one token."""
    key = (temperature, size)
    reference = {
        (r.batch, r.repeat): r
        for r in records
        if r.method == Vanilla.name and (r.temperature, r.batch_size) == key and r.ok and r.new_tokens
    }
    ratios = []
    for r in records:
        ref = reference.get((r.batch, r.repeat))
        if r.method == method and (r.temperature, r.batch_size) == key and r.ok and r.new_tokens and ref is not None:
            ratios.append(paired_speedup(r.wall_time, r.new_tokens, ref.wall_time, ref.new_tokens))
    return ratios


def summarize_batches(
    records: Sequence[BatchRecord], methods: Sequence[str], skipped: Sequence[str] = ()
) -> list[BatchSummary]:
    """One `BatchSummary` per (method, temperature, batch size) in `records`, in the order of `methods` (vanilla
    first); the `skipped` methods get a row that says so."""
    summaries = []
    for temperature, size in dict.fromkeys((r.temperature, r.batch_size) for r in records):
        for method in methods:
            if method in skipped:
                summaries.append(BatchSummary(method, temperature, size, 0, 0, None, None, None, 0, 0, SKIPPED))
                continue
            runs = [r for r in records if (r.method, r.temperature, r.batch_size) == (method, temperature, size)]
            ok = [r for r in runs if r.ok]
            compared = [equal for r in ok if r.rows_equal is not None for equal in r.rows_equal]
            summaries.append(
                BatchSummary(
                    method=method,
                    temperature=temperature,
                    batch_size=size,
                    runs=len(runs),
                    failed=len(runs) - len(ok),
                    tokens_per_second=spread([r.tokens_per_second for r in ok if r.tokens_per_second is not None]),
                    speedup=spread(paired_batch_speedups(records, method, temperature, size)),
                    mean_accepted_length=mean_accepted_length(
                        sum(r.new_tokens for r in ok), sum(sum(r.row_target_forwards) for r in ok)
                    ),
                    rows_equal=sum(compared),
                    rows_compared=len(compared),
                    errors=[f"{r.batch}@{r.repeat}: {r.error}" for r in runs if not r.ok],
                )
            )
    return summaries


def _fmt(value: float | None, pattern: str = "{:.2f}") -> str:
    return "-" if value is None else pattern.format(value)


def batch_table(summaries: Sequence[BatchSummary]) -> str:
    """One row per method, temperature and batch size."""
    columns = ("method", "T", "batch", "tok/s", "x vanilla median [IQR]", "sigma per row", "= vanilla", "failed")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for s in summaries:
        head = (s.method, f"{s.temperature:g}", str(s.batch_size))
        if s.skipped:
            cells = (*head, s.skipped, "-", "-", "-", "-")
        else:
            sp = s.speedup
            cells = (
                *head,
                _fmt(s.tokens_per_second.median if s.tokens_per_second else None, "{:.1f}"),
                f"{sp.median:.2f}x [{sp.q1:.2f}-{sp.q3:.2f}]" if sp else "-",
                _fmt(s.mean_accepted_length),
                f"{s.rows_equal}/{s.rows_compared}" if s.rows_compared and s.temperature == 0 else "-",
                f"{s.failed}/{s.runs}",
            )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
