"""Model cards render offline from the package template with the draft's own training figures."""

import json

import pytest
from huggingface_hub import ModelCard

from specvlm_hf import SpecVLMDraftModel
from specvlm_hf.hub import create_model_card


def test_card_renders_curve_and_metadata(target, tmp_path):
    SpecVLMDraftModel.from_target(target).save_pretrained(tmp_path)
    curve = [{"epoch": 0.0, "mean_accepted_length": 1.25}, {"epoch": 1.0, "mean_accepted_length": 3.5}]
    (tmp_path / "acceptance_curve.json").write_text(json.dumps(curve))
    (tmp_path / "training_summary.json").write_text(json.dumps(
        {"rows_used": 10, "rows_skipped": {}, "steps": 4, "epochs": 1, "wall_seconds": 3.0, "lambda_logit": 0.1,
         "lambda_feat": 1.0}))  # fmt: skip
    card = create_model_card(tmp_path, target_name="llava-hf/llava-1.5-7b-hf", repo_id="me/llava-draft")
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
