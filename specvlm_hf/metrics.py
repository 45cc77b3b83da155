"""Figures of one speculative generation: mean accepted length (sigma), forwards, and where the time went."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


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
    """

    new_tokens: int = 0
    target_forwards: int = 0
    accepted_lengths: list[int] = field(default_factory=list)
    wall_time: float | None = None
    step_time: float | None = None
    verify_time: float | None = None
    draft_time: float | None = None

    @property
    def mean_accepted_length(self) -> float:
        """Tokens per target forward (sigma), bonus token included: 1.00 for plain decoding."""
        return self.new_tokens / self.target_forwards if self.target_forwards else 0.0

    @property
    def overhead_share(self) -> float | None:
        """Share of step time outside target and draft forwards (acceptance, cache compaction, Python)."""
        if not self.step_time or self.verify_time is None or self.draft_time is None:
            return None
        return max(0.0, 1.0 - (self.verify_time + self.draft_time) / self.step_time)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["mean_accepted_length"] = self.mean_accepted_length
        data["overhead_share"] = self.overhead_share
        return data
