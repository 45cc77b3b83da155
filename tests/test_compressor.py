"""The elastic visual compressor: shapes and positions per primitive, the identity case equals EagleVLM's input,
straight-through gradients reach the gate, save/load (alone and inside a draft), lossless generation with every
primitive and every mode, training builds the same draft input as decoding, and bad input gets a clear error."""

import pytest
import torch
from test_training import config, rows
from tiny import NUM_IMAGE_TOKENS, make_inputs
from transformers import AutoModel, DynamicCache

from specvlm_hf import SpecVLMCompressor, SpecVLMCompressorConfig, SpecVLMDraftModel, speculative_generate
from specvlm_hf.adapters import get_adapter
from specvlm_hf.compressor import Branch, compressor_for, window_for_ratio
from specvlm_hf.loop import prefill, prompt_draft_state
from specvlm_hf.training import DistillationCollator, DistillationTrainer, RowEncoder, train_draft

GRID = (4, 4)  # tiny.make_target's 32 px images in 8 px patches
HIDDEN = 64


def compressor(branches, mode="select", **fields):
    torch.manual_seed(0)
    return SpecVLMCompressor(
        SpecVLMCompressorConfig(hidden_size=HIDDEN, grid=list(GRID), branches=branches, mode=mode, **fields)
    ).eval()


def row(n_text_before=3, images=1, n_text_after=5, seed=0):
    """A draft prompt row: text, `images` images of 16 visual pairs, text; positions 0..n-1."""
    g = torch.Generator().manual_seed(seed)
    n = n_text_before + images * NUM_IMAGE_TOKENS + n_text_after
    mask = torch.zeros(n, dtype=torch.bool)
    mask[n_text_before : n_text_before + images * NUM_IMAGE_TOKENS] = True
    return torch.randn(n, HIDDEN, generator=g), torch.randn(n, HIDDEN, generator=g), torch.arange(n), mask


@pytest.mark.parametrize(
    ("spec", "kept"),
    [("pool:4", 4), ("conv:4", 4), ("prune:4", 4), ("prune_importance:2", 8), ("resampler:3", 3), ("text", 0)],
)
def test_each_primitive_keeps_the_text_and_shrinks_the_image(spec, kept):
    embeds, features, positions, mask = row(images=2)
    out = compressor([spec]).compress_row(embeds, features, positions, mask)
    text = ~mask
    assert out.inputs_embeds.shape == out.features.shape == (int(text.sum()) + 2 * kept, HIDDEN)
    # text entries are untouched, at their own positions, in order, and `source` points back at them
    kept_text = out.source >= 0
    assert torch.equal(out.source[kept_text], text.nonzero()[:, 0])
    assert torch.equal(out.inputs_embeds[kept_text], embeds[text])
    assert torch.equal(out.features[kept_text], features[text])
    assert torch.equal(out.position_ids[kept_text], positions[text])
    # each image's pairs sit where its image was, at positions inside that image's span
    visual_positions = out.position_ids[~kept_text].view(2, kept)
    for image in range(2):
        start = 3 + image * NUM_IMAGE_TOKENS
        assert ((visual_positions[image] >= start) & (visual_positions[image] < start + NUM_IMAGE_TOKENS)).all()
    assert torch.equal(out.source[: 3 + kept][3:], torch.full((kept,), -1))


def test_pooling_averages_grid_windows_at_their_mean_position():
    embeds, features, positions, mask = row(n_text_before=1, n_text_after=1)
    out = compressor(["pool:4"]).compress_row(embeds, features, positions, mask)
    grid = embeds[1:17].view(4, 4, HIDDEN)
    top_left = grid[:2, :2].reshape(4, HIDDEN).mean(0)
    torch.testing.assert_close(out.inputs_embeds[1], top_left)
    assert out.position_ids[1:5].tolist() == [
        1 + (0 + 1 + 4 + 5) // 4,
        1 + (2 + 3 + 6 + 7) // 4,
        1 + (8 + 9 + 12 + 13) // 4,
        13,
    ]


def test_ratio_windows():
    assert window_for_ratio((24, 24), 4) == (2, 2)
    assert window_for_ratio((9, 9), 20) == (5, 5)  # 4 outputs of 81 (20.25x)
    assert window_for_ratio((9, 9), 1) == (1, 1)
    assert str(Branch.parse("pool:10")) == "pool:10" and Branch.parse("resampler").size == 2


def test_importance_pruning_keeps_the_pairs_closest_to_the_question():
    embeds, features, positions, mask = row(n_text_before=1, n_text_after=2)
    features[-1] = features[5] * 3  # the prompt's last feature points at visual pair 4 (position 5)
    out = compressor(["prune_importance:16"]).compress_row(embeds, features, positions, mask)
    assert out.position_ids[1].item() == 5 and torch.equal(out.features[1], features[5])


@pytest.mark.parametrize("spec", ["pool:1", "prune:1", "conv:1", "prune_importance:1"])
def test_identity_ratio_reproduces_eaglevlm_input(target, spec):
    inputs = make_inputs(seed=2)
    adapter = get_adapter(target)
    layout = adapter.layout(inputs["input_ids"], inputs)
    embeds, features, _ = prefill(adapter, inputs["input_ids"], layout, DynamicCache())
    first = torch.tensor([[5]])
    state = prompt_draft_state(
        adapter, torch.cat([inputs["input_ids"], first], 1), embeds, features, layout.visual_mask[0]
    )
    got = compressor([spec])(state.inputs_embeds, state.features, state.position_ids, state.image_mask)
    assert torch.equal(got[0], state.inputs_embeds) and torch.equal(got[1], state.features)
    assert torch.equal(got[2], state.position_ids)


def test_gate_gets_straight_through_gradients():
    embeds, features, positions, mask = row()
    comp = compressor(["pool:4", "conv:2", "resampler:2", "text"]).train()
    torch.manual_seed(3)
    for _ in range(20):  # until a branch with outputs is drawn
        out = comp.compress_row(embeds, features, positions, mask, sample=True)
        if out.branch != "text":
            break
    out.features.sum().backward()
    assert comp.gate[0].weight.grad is not None and comp.gate[0].weight.grad.abs().sum() > 0


def test_weight_and_concat_modes():
    embeds, features, positions, mask = row()
    mixed = compressor(["prune:4", "pool:4", "conv:4"], mode="weight").compress_row(embeds, features, positions, mask)
    assert mixed.inputs_embeds.shape[0] == 8 + 4 and mixed.branch is None
    both = compressor(["pool:4", "resampler:2", "text"], mode="concat").compress_row(embeds, features, positions, mask)
    assert both.inputs_embeds.shape[0] == 8 + 4 + 2


@pytest.mark.parametrize(
    ("branches", "mode"),
    [
        (["pool:2"], "select"),
        (["conv:3"], "select"),
        (["prune:4"], "select"),
        (["prune_importance:8"], "select"),
        (["resampler:2"], "select"),
        (["text"], "select"),
        (["prune:16", "pool:8", "conv:3", "resampler:2", "text"], "select"),
        (["prune:2", "pool:2", "conv:2"], "weight"),
        (["pool:8", "conv:3", "resampler:1"], "concat"),
    ],  # fmt: skip
)
def test_generation_stays_lossless(target, branches, mode):
    torch.manual_seed(0)
    draft = SpecVLMDraftModel.from_target(target).set_compressor(compressor(branches, mode))
    for seed, image in ((4, True), (5, False)):
        inputs = make_inputs(seed=seed, image=image)
        for knobs in (
            {"depth": 4, "tree_top_k": 1, "total_tokens": 5},
            {"depth": 3, "tree_top_k": 3, "total_tokens": 8},
        ):
            out = speculative_generate(target, draft, **inputs, max_new_tokens=24, **knobs)
            assert torch.equal(out.sequences, target.generate(**inputs, max_new_tokens=24, do_sample=False))
    if mode == "select":
        assert sum(draft.compressor.branch_counts.values()) >= 2  # one choice per image prompt, counted


def test_save_and_load(target, tmp_path):
    torch.manual_seed(0)
    comp = compressor(["prune:16", "pool:8", "conv:3", "resampler:2", "text"])
    comp.save_pretrained(tmp_path / "compressor")
    loaded = AutoModel.from_pretrained(tmp_path / "compressor")  # no trust_remote_code
    assert isinstance(loaded, SpecVLMCompressor) and loaded.config.branches == comp.config.branches
    assert all(torch.equal(a, b) for a, b in zip(comp.state_dict().values(), loaded.state_dict().values()))

    draft = SpecVLMDraftModel.from_target(target).set_compressor(comp)
    draft.save_pretrained(tmp_path / "draft")
    again = SpecVLMDraftModel.from_pretrained(tmp_path / "draft", target=target)
    assert isinstance(again.compressor, SpecVLMCompressor) and again.config.compressor["branches"] == comp.names
    assert draft.state_dict().keys() == again.state_dict().keys()
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in draft.state_dict().items())
    inputs = make_inputs(seed=6)
    a = speculative_generate(target, draft, **inputs, max_new_tokens=16, depth=3, tree_top_k=2, total_tokens=6)
    b = speculative_generate(target, again, **inputs, max_new_tokens=16, depth=3, tree_top_k=2, total_tokens=6)
    assert a.stats.accepted_lengths == b.stats.accepted_lengths
    assert (
        SpecVLMDraftModel.from_pretrained(tmp_path / "draft", target=target).set_compressor(None).config.compressor
        is None
    )


def test_training_builds_the_decoding_loops_draft_input(tiny_testbed, tmp_path):
    target, processor = tiny_testbed
    grid = get_adapter(target).patch_grid()
    torch.manual_seed(0)
    branches = ["pool:2", "resampler:2", "text", "prune_importance:3"]
    comp = compressor_for("elastic", draft_width(target), grid, branches)
    draft = SpecVLMDraftModel.from_target(target).set_compressor(comp).eval()
    trainer = DistillationTrainer(model=draft, target=target, args=config(tmp_path), train_dataset=[])
    encoder = RowEncoder(processor, 4096)
    examples = [encoder.encode(r) for r in rows(3)]
    batch = DistillationCollator(processor.tokenizer.pad_token_id)(examples)
    embeds, features, _ = trainer.target_pass(batch["input_ids"], {"pixel_values": batch["pixel_values"]})
    got = trainer.draft_input(draft, batch["input_ids"], batch["loss_mask"], embeds, features)
    adapter = get_adapter(target)
    for b in range(len(examples)):  # every row has an image
        prompt_len = int(batch["loss_mask"][b].nonzero()[0, 0])
        ids = batch["input_ids"][b : b + 1, :prompt_len]
        layout = adapter.layout(ids, {"pixel_values": batch["pixel_values"][b : b + 1]})
        p_embeds, p_features, _ = prefill(adapter, ids, layout, DynamicCache())
        state = prompt_draft_state(
            adapter, batch["input_ids"][b : b + 1, : prompt_len + 1], p_embeds, p_features, layout.visual_mask[0]
        )
        want = draft.compressor(state.inputs_embeds, state.features, state.position_ids, state.image_mask)
        n = want[0].shape[1]
        torch.testing.assert_close(got[0][b, :n], want[0][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[1][b, :n], want[1][0], atol=1e-4, rtol=1e-4)
        assert torch.equal(got[2][b, :n], want[2][0])


def draft_width(target):
    return get_adapter(target).text_config.hidden_size


def test_joint_training_trains_the_compressor_and_logs_the_gate(tiny_testbed, tmp_path):
    target, processor = tiny_testbed
    grid = get_adapter(target).patch_grid()
    torch.manual_seed(0)
    comp = compressor_for("elastic", draft_width(target), grid, ["pool:3", "conv:3", "resampler:2", "text"])
    draft = SpecVLMDraftModel.from_target(target).set_compressor(comp)
    before = {k: v.clone() for k, v in draft.state_dict().items()}
    trainer_args = config(tmp_path, max_steps=4, save_steps=100)
    _, summary = train_draft(target, processor, rows(8), trainer_args, draft=draft)
    changed = {k for k, v in before.items() if not torch.equal(v, draft.state_dict()[k])}
    assert any(k.startswith("compressor.gate") for k in changed)
    assert summary["compressor_branches"] and set(summary["compressor_branches"]) <= set(comp.names)
    again = SpecVLMDraftModel.from_pretrained(tmp_path, target=target)
    assert again.config.compressor["branches"] == comp.names


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Branch.parse("blur:3"), "valid branches: prune, prune_importance, pool, conv, resampler, text"),
        (lambda: compressor(["pool:17"]), "larger than the 16 visual tokens"),
        (lambda: compressor(["pool:2", "text"], mode="weight"), "equal output length"),
        (lambda: compressor(["pool:2"], mode="mean"), "valid modes"),
        (lambda: compressor_for("blur", HIDDEN, GRID), "valid: none, elastic"),
    ],
)
def test_bad_configurations_are_named(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_a_compressor_for_another_target_is_refused(target):
    draft = SpecVLMDraftModel.from_target(target)
    wide = SpecVLMCompressor(SpecVLMCompressorConfig(hidden_size=2 * HIDDEN, grid=list(GRID), branches=["pool:2"]))
    with pytest.raises(ValueError, match="hidden size 128 != the draft's 64"):
        draft.set_compressor(wide)
    other_grid = SpecVLMCompressor(SpecVLMCompressorConfig(hidden_size=HIDDEN, grid=[3, 3], branches=["pool:2"]))
    with pytest.raises(ValueError, match="patch grid 3x3 != the target's 4x4"):
        draft.set_compressor(other_grid)


def test_visual_tokens_that_are_not_whole_images_are_refused():
    embeds, features, positions, mask = row()
    mask[3] = False  # 15 visual tokens: not a whole 4x4 image
    with pytest.raises(ValueError, match="15 visual tokens, not a whole number of images of 4x4"):
        compressor(["pool:2"]).compress_row(embeds, features, positions, mask)


def test_the_branch_and_the_visual_tokens_kept_are_reported(target):
    torch.manual_seed(0)
    draft = SpecVLMDraftModel.from_target(target).set_compressor(compressor(["pool:4", "resampler:2", "text"]))
    out = speculative_generate(target, draft, **make_inputs(seed=4), max_new_tokens=8, depth=2, tree_top_k=1)
    kept = {"pool:4": 4, "resampler:2": 2, "text": 0}
    assert out.stats.compressor_branch in kept
    assert out.stats.draft_visual_tokens == kept[out.stats.compressor_branch]
    plain = SpecVLMDraftModel.from_target(target)
    out = speculative_generate(target, plain, **make_inputs(seed=4), max_new_tokens=8, depth=2, tree_top_k=1)
    assert out.stats.compressor_branch is None and out.stats.draft_visual_tokens == NUM_IMAGE_TOKENS
