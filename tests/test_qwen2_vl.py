"""Qwen2-VL and Qwen2.5-VL targets (3-axis M-RoPE), what is particular to them: a Qwen2.5-VL video with 2 s per
temporal grid (where `rope_deltas` would be wrong), eager attention, the layout against generate()'s own positions,
mismatched visual inputs refused, training batches, the benchmark. Greedy and sampling equality with plain generate()
over images, videos and text, random and oracle drafts, and cache compaction: `test_conformance.py`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny import make_qwen_inputs, make_qwen_target

from specvlm_hf import SpecVLMDraftModel
from specvlm_hf.adapters import get_adapter
from specvlm_hf.training import DistillationConfig, DistillationTrainer

PROMPTS = {
    "image": [("text", 3), ("image", (1, 4, 6)), ("text", 3)],
    "two images": [("text", 2), ("image", (1, 4, 4)), ("text", 2), ("image", (1, 2, 6)), ("text", 2)],
    "video": [("text", 2), ("video", (4, 2, 2)), ("text", 3)],
    "text": [("text", 7)],
}


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def qwen(request):
    target = make_qwen_target(request.param)
    torch.manual_seed(0)
    return target, SpecVLMDraftModel.from_target(target)


def plain(target, inputs, n=20, **kwargs):
    return target.generate(**inputs, max_new_tokens=n, do_sample=False, **kwargs)


def test_qwen2_5_video_seconds_per_grid(qwen):
    """Two seconds per temporal grid: the temporal axis runs past the text after the video, so the next position is
    not `cache length + rope_deltas`; the loop must continue generate()'s own numbering."""
    target, draft = qwen
    inputs = make_qwen_inputs([("text", 2), ("video", (2, 4, 4)), ("text", 3)], seed=3, seconds_per_grid=2.0)
    if target.config.model_type != "qwen2_5_vl":
        inputs.pop("second_per_grid_ts")
    expected = plain(target, inputs, n=24)
    assert torch.equal(target.generate(**inputs, max_new_tokens=24, do_sample=False, assistant_model=draft), expected)


def test_eager_attention_too():
    target = make_qwen_target("qwen2_vl", seed=1, attn_implementation="eager")
    draft = SpecVLMDraftModel.from_target(target)
    inputs = make_qwen_inputs(PROMPTS["image"], seed=4)
    assert torch.equal(
        target.generate(**inputs, max_new_tokens=16, assistant_model=draft), plain(target, inputs, n=16)
    )


def test_layout_follows_generate_positions(qwen):
    """The layout built from the processor's outputs (get_rope_index) is the one generate() hands the loop."""
    target, _ = qwen
    inputs = make_qwen_inputs(PROMPTS["two images"], seed=6)
    adapter = get_adapter(target)
    layout = adapter.layout(inputs["input_ids"], inputs)
    length = inputs["input_ids"].shape[1]
    assert torch.equal(
        layout.positions, target._prepare_position_ids_for_generation(inputs["input_ids"], dict(inputs))[1:]
    )
    assert layout.positions.shape == (3, 1, length)
    assert not torch.equal(layout.positions[1], layout.positions[2])  # height and width differ over the images
    assert torch.equal(layout.positions_at(torch.tensor([length - 1])), layout.positions[:, :, -1:])
    assert int(layout.visual_mask.sum()) == layout.visual_features.shape[0] == (4 * 4 + 2 * 6) // 4


def test_mismatched_visual_inputs_are_refused(qwen):
    target, _ = qwen
    inputs = make_qwen_inputs(PROMPTS["image"], seed=7)
    broken = inputs["input_ids"].clone()
    broken[0, broken[0] == 4] = 5  # image slots relabelled as video slots
    with pytest.raises(ValueError, match="0 image tokens but the images give 6 features"):
        get_adapter(target).layout(broken, inputs)


def test_a_training_batch_sees_what_decoding_sees(qwen, tmp_path):
    """Right-padded rows (prompt + answer) with images of different grids and a video: the trainer's positions and
    features are those of each row decoded alone, and the distillation loss trains the draft."""
    target, draft = qwen
    rows = [
        make_qwen_inputs(PROMPTS["two images"] + [("text", 6)], seed=8),
        make_qwen_inputs(PROMPTS["video"] + [("text", 2)], seed=9),
        make_qwen_inputs(PROMPTS["text"], seed=10),
    ]
    length = max(r["input_ids"].shape[1] for r in rows)
    batch = {
        "input_ids": torch.stack([F.pad(r["input_ids"][0], (0, length - r["input_ids"].shape[1]), value=2) for r in rows]),
        "attention_mask": torch.stack([F.pad(torch.ones_like(r["input_ids"][0]), (0, length - r["input_ids"].shape[1])) for r in rows]),
        "mm_token_type_ids": torch.stack([F.pad(r["mm_token_type_ids"][0], (0, length - r["input_ids"].shape[1])) for r in rows]),
    }  # fmt: skip
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        batch[key] = torch.cat([r[key] for r in rows if key in r])
    adapter = get_adapter(target)
    embeds, positions = adapter.batch_view(batch["input_ids"], batch)
    features = adapter.forward(embeds, positions)
    for b, row in enumerate(rows):
        n = row["input_ids"].shape[1]
        prompt_len = n - 4  # the last 4 tokens stand for the answer
        prompt = dict(row, mm_token_type_ids=row["mm_token_type_ids"][:, :prompt_len])
        layout = adapter.layout(row["input_ids"][:, :prompt_len], prompt)
        assert torch.equal(positions[:, b : b + 1, :n], layout.continued(n))
        alone = adapter.forward(adapter.embed(row["input_ids"], layout.visual_features), layout.continued(n))
        torch.testing.assert_close(features[b, :n], alone[0], atol=1e-5, rtol=1e-5)

    loss_mask = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    for b, row in enumerate(rows):
        loss_mask[b, row["input_ids"].shape[1] - 4 : row["input_ids"].shape[1]] = True
    trainee = SpecVLMDraftModel.from_target(target)
    args = DistillationConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], eval_prompts=0)
    trainer = DistillationTrainer(model=trainee, target=target, args=args, train_dataset=[])
    loss = trainer.compute_loss(trainee, dict(batch, loss_mask=loss_mask))
    loss.backward()
    assert torch.isfinite(loss) and trainee.fc.weight.grad.abs().sum() > 0


def test_the_benchmark_calibrates_and_runs_on_qwen(qwen):
    from specvlm_hf.benchmark import BenchmarkConfig, run_benchmark
    from specvlm_hf.benchmark.prompts import Sample
    from specvlm_hf.benchmark.runner import Resources

    target, draft = qwen
    config = BenchmarkConfig(
        methods=("eaglevlm-fixed", "prompt-lookup"), num_samples=2, repeats=1, max_new_tokens=12, temperatures=(0,),
        calibration_samples=1, calibration_tokens=8, search_budget=2, warmup_tokens=0, device="cpu",
    )  # fmt: skip
    samples = [Sample(f"qwen:{i}", "long", make_qwen_inputs(PROMPTS["two images"], seed=20 + i)) for i in range(3)]
    result = run_benchmark(config, resources=Resources(target, None, draft), samples=samples)
    runs = [r for r in result.records if r.method != "vanilla"]
    assert {r.method for r in runs} == {"eaglevlm-fixed", "prompt-lookup"}
    assert all(r.error is None and r.matches_vanilla for r in runs)
    assert result.trees[0]["mode"] == "search"
