"""The soak command in miniature: 12 calls on the shipped testbed write the checkpoints, the verdicts and the
README, and the checked greedy calls equal plain `generate()`; and its schedule on its own."""

from __future__ import annotations

import json

from specvlm_hf.benchmark.soak import KINDS, checkpoints, main, schedule


def test_schedule_mixes_kinds_and_modes_deterministically():
    plan = schedule(12, {"long": 3, "short": 5, "text": 4}, seed=7, check_every=6)
    assert plan == schedule(12, {"long": 3, "short": 5, "text": 4}, seed=7, check_every=6)
    assert {(c.kind, c.do_sample) for c in plan[:6]} == {(k, s) for k in KINDS for s in (False, True)}
    assert [c.number for c in plan if c.check] == [1, 7]
    assert not any(c.check and c.do_sample for c in plan)
    long_prompts = [c.prompt for c in plan if c.kind == "long"]
    assert sorted(long_prompts[:3]) == [0, 1, 2] and long_prompts[3] == long_prompts[0]  # a permutation, cycled


def test_checkpoints():
    assert checkpoints(1000, 100) == [1, 10, *range(100, 1001, 100)]
    assert checkpoints(12, 100) == [1, 10, 12]
    assert checkpoints(5, 100) == [1, 5]


def test_soak_miniature(tmp_path):
    assert main(["--calls", "12", "--max-new-tokens", "8", "--check-every", "6", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "soak.json").read_text())
    assert [s["call"] for s in report["samples"]] == [1, 10, 12]
    assert len(report["calls"]) == 12 and {c["kind"] for c in report["calls"]} == set(KINDS)
    assert report["greedy_checks"] == 2 and report["mismatches"] == []
    last = report["samples"][-1]
    assert last["rss_mb"] > 0 and last["tensors"] > 0 and last["caches"]["cost_entries"] >= 1
    assert {t["key"].split("/")[2] for t in last["tuners"]} == {"False", "True"}  # greedy and sampling tuners
    verdicts = report["verdicts"]
    assert verdicts["baseline_call"] == 10 and verdicts["last_call"] == 12
    for name in ("rss_flat", "tensors_flat", "state_flat", "throughput_held"):
        assert isinstance(verdicts[name], bool) and verdicts[f"{name}_threshold"]
    readme = (tmp_path / "README.md").read_text()
    assert "python -m specvlm_hf.benchmark.soak --calls 12" in readme and "| 12 |" in readme
    assert "2 greedy calls compared with plain `generate()`: 0 mismatches." in readme
