"""Export for serving engines: the speculators `eagle` config passes its schema, weights carry speculators' names,
export then re-import gives the same weights and the same speculative output (equal to plain greedy), a compressor
is refused unless dropped (and then recorded), bad input gets a clear error, and the CLI runs end to end."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tiny import make_inputs, make_target

from specvlm_hf import SpecVLMCompressor, SpecVLMCompressorConfig, SpecVLMDraftModel, speculative_generate
from specvlm_hf.cli import main
from specvlm_hf.export import check_speculators_config, export_draft, import_speculators
from specvlm_hf.testbed.store import SHIPPED_SPECVLM_DRAFT_DIR

TREE = {"depth": 4, "tree_top_k": 3, "total_tokens": 10}


@pytest.fixture(scope="module")
def target_dir(target, tmp_path_factory):
    """The tiny target saved, so that the export can name it as an engine would load it."""
    directory = tmp_path_factory.mktemp("target")
    target.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def exported(draft, target_dir, tmp_path_factory):
    return export_draft(draft, tmp_path_factory.mktemp("export"), target=str(target_dir))


def with_compressor(target):
    torch.manual_seed(0)
    config = SpecVLMCompressorConfig(hidden_size=64, grid=[4, 4], branches=["pool:4"])
    return SpecVLMDraftModel.from_target(target).set_compressor(SpecVLMCompressor(config).eval())


def speculative(target, draft, seed, image):
    inputs = make_inputs(seed, text_len=5, image=image)
    out = speculative_generate(target, draft, **inputs, max_new_tokens=16, do_sample=False, **TREE).sequences
    return out, target.generate(**inputs, max_new_tokens=16, do_sample=False)


def test_export_is_a_valid_speculators_eagle_draft(exported, target_dir):
    config = json.loads((exported / "config.json").read_text())
    check_speculators_config(config)
    assert config["speculators_model_type"] == config["speculators_config"]["algorithm"] == "eagle"
    assert config["speculators_config"]["verifier"] == {
        "name_or_path": str(target_dir),
        "architectures": ["LlavaForConditionalGeneration"],
    }
    assert config["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == 5
    assert config["transformer_layer_config"]["hidden_size"] == 64 and config["fusion_bias"] is True
    with safe_open(exported / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert {"fusion_fc.weight", "fusion_fc.bias", "transformer.self_attn.q_proj.weight"} <= names
    assert all(n.startswith(("fusion_fc.", "transformer.")) for n in names)  # no borrowed embed_tokens / lm_head
    readme = (exported / "README.md").read_text()
    assert "input RMSNorm" in readme and "vllm serve" in readme and "Dropped" not in readme


def test_schema_check_names_every_problem(exported):
    config = json.loads((exported / "config.json").read_text())
    del config["speculators_config"]["verifier"]["name_or_path"]
    config["fusion_bias"] = "yes"
    config["speculators_config"]["proposal_methods"][0]["speculative_tokens"] = 0
    config["speculators_config"]["default_proposal_method"] = "tree"
    config["transformer_layer_config"]["model_type"] = "qwen3"
    with pytest.raises(ValueError, match="Not a valid speculators `eagle` config") as err:
        check_speculators_config(config)
    for key in (
        "speculators_config.verifier.name_or_path: missing",
        "fusion_bias: expected a bool, got 'yes'",
        "proposal_methods.0.speculative_tokens: expected an integer >= 1, got 0",
        "default_proposal_method: 'tree' is not one of the proposal methods ['greedy']",
        "transformer_layer_config.model_type: expected 'llama'",
    ):
        assert key in str(err.value)


def test_reimport_gives_the_same_weights_and_output(target, draft, exported):
    again = import_speculators(exported, target=target)
    ours, theirs = draft.state_dict(), again.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert again.config.to_diff_dict() == draft.config.to_diff_dict()
    for seed, image in ((0, True), (1, False)):
        out, reference = speculative(target, draft, seed, image)
        assert torch.equal(speculative(target, again, seed, image)[0], out)
        assert torch.equal(out, reference)


def test_compressor_is_refused_unless_dropped(target, target_dir, tmp_path):
    draft = with_compressor(target)
    with pytest.raises(ValueError, match=r"visual compressor \(`compressor`: branches pool:4.*--drop-compressor"):
        export_draft(draft, tmp_path, target=str(target_dir))
    assert not (tmp_path / "config.json").exists()
    export_draft(draft, tmp_path, target=str(target_dir), drop_compressor=True)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["specvlm_hf"]["dropped"]["compressor"]["branches"] == ["pool:4"]
    assert "**Dropped: `compressor`**" in (tmp_path / "README.md").read_text()
    again = import_speculators(tmp_path, target=target)
    plain = SpecVLMDraftModel.from_target(target)
    plain.load_state_dict({k: v for k, v in draft.state_dict().items() if not k.startswith("compressor.")})
    assert again.config.compressor is None
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in plain.state_dict().items())
    out, reference = speculative(target, again, 2, True)
    assert torch.equal(out, reference) and torch.equal(out, speculative(target, plain, 2, True)[0])


def test_bad_input_gets_a_clear_error(target, draft, target_dir, tmp_path):
    with pytest.raises(ValueError, match="holds one decoder layer; this draft has 2"):
        export_draft(SpecVLMDraftModel.from_target(target, num_hidden_layers=2), tmp_path, target=str(target_dir))
    with pytest.raises(ValueError, match="no name or path"):
        export_draft(draft, tmp_path)  # the in-process target was never saved
    other = tmp_path / "other"
    make_target(hidden=32, heads=2, kv_heads=1).config.save_pretrained(other)
    with pytest.raises(ValueError, match="does not fit the export's target: hidden_size 32 != draft's 64"):
        export_draft(draft, tmp_path, target=str(other))
    with pytest.raises(ValueError, match="Unknown export format 'gguf'; valid: speculators"):
        export_draft(draft, tmp_path, format="gguf", target=str(target_dir))


def test_import_refuses_what_it_cannot_reproduce(exported, tmp_path):
    config = json.loads((exported / "config.json").read_text())
    del config["specvlm_hf"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="was not written by `specvlm-hf export`"):
        import_speculators(tmp_path)
    config = json.loads((exported / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config))
    with safe_open(exported / "model.safetensors", "pt") as f:
        weights = {k: f.get_tensor(k) for k in f.keys() if k != "transformer.input_layernorm.weight"}
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing \['layers.0.input_layernorm.weight'\], unexpected \[\]"):
        import_speculators(tmp_path)


def test_cli_exports_a_saved_draft(target, draft, target_dir, tmp_path, capsys):
    draft.save_pretrained(tmp_path / "draft")
    argv = ["export", str(tmp_path / "draft"), "--format", "speculators", "--output", str(tmp_path / "out")]
    assert main([*argv, "--target", str(target_dir), "--depth", "3"]) == 0
    assert "README.md" in capsys.readouterr().out
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == 3
    again = import_speculators(tmp_path / "out")
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in draft.state_dict().items())


def test_cli_refuses_then_drops_the_shipped_compressor(tmp_path, capsys):
    argv = ["export", str(SHIPPED_SPECVLM_DRAFT_DIR), "--output", str(tmp_path), "--target", "testbed"]
    assert main(argv) == 2
    assert "specvlm-hf export: error: This draft has a visual compressor" in capsys.readouterr().err
    assert main([*argv, "--drop-compressor"]) == 0
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["speculators_config"]["verifier"]["architectures"] == ["LlavaForConditionalGeneration"]
    assert config["specvlm_hf"]["dropped"]["compressor"]["branches"][0] == "prune:20"
