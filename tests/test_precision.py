"""`python -m specvlm_hf.benchmark.precision`: greedy tree decoding against plain greedy in bfloat16 on the shipped
testbed, reported per tree with the divergences' positions and logit gaps."""

import json

import pytest

from specvlm_hf.benchmark import precision
from specvlm_hf.testbed import store


@pytest.mark.skipif(not store.is_valid(store.SHIPPED_DIR), reason="no testbed shipped in this checkout")
def test_precision_report_counts_every_run(tmp_path):
    assert precision.main(["--num-samples", "2", "--max-new-tokens", "8", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "precision.json").read_text())
    assert report["dtype"] == "bfloat16" and [run["kind"] for run in report["runs"]] == ["long", "short"]
    for name in precision.TREES:
        runs = [run[name] for run in report["runs"]]
        assert all((r["first_divergence"] is None) == r["equal"] for r in runs)
        summary = report["summary"][name]
        assert summary["compared"] == 2 and summary["exact"] == sum(r["equal"] for r in runs)
        assert len(summary["first_divergence"]) == 2 - summary["exact"]
    assert "| auto tree |" in (tmp_path / "README.md").read_text()
