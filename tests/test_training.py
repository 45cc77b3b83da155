"""Online distillation: loss properties, only the draft learns, resume equals an uninterrupted run, collator masks,
bad rows skipped with counts (or named with --fail-fast), mismatches refused before training."""

import json

import pytest
import torch
from PIL import Image
from tiny import make_target
from transformers import TrainerCallback

from specvlm_hf import SpecVLMDraftModel, SpecVLMEagle3DraftModel, speculative_generate
from specvlm_hf.adapters import get_adapter
from specvlm_hf.cli import build_parser
from specvlm_hf.compressor import compressor_for
from specvlm_hf.testbed.dataset import heldout_prompts, training_conversations
from specvlm_hf.training import (
    ConversationRow,
    DistillationCollator,
    DistillationConfig,
    DistillationDataset,
    DistillationTrainer,
    RowEncoder,
    distillation_loss,
    feature_loss,
    read_llava_jsonl,
    regenerate_answers,
    soft_cross_entropy,
    train_draft,
)
from specvlm_hf.training.data import BadRow as BadRowError


def test_feature_loss_is_zero_only_for_identical_features():
    f = torch.randn(7, 16)
    assert feature_loss(f, f) == 0
    assert feature_loss(f + 0.1, f) > 0


def test_cross_entropy_is_minimal_when_distributions_match():
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(5, 11, generator=g)
    entropy = -(torch.softmax(teacher, -1) * torch.log_softmax(teacher, -1)).sum(-1).mean()
    torch.testing.assert_close(soft_cross_entropy(teacher, teacher), entropy)
    for _ in range(20):
        assert soft_cross_entropy(torch.randn(5, 11, generator=g), teacher) > soft_cross_entropy(teacher, teacher)


def test_distillation_loss_weights_its_parts():
    f, z = torch.randn(4, 8), torch.randn(4, 10)
    loss = distillation_loss(f + 1, z, f, z, lambda_logit=0.1, lambda_feat=1.0)
    torch.testing.assert_close(loss.total, 0.1 * soft_cross_entropy(z, z) + feature_loss(f + 1, f))
    assert loss.top1 == 1


def rows(n, image_size=48, seed=1):
    out = []
    for i, conv in enumerate(training_conversations(n, seed, image_size=image_size)):
        out.append(ConversationRow(conv.image, [(t.question, t.answer) for t in conv.turns[:2]], f"row {i}"))
    return out


def config(tmp_path, **overrides):
    base = dict(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2, learning_rate=1e-3, use_cpu=True,
        report_to=[], save_steps=2, logging_steps=1, eval_prompts=0, seed=0, eval_at_start=False,
        disable_tqdm=True,
    )  # fmt: skip
    return DistillationConfig(**{**base, **overrides})


def test_two_steps_change_the_draft_only(tiny_testbed, tmp_path):
    target, processor = tiny_testbed
    before_target = {k: v.clone() for k, v in target.state_dict().items()}
    draft = SpecVLMDraftModel.from_target(target)
    before_draft = {k: v.clone() for k, v in draft.state_dict().items()}
    args = config(tmp_path, max_steps=2, save_steps=100, hub_model_id="me/tiny-draft")
    train_draft(target, processor, rows(6), args, draft=draft)
    assert "# me/tiny-draft" in (tmp_path / "README.md").read_text()  # the model card names the draft
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in before_target.items())
    changed = [k for k, v in before_draft.items() if not torch.equal(v, draft.state_dict()[k])]
    assert "fc.weight" in changed and any(k.startswith("layers.0.self_attn") for k in changed)
    assert (tmp_path / "model.safetensors").exists()
    assert SpecVLMDraftModel.from_pretrained(tmp_path, target=target).is_bound


@pytest.mark.parametrize("family", [SpecVLMDraftModel, SpecVLMEagle3DraftModel], ids=["eagle", "eagle3"])
def test_training_time_test_trains_either_family(tiny_testbed, tmp_path, family):
    """Three unrolled steps: the draft's own weights change (an EAGLE-3 draft's head and norms too), the target's
    do not, each step's loss is logged, and the saved draft loads as its family."""
    target, processor = tiny_testbed
    before_target = {k: v.clone() for k, v in target.state_dict().items()}
    torch.manual_seed(0)
    draft = family.from_target(target)
    before_draft = {k: v.clone() for k, v in draft.state_dict().items()}
    args = config(tmp_path, max_steps=2, save_steps=100, ttt_steps=3)
    logs = LogRecorder()
    train_draft(target, processor, rows(6), args, draft=draft, callbacks=[logs])
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in before_target.items())
    changed = {k for k, v in before_draft.items() if not torch.equal(v, draft.state_dict()[k])}
    expected = {"fc.weight", "layers.0.self_attn.q_proj.weight"}
    if family is SpecVLMEagle3DraftModel:
        expected |= {"lm_head.weight", "norm.weight", "layers.0.hidden_norm.weight"}
    assert expected <= changed
    losses = [entry for entry in logs.entries if "loss" in entry]
    assert losses and all({"logit_ce", "logit_ce_2", "logit_ce_3", "top1_3"} <= set(entry) for entry in losses)
    assert type(SpecVLMDraftModel.from_pretrained(tmp_path, target=target)) is family


def test_parallel_drafting_trains_its_mask_entries(tiny_testbed, tmp_path):
    """A parallel draft of depth 3 trains one unrolled step per depth from its mask entries: the mask inputs learn,
    each depth's loss is logged, and the saved draft loads with them."""
    target, processor = tiny_testbed
    torch.manual_seed(0)
    draft = SpecVLMDraftModel.from_target(target).enable_parallel_drafting(3)
    before = {k: v.clone() for k, v in draft.state_dict().items()}
    logs = LogRecorder()
    train_draft(
        target, processor, rows(6), config(tmp_path, max_steps=2, save_steps=100), draft=draft, callbacks=[logs]
    )
    changed = {k for k, v in before.items() if not torch.equal(v, draft.state_dict()[k])}
    assert {"mask_embeds", "mask_features", "fc.weight"} <= changed
    losses = [entry for entry in logs.entries if "loss" in entry]
    assert losses and all({"logit_ce", "logit_ce_2", "logit_ce_3"} <= set(entry) for entry in losses)
    assert not any("logit_ce_4" in entry for entry in losses)
    loaded = SpecVLMDraftModel.from_pretrained(tmp_path, target=target)
    assert loaded.config.parallel_depth == 3 and torch.equal(loaded.mask_embeds, draft.mask_embeds)
    with pytest.raises(ValueError, match="ttt_steps must stay 1"):
        DistillationTrainer(draft, target, config(tmp_path, ttt_steps=2))


class LogRecorder(TrainerCallback):
    def __init__(self):
        self.entries = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.entries.append(dict(logs or {}))


def test_training_time_test_refuses_what_it_cannot_unroll(tiny_testbed, tmp_path):
    target, processor = tiny_testbed
    draft = SpecVLMDraftModel.from_target(target)
    draft.set_compressor(
        compressor_for("pool", draft.config.hidden_size, get_adapter(target).patch_grid(), ["pool:3"])
    )
    with pytest.raises(ValueError, match="a draft with a visual compressor trains with ttt_steps=1"):
        DistillationTrainer(draft, target, config(tmp_path, ttt_steps=2))
    eagle3 = SpecVLMEagle3DraftModel.from_target(target)
    with pytest.raises(ValueError, match="logit loss alone; lambda_logit must be > 0"):
        DistillationTrainer(eagle3, target, config(tmp_path, lambda_logit=0.0))
    with pytest.raises(ValueError, match="ttt_steps must be >= 1"):
        config(tmp_path, ttt_steps=0)


class StopAfterSave(TrainerCallback):
    """Simulates a killed process: stop right after the checkpoint of `step`."""

    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


def test_resume_equals_an_uninterrupted_run(tiny_testbed, tmp_path):
    target, processor = tiny_testbed
    data = rows(8)
    torch.manual_seed(0)
    straight = SpecVLMDraftModel.from_target(target)
    initial = {k: v.clone() for k, v in straight.state_dict().items()}
    train_draft(target, processor, data, config(tmp_path / "a", feature_noise=0.1), draft=straight)

    interrupted = SpecVLMDraftModel.from_target(target)
    interrupted.load_state_dict(initial)
    args = config(tmp_path / "b", feature_noise=0.1)
    dataset = DistillationDataset(data, RowEncoder(processor, 4096))
    trainer = DistillationTrainer(
        model=interrupted,
        target=target,
        args=args,
        train_dataset=dataset,
        data_collator=DistillationCollator(0),
        callbacks=[StopAfterSave(2)],
    )
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert (tmp_path / "b" / "checkpoint-2").is_dir()

    resumed = SpecVLMDraftModel.from_target(target)  # a fresh process: weights come from the checkpoint
    _, summary = train_draft(target, processor, data, args, draft=resumed)
    assert summary["resumed_from"].endswith("checkpoint-2")
    for key, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, atol=1e-6, rtol=1e-5)


def test_collator_pads_right_and_masks(tiny_testbed):
    _, processor = tiny_testbed
    encoder = RowEncoder(processor, 4096)
    a, b = encoder.encode(rows(2)[0]), encoder.encode(ConversationRow(None, [("Say hi.", "Hi.")], "text only"))
    assert "pixel_values" in a and "pixel_values" not in b
    batch = DistillationCollator(pad_token_id=0)([a, b])
    n_a, n_b = len(a["input_ids"]), len(b["input_ids"])
    assert batch["input_ids"].shape == (2, max(n_a, n_b))
    assert batch["attention_mask"].sum(1).tolist() == [n_a, n_b]
    assert (batch["input_ids"][1, n_b:] == 0).all() and not batch["loss_mask"][1, n_b:].any()
    assert batch["pixel_values"].shape[0] == 1
    answer = processor.tokenizer.decode(b["input_ids"][b["loss_mask"]])
    assert answer.strip() == "Hi.</s>"  # the answer and its end-of-turn token, nothing of the prompt


def test_bad_rows_are_skipped_with_counts_or_named(tiny_testbed, tmp_path):
    _, processor = tiny_testbed
    image = tmp_path / "ok.png"
    Image.new("RGB", (48, 48), "white").save(image)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    lines = [
        {"image": "ok.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A."}]},
        {"image": "missing.png", "conversations": [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]},
        {"image": "broken.png", "conversations": [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]},
        {"image": "ok.png", "conversations": [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "  "}]},
        {"image": "ok.png", "conversations": [{"from": "human", "value": "<image>\n" + "long " * 300},
                                              {"from": "gpt", "value": "A"}]},
        {"image": "ok.png"},
    ]  # fmt: skip
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n{not json\n")
    parsed, problems = read_llava_jsonl(path)
    assert len(parsed) == 5 and problems == {"malformed JSON": 1, "malformed row": 1}
    dataset = DistillationDataset(parsed, RowEncoder(processor, max_length=200))
    assert len(dataset) == 1
    assert dataset.skipped == {
        "missing or unreadable image": 2,
        "empty answer": 1,
        "longer than the target's context": 1,
    }
    with pytest.raises(BadRowError, match=r"data.jsonl:2"):
        DistillationDataset(parsed, RowEncoder(processor, max_length=200), fail_fast=True)


def test_mismatched_draft_fails_before_training(tiny_testbed, tmp_path):
    target, processor = tiny_testbed
    other = make_target()
    draft = SpecVLMDraftModel.from_target(other)
    with pytest.raises(ValueError, match="bound to the target"):
        DistillationTrainer(model=draft, target=target, args=config(tmp_path), train_dataset=[])
    with pytest.raises(ValueError, match="does not fit the target"):
        train_draft(target, processor, rows(2), config(tmp_path), draft=draft)


def weights_of(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class WeightsAtEachEpoch(TrainerCallback):
    """Keeps a copy of the model's weights before training and at the end of every epoch."""

    def __init__(self):
        self.weights = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.weights.append(weights_of(model))

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        self.weights.append(weights_of(model))


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_per_epoch_curve_is_measured_and_drawn(tiny_testbed, tmp_path, monkeypatch):
    """Each point of the curve is the accepted length of the draft as it was at that epoch (untrained at epoch 0):
    the weights it decoded with are that epoch's, and decoding the held-out prompts greedy with a copy of them and
    the configured tree reproduces its counts. (At this size two epochs leave the accepted length where it starts,
    so the weights, not the figures, tell the epochs apart.)"""
    target, processor = tiny_testbed
    prompts = [dict(p.inputs(processor)) for p in heldout_prompts(kind="long", n=2, image_size=48)]
    args = config(
        tmp_path,
        max_steps=-1,
        num_train_epochs=2,
        eval_prompts=2,
        eval_max_new_tokens=6,
        eval_at_start=True,
        save_steps=100,
    )
    measured = []  # the draft's weights at each of the curve's decodes

    def spy(target, draft, **kwargs):
        measured.append(weights_of(draft))
        return speculative_generate(target, draft, **kwargs)

    monkeypatch.setattr("specvlm_hf.training.evaluation.speculative_generate", spy)
    snapshots = WeightsAtEachEpoch()
    draft = SpecVLMDraftModel.from_target(target)
    _, summary = train_draft(
        target, processor, rows(4), args, eval_prompts=prompts, draft=draft, callbacks=[snapshots]
    )
    curve = summary["curve"]
    assert [(p["epoch"], p["step"]) for p in curve] == [(0.0, 0), (1.0, 2), (2.0, 4)] and summary["steps"] == 4
    assert len(snapshots.weights) == len(curve) and not same_weights(snapshots.weights[0], snapshots.weights[-1])
    assert len(measured) == len(curve) * len(prompts)
    replay = SpecVLMDraftModel.from_target(target).eval()
    for i, (point, weights) in enumerate(zip(curve, snapshots.weights)):
        assert all(same_weights(m, weights) for m in measured[i * len(prompts) : (i + 1) * len(prompts)])
        replay.load_state_dict(weights)
        new_tokens = forwards = 0
        for inputs in prompts:
            out = speculative_generate(
                target, replay, **inputs, max_new_tokens=args.eval_max_new_tokens, depth=args.eval_depth,
                tree_top_k=args.eval_top_k, total_tokens=args.eval_total_tokens,
            )  # fmt: skip
            new_tokens, forwards = new_tokens + out.stats.new_tokens, forwards + out.stats.target_forwards
        assert (point["new_tokens"], point["target_forwards"]) == (new_tokens, forwards)
        assert point["mean_accepted_length"] == round(new_tokens / forwards, 4)
    # the target's output does not depend on the draft, so every epoch decodes the same tokens
    assert len({p["new_tokens"] for p in curve}) == 1 and 0 < curve[0]["new_tokens"] <= 12
    assert (tmp_path / "acceptance_curve.png").stat().st_size > 1000


def test_self_distillation_samples_the_targets_answers_from_a_seed(tiny_testbed):
    """At a temperature the answers are what generate() samples for each batch from torch's generator seeded with
    the seed and the batch's index: a seed regenerates them, another seed and greedy decoding give others."""
    from specvlm_hf.training.data import messages_for

    target, processor = tiny_testbed
    data = [ConversationRow(r.image, r.turns[:1], r.source) for r in rows(3)]
    sampled = regenerate_answers(target, processor, data, max_new_tokens=8, progress=False, temperature=1.0, seed=4)
    texts = [
        processor.apply_chat_template(messages_for([(r.turns[0][0], None)], True), add_generation_prompt=True)
        for r in data
    ]
    side, processor.tokenizer.padding_side = processor.tokenizer.padding_side, "left"  # the shared fixture's
    try:
        inputs = processor(text=texts, images=[r.image for r in data], return_tensors="pt", padding=True)
    finally:
        processor.tokenizer.padding_side = side
    torch.manual_seed(4 * 1_000_003)  # the first batch's generator
    out = target.generate(**inputs, max_new_tokens=8, do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
    expected = processor.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert [r.turns[0][1] for r in sampled] == [answer.strip() for answer in expected]
    assert [r.turns[0][0] for r in sampled] == [r.turns[0][0] for r in data]  # the questions are kept
    again = regenerate_answers(target, processor, data, max_new_tokens=8, progress=False, temperature=1.0, seed=4)
    other = regenerate_answers(target, processor, data, max_new_tokens=8, progress=False, temperature=1.0, seed=5)
    greedy = regenerate_answers(target, processor, data, max_new_tokens=8, progress=False)
    answers = [[r.turns[0][1] for r in result] for result in (sampled, again, other, greedy)]
    assert answers[0] == answers[1] and answers[0] != answers[2] and answers[0] != answers[3]
    with pytest.raises(ValueError, match="temperature"):
        regenerate_answers(target, processor, data, temperature=-1.0, progress=False)


def test_train_cli_help(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    assert "--self-distill" in capsys.readouterr().out


def test_train_cli_refuses_a_self_distillation_temperature_without_self_distillation(capsys, tmp_path):
    from specvlm_hf.cli import main

    with pytest.raises(SystemExit, match="add --self-distill"):
        main(["train", "--target", "testbed", "--self-distill-temperature", "1", "--output", str(tmp_path)])
    with pytest.raises(SystemExit, match="0 \\(greedy\\) or positive"):
        main(["train", "--target", "testbed", "--self-distill", "--self-distill-temperature", "-1", "--output",
              str(tmp_path)])  # fmt: skip


def test_train_cli_refuses_family_options_it_cannot_use(capsys, tmp_path):
    from specvlm_hf.cli import main

    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--family", "eagle3", "--aux-layers", "1,x", "--output", "o"])
    assert "expected three comma-separated layer indices, got '1,x'" in capsys.readouterr().err
    for argv, message in (
        (["--aux-layers", "1,2,3"], "add --family eagle3"),
        (["--family", "eagle3", "--compressor", "elastic"], "takes no compressor"),
        (["--ttt-steps", "3", "--compressor", "pool"], "train a draft with a compressor with --ttt-steps 1"),
        (["--parallel-depth", "3", "--family", "eagle3"], "drop --ttt-steps, --lora and --family eagle3"),
        (["--parallel-depth", "3", "--ttt-steps", "2"], "one unrolled step per depth"),
        (["--parallel-depth", "3", "--compressor", "pool"], "drop --compressor"),
        (["--parallel-depth", "0"], "must be >= 1"),
    ):
        with pytest.raises(SystemExit, match=message):
            main(["train", *argv, "--output", str(tmp_path)])
