"""The EAGLE-3 draft family: its config, what it reads of the target in the loop (three layers' hidden states at the
committed positions, the placeholder's embedding at image slots), its own head and draft vocabulary, save/load, and
training-time test (unrolled training computes what the loop's chain drafting computes)."""

import pytest
import torch
from drafters import RecordingDraft
from tiny import make_inputs
from transformers import AutoModel, DynamicCache

from specvlm_hf import (
    SpeculativeConfig,
    SpecVLMDraftConfig,
    SpecVLMDraftModel,
    SpecVLMEagle3DraftConfig,
    SpecVLMEagle3DraftModel,
    speculative_generate,
)
from specvlm_hf.adapters import get_adapter
from specvlm_hf.configuration import eagle3_layer_ids
from specvlm_hf.training.trainer import ttt_attention_mask, unrolled


def test_layer_ids_follow_eagle3_and_fit_shallow_targets():
    assert eagle3_layer_ids(32) == [2, 16, 29]  # vLLM's default for a 32-layer target
    assert eagle3_layer_ids(6) == [1, 3, 5]
    assert eagle3_layer_ids(2) == [0, 1, 1]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"fc_bias": True}, "fc has no bias"),
        ({"compressor": {"branches": ["pool:4"]}}, "takes no visual compressor"),
        ({"aux_hidden_state_layer_ids": [1, 2]}, "three layer indices"),
        ({"aux_hidden_state_layer_ids": [1, -2, 3]}, "three layer indices"),
        ({"draft_vocab_size": 200}, r"draft_vocab_size must be in \[1, vocab_size=96\]"),
    ],
)
def test_config_refuses_what_the_layout_cannot_hold(fields, message):
    with pytest.raises(ValueError, match=message):
        SpecVLMEagle3DraftConfig(hidden_size=64, num_attention_heads=4, vocab_size=96, **fields)


def test_from_target_starts_from_the_targets_head_and_layers(deep_target, eagle3_draft):
    adapter = get_adapter(deep_target)
    assert eagle3_draft.config.aux_hidden_state_layer_ids == [1, 2, 3]
    assert eagle3_draft.feature_layers == (1, 2, 3)
    assert torch.equal(eagle3_draft.lm_head.weight, adapter.lm_head.weight)
    assert eagle3_draft.lm_head is not adapter.lm_head  # its own, trained
    assert eagle3_draft.embed_tokens is adapter.embed_tokens  # borrowed
    assert eagle3_draft.fc.in_features == 3 * 64 and eagle3_draft.fc.bias is None
    assert eagle3_draft.layers[0].self_attn.q_proj.in_features == 2 * 64


def test_a_draft_whose_layers_the_target_lacks_is_refused(deep_target, eagle3_draft):
    fields = {**eagle3_draft.config.to_dict(), "aux_hidden_state_layer_ids": [1, 2, 4]}
    draft = SpecVLMEagle3DraftModel(SpecVLMEagle3DraftConfig(**fields))
    with pytest.raises(ValueError, match=r"layer_ids \[1, 2, 4\] are not three of the target's layers 0..3"):
        draft.bind(deep_target)


def test_save_and_load_by_either_class_and_auto(deep_target, eagle3_draft, tmp_path):
    eagle3_draft.save_pretrained(tmp_path)
    for loaded in (
        SpecVLMDraftModel.from_pretrained(tmp_path, target=deep_target),
        SpecVLMEagle3DraftModel.from_pretrained(tmp_path, target=deep_target),
        AutoModel.from_pretrained(tmp_path).bind(deep_target),
    ):
        assert type(loaded) is SpecVLMEagle3DraftModel
        assert loaded.state_dict().keys() == eagle3_draft.state_dict().keys()
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), eagle3_draft.state_dict().values()))
    assert not any("embed_tokens" in name for name in eagle3_draft.state_dict())
    SpecVLMDraftModel.from_target(deep_target).save_pretrained(tmp_path / "eagle")
    with pytest.raises(ValueError, match="load it with SpecVLMDraftModel.from_pretrained"):
        SpecVLMEagle3DraftModel.from_pretrained(tmp_path / "eagle")
    assert isinstance(SpecVLMDraftModel.from_pretrained(tmp_path / "eagle").config, SpecVLMDraftConfig)


@pytest.mark.parametrize("shape", [SpeculativeConfig(5, 1, 6), SpeculativeConfig(4, 3, 12)], ids=["chain", "wide"])
def test_the_draft_reads_the_targets_layers_at_every_committed_position(deep_target, eagle3_draft, shape):
    """The states the loop hands an EAGLE-3 drafter hold, at each committed position, the hidden states entering the
    draft's three target layers, as one causal forward over the final sequence computes them, and nothing else."""
    inputs = make_inputs(seed=2)
    source = RecordingDraft(eagle3_draft, shape)
    out = speculative_generate(deep_target, source, **inputs, max_new_tokens=30, do_sample=False)
    assert torch.equal(out.sequences, deep_target.generate(**inputs, max_new_tokens=30, do_sample=False))
    adapter = get_adapter(deep_target)
    sequence, p = out.sequences, inputs["input_ids"].shape[1]
    embeds = torch.cat(
        [adapter.embed(sequence[:, :p], adapter.image_features(inputs)), adapter.embed_tokens(sequence[:, p:])], 1
    )
    with torch.no_grad():
        _, reference = adapter.forward_with_layers(embeds, torch.arange(sequence.shape[1])[None], (1, 2, 3))
    covered = []
    for state in source.drafters[0].states:
        positions = state.position_ids[0]
        covered += positions.tolist()
        torch.testing.assert_close(state.features[0], reference[0, positions], rtol=1e-5, atol=1e-5)
    assert covered == list(range(len(covered)))  # every committed position once, in order


def test_the_draft_reads_the_placeholder_embedding_at_image_slots(deep_target, eagle3_draft):
    inputs = make_inputs(seed=2)
    source = RecordingDraft(eagle3_draft, SpeculativeConfig(3, 1, 4))
    speculative_generate(deep_target, source, **inputs, max_new_tokens=4, do_sample=False)
    state = source.drafters[0].states[0]
    embeds, features, positions = eagle3_draft.prompt_input(state)
    adapter = get_adapter(deep_target)
    assert torch.equal(embeds, adapter.embed_tokens(state.input_ids[:, 1:]))  # no visual tokens
    assert state.image_mask.any() and not torch.equal(embeds, state.inputs_embeds)
    assert features is state.features and features.shape[-1] == 3 * 64


def test_a_smaller_draft_vocabulary_maps_back_to_target_ids(deep_target):
    torch.manual_seed(4)
    draft = SpecVLMEagle3DraftModel.from_target(deep_target, draft_vocab_size=40)
    kept = torch.arange(0, 96, 2)[:40]
    draft.set_draft_vocab(kept, get_adapter(deep_target).lm_head)
    assert torch.equal(draft.draft_token_ids(), kept)
    logits = draft.compute_logits(torch.randn(3, 64))
    assert logits.shape == (3, 96)
    assert torch.isinf(logits[:, 1]).all() and torch.isfinite(logits[:, kept]).all()
    draft_logits, target_logits = draft.training_logits(torch.randn(3, 64), torch.randn(3, 96))
    assert draft_logits.shape == target_logits.shape == (3, 40)
    inputs = make_inputs(seed=3)
    out = speculative_generate(deep_target, draft, **inputs, max_new_tokens=20, do_sample=False, depth=3)
    assert torch.equal(out.sequences, deep_target.generate(**inputs, max_new_tokens=20, do_sample=False))
    with pytest.raises(ValueError, match="40 distinct target ids"):
        draft.set_draft_vocab(torch.zeros(40, dtype=torch.long), get_adapter(deep_target).lm_head)


def test_ttt_mask_sees_the_prefix_and_its_own_chain():
    allowed = ttt_attention_mask(4, 2, torch.float32, torch.device("cpu"))[0, 0] == 0
    assert allowed.shape == (4, 12)
    assert torch.equal(allowed[:, :4], torch.ones(4, 4, dtype=torch.bool).tril())
    assert torch.equal(allowed[:, 4:8], torch.eye(4, dtype=torch.bool))
    assert torch.equal(allowed[:, 8:], torch.eye(4, dtype=torch.bool))


@pytest.mark.parametrize("family", [SpecVLMDraftModel, SpecVLMEagle3DraftModel], ids=["eagle", "eagle3"])
def test_unrolled_training_computes_what_chain_drafting_computes(deep_target, family):
    """Step j of training-time test at entry t equals the draft's output at depth j + 1 of a chain drafted after
    committed position t whose tokens are the true ones (the catch-up over 0..t, then one level per token)."""
    torch.manual_seed(5)
    draft = family.from_target(deep_target)
    length, h = 10, draft.config.hidden_size
    width = 3 * h if family is SpecVLMEagle3DraftModel else h
    embeds, features, positions = torch.randn(1, length, h), torch.randn(1, length, width), torch.arange(length)[None]
    with torch.no_grad():
        steps = list(unrolled(draft, embeds, features, positions, 3))
        for t in (0, 4, 7):
            cache = DynamicCache()
            out = draft(embeds[:, : t + 1], features[:, : t + 1], positions[:, : t + 1], None, cache)[:, -1:]
            torch.testing.assert_close(out[0, 0], steps[0][0, t], rtol=1e-5, atol=1e-5)
            for j in (1, 2):
                out = draft(embeds[:, t + j : t + j + 1], out, positions[:, t : t + 1] + j, None, cache)
                torch.testing.assert_close(out[0, 0], steps[j][0, t], rtol=1e-5, atol=1e-5)
