"""The lean draft step (`draft_step.py`, used by `TreeDrafter`) against the reference path (`SpecVLMDraftModel.forward`
with a `DynamicCache`, `drafters.ReferenceTreeDrafter`): every draft forward's output bit for bit, and the same trees,
in float32, on the states a real generation produces."""

import pytest
import torch
from drafters import ReferenceTreeDrafter
from tiny import make_inputs, make_target
from transformers import DynamicCache

from specvlm_hf import DraftSource, SpeculativeConfig, SpecVLMDraftModel, SpecVLMEagle3DraftModel, speculative_generate
from specvlm_hf.adapters import get_adapter
from specvlm_hf.draft_step import LeanDraftForward, StaticDraftCache
from specvlm_hf.drafter import Drafter, DraftState, TreeDrafter


class _RecordingForward:
    """Wraps a `LeanDraftForward`, keeping every output."""

    def __init__(self, forward: LeanDraftForward):
        self.inner, self.cache, self.outputs = forward, forward.cache, []
        self.reserve_positions, self.logits = forward.reserve_positions, forward.logits

    def __call__(self, *args):
        self.outputs.append(self.inner(*args))
        return self.outputs[-1]


class _Twin(Drafter):
    def __init__(self, draft, config, capacity):
        self.feature_layers = draft.feature_layers
        self.lean = TreeDrafter(draft, config)
        self.lean.forward = _RecordingForward(LeanDraftForward(draft, capacity=capacity))
        self.reference = ReferenceTreeDrafter(draft, config)
        self.steps = 0

    def propose(self, state):
        lean, reference = self.lean.propose(state), self.reference.propose(state)
        assert torch.equal(lean.tokens, reference.tokens) and lean.parents == reference.parents
        got, want = self.lean.forward.outputs, self.reference.outputs
        assert len(got) == len(want)
        for a, b in zip(got, want):
            assert torch.equal(a, b), (a - b).abs().max()
        got.clear(), want.clear()
        self.steps += 1
        return lean


class TwinDraft(DraftSource):
    """Drafts with the lean and the reference drafter side by side and asserts they agree at every step."""

    def __init__(self, draft, config, capacity=512):
        self.draft, self.speculative_config, self.capacity = draft, config, capacity
        self.twins = []

    def new_drafter(self, target):
        self.twins.append(_Twin(self.draft, self.speculative_config, self.capacity))
        return self.twins[-1]


SHAPES = [
    SpeculativeConfig(depth=5, top_k=1, total_tokens=6),
    SpeculativeConfig(depth=3, top_k=2, total_tokens=7),
    SpeculativeConfig(depth=4, top_k=4, total_tokens=16),
]


# Every shape, attention kernel and head layout for the EAGLE-2-style draft; the EAGLE-3 draft's own arithmetic (the
# fused input of its first layer) sits before the attention, so SDPA with both head layouts covers it.
LEAN_CASES = [
    pytest.param(shape, attention, kv_heads, family, id=f"{name}-{attention}-{kv}-{shape.depth},{shape.top_k}")
    for name, family, attentions in (("eagle", SpecVLMDraftModel, ("sdpa", "eager")),
                                     ("eagle3", SpecVLMEagle3DraftModel, ("sdpa",)))
    for attention in attentions
    for kv_heads, kv in ((2, "gqa"), (4, "mha"))
    for shape in SHAPES
]  # fmt: skip


@pytest.mark.parametrize(("shape", "attention", "kv_heads", "family"), LEAN_CASES)
def test_lean_step_matches_reference_bit_for_bit(shape, attention, kv_heads, family):
    target = make_target(seed=3, attn_implementation=attention, kv_heads=kv_heads, layers=4)
    torch.manual_seed(1)
    draft = family.from_target(target)
    # A small capacity makes the static cache grow several times during the call.
    source = TwinDraft(draft, shape, capacity=8)
    inputs = make_inputs(seed=4)
    out = speculative_generate(target, source, **inputs, max_new_tokens=40)
    assert source.twins[0].steps == out.stats.target_forwards - 1 >= 5
    plain = target.generate(**inputs, max_new_tokens=40, do_sample=False)
    assert torch.equal(out.sequences, plain)


def test_lean_step_matches_reference_on_long_catch_ups(target, draft):
    """States that commit many positions at once (as a well-trained draft's accepted paths do), from the true
    continuation, including the prompt with its image."""
    inputs = make_inputs(seed=6)
    sequence = target.generate(**inputs, max_new_tokens=30, do_sample=False)
    adapter = get_adapter(target)
    p = inputs["input_ids"].shape[1]
    embeds = torch.cat(
        [
            adapter.embed(sequence[:, :p], adapter.image_features({"pixel_values": inputs["pixel_values"]})),
            adapter.embed_tokens(sequence[:, p:]),
        ],
        dim=1,
    )
    with torch.no_grad():
        features = adapter.forward(embeds, torch.arange(sequence.shape[1])[None], DynamicCache())
    config = SpeculativeConfig(depth=4, top_k=3, total_tokens=10)
    twin = _Twin(draft, config, capacity=16)
    slots = inputs["input_ids"][0] == adapter.image_token_id
    state = DraftState(
        sequence[:, : p + 1], embeds[:, 1 : p + 1], features[:, :p], torch.arange(p)[None],
        image_mask=torch.cat([slots[1:], slots.new_zeros(1)]),
    )  # fmt: skip
    root = p
    for accepted in (7, 1, 4, 2, 6):
        twin.propose(state)
        committed = torch.arange(root, root + accepted)
        state = DraftState(
            sequence[:, : root + accepted + 1], embeds[:, root + 1 : root + accepted + 1],
            features[:, root : root + accepted], committed[None],
        )  # fmt: skip
        root += accepted
    assert twin.steps == 5


def test_static_cache_grows_keeping_entries_and_truncates():
    cache = StaticDraftCache(1, 2, 4, torch.float32, torch.device("cpu"), capacity=3)
    first = torch.randn(1, 2, 3, 4)
    cache.reserve(3)
    cache.write(0, 0, first, first + 1)
    cache.length = 3
    second = torch.randn(1, 2, 4, 4)
    cache.reserve(7)
    assert cache.capacity == 7
    keys, values = cache.write(0, 3, second, second + 1)
    assert torch.equal(keys, torch.cat([first, second], dim=2))
    assert torch.equal(values, torch.cat([first, second], dim=2) + 1)
    cache.length = 7
    cache.truncate(2)
    assert cache.length == 2


def test_lean_step_refuses_modules_it_would_skip(target):
    torch.manual_seed(2)
    draft = SpecVLMDraftModel.from_target(target)
    handle = draft.layers[0].mlp.up_proj.register_forward_hook(lambda *args: None)
    with pytest.raises(ValueError, match=r"layers\.0\.mlp\.up_proj"):
        LeanDraftForward(draft)
    handle.remove()
    LeanDraftForward(draft)


def _prompt_state(target, seed=4):
    from specvlm_hf.loop import prefill, prompt_draft_state

    adapter = get_adapter(target)
    inputs = make_inputs(seed=seed)
    layout = adapter.layout(inputs["input_ids"], inputs)
    embeds, features, _ = prefill(adapter, inputs["input_ids"], layout, DynamicCache())
    first = adapter.logits(features[:, -1]).argmax(-1, keepdim=True)
    state = prompt_draft_state(
        adapter, torch.cat([inputs["input_ids"], first], 1), embeds, features, layout.visual_mask[0]
    )
    return adapter, state


def test_a_drafted_end_token_is_never_expanded(target, draft):
    adapter, state = _prompt_state(target)
    chain = SpeculativeConfig(depth=5, top_k=1, total_tokens=6)
    free = TreeDrafter(draft, chain)
    free.begin(adapter, False, state.input_ids.shape[1] - 1)
    tokens = free.propose(state).tokens.tolist()  # root + 5 drafted tokens
    assert len(tokens) == 6
    ended = TreeDrafter(draft, chain)
    ended.begin(adapter, False, state.input_ids.shape[1] - 1, end_tokens=(tokens[2],))
    assert ended.propose(state).tokens.tolist() == tokens[:3]  # the chain stops at the end token

    wide = SpeculativeConfig(depth=4, top_k=3, total_tokens=16)
    free = TreeDrafter(draft, wide)
    free.begin(adapter, False, state.input_ids.shape[1] - 1)
    level_one = free.propose(state).tokens[1:4].tolist()
    tree_drafter = TreeDrafter(draft, wide)
    tree_drafter.begin(adapter, False, state.input_ids.shape[1] - 1, end_tokens=(level_one[0],))
    tree = tree_drafter.propose(state)
    ends = [i for i in range(1, tree.num_nodes) if int(tree.tokens[i]) == level_one[0]]
    assert ends and all(not tree.children[i] for i in ends)  # present, childless
    assert tree.num_nodes > 4  # the other branches still grow


@pytest.mark.parametrize(("end_probability", "levels"), [(1.0, 1), (0.5, 4)])
def test_a_tree_stops_growing_once_the_draft_expects_the_answer_to_end(
    target, draft, monkeypatch, end_probability, levels
):
    """With the draft sure (probability ~1) that the answer ends after the root, a width-3 tree keeps its first
    level only (END_MASS); at probability 0.5 it grows to its full depth."""
    adapter, state = _prompt_state(target)
    end = 7
    compute_logits = draft.compute_logits

    def ending(hidden, head=None):
        logits = compute_logits(hidden, head=head).clone()
        others = torch.cat([logits[..., :end], logits[..., end + 1 :]], dim=-1).logsumexp(-1)
        logits[..., end] = others + (50.0 if end_probability == 1.0 else 0.0)  # p(end) = 1 - e^-50, or 0.5
        return logits

    monkeypatch.setattr(draft, "compute_logits", ending)
    drafter = TreeDrafter(draft, SpeculativeConfig(depth=4, top_k=3, total_tokens=16))
    drafter.begin(adapter, False, state.input_ids.shape[1] - 1, end_tokens=(end,))
    tree = drafter.propose(state)
    assert drafter._levels == levels  # levels drafted
    assert end in tree.tokens[1:4].tolist() and (levels > 1 or int(tree.depths.max()) == 1)
    # whole generations with this draft and `end` as EOS: trees cut by the end mass, output still plain generate()'s
    inputs = make_inputs(seed=4)
    plain = target.generate(**inputs, max_new_tokens=30, eos_token_id=end, do_sample=False)
    for knobs in ({}, {"depth": 4, "tree_top_k": 3, "total_tokens": 16}):  # the auto tree, a fixed wide tree
        out = speculative_generate(target, draft, **inputs, max_new_tokens=30, eos_token_id=end, **knobs)
        assert torch.equal(out.sequences, plain)
