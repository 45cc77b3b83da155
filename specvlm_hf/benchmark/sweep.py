"""The measurement sweep: every method on every sample, interleaved per sample (the method order rotates from one
sample to the next) so that machine drift hits all methods alike; warm-up runs first and is discarded; a method
that raises is recorded as failed and the sweep goes on."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch

from ..metrics import mean_accepted_length
from .methods import Method, MethodResult, Vanilla
from .prompts import Sample
from .stats import first_mismatch
from .timing import Meter, module_bytes

logger = logging.getLogger(__name__)


@dataclass
class RunRecord:
    """
    One timed generation (`error` set and the figures `None` when the method raised).

    Attributes:
        method, sample, kind (`str`), temperature (`float`), repeat, seed (`int`): what ran.
        wall_time (`float`): seconds for the whole `generate` call (image encoding and prefill included).
        new_tokens, target_forwards (`int`), tokens_per_forward, forward_sizes (`list[int]`): see `MethodResult`.
        peak_memory_bytes (`int`): weights of the models the method uses + the call's transient peak.
        transient_memory_bytes (`int`): the call's transient peak alone (`timing.py`).
        step_time, verify_time, draft_time (`float`): the tree loop's profile, where the method has one.
        matches_vanilla (`bool`), first_mismatch (`int`): output equality with the vanilla run of the same sample,
            repeat and temperature (meaningful at T = 0).
    """

    method: str
    temperature: float
    sample: str
    kind: str
    repeat: int
    seed: int
    wall_time: float | None = None
    new_tokens: int | None = None
    target_forwards: int | None = None
    tokens_per_forward: list[int] | None = None
    forward_sizes: list[int] | None = None
    peak_memory_bytes: int | None = None
    transient_memory_bytes: int | None = None
    step_time: float | None = None
    verify_time: float | None = None
    draft_time: float | None = None
    matches_vanilla: bool | None = None
    first_mismatch: int | None = None
    error: str | None = None
    tokens: list[int] | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def tokens_per_second(self) -> float | None:
        return self.new_tokens / self.wall_time if self.ok and self.wall_time else None

    @property
    def mean_accepted_length(self) -> float | None:
        return mean_accepted_length(self.new_tokens, self.target_forwards) if self.ok else None

    def to_dict(self) -> dict:
        """Every figure (the generated token ids are left out)."""
        data = asdict(self)
        del data["tokens"]
        data["tokens_per_second"] = self.tokens_per_second
        data["mean_accepted_length"] = self.mean_accepted_length
        return data


def sample_seed(base: int, sample_index: int, repeat: int) -> int:
    """The seed every method uses on one sample and repeat (same sampling noise source for all methods)."""
    return base + 100_003 * repeat + sample_index


def measured_run(meter: Meter, record, name: str, item_id: str, call):
    """`meter.measure(call)` under `record.seed`, or `None` with `record.error` set: a failing method is a result,
    not a crash. `record` is a `RunRecord` or a `batches.BatchRecord`; `name` and `item_id` only name the failure."""
    torch.manual_seed(record.seed)
    try:
        return meter.measure(call)
    except Exception as err:
        record.error = f"{type(err).__name__}: {err}"
        logger.warning("%s failed on %s (T=%s): %s", name, item_id, record.temperature, record.error)
        return None


def _run_one(
    method: Method, target, sample: Sample, meter: Meter, weights: int, record: RunRecord, max_new_tokens: int
):
    measurement = measured_run(
        meter, record, method.name, sample.id,
        lambda: method.generate(target, sample.inputs, temperature=record.temperature, max_new_tokens=max_new_tokens),
    )  # fmt: skip
    if measurement is None:
        return record
    result: MethodResult = measurement.value
    record.wall_time = measurement.seconds
    record.new_tokens = result.new_tokens
    record.target_forwards = result.target_forwards
    record.tokens_per_forward = result.tokens_per_forward
    record.forward_sizes = result.forward_sizes
    record.transient_memory_bytes = measurement.transient_bytes
    record.peak_memory_bytes = weights + (measurement.transient_bytes or 0) if meter.measures_memory else None
    record.step_time, record.verify_time, record.draft_time = result.step_time, result.verify_time, result.draft_time
    record.tokens = result.tokens
    return record


def warm_up(target, methods: Mapping[str, Method], sample: Sample, temperature: float, max_new_tokens: int) -> None:
    """One discarded run per method (first-call allocations, kernel selection, lazy imports)."""
    for method in methods.values():
        torch.manual_seed(0)
        try:
            method.generate(target, sample.inputs, temperature=temperature, max_new_tokens=max_new_tokens)
        except Exception as err:  # the timed runs record the failure
            logger.warning("warm-up of %s failed: %s", method.name, err)


def run_sweep(
    target,
    samples: Sequence[Sample],
    methods: Mapping[str, Method],
    *,
    temperature: float,
    repeats: int,
    max_new_tokens: int,
    device: torch.device,
    seed: int = 0,
    warmup_tokens: int = 32,
) -> list[RunRecord]:
    """
    Runs every method on every sample `repeats` times at one temperature.

    Args:
        methods (`Mapping[str, Method]`): must hold "vanilla", the reference of the equality check.
        warmup_tokens (`int`): new tokens of the warm-up runs (0 = no warm-up).

    Returns:
        `list[RunRecord]` in execution order.
    """
    if Vanilla.name not in methods:
        raise ValueError("the sweep needs the 'vanilla' method as its reference")
    meter = Meter(device)
    weights = {name: module_bytes(target, *m.models) for name, m in methods.items()}
    if warmup_tokens and samples:
        warm_up(target, methods, samples[0], temperature, min(warmup_tokens, max_new_tokens))
    names = list(methods)
    records = []
    for repeat in range(repeats):
        for index, sample in enumerate(samples):
            shift = (index + repeat) % len(names)
            group = {}
            for name in names[shift:] + names[:shift]:
                record = RunRecord(
                    name, float(temperature), sample.id, sample.kind, repeat, sample_seed(seed, index, repeat)
                )
                group[name] = _run_one(methods[name], target, sample, meter, weights[name], record, max_new_tokens)
            reference = group[Vanilla.name]
            for record in group.values():
                if record.ok and reference.ok:
                    record.first_mismatch = first_mismatch(record.tokens, reference.tokens)
                    record.matches_vanilla = record.first_mismatch is None
            records += group.values()
            logger.info(
                "T=%s repeat %d sample %s: %s",
                temperature,
                repeat,
                sample.id,
                ", ".join(f"{r.method} {r.wall_time:.2f}s" if r.ok else f"{r.method} failed" for r in group.values()),
            )
    return records
