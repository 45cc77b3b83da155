"""The draft's fast numerics (`draft_step.PackedKernels`, chosen by `tuning.device_costs`): close to the reference
forward, repacked when the weights change, refused by name where they do not run, exact output through both routes,
and on the shipped testbed the same mean accepted length as the reference draft within 1%."""

import pytest
import torch
import torch.nn.functional as F
from tiny import make_inputs, make_target

from specvlm_hf import SpeculativeConfig, SpecVLMDraftModel, SpecVLMEagle3DraftModel, speculative_generate
from specvlm_hf.adapters import get_adapter
from specvlm_hf.draft_step import INT8_ROWS, LeanDraftForward, available_numerics, draft_kernels
from specvlm_hf.drafter import TreeDrafter
from specvlm_hf.testbed import heldout_prompts, load_testbed_draft, store
from specvlm_hf.tree import causal_attention_mask
from specvlm_hf.tuning import choose_numerics, device_costs

FAST = [name for name in available_numerics(torch.device("cpu"), torch.float32) if name != "reference"]
needs_fast = pytest.mark.skipif(not FAST, reason="this CPU runs the reference numerics only (no oneDNN)")
# Worst relative error of a forward's output against the reference: float32 sums in another order; bfloat16 keeps 8
# bits of mantissa in the layer's matmuls, and int8 also rounds the weights (to 1/254 of their row's largest).
TOLERANCE = {"onednn": 1e-5, "onednn-bf16": 3e-2, "int8": 3e-2}


def _forward_pair(draft, numerics: str, prompt_len: int = 12, level: int = 3):
    """The reference and `numerics` lean forwards over the same random prompt and one tree level of `level` nodes
    (each node sees the prompt and itself): `[(reference, fast)]` outputs, prompt then level, and the level's logits."""
    hidden = draft.config.hidden_size
    generator = torch.Generator().manual_seed(5)
    features = draft.feature_layers and len(draft.feature_layers) * hidden or hidden
    embeds = torch.randn(1, prompt_len + level, hidden, generator=generator)
    states = torch.randn(1, prompt_len + level, features, generator=generator)
    prompt_mask = causal_attention_mask(prompt_len, 0, torch.float32, "cpu")
    level_mask = torch.full((1, 1, level, prompt_len + level), float("-inf"))
    level_mask[..., :prompt_len] = 0
    level_mask[..., prompt_len:] = torch.where(torch.eye(level, dtype=torch.bool), 0.0, float("-inf"))
    outputs = []
    with torch.no_grad():
        for name in ("reference", numerics):
            forward = LeanDraftForward(draft, capacity=8, rows=1, numerics=name)  # grows while feeding
            forward.reserve_positions(prompt_len + 1)
            prompt = forward(embeds[:, :prompt_len], states[:, :prompt_len], torch.arange(prompt_len)[None],
                             prompt_mask)  # fmt: skip
            nodes = forward(embeds[:, prompt_len:], states[:, prompt_len:],
                            torch.full((1, level), prompt_len), level_mask)  # fmt: skip
            outputs.append((prompt, nodes, forward.logits(nodes)))
    return list(zip(*outputs))


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


@needs_fast
@pytest.mark.parametrize("numerics", FAST)
@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
@pytest.mark.parametrize("family", [SpecVLMDraftModel, SpecVLMEagle3DraftModel], ids=["eagle", "eagle3"])
def test_fast_forward_is_close_to_the_reference(numerics, kv_heads, family):
    """Every output of the packed forward (the prompt pass, a tree level, its logits) is within the numerics'
    rounding of the reference: a wrong weight, a dropped bias, or RoPE pairs permuted in q but not in k are far off."""
    target = make_target(seed=3, kv_heads=kv_heads, layers=4)
    torch.manual_seed(1)
    draft = family.from_target(target)
    for reference, fast in _forward_pair(draft, numerics):
        assert _relative_error(fast, reference) < TOLERANCE[numerics]


@needs_fast
@pytest.mark.parametrize("numerics", FAST)
def test_fast_attention_scores_and_values_match_the_reference(numerics):
    """The packed path permutes q and k rows to rotate RoPE pairs as complex numbers; the attention scores q . k
    (the only use of q and k) and the values match the reference's. Checked apart from the forward, whose output a
    random draft's residual stream dominates."""
    target = make_target(seed=3, kv_heads=2, layers=4)
    torch.manual_seed(1)
    draft = SpecVLMDraftModel.from_target(target)
    config = draft.config
    hidden = torch.randn(1, 6, config.hidden_size, generator=torch.Generator().manual_seed(2))
    cos, sin = draft.rotary_emb(hidden, torch.arange(3, 9)[None])
    shape = (1, 6, config.head_dim)
    scores, values = [], []
    with torch.no_grad():
        for kernels in (draft_kernels(draft, "reference"), draft_kernels(draft, numerics)):
            qkv = kernels.layers[0][0]
            query, key, value = kernels.attention_inputs(qkv(hidden), kernels.angles(cos, sin), shape)
            groups = query.shape[1] // key.shape[1]
            scores.append(query @ key.repeat_interleave(groups, dim=1).transpose(2, 3))
            values.append(value)
    assert _relative_error(scores[1], scores[0]) < TOLERANCE[numerics]
    assert _relative_error(values[1], values[0]) < TOLERANCE[numerics]


@needs_fast
def test_packed_weights_follow_the_draft_weights():
    target = make_target(seed=3)
    torch.manual_seed(1)
    draft = SpecVLMDraftModel.from_target(target)
    numerics = FAST[0]
    kernels = draft_kernels(draft, numerics)
    assert draft_kernels(draft, numerics) is kernels  # packed once per weights
    with torch.no_grad():
        draft.layers[0].mlp.down_proj.weight.mul_(2.0)  # as an optimizer step changes it in place
    repacked = draft_kernels(draft, numerics)
    assert repacked is not kernels
    # A fused optimizer's step changes the weights in place without counting a version (the Trainer's default).
    weight = draft.layers[0].self_attn.q_proj.weight
    version = weight._version
    weight.grad = torch.randn_like(weight)
    torch.optim.AdamW([weight], lr=1e-2, fused=True).step()
    assert weight._version == version
    assert draft_kernels(draft, numerics) is not repacked
    for reference, fast in _forward_pair(draft, numerics):
        assert _relative_error(fast, reference) < TOLERANCE[numerics]


def test_numerics_that_do_not_run_here_are_refused_by_name(target):
    with pytest.raises(ValueError, match="draft_numerics must be one of auto, reference, onednn, onednn-bf16, int8"):
        SpeculativeConfig(draft_numerics="int4")
    torch.manual_seed(1)
    draft = SpecVLMDraftModel.from_target(target).to(torch.bfloat16)  # bf16 weights: onednn is already bf16
    with pytest.raises(ValueError, match=r"draft_numerics='onednn-bf16' does not run here .*available: reference"):
        draft_kernels(draft, "onednn-bf16")


def test_choose_numerics_takes_the_fastest_only_where_it_pays():
    reference = {1: 1.0, 2: 1.2, 4: 1.4, 8: 1.6}
    faster = {1: 1.1, 2: 0.9, 4: 0.9, 8: 1.0}
    assert choose_numerics({"reference": reference, "onednn": faster}) == "onednn"
    marginal = {k: 0.97 * v for k, v in reference.items()}  # within the measurement's noise
    assert choose_numerics({"reference": reference, "onednn": marginal}) == "reference"


def test_auto_numerics_are_the_measured_choice(target, monkeypatch, tmp_path):
    """`device_costs` measures a draft level in every numerics this CPU runs and picks by `choose_numerics`; an auto
    drafter (and a fixed tree with auto numerics) then drafts in that numerics, and its tuner uses those costs."""
    from specvlm_hf import tuning

    monkeypatch.setenv("SPECVLM_HF_CACHE", str(tmp_path))
    monkeypatch.setattr(tuning, "_MEMORY", {})
    torch.manual_seed(1)
    draft = SpecVLMDraftModel.from_target(target)  # no tuner kept from other tests
    adapter = get_adapter(target)
    costs = device_costs(adapter, draft, prefix_len=16)
    assert set(costs.levels) == set(available_numerics(torch.device("cpu"), torch.float32))
    assert costs.numerics == choose_numerics(costs.levels) and costs.draft_level == costs.levels[costs.numerics]
    for config in (SpeculativeConfig(), SpeculativeConfig(depth=3, top_k=2, total_tokens=6)):
        drafter = TreeDrafter(draft, config)
        drafter.begin(adapter, False, 16)
        assert drafter._draft_forward().kernels.numerics == costs.numerics
    drafter = TreeDrafter(draft, SpeculativeConfig(draft_numerics="reference"))
    drafter.begin(adapter, False, 16)
    assert drafter._draft_forward().kernels.numerics == "reference"
    assert drafter.tuner.costs.draft_level == costs.levels["reference"]


@needs_fast
@pytest.mark.parametrize("numerics", FAST)
@pytest.mark.parametrize("do_sample", [False, True], ids=["greedy", "sampling"])
def test_fast_numerics_keep_the_output(target, draft, numerics, do_sample):
    """Both routes, the auto tree and a fixed one: the same tokens as plain `generate()` (greedy), the same draws
    under one seed (sampling: acceptance is decided by the target's distribution, and the draft's proposals of a random
    draft rarely agree with it, so the rejection path is what runs)."""
    inputs = make_inputs(seed=9)
    kwargs = dict(max_new_tokens=30, do_sample=do_sample)
    for knobs in ({}, {"depth": 4, "tree_top_k": 3, "total_tokens": 10}):
        source = draft.with_tree(draft_numerics=numerics, **knobs)
        routed = target.generate(**inputs, **kwargs, assistant_model=source)
        spec = speculative_generate(target, draft, **inputs, **kwargs, draft_numerics=numerics, **knobs)
        if not do_sample:
            plain = target.generate(**inputs, **kwargs)
            assert torch.equal(routed, plain) and torch.equal(spec.sequences, plain)
        else:
            assert routed.shape[1] > inputs["input_ids"].shape[1] and spec.stats.new_tokens > 0


SHIPPED = store.is_valid(store.SHIPPED_DIR) and (store.SHIPPED_DRAFT_DIR / "config.json").is_file()


@needs_fast
@pytest.mark.skipif(not SHIPPED, reason="no testbed and draft shipped in this checkout")
@pytest.mark.parametrize("tree", [(5, 1, 6), (4, 2, 8)], ids=["chain", "tree"])
def test_fast_numerics_keep_the_acceptance_on_held_out_prompts(tree):
    """The shipped draft's mean accepted length over 8 held-out long prompts (96 new tokens, a fixed tree so that only
    the proposals differ) in each fast numerics is within 1% of the reference numerics', with the same output. A
    chain is the most sensitive shape: one candidate per level, so every flipped near-tie shows."""
    target, processor = store.load_testbed(store.SHIPPED_DIR)
    draft = load_testbed_draft("draft", target)
    depth, top_k, total = tree
    prompts = [prompt.inputs(processor) for prompt in heldout_prompts("long", n=8)]
    accepted, sequences = {}, {}
    for numerics in ("reference", *FAST):
        outs = [speculative_generate(target, draft, **inputs, max_new_tokens=96, depth=depth, tree_top_k=top_k,
                                     total_tokens=total, draft_numerics=numerics) for inputs in prompts]  # fmt: skip
        accepted[numerics] = sum(out.stats.mean_accepted_length for out in outs) / len(outs)
        sequences[numerics] = [out.sequences for out in outs]
    assert accepted["reference"] > 3.5  # a trained draft
    for numerics in FAST:
        assert abs(accepted[numerics] / accepted["reference"] - 1) <= 0.01, accepted
        assert all(torch.equal(a, b) for a, b in zip(sequences[numerics], sequences["reference"]))


@pytest.mark.skipif("int8" not in FAST, reason="this CPU has no int8 numerics (no bf16 instructions)")
def test_int8_runs_only_a_few_rows_in_int8():
    """`Int8Linear` multiplies at most `INT8_ROWS` rows (a tree level, a step's committed positions) by its int8
    weights and more rows (the prompt pass) by a bfloat16 copy, exactly `F.linear` in bfloat16; both within int8's
    rounding of the float32 map."""
    from torch import nn

    from specvlm_hf.draft_step import Int8Linear

    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    int8 = Int8Linear(linear)
    with torch.no_grad():
        for rows in (INT8_ROWS, INT8_ROWS + 1):
            hidden = torch.randn(rows, 64)
            bf16 = F.linear(hidden.bfloat16(), linear.weight.bfloat16()).float() + linear.bias
            out = int8(hidden)
            assert torch.equal(out, bf16) == (rows > INT8_ROWS), rows
            assert _relative_error(out, linear(hidden)) < TOLERANCE["int8"]


@pytest.mark.skipif("int8" not in FAST, reason="this CPU has no int8 numerics (no bf16 instructions)")
@pytest.mark.parametrize("in_features", [16, 37, 100])
def test_int8_linear_takes_any_inner_size(in_features):
    """The int8 kernel reads the inner dimension in blocks of 16: other sizes are padded with zeros (which add
    nothing), so a draft of any hidden size runs, and every output stays within int8's rounding of `F.linear`."""
    from torch import nn

    from specvlm_hf.draft_step import Int8Linear

    torch.manual_seed(0)
    first, second = nn.Linear(in_features, 24), nn.Linear(in_features, 8, bias=False)
    hidden = torch.randn(3, 2, in_features)
    with torch.no_grad():
        outs = Int8Linear(first, second)(hidden)
        for out, linear in zip(outs, (first, second)):
            assert _relative_error(out, linear(hidden)) < TOLERANCE["int8"]
