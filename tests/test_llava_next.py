"""LLaVA-NeXT targets (AnyRes: a different number of visual tokens per image), what is particular to them: token
counts per image size, a missing `image_sizes` refused by name, training batches. Greedy and sampling equality with
plain generate() over one image, images of different sizes and text only, random and oracle drafts, and cache
compaction: `test_conformance.py`."""

from __future__ import annotations

import pytest
import torch
from tiny import make_next_inputs, make_next_target

from specvlm_hf import SpecVLMDraftModel
from specvlm_hf.adapters import get_adapter

IMAGES = {"one image": [[16, 16]], "two sizes": [[6, 20], [16, 16]]}


@pytest.fixture(scope="module")
def llava_next():
    target = make_next_target()
    torch.manual_seed(0)
    return target, SpecVLMDraftModel.from_target(target)


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
