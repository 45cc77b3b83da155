"""The figures of speculative decoding, each defined once: mean accepted length (sigma), the loop's overhead share
and the free-draft bound, as functions of the counts and times they summarise (used by the loop, the benchmark, the trainer's
evaluation and the `evaluate` metric), and `SpeculativeStats`, the figures of one speculative generation."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


def mean_accepted_length(new_tokens: int, target_forwards: int) -> float | None:
    """sigma: tokens per target forward, bonus token included (plain decoding: 1.00); `None` without forwards."""
    return new_tokens / target_forwards if target_forwards else None


def overhead_share(step_time: float, verify_time: float, draft_time: float) -> float | None:
    """Share of step time spent outside target and draft forwards (the loop's own overhead: acceptance, cache
    compaction, Python), for one run or summed over runs; `None` without step time."""
    if step_time <= 0:
        return None
    return max(0.0, 1.0 - (verify_time + draft_time) / step_time)


def free_draft_bound(decoded_tokens: int, verify_seconds, plain_step_seconds: float) -> float | None:
    """
    The speedup a speculative method would reach if drafting and its own loop cost nothing: plain decoding's time
    for the decoded tokens over the time of the verification forwards alone, `sigma x T(1) / T(q)` for a fixed tree
    size q. `None` without forwards.

    Args:
        decoded_tokens (`int`): tokens emitted by the verification forwards (every forward after the first, which
            processes the prompt and, in transformers' assisted decoding, also verifies the first candidates).
        verify_seconds (`Sequence[float]`): T(q) of each verification forward.
        plain_step_seconds (`float`): T(1), one plain decoding step.
    """
    total = sum(verify_seconds)
    return decoded_tokens * plain_step_seconds / total if total > 0 else None


@dataclass
class SpeculativeStats:
    """
    Attributes:
        new_tokens (`int`): tokens generated.
        target_forwards (`int`): target forwards, prefill included (plain decoding: one per token).
        accepted_lengths (`list[int]`): tokens emitted by each verification step, bonus token included.
        wall_time (`float`): seconds for the whole call (image encoding and prefill included), when measured.
        step_time (`float`): seconds inside the draft-verify-accept steps (prefill excluded), when profiled.
        verify_time, draft_time (`float`): of `step_time`, seconds inside target verification forwards and inside
            draft forwards (tree growth included), when profiled.
        compressor_branch (`str`, *optional*): the elastic visual compressor's branch for this prompt (select
            mode), when the draft has one and the prompt an image.
        draft_visual_tokens (`int`, *optional*): visual pairs that reached the draft's cache (every visual token
            without a compressor), when the draft drafted (the first row's, for a batch).
        drafted (`bool`): False when the auto tree left the whole call to plain decoding (`CallChooser`): one
            forward per token, no verification steps.

    For a batch, `new_tokens`, `target_forwards` and `accepted_lengths` sum over its rows (a row counts the forwards
    it took part in), so `mean_accepted_length` is tokens per forward per row; `row_new_tokens`,
    `row_target_forwards` and `row_accepted_lengths` give each row's (`None` for one prompt).
    """

    new_tokens: int = 0
    target_forwards: int = 0
    accepted_lengths: list[int] = field(default_factory=list)
    wall_time: float | None = None
    step_time: float | None = None
    verify_time: float | None = None
    draft_time: float | None = None
    compressor_branch: str | None = None
    draft_visual_tokens: int | None = None
    row_new_tokens: list[int] | None = None
    row_target_forwards: list[int] | None = None
    row_accepted_lengths: list[list[int]] | None = None
    drafted: bool = True

    @property
    def mean_accepted_length(self) -> float:
        """`mean_accepted_length` of this generation (0.0 before any forward)."""
        return mean_accepted_length(self.new_tokens, self.target_forwards) or 0.0

    @property
    def overhead_share(self) -> float | None:
        """`overhead_share` of this generation, when profiled."""
        if self.step_time is None or self.verify_time is None or self.draft_time is None:
            return None
        return overhead_share(self.step_time, self.verify_time, self.draft_time)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["mean_accepted_length"] = self.mean_accepted_length
        data["overhead_share"] = self.overhead_share
        return data
