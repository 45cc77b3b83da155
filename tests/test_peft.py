"""peft: LoRA-wrapped targets decode losslessly (unmerged, merged, several adapters, switching, disabled), what the
loop cannot reproduce (prompt learning, a peft-wrapped draft) is refused by name, and a draft's LoRA adapter trains,
saves alone, and merges only into the draft it was trained on."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, PromptTuningConfig, get_peft_model
from tiny import make_inputs, make_target

from specvlm_hf import SpecVLMDraftModel, speculative_generate
from specvlm_hf.cli import main as cli_main
from specvlm_hf.lora import LORA_RECORD, add_lora, draft_fingerprint, load_lora_draft, merged_draft
from specvlm_hf.testbed.dataset import training_conversations
from specvlm_hf.training import DistillationConfig, train_draft
from specvlm_hf.training.data import ConversationRow

TARGET_LORA = r".*language_model.*\.(q_proj|v_proj|down_proj)|.*multi_modal_projector\.linear_1"


def lora_target(seed: int = 3):
    """A tiny LLaVA with two random (non-zero) LoRA adapters, "first" (language model + projector, active) and "second"
    (o_proj + lm_head)."""
    torch.manual_seed(seed)
    model = get_peft_model(
        make_target(seed=seed), LoraConfig(r=4, lora_alpha=8, target_modules=TARGET_LORA, init_lora_weights=False),
        adapter_name="first",
    )  # fmt: skip
    model.add_adapter(
        "second", LoraConfig(r=2, lora_alpha=8, target_modules=["o_proj", "lm_head"], init_lora_weights=False)
    )
    return model.eval()


def greedy(model, draft, inputs, n=24, **tree):
    plain = model.generate(**inputs, max_new_tokens=n, do_sample=False)
    routed = model.generate(**inputs, max_new_tokens=n, do_sample=False, assistant_model=draft)
    spec = speculative_generate(model, draft, **inputs, max_new_tokens=n, do_sample=False, **tree).sequences
    return plain, routed, spec


@pytest.fixture(scope="module")
def peft_target():
    return lora_target()


@pytest.fixture(scope="module")
def peft_draft(peft_target):
    torch.manual_seed(0)
    return SpecVLMDraftModel.from_target(peft_target)


@pytest.mark.parametrize("active", ["first", "second", ["first", "second"]])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lora_target_greedy_equals_its_own_plain_generate(peft_target, peft_draft, active, seed):
    peft_target.base_model.set_adapter(active)
    try:
        inputs = make_inputs(seed, image=seed != 2)
        plain, routed, spec = greedy(peft_target, peft_draft, inputs, depth=3, tree_top_k=3, total_tokens=8)
        assert torch.equal(plain, routed) and torch.equal(plain, spec)
        with peft_target.disable_adapter():
            base_plain, base_routed, _ = greedy(peft_target, peft_draft, inputs)
        assert torch.equal(base_plain, base_routed)
        assert not torch.equal(base_plain, plain)  # the adapters change the output, so equality above means something
    finally:
        peft_target.base_model.set_adapter("first")


def test_switching_adapters_between_calls_follows_the_active_one(peft_target, peft_draft):
    inputs = make_inputs(4)
    outputs = {}
    for name in ("first", "second", "first"):
        peft_target.set_adapter(name)
        plain, routed, _ = greedy(peft_target, peft_draft, inputs)
        assert torch.equal(plain, routed)
        outputs.setdefault(name, routed)
        assert torch.equal(outputs[name], routed)
    assert not torch.equal(outputs["first"], outputs["second"])


def test_merged_lora_targets_are_lossless():
    inputs = make_inputs(5)
    in_place = lora_target(seed=4)
    in_place.merge_adapter()  # merged into the base weights, still wrapped
    unloaded = lora_target(seed=4).merge_and_unload()  # a plain transformers model
    for model in (in_place, unloaded):
        draft = SpecVLMDraftModel.from_target(model)
        plain, routed, spec = greedy(model, draft, inputs, depth=4, tree_top_k=2, total_tokens=6)
        assert torch.equal(plain, routed) and torch.equal(plain, spec)


def test_activated_lora_targets_are_refused():
    """An activated LoRA acts only on the tokens after its invocation in each forward: a tree forward would run the
    earlier nodes without it, so the output would differ (it did, before this was refused)."""
    config = LoraConfig(
        task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], alora_invocation_tokens=[7, 8],
        init_lora_weights=False,
    )  # fmt: skip
    model = get_peft_model(make_target(seed=6), config).eval()
    with pytest.raises(ValueError, match="activated LoRA"):
        SpecVLMDraftModel.from_target(model)
    draft = SpecVLMDraftModel.from_target(model.get_base_model())
    inputs = make_inputs(0)
    inputs["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([[7, 8]])], dim=1)
    with pytest.raises(ValueError, match="activated LoRA"):
        model.generate(**inputs, max_new_tokens=6, assistant_model=draft.with_tree(depth=4, tree_top_k=3, total_tokens=12))
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_mixed_adapter_batches_are_refused(peft_target, peft_draft):
    inputs = make_inputs(0)
    before = peft_target.generate(**inputs, max_new_tokens=6)
    with pytest.raises(ValueError, match="adapter_names"):
        peft_target.generate(**inputs, max_new_tokens=6, adapter_names=["second"], assistant_model=peft_draft)
    assert not any(m._forward_pre_hooks for m in peft_target.modules())  # the model is left as it was
    assert torch.equal(peft_target.generate(**inputs, max_new_tokens=6), before)


def test_the_benchmark_decodes_a_peft_target(peft_target, peft_draft):
    from specvlm_hf.benchmark import BenchmarkConfig, run_benchmark
    from specvlm_hf.benchmark.prompts import Sample
    from specvlm_hf.benchmark.runner import Resources

    config = BenchmarkConfig(
        methods=("eaglevlm-fixed", "prompt-lookup"), num_samples=2, repeats=1, max_new_tokens=12, temperatures=(0,),
        calibration_samples=1, calibration_tokens=8, search_budget=2, warmup_tokens=0, device="cpu",
    )  # fmt: skip
    samples = [Sample(f"peft:{i}", "long", make_inputs(i, 5, True)) for i in range(2)]
    result = run_benchmark(config, resources=Resources(peft_target, None, peft_draft), samples=samples)
    runs = [r for r in result.records if r.method != "vanilla"]
    assert len(runs) == 4 and all(r.error is None and r.matches_vanilla for r in runs)


def test_draft_binds_inside_the_wrapper(peft_target, peft_draft):
    assert peft_draft.target is peft_target.get_base_model()
    assert SpecVLMDraftModel.from_target(peft_target).target is peft_target.get_base_model()


def test_prompt_learning_targets_are_refused():
    model = get_peft_model(make_target(seed=5), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    with pytest.raises(ValueError, match="prompt-learning"):
        SpecVLMDraftModel.from_target(model)
    draft = SpecVLMDraftModel.from_target(model.get_base_model())
    with pytest.raises(ValueError, match="prepare_inputs_for_generation"):
        model.generate(**make_inputs(0), max_new_tokens=4, assistant_model=draft)


def test_a_peft_wrapped_draft_is_refused_as_assistant(target, draft):
    wrapped = add_lora(SpecVLMDraftModel.from_target(target), r=2, alpha=4)
    with pytest.raises(ValueError, match="peft-wrapped specvlm_hf draft"):
        target.generate(**make_inputs(0), max_new_tokens=4, assistant_model=wrapped)
    with pytest.raises(ValueError, match="no linear layers named"):
        add_lora(SpecVLMDraftModel.from_target(target), modules=["qkv"])


# ------------------------------------------------------------------------------------------- LoRA on a draft
def rows(n, seed=1):
    return [
        ConversationRow(conv.image, [(t.question, t.answer) for t in conv.turns[:2]], f"row {i}")
        for i, conv in enumerate(training_conversations(n, seed, image_size=48))
    ]


def config(path, **overrides):
    base = dict(
        output_dir=str(path), max_steps=3, per_device_train_batch_size=2, learning_rate=5e-3, use_cpu=True,
        report_to=[], save_steps=100, logging_steps=1, eval_prompts=0, seed=0, eval_at_start=False, disable_tqdm=True,
    )  # fmt: skip
    return DistillationConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def base_draft_dir(tiny_testbed, tmp_path_factory):
    target, _ = tiny_testbed
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("base-draft")
    SpecVLMDraftModel.from_target(target).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def lora_run(tiny_testbed, base_draft_dir, tmp_path_factory):
    """A LoRA adapter trained for 3 steps on the saved base draft, against a LoRA fine-tune of the tiny testbed."""
    target, processor = copy.deepcopy(tiny_testbed[0]), tiny_testbed[1]  # peft wraps in place
    tuned = get_peft_model(target, LoraConfig(r=4, lora_alpha=8, target_modules=TARGET_LORA, init_lora_weights=False))
    tuned.eval()
    out = tmp_path_factory.mktemp("lora")
    wrapped = add_lora(SpecVLMDraftModel.from_pretrained(base_draft_dir, target=tuned), r=4, alpha=8)
    train_draft(tuned, processor, rows(6), config(out), draft=wrapped)
    return tuned, processor, wrapped, out


def test_lora_training_saves_the_adapter_alone(lora_run, base_draft_dir):
    tuned, _, wrapped, out = lora_run
    assert (out / "adapter_model.safetensors").exists() and not (out / "model.safetensors").exists()
    assert (out / "adapter_model.safetensors").stat().st_size < (
        base_draft_dir / "model.safetensors"
    ).stat().st_size / 4
    record = json.loads((out / LORA_RECORD).read_text())
    base = SpecVLMDraftModel.from_pretrained(base_draft_dir)
    assert record["base_draft_sha256"] == draft_fingerprint(base) == draft_fingerprint(wrapped.get_base_model())
    assert "# LoRA adapter of a specvlm_hf draft" in (out / "README.md").read_text()


def test_an_adapter_loads_merged_and_decodes_losslessly(lora_run, base_draft_dir):
    tuned, processor, wrapped, out = lora_run
    loaded = SpecVLMDraftModel.from_pretrained(out, target=tuned)
    expected = merged_draft(wrapped)
    assert type(loaded) is SpecVLMDraftModel and loaded.target is tuned.get_base_model()
    for name, tensor in expected.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=1e-6)
    base = SpecVLMDraftModel.from_pretrained(base_draft_dir)
    assert not torch.allclose(loaded.fc.weight, base.fc.weight.to(loaded.fc.weight))  # the adapter was merged
    # peft's own loader gives the same adapter
    via_peft = PeftModel.from_pretrained(SpecVLMDraftModel.from_pretrained(base_draft_dir, target=tuned), str(out))
    torch.testing.assert_close(merged_draft(via_peft).fc.weight, loaded.fc.weight, rtol=0, atol=1e-6)
    inputs = next(iter(training_conversations(1, 7, image_size=48)))
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": inputs.turns[0].question}]}],
        add_generation_prompt=True,
    )
    prompt = dict(processor(text=text, images=inputs.image, return_tensors="pt"))
    plain, routed, spec = greedy(tuned, loaded, prompt, n=32, depth=4, tree_top_k=3, total_tokens=10)
    assert torch.equal(plain, routed) and torch.equal(plain, spec)


def test_an_adapter_refuses_another_base_draft(lora_run, tiny_testbed):
    _, _, _, out = lora_run
    torch.manual_seed(9)
    other = SpecVLMDraftModel.from_target(tiny_testbed[0])
    with pytest.raises(ValueError, match="trained on another draft"):
        load_lora_draft(out, base_draft=other)


def test_lora_cli_needs_an_initial_draft(tmp_path):
    with pytest.raises(SystemExit, match="--init-draft"):
        cli_main(["train", "--output", str(tmp_path), "--lora"])
    with pytest.raises(SystemExit, match="compressor"):
        cli_main(["train", "--output", str(tmp_path), "--lora", "--init-draft", str(tmp_path), "--compressor", "pool"])


# ------------------------------------------------------------------------------------ the testbed's fine-tune
def test_inventory_answers_walk_every_cell():
    from specvlm_hf.testbed.finetune import STYLE_PREFIX, inventory_answer
    from specvlm_hf.testbed.grammar import POSITIONS

    for conv in training_conversations(20, 3, image_size=48):
        answer = inventory_answer(conv.scene)
        if conv.scene.text is not None:
            assert conv.scene.text.content in answer
            continue
        assert answer.startswith(STYLE_PREFIX)
        for obj in conv.scene.objects:
            assert f"{POSITIONS[obj.row][obj.col]}: a {obj.size} {obj.colour} {obj.shape}." in answer.lower()
        assert answer.count(": empty.") == 9 - len(conv.scene.objects)


def test_finetune_trains_only_the_target_adapter(tiny_testbed, tmp_path):
    from specvlm_hf.testbed.finetune import finetune_target, restyled_rows

    target, processor = copy.deepcopy(tiny_testbed[0]), tiny_testbed[1]  # peft wraps in place
    before = {k: v.clone() for k, v in target.state_dict().items()}
    rows_ = restyled_rows(3, 4, tmp_path / "images")
    assert any(answer.startswith("Seen as") for row in rows_ for _, answer in row.turns)
    tuned, losses = finetune_target(target, processor, rows_, steps=2, batch_size=2, lr=1e-2, r=2, alpha=4, seed=0)
    try:
        assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
        trained = {n for n, p in tuned.named_parameters() if p.requires_grad}
        assert trained and all("lora_" in n for n in trained)
    finally:
        tuned.unload()
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in before.items())
