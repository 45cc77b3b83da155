"""Export for serving engines: an EAGLE-3 draft becomes a speculators `eagle3_draft` checkpoint whose config passes the
schema vLLM reads and whose weights carry the engines' names; export then re-import gives the same weights and the
same speculative output (equal to plain greedy); a target is written in the layout engines load and transformers
still loads it to the same output; EAGLE-2-style drafts and targets an engine cannot load are refused, saying what to
do; the CLI runs end to end. (Running the export in vLLM: `specvlm-hf serve-check`, docs/serving.md.)"""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tiny import make_inputs, make_target
from transformers import LlavaForConditionalGeneration

from specvlm_hf import SpecVLMDraftModel, SpecVLMEagle3DraftModel, speculative_generate
from specvlm_hf.cli import main
from specvlm_hf.export import (
    check_speculators_config,
    engine_layout_problem,
    export_draft,
    export_target,
    import_speculators,
)

TREE = {"depth": 4, "tree_top_k": 3, "total_tokens": 10}


@pytest.fixture(scope="module")
def saved_target(deep_target, tmp_path_factory):
    """The tiny target saved by transformers (`vision_tower.*` names)."""
    directory = tmp_path_factory.mktemp("saved")
    deep_target.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def target_dir(saved_target, tmp_path_factory):
    """The same target in the engines' layout (`vision_tower.vision_model.*`)."""
    return export_target(saved_target, tmp_path_factory.mktemp("engine_target"))


@pytest.fixture(scope="module")
def exported(eagle3_draft, target_dir, tmp_path_factory):
    return export_draft(eagle3_draft, tmp_path_factory.mktemp("export"), target=str(target_dir))


def speculative(target, draft, seed, image):
    inputs = make_inputs(seed, text_len=5, image=image)
    out = speculative_generate(target, draft, **inputs, max_new_tokens=16, do_sample=False, **TREE).sequences
    return out, target.generate(**inputs, max_new_tokens=16, do_sample=False)


def test_export_is_a_valid_speculators_eagle3_draft(exported, target_dir):
    config = json.loads((exported / "config.json").read_text())
    check_speculators_config(config)
    assert config["speculators_model_type"] == config["speculators_config"]["algorithm"] == "eagle3"
    assert config["speculators_config"]["verifier"] == {
        "name_or_path": str(target_dir),
        "architectures": ["LlavaForConditionalGeneration"],
    }
    assert config["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == 5
    assert config["eagle_aux_hidden_state_layer_ids"] == [1, 2, 3] and config["draft_vocab_size"] == 96
    assert config["transformer_layer_config"]["hidden_size"] == 64 and config["norm_before_residual"] is True
    with safe_open(exported / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert {"fc.weight", "fc_norm.0.weight", "midlayer.hidden_norm.weight", "midlayer.self_attn.q_proj.weight",
            "norm.weight", "lm_head.weight"} <= names  # fmt: skip
    assert not any(n.startswith("layers.") or "embed_tokens" in n for n in names)  # the embedding stays the target's
    assert "vllm serve" in (exported / "README.md").read_text()


def test_schema_check_names_every_problem(exported):
    config = json.loads((exported / "config.json").read_text())
    del config["speculators_config"]["verifier"]["name_or_path"]
    config["eagle_aux_hidden_state_layer_ids"] = [1, 2]
    config["speculators_config"]["proposal_methods"][0]["speculative_tokens"] = 0
    config["transformer_layer_config"]["model_type"] = "qwen3"
    config["draft_vocab_size"] = 500
    with pytest.raises(ValueError, match="Not a valid speculators `eagle3` config") as err:
        check_speculators_config(config)
    for key in (
        "speculators_config.verifier.name_or_path: missing",
        "eagle_aux_hidden_state_layer_ids: expected a list of three integers >= 0, got [1, 2]",
        "proposal_methods.0.speculative_tokens: expected an integer >= 1, got 0",
        "transformer_layer_config.model_type: expected 'llama'",
        "draft_vocab_size: 500 exceeds the target's vocab_size 96",
    ):
        assert key in str(err.value)


def test_reimport_gives_the_same_weights_and_output(deep_target, eagle3_draft, exported):
    again = import_speculators(exported, target=deep_target)
    assert type(again) is SpecVLMEagle3DraftModel
    ours, theirs = eagle3_draft.state_dict(), again.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    for seed, image in ((0, True), (1, False)):
        out, reference = speculative(deep_target, eagle3_draft, seed, image)
        assert torch.equal(speculative(deep_target, again, seed, image)[0], out)
        assert torch.equal(out, reference)


def test_the_engine_target_keeps_every_tensor_and_loads_back(deep_target, saved_target, target_dir):
    assert "vision_tower.vision_model.*" in engine_layout_problem(saved_target)
    assert engine_layout_problem(target_dir) is None
    with (
        safe_open(saved_target / "model.safetensors", "pt") as old,
        safe_open(target_dir / "model.safetensors", "pt") as new,
    ):
        renamed = {k.replace("vision_tower.", "vision_tower.vision_model.", 1): k for k in old.keys()}
        assert set(new.keys()) == set(renamed)
        assert all(torch.equal(new.get_tensor(n), old.get_tensor(o)) for n, o in renamed.items())
    loaded = LlavaForConditionalGeneration.from_pretrained(target_dir).eval()
    inputs = make_inputs(seed=4)
    assert torch.equal(
        loaded.generate(**inputs, max_new_tokens=12, do_sample=False),
        deep_target.generate(**inputs, max_new_tokens=12, do_sample=False),
    )


def test_what_no_engine_runs_is_refused_saying_what_to_do(
    deep_target, eagle3_draft, saved_target, target_dir, tmp_path
):
    with pytest.raises(ValueError, match=r"EAGLE-2-style draft.*specvlm-hf train --family eagle3"):
        export_draft(SpecVLMDraftModel.from_target(deep_target), tmp_path, target=str(target_dir))
    with pytest.raises(ValueError, match=r"vision tower is saved as `vision_tower\.\*`.*--target-output"):
        export_draft(eagle3_draft, tmp_path, target=str(saved_target))
    with pytest.raises(ValueError, match="testbed 'testbed' is saved in transformers' layout"):
        export_draft(eagle3_draft, tmp_path, target="testbed")
    with pytest.raises(ValueError, match="no name or path"):
        export_draft(eagle3_draft, tmp_path)  # the in-process target was never saved
    other = tmp_path / "other"
    make_target(layers=2).config.save_pretrained(other)
    with pytest.raises(ValueError, match=r"aux layers \[2, 3\] outside the target's layers 0..1"):
        export_draft(eagle3_draft, tmp_path, target=str(other))
    with pytest.raises(ValueError, match="Unknown export format 'gguf'; valid: speculators"):
        export_draft(eagle3_draft, tmp_path, format="gguf", target=str(target_dir))
    assert not (tmp_path / "config.json").exists()


def test_import_refuses_what_it_cannot_reproduce(exported, tmp_path):
    config = json.loads((exported / "config.json").read_text())
    del config["specvlm_hf"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="was not written by `specvlm-hf export`"):
        import_speculators(tmp_path)
    (tmp_path / "config.json").write_text((exported / "config.json").read_text())
    with safe_open(exported / "model.safetensors", "pt") as f:
        weights = {k: f.get_tensor(k) for k in f.keys() if k != "midlayer.hidden_norm.weight"}
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing \['layers.0.hidden_norm.weight'\], unexpected \[\]"):
        import_speculators(tmp_path)


def test_cli_exports_a_draft_and_its_target(eagle3_draft, saved_target, tmp_path, capsys):
    eagle3_draft.save_pretrained(tmp_path / "draft")
    argv = ["export", str(tmp_path / "draft"), "--output", str(tmp_path / "out"), "--target", str(saved_target)]
    assert main(argv) == 2
    assert "--target-output" in capsys.readouterr().err
    assert main([*argv, "--target-output", str(tmp_path / "target"), "--depth", "3"]) == 0
    assert "vllm serve" in capsys.readouterr().out
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == 3
    assert config["speculators_config"]["verifier"]["name_or_path"] == str((tmp_path / "target").resolve())
    again = import_speculators(tmp_path / "out")
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in eagle3_draft.state_dict().items())


def test_cli_refuses_a_shipped_eagle2_draft(tmp_path, capsys):
    argv = [
        "export",
        "draft",
        "--output",
        str(tmp_path),
        "--target",
        "testbed",
        "--target-output",
        str(tmp_path / "t"),
    ]
    assert main(argv) == 2
    assert "EAGLE-2-style draft" in capsys.readouterr().err
    assert not (tmp_path / "config.json").exists()
