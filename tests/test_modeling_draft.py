"""The draft as a Hugging Face model: shapes, save/load round trip, Auto classes, borrowed weights never saved."""

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny import make_target
from transformers import AutoConfig, AutoModel, DynamicCache

from specvlm_hf import SpeculativeConfig, SpecVLMDraftConfig, SpecVLMDraftModel


def test_from_target_sizes_and_shapes(target):
    draft = SpecVLMDraftModel.from_target(target)
    text = target.config.text_config
    assert draft.config.hidden_size == text.hidden_size
    assert draft.fc.in_features == 2 * text.hidden_size
    assert len(draft.layers) == 1 and draft.layers[0].input_layernorm is not None
    x = torch.randn(2, 5, text.hidden_size)
    hidden = draft(x, x, torch.arange(5).expand(2, 5))
    assert hidden.shape == (2, 5, text.hidden_size)
    assert draft.compute_logits(hidden).shape == (2, 5, text.vocab_size)
    assert draft.lm_head is target.lm_head and draft.embed_tokens is target.get_input_embeddings()


def test_cached_steps_equal_one_causal_pass(target):
    draft = SpecVLMDraftModel.from_target(target)
    x, f = torch.randn(1, 9, 64), torch.randn(1, 9, 64)
    full = draft(x, f, torch.arange(9)[None])
    cache = DynamicCache()
    first = draft(x[:, :4], f[:, :4], torch.arange(4)[None], cache=cache)
    rest = draft(x[:, 4:], f[:, 4:], torch.arange(4, 9)[None], cache=cache)
    torch.testing.assert_close(torch.cat([first, rest], 1), full, atol=1e-5, rtol=1e-5)


def test_save_load_round_trip_without_target_weights(target, tmp_path):
    draft = SpecVLMDraftModel.from_target(target, intermediate_size=96)
    draft.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert not any("embed" in k or "lm_head" in k for k in saved)
    assert set(saved) == set(draft.state_dict())
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "specvlm_draft" and "speculative_config" not in config

    loaded = SpecVLMDraftModel.from_pretrained(tmp_path, target=target)
    for key, value in draft.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key])
    assert loaded.lm_head is target.lm_head

    auto = AutoModel.from_pretrained(tmp_path)  # registered on import: no trust_remote_code
    assert isinstance(auto, SpecVLMDraftModel) and not auto.is_bound
    assert isinstance(AutoConfig.from_pretrained(tmp_path), SpecVLMDraftConfig)
    with pytest.raises(RuntimeError, match="not bound"):
        _ = auto.lm_head
    assert auto.bind(target).is_bound


def test_bind_rejects_a_mismatched_target(target, tmp_path):
    other = make_target(seed=5, hidden=32)
    draft = SpecVLMDraftModel.from_target(target)
    with pytest.raises(ValueError, match="hidden_size 32 != draft's 64"):
        draft.bind(other)
    small_vocab = make_target(seed=5, vocab=50)
    with pytest.raises(ValueError, match="vocabulary 50 != draft's 96"):
        draft.bind(small_vocab)
    draft.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="does not fit the target"):
        SpecVLMDraftModel.from_pretrained(tmp_path, target=other)


def test_configs_validate_their_values():
    with pytest.raises(ValueError, match="depth must be an integer >= 1, got 0"):
        SpeculativeConfig(depth=0)
    with pytest.raises(ValueError, match="total_tokens"):
        SpeculativeConfig(total_tokens=1)
    with pytest.raises(ValueError, match="num_hidden_layers"):
        SpecVLMDraftConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=0)
    assert SpeculativeConfig(depth=3, top_k=2).max_nodes == 2 + 2 * 4
    assert SpeculativeConfig().with_overrides(depth=7, top_k=None) == SpeculativeConfig(depth=7)


def test_with_tree_takes_the_tree_width_as_tree_top_k(draft):
    tree = draft.with_tree(depth=4, tree_top_k=3, total_tokens=9).speculative_config
    assert (tree.depth, tree.top_k, tree.total_tokens) == (4, 3, 9)
    assert draft.with_tree(depth=4).with_tree(tree_top_k=2).speculative_config.top_k == 2
    with pytest.warns(FutureWarning, match=r"with_tree\(top_k=\) is now with_tree\(tree_top_k=\)"):
        assert draft.with_tree(top_k=5).speculative_config.top_k == 5
    with pytest.raises(TypeError, match="both tree_top_k and top_k"):
        draft.with_tree(top_k=2, tree_top_k=3)
    assert draft.speculative_config.is_auto  # the draft's own default is untouched
