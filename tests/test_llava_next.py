"""LLaVA-NeXT targets (AnyRes: a different number of visual tokens per image): tree decoding through generate()
equals plain greedy decoding with one image, two images of different sizes and text only, over the real draft class,
random drafts and an oracle; a missing `image_sizes` is refused by name."""

from __future__ import annotations

import pytest
import torch
from drafters import OracleDraft, RandomDraft
from tiny import VOCAB, make_next_inputs, make_next_target

from specvlm_hf import SpeculativeConfig, SpecVLMDraftModel, speculative_generate
from specvlm_hf.adapters import get_adapter

IMAGES = {"one image": [[16, 16]], "two sizes": [[6, 20], [16, 16]], "text": []}


@pytest.fixture(scope="module")
def llava_next():
    target = make_next_target()
    torch.manual_seed(0)
    return target, SpecVLMDraftModel.from_target(target)


def inputs_for(target, name, seed):
    if not IMAGES[name]:
        g = torch.Generator().manual_seed(seed)
        return {"input_ids": torch.cat([torch.tensor([1]), torch.randint(3, VOCAB - 1, (8,), generator=g)])[None]}
    return make_next_inputs(target, IMAGES[name], seed=seed)


@pytest.mark.parametrize("name", list(IMAGES))
@pytest.mark.parametrize("knobs", [dict(depth=3, tree_top_k=3, total_tokens=8), {}])
def test_greedy_equals_plain_generate(llava_next, name, knobs):
    target, draft = llava_next
    for seed in range(2):
        inputs = inputs_for(target, name, seed)
        expected = target.generate(**inputs, max_new_tokens=20, do_sample=False)
        assert torch.equal(
            target.generate(**inputs, max_new_tokens=20, do_sample=False, assistant_model=draft), expected
        )
        out = speculative_generate(target, draft, **inputs, max_new_tokens=20, do_sample=False, **knobs)
        assert torch.equal(out.sequences, expected)


def test_random_and_oracle_drafts(llava_next):
    target, _ = llava_next
    inputs = make_next_inputs(target, IMAGES["two sizes"], seed=4)
    expected = target.generate(**inputs, max_new_tokens=24, do_sample=False)
    for seed in range(3):
        config = SpeculativeConfig(depth=2 + seed, top_k=1 + seed, total_tokens=4 + 3 * seed)
        out = speculative_generate(target, RandomDraft(VOCAB, config, seed), **inputs, max_new_tokens=24)
        assert torch.equal(out.sequences, expected)
    oracle = OracleDraft(expected[0].tolist(), VOCAB, SpeculativeConfig(depth=5, top_k=2, total_tokens=10))
    out = speculative_generate(target, oracle, **inputs, max_new_tokens=24)
    assert torch.equal(out.sequences, expected) and out.stats.mean_accepted_length > 3


def test_images_of_different_sizes_have_different_token_counts(llava_next):
    target, _ = llava_next
    inputs = make_next_inputs(target, IMAGES["two sizes"], seed=5)
    adapter = get_adapter(target)
    layout = adapter.layout(inputs["input_ids"], inputs)
    assert adapter.patch_grid() is None
    assert int(layout.visual_mask.sum()) == layout.visual_features.shape[0] == 22 + 24


def test_missing_image_sizes_is_refused(llava_next):
    target, _ = llava_next
    inputs = make_next_inputs(target, IMAGES["one image"], seed=6)
    with pytest.raises(ValueError, match="image_sizes"):
        get_adapter(target).layout(inputs["input_ids"], {"pixel_values": inputs["pixel_values"]})


def test_a_training_batch_sees_what_decoding_sees(llava_next):
    """Rows with images of different sizes (different crop counts, padded by the collator) give each row the
    features it has decoded alone."""
    from specvlm_hf.training.data import DistillationCollator

    target, _ = llava_next
    rows = [make_next_inputs(target, [size], seed=7 + i) for i, size in enumerate(([6, 20], [16, 16]))]
    examples = [
        {"input_ids": r["input_ids"][0], "loss_mask": torch.ones_like(r["input_ids"][0], dtype=torch.bool),
         "pixel_values": r["pixel_values"], "image_sizes": r["image_sizes"]}
        for r in rows
    ]  # fmt: skip
    batch = DistillationCollator(pad_token_id=0)(examples)
    assert batch["pixel_values"].shape[:2] == (2, max(r["pixel_values"].shape[1] for r in rows))
    adapter = get_adapter(target)
    embeds, positions = adapter.batch_view(batch["input_ids"], batch)
    features = adapter.forward(embeds, positions)
    for b, row in enumerate(rows):
        n = row["input_ids"].shape[1]
        layout = adapter.layout(row["input_ids"], row)
        alone = adapter.forward(adapter.embed(row["input_ids"], layout.visual_features), layout.positions)
        torch.testing.assert_close(features[b, :n], alone[0], atol=1e-5, rtol=1e-5)
