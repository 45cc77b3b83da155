"""The 7B-scale cost measurement (`benchmark.scale_costs`) on its tiny configuration: the same code path end to end."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from specvlm_hf.benchmark.scale_costs import COST_SIZES, HUB_TO_PARAMETER, main
from specvlm_hf.draft_step import available_numerics


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """`main(["--tiny", ...])` once, checkpoints kept: `(exit code, report, out dir)`."""
    out = tmp_path_factory.mktemp("scale_costs")
    code = main(["--tiny", "--out", out, "--prompts", "1", "--new-tokens", "8", "--keep", "--work-dir", out])
    return code, json.loads((out / "scale_costs.json").read_text()), out


def test_tiny_run_succeeds_and_writes_its_record(tiny_run):
    code, report, out = tiny_run
    assert code == 0, report
    assert report["tiny"] is True and report["command"].startswith("python -m specvlm_hf.benchmark.scale_costs --tiny")
    assert report["environment"]["device"] == "cpu" and report["peak_rss_gib"] > 0
    readme = (out / "README.md").read_text()
    assert "T(q)/T(1)" in readme and "auto tree picks" in readme and report["command"] in readme


def test_checkpoints_are_on_disk_in_the_hub_layout(tiny_run):
    _, report, _ = tiny_run
    assert report["build"]["target_layout"]["hub_layout"] is True
    target = report["checkpoints"] + "/target"
    with safe_open(f"{target}/model.safetensors", "pt") as f:
        names = list(f.keys())
    assert all(name.startswith(tuple(HUB_TO_PARAMETER)) for name in names)
    assert {prefix for prefix in HUB_TO_PARAMETER if any(n.startswith(prefix) for n in names)} == set(HUB_TO_PARAMETER)
    assert "language_model.lm_head.weight" in names and not any(n.startswith("model.") for n in names)
    with safe_open(f"{report['checkpoints']}/draft/model.safetensors", "pt") as f:
        draft_names = list(f.keys())
    assert "fc.weight" in draft_names and not any("embed_tokens" in n or "lm_head" in n for n in draft_names)
    for dtype in ("float32", "bfloat16"):
        load = report[dtype]["load"]
        assert load["missing_keys"] == [] and load["unexpected_keys"] == []
        assert all(load["target_weights_equal"].values()) and load["draft_weights_equal"]
        assert (
            load["processor"] == "LlavaProcessor"
            and load["image_tokens_in_prompt"] == report["config"]["image_tokens"]
        )


def test_both_routes_equal_plain_greedy_in_float32(tiny_run):
    _, report, _ = tiny_run
    decode = report["float32"]["decode"]
    assert decode["compared"] == 2 and decode["exact"] == 2 and decode["token_match_rate"] == 1.0
    run = decode["runs"][0]
    assert run["generate"]["equal"] and run["speculative_generate"]["equal"] and len(run["plain_tokens"]) == 8
    assert 0.0 <= report["bfloat16"]["decode"]["token_match_rate"] <= 1.0  # a rate, not a requirement


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_costs_cover_every_size_and_draft_numerics(tiny_run, dtype):
    _, report, _ = tiny_run
    costs = report[dtype]["costs"]
    assert "error" not in costs, costs
    assert [int(q) for q in costs["cost_curve_relative"]] == list(COST_SIZES)
    assert costs["cost_curve_relative"]["1"] == 1.0
    numerics = available_numerics(torch.device("cpu"), getattr(torch, dtype))
    assert set(costs["draft_level_seconds"]) == set(numerics) and costs["chosen_numerics"] in numerics
    for levels in costs["draft_level_seconds"].values():
        assert [int(k) for k in levels] == [1, 2, 4, 8] and all(t > 0 for t in levels.values())
    assert set(costs["auto_tree"]) == set(numerics) and all(len(p) == 3 for p in costs["auto_tree"].values())
    assert set(costs["loop"]) == {"chain", "tree"}
    assert all(0 <= loop["overhead_share"] < 1 for loop in costs["loop"].values())
