"""Model cards render offline from the package template with the draft's own training figures and a benchmark's
speed figures (model-index); the shipped testbed card is what the renderer makes today, and its usage snippet runs."""

import json
import shlex
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from specvlm_hf import SpecVLMDraftModel
from specvlm_hf.cli import main as cli_main
from specvlm_hf.hub import create_model_card, hub_id_or_none


def test_card_renders_curve_and_metadata(target, tmp_path):
    SpecVLMDraftModel.from_target(target).save_pretrained(tmp_path)
    curve = [{"epoch": 0.0, "mean_accepted_length": 1.25}, {"epoch": 1.0, "mean_accepted_length": 3.5}]
    (tmp_path / "acceptance_curve.json").write_text(json.dumps(curve))
    (tmp_path / "training_summary.json").write_text(json.dumps(
        {"rows_used": 10, "rows_skipped": {}, "steps": 4, "epochs": 1, "wall_seconds": 3.0, "lambda_logit": 0.1,
         "lambda_feat": 1.0}))  # fmt: skip
    card = create_model_card(
        tmp_path, target_name="LLaVA-1.5-7B", base_model="llava-hf/llava-1.5-7b-hf", repo_id="me/llava-draft"
    )
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    assert loaded.data.base_model == "llava-hf/llava-1.5-7b-hf"
    assert loaded.data.pipeline_tag == "image-text-to-text"
    assert "| 1.0 | 3.500 |" in loaded.text
    assert 'SpecVLMDraftModel.from_pretrained("me/llava-draft", target=target)' in loaded.text
    assert "steps: 4" in loaded.text


def test_card_needs_a_saved_draft(tmp_path):
    with pytest.raises(FileNotFoundError, match="no saved draft"):
        create_model_card(tmp_path, target_name="x")


REPO = Path(__file__).resolve().parent.parent


def _benchmark(tau=2.5, sigma=6.0):
    summary = [
        {"method": "vanilla", "temperature": 0.0, "speedup": {"median": 1.0}, "mean_accepted_length": 1.0,
         "exact_match": 4, "compared": 4},
        {"method": "eaglevlm-auto", "temperature": 0.0, "speedup": {"median": tau}, "mean_accepted_length": sigma,
         "exact_match": 4, "compared": 4},
        {"method": "hf-assisted", "temperature": 0.0, "speedup": {"median": 0.9}, "mean_accepted_length": 5.0,
         "exact_match": 4, "compared": 4},
    ]  # fmt: skip
    return {
        "environment": {"device_name": "Test CPU", "torch_threads": 2, "dtype": "float32"},
        "config": {"prompts": None, "kind": "long"},
        "summary": summary,
    }


def test_card_reports_the_benchmark_as_model_index(target, tmp_path):
    SpecVLMDraftModel.from_target(target).save_pretrained(tmp_path)
    card = create_model_card(
        tmp_path, target_name="LLaVA-1.5-7B", base_model="llava-hf/llava-1.5-7b-hf", repo_id="me/draft",
        benchmark=_benchmark(), training_command="specvlm-hf train --target x",
    )  # fmt: skip
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    metrics = {(r.metric_type, r.metric_value) for r in loaded.data.eval_results}
    assert metrics == {("speedup", 2.5), ("mean_accepted_length", 6.0)}  # this project's rows only
    assert all("Test CPU" in r.metric_name for r in loaded.data.eval_results)
    assert "| eaglevlm-auto | 0 | 2.50x | 6.00 | 4/4 |" in loaded.text
    assert "specvlm-hf train --target x" in loaded.text


def test_base_model_is_a_hub_id_never_a_local_path(target, tmp_path):
    SpecVLMDraftModel.from_target(target).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="Hub id"):
        create_model_card(tmp_path, target_name="x", base_model=str(tmp_path))
    assert hub_id_or_none(str(tmp_path)) is None and hub_id_or_none("org/name") == "org/name"
    assert create_model_card(tmp_path, target_name="local LLaVA").data.base_model is None


def test_card_command_writes_the_card(target, tmp_path):
    draft_dir = tmp_path / "draft"
    SpecVLMDraftModel.from_target(target).save_pretrained(draft_dir)
    (tmp_path / "bench.json").write_text(json.dumps(_benchmark(tau=1.7)))
    out = tmp_path / "card.md"
    args = ["card", "--draft", str(draft_dir), "--target-name", "t", "--benchmark", str(tmp_path / "bench.json")]
    assert cli_main([*args, "--output", str(out)]) == 0
    assert ModelCard.load(out).data.eval_results[0].metric_value == 1.7


def test_shipped_testbed_cards_are_what_the_renderer_makes_today(tmp_path, monkeypatch):
    """Each `specvlm-hf card` command of model_cards/render.sh, rendered now, gives its card and the copy shipped
    beside the draft byte for byte."""
    monkeypatch.chdir(REPO)
    script = (REPO / "model_cards" / "render.sh").read_text()
    blocks = [b for b in script.split("\n\n") if "specvlm-hf card" in b]
    assert len(blocks) == 4
    for block in blocks:
        card, copy = block[block.index("specvlm-hf card") :].split("\ncp ")
        command = shlex.split(card.replace("\\\n", " "))
        out = tmp_path / "README.md"
        shipped = command[command.index("--output") + 1]
        command[command.index("--output") + 1] = str(out)
        assert cli_main(command[1:]) == 0
        rendered = out.read_text()
        assert rendered == (REPO / shipped).read_text()
        assert rendered == (REPO / shlex.split(copy)[1]).read_text()


@pytest.mark.parametrize(
    "card", ["testbed-draft", "testbed-specvlm-draft", "testbed-eagle3-draft", "testbed-qwen2-vl-draft"]
)
def test_testbed_card_usage_snippet_runs(monkeypatch, card):
    monkeypatch.chdir(REPO)
    namespace = {}
    exec((REPO / "model_cards" / card / "usage.py").read_text(), namespace)
    assert namespace["output"].shape[1] > namespace["inputs"]["input_ids"].shape[1]
