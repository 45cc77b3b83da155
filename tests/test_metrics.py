"""The figures are defined once (`specvlm_hf.metrics`), and every place that reports them reads those definitions."""

import pytest

from specvlm_hf import SpeculativeStats
from specvlm_hf.benchmark.methods import MethodResult
from specvlm_hf.benchmark.sweep import RunRecord
from specvlm_hf.metrics import mean_accepted_length, overhead_share


def test_mean_accepted_length_counts_tokens_per_target_forward():
    assert mean_accepted_length(180, 36) == 5.0
    assert mean_accepted_length(20, 20) == 1.0  # plain decoding
    assert mean_accepted_length(0, 0) is None


@pytest.mark.parametrize(
    ("step", "verify", "draft", "share"), [(10.0, 6.0, 3.0, 0.1), (10.0, 7.0, 3.5, 0.0), (0.0, 0.0, 0.0, None)]
)
def test_overhead_share_is_the_rest_of_the_step(step, verify, draft, share):
    assert overhead_share(step, verify, draft) == (share if share is None else pytest.approx(share))


def test_every_reporter_uses_the_same_definitions():
    stats = SpeculativeStats(new_tokens=17, target_forwards=4, step_time=2.0, verify_time=1.2, draft_time=0.5)
    assert stats.mean_accepted_length == mean_accepted_length(17, 4)
    assert stats.overhead_share == pytest.approx(overhead_share(2.0, 1.2, 0.5))
    assert SpeculativeStats().mean_accepted_length == 0.0 and SpeculativeStats().overhead_share is None
    assert (
        MethodResult(
            tokens=list(range(17)), tokens_per_forward=[5, 4, 4, 4], forward_sizes=[9, 6, 6, 6]
        ).mean_accepted_length
        == 17 / 4
    )
    record = RunRecord("eaglevlm-fixed", 0.0, "s", "long", 0, 0, wall_time=1.0, new_tokens=17, target_forwards=4)
    assert record.mean_accepted_length == 17 / 4
    assert RunRecord("eaglevlm-fixed", 0.0, "s", "long", 0, 0, error="boom").mean_accepted_length is None
