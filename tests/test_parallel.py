"""Parallel drafting (mask entries, P-EAGLE-style): the config and its refusals, save/load, what the drafter drafts
(the marginals of one forward over mask entries), that training-time unrolling trains exactly that, the auto tree's
draft costs, and lossless decoding through both routes."""

import numpy as np
import pytest
import torch
from drafters import RecordingDraft
from tiny import left_pad, make_inputs
from transformers import DynamicCache

from specvlm_hf import (
    SpeculativeConfig,
    SpecVLMDraftConfig,
    SpecVLMDraftModel,
    SpecVLMEagle3DraftConfig,
    speculative_generate,
)
from specvlm_hf.adapters import get_adapter
from specvlm_hf.training.trainer import unrolled
from specvlm_hf.tuning import CostCurve, DeviceCosts, TreeTuner

DEPTH = 4


@pytest.fixture(scope="module")
def parallel_draft(target):
    """A draft with random weights bound to `target` that drafts depths 2..4 in one forward; tests never modify it."""
    torch.manual_seed(7)
    return SpecVLMDraftModel.from_target(target).enable_parallel_drafting(DEPTH)


def test_config_and_refusals(eagle3_draft):
    assert SpecVLMDraftConfig().parallel_depth == 1
    with pytest.raises(ValueError, match="parallel_depth must be >= 1"):
        SpecVLMDraftConfig(parallel_depth=0)
    with pytest.raises(ValueError, match="an EAGLE-3 draft drafts one depth per forward"):
        SpecVLMEagle3DraftConfig(parallel_depth=3)
    with pytest.raises(ValueError, match="not EAGLE-3 drafts"):
        eagle3_draft.enable_parallel_drafting(3)
    assert eagle3_draft.config.parallel_depth == 1 and not hasattr(eagle3_draft, "mask_embeds")


def test_save_and_load_keep_the_mask_inputs(target, parallel_draft, tmp_path):
    parallel_draft.save_pretrained(tmp_path)
    loaded = SpecVLMDraftModel.from_pretrained(tmp_path, target=target)
    assert loaded.config.parallel_depth == DEPTH
    for name in ("mask_embeds", "mask_features"):
        assert torch.equal(getattr(loaded, name), getattr(parallel_draft, name))
    inputs = make_inputs(seed=3)
    chain = dict(depth=DEPTH, tree_top_k=1, total_tokens=DEPTH + 1, max_new_tokens=20, do_sample=False)
    chain["draft_numerics"] = "reference"
    a = speculative_generate(target, parallel_draft, **inputs, **chain)
    b = speculative_generate(target, loaded, **inputs, **chain)
    assert a.stats.accepted_lengths == b.stats.accepted_lengths


def test_a_chain_is_the_argmax_of_one_forward_over_mask_entries(target, parallel_draft):
    """The first chain after the prompt: depth 1 from the draft's pass over the prompt, depths 2..4 from one forward
    over three mask entries at the root's position + 0, 1, 2 (each seeing the prompt and the mask entries before it),
    as the draft's own `forward` computes them."""
    inputs = make_inputs(seed=4)
    shape = SpeculativeConfig(DEPTH, 1, DEPTH + 1, draft_numerics="reference")
    source = RecordingDraft(parallel_draft, shape)
    out = speculative_generate(target, source, **inputs, max_new_tokens=20, do_sample=False)
    assert torch.equal(out.sequences, target.generate(**inputs, max_new_tokens=20, do_sample=False))
    state, tree = source.drafters[0].states[0], source.drafters[0].trees[0]
    draft = parallel_draft
    with torch.no_grad():
        cache = DynamicCache()
        hidden = draft(*draft.prompt_input(state), None, cache)
        first = draft.compute_logits(hidden[:, -1]).argmax(-1)
        root = state.input_ids.shape[1] - 1
        entries = DEPTH - 1
        masks = (draft.mask_embeds.expand(1, entries, -1), draft.mask_features.expand(1, entries, -1))
        out = draft(*masks, root + torch.arange(entries)[None], None, cache)
        rest = draft.compute_logits(out).argmax(-1)[0]
    assert tree.tokens.tolist() == [int(state.input_ids[0, -1]), int(first), *rest.tolist()]
    assert tree.parents == [-1, 0, 1, 2, 3]


def test_unrolled_training_computes_what_parallel_drafting_computes(parallel_draft):
    """With mask inputs, unrolled step j at entry t equals the draft's output at mask entry j of the one forward that
    drafts after committed position t (the catch-up over 0..t, then the mask entries at t + 1, t + 2, ...)."""
    draft = parallel_draft
    length, h = 10, draft.config.hidden_size
    embeds, features, positions = torch.randn(1, length, h), torch.randn(1, length, h), torch.arange(length)[None]
    masks = (draft.mask_embeds, draft.mask_features)
    with torch.no_grad():
        steps = list(unrolled(draft, embeds, features, positions, 3, masks))
        for t in (0, 4, 7):
            cache = DynamicCache()
            out = draft(embeds[:, : t + 1], features[:, : t + 1], positions[:, : t + 1], None, cache)
            torch.testing.assert_close(out[0, -1], steps[0][0, t], rtol=1e-5, atol=1e-5)
            mask_out = draft(
                masks[0].expand(1, 2, -1), masks[1].expand(1, 2, -1), t + 1 + torch.arange(2)[None], None, cache
            )
            for j in (1, 2):
                torch.testing.assert_close(mask_out[0, j - 1], steps[j][0, t], rtol=1e-5, atol=1e-5)


def test_the_auto_tree_prices_one_forward_for_every_depth(target, parallel_draft):
    curve = CostCurve((1, 2, 65), (1e-2, 1.1e-2, 5e-2), 16)
    level = {1: 1e-3, 2: 1.1e-3, 4: 1.3e-3, 8: 2e-3}
    tuner = TreeTuner(DeviceCosts(curve, level), parallel=True, max_depth=6)
    for k in tuner.widths:  # depth d drafts d - 1 mask entries in one forward, at any width
        np.testing.assert_allclose(tuner._draft[k], [1e-3, 2e-3, 2.1e-3, 2.3e-3, 2.3e-3, 3e-3])
    sequential = TreeTuner(DeviceCosts(curve, level))
    np.testing.assert_allclose(sequential._draft[4][:3], [1e-3, 2.3e-3, 3.6e-3])
    inputs = make_inputs(seed=5)
    tuner = parallel_draft.tree_tuner(get_adapter(target), False, inputs["input_ids"].shape[1])
    assert tuner.max_depth == DEPTH


@pytest.mark.parametrize("sample", [False, True], ids=["greedy", "sampling"])
def test_parallel_drafts_decode_losslessly(target, parallel_draft, sample):
    """Both routes, a chain, a wide tree and the auto tree, one prompt and a left-padded batch: plain `generate()`'s
    output. Sampling runs with `top_k=1`, where each draw is the target's top token, so plain decoding's output is
    the only one (the sampling certificate checks the distribution for any proposal)."""
    single = make_inputs(seed=6)
    batch = left_pad(
        [make_inputs(seed=7, text_len=4), make_inputs(seed=8, text_len=9)], target.generation_config.pad_token_id
    )
    settings = dict(max_new_tokens=24, do_sample=sample, **({"top_k": 1} if sample else {}))
    for inputs in (single, batch):
        plain = target.generate(**inputs, **settings)
        for knobs in (
            {},
            dict(depth=DEPTH, tree_top_k=1, total_tokens=DEPTH + 1),
            dict(depth=3, tree_top_k=3, total_tokens=9),
        ):
            ours = speculative_generate(target, parallel_draft, **inputs, **knobs, **settings)
            assert torch.equal(ours.sequences, plain), knobs
        assert torch.equal(target.generate(**inputs, **settings, assistant_model=parallel_draft), plain)
