"""Bad input gets a clear error naming the problem, never a silent lossy or different algorithm."""

import pytest
import torch
from drafters import OracleDraft
from tiny import VOCAB, make_inputs, make_target
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.generation.streamers import BaseStreamer

from specvlm_hf import SpeculativeConfig, SpecVLMDraftModel, speculative_generate


class _Silent(BaseStreamer):
    def put(self, value):
        pass

    def end(self):
        pass


def test_a_batch_is_refused_where_it_cannot_be_decoded_exactly(target, draft):
    inputs = make_inputs(0, 4, False)
    batch = {"input_ids": inputs["input_ids"].repeat(2, 1)}
    with pytest.raises(ValueError, match="OracleDrafter drafts for one prompt at a time; this call has 2 rows"):
        target.generate(**batch, assistant_model=OracleDraft([], VOCAB, SpeculativeConfig(2, 1, 3)), max_new_tokens=4)
    for flag in ("output_scores", "output_logits"):
        with pytest.raises(ValueError, match=f"does not return per-step {flag[7:]}"):
            target.generate(**batch, assistant_model=draft, max_new_tokens=4, return_dict_in_generate=True,
                            **{flag: True})  # fmt: skip
    with pytest.raises(ValueError, match="streamer streams one sequence"):
        target.generate(**batch, assistant_model=draft, max_new_tokens=4, streamer=_Silent())
    with pytest.raises(ValueError, match="prefix_allowed_tokens_fn .* depends on the whole batch"):
        target.generate(**batch, assistant_model=draft, max_new_tokens=4, prefix_allowed_tokens_fn=lambda b, s: [3])


@pytest.mark.parametrize(
    "kwargs", [{"num_beams": 2}, {"num_beams": 2, "do_sample": True}, {"penalty_alpha": 0.6, "top_k": 4}]
)
def test_beam_search_and_contrastive_search_are_refused(target, draft, kwargs):
    # (transformers itself stops contrastive search first, as a Hub-only method.)
    with pytest.raises(ValueError, match="greedy search or sampling only|Contrastive Search"):
        target.generate(**make_inputs(0, 4), assistant_model=draft, max_new_tokens=4, **kwargs)


def test_flash_attention_target_is_refused(target, draft, monkeypatch):
    monkeypatch.setattr(target.model.language_model.config, "_attn_implementation", "flash_attention_2")
    with pytest.raises(ValueError, match="cannot apply a tree attention mask"):
        speculative_generate(target, draft, **make_inputs(0, 4), max_new_tokens=4)


def test_unsupported_model_type_names_the_supported_ones():
    llm = LlamaForCausalLM(
        LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    )
    with pytest.raises(ValueError, match=r"Unsupported target model_type 'llama'.*supports: llava"):
        SpecVLMDraftModel.from_target(llm)


@pytest.mark.parametrize("max_new_tokens", [0, -3])
def test_max_new_tokens_must_be_positive(target, draft, max_new_tokens):
    with pytest.raises(ValueError, match="max_new_tokens"):
        speculative_generate(target, draft, **make_inputs(0, 4), max_new_tokens=max_new_tokens)


def test_right_padding_and_malformed_masks_are_refused(target, draft):
    inputs = make_inputs(0, 4)
    mask = torch.ones_like(inputs["input_ids"])
    mask[0, -1] = 0
    with pytest.raises(ValueError, match="left-padded prompts.*right padding"):
        target.generate(**inputs, attention_mask=mask, assistant_model=draft, max_new_tokens=4)
    mask = torch.ones_like(inputs["input_ids"])
    mask[0, 3] = 0  # a hole inside the prompt
    with pytest.raises(ValueError, match="left-padded prompts"):
        target.generate(**inputs, attention_mask=mask, assistant_model=draft, max_new_tokens=4)


def test_static_cache_is_refused(target, draft):
    with pytest.raises(ValueError, match="StaticLayer"):
        target.generate(**make_inputs(0, 4), assistant_model=draft, max_new_tokens=4, cache_implementation="static")


def test_output_attentions_is_refused(target, draft):
    with pytest.raises(ValueError, match="output_attentions"):
        target.generate(
            **make_inputs(0, 4),
            assistant_model=draft,
            max_new_tokens=4,
            output_attentions=True,
            return_dict_in_generate=True,
        )


@pytest.mark.parametrize("drafted", [True, False], ids=["drafted", "plain-call"])
def test_image_tokens_without_an_image(target, draft, monkeypatch, drafted):
    """Refused whichever way the auto tree takes the call: the prompt is checked before the choice."""
    from specvlm_hf.tuning import CallChooser

    monkeypatch.setattr(CallChooser, "draft", lambda self: drafted)
    inputs = make_inputs(0, 4)
    del inputs["pixel_values"]
    with pytest.raises(ValueError, match="16 image tokens but no image"):
        speculative_generate(target, draft, **inputs, max_new_tokens=4)


def test_draft_bound_to_another_target(target):
    other = make_target(seed=9)
    draft = SpecVLMDraftModel.from_target(other)
    with pytest.raises(ValueError, match="bound to another target"):
        target.generate(**make_inputs(0, 4), assistant_model=draft, max_new_tokens=4)


def test_stock_assistant_keeps_stock_behaviour(target):
    assistant = make_target(seed=0)  # an identical copy: stock chain assisted decoding, lossless and untouched
    inputs = make_inputs(1, 5, False)
    reference = target.generate(**inputs, max_new_tokens=12, do_sample=False)
    out = target.generate(
        **inputs, assistant_model=assistant, max_new_tokens=12, do_sample=False, return_dict_in_generate=True
    )
    assert torch.equal(out.sequences, reference)
    assert not hasattr(out, "speculative_stats")
