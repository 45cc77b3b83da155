"""Pure arithmetic of the benchmark (peers.md §6): paired speedups, spreads, tokens per target forward, output
equality. No model, no clock: every function here is tested on synthetic numbers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Spread:
    """Median, quartiles and range of a sample of values (`n` values)."""

    median: float
    q1: float
    q3: float
    min: float
    max: float
    n: int


def spread(values: Sequence[float]) -> Spread | None:
    """The `Spread` of `values` (linear-interpolated quartiles), `None` when empty."""
    if len(values) == 0:
        return None
    data = np.asarray(values, dtype=float)
    q1, median, q3 = np.percentile(data, [25, 50, 75])
    return Spread(float(median), float(q1), float(q3), float(data.min()), float(data.max()), len(data))


def paired_speedup(wall_time: float, new_tokens: int, reference_wall_time: float, reference_new_tokens: int) -> float:
    """
    Speedup tau of one run over the reference run of the same sample, repeat and temperature: the ratio of their
    throughputs (tokens per second). When both produced the same tokens (T = 0, lossless) this is exactly
    `reference_wall_time / wall_time`; at T > 0 the lengths may differ and tokens per second keeps the ratio fair.
    """
    if wall_time <= 0 or reference_wall_time <= 0 or new_tokens <= 0 or reference_new_tokens <= 0:
        raise ValueError(
            f"speedup needs positive times and token counts, got {wall_time=}, {new_tokens=}, "
            f"{reference_wall_time=}, {reference_new_tokens=}"
        )
    return (new_tokens / wall_time) / (reference_new_tokens / reference_wall_time)


def tokens_per_forward(starts: Sequence[int], prompt_len: int, final_len: int) -> list[int]:
    """
    Tokens each target forward emitted, from the cache length at the start of each forward.

    Every decoding method runs forward `i` on the sequence from position `starts[i]`; the last token of the sequence
    is never cached yet, so after forward `i` the sequence holds `starts[i + 1] + 1` tokens, and `final_len` after
    the last one. The first forward (prefill, or prefill + candidates for transformers' assisted decoding) is
    included, so the list sums to the new tokens and its mean is sigma.

    Args:
        starts (`Sequence[int]`): cache length before each target forward, in call order; `starts[0] == 0`.
        prompt_len (`int`), final_len (`int`): sequence length before and after generation.
    """
    if not starts:
        return []
    lengths = [s + 1 for s in starts[1:]] + [final_len]
    previous = [prompt_len] + lengths[:-1]
    return [after - before for after, before in zip(lengths, previous)]


def first_mismatch(tokens: Sequence[int], reference: Sequence[int]) -> int | None:
    """Index of the first generated token where two outputs differ (a length difference counts), `None` if equal."""
    for i, (a, b) in enumerate(zip(tokens, reference)):
        if a != b:
            return i
    return None if len(tokens) == len(reference) else min(len(tokens), len(reference))
