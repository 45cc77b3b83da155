"""The benchmark harness on tiny in-process models: the JSON a run writes, its arithmetic (paired speedups, tokens per
forward), the tree-budget chooser on synthetic cost curves, the replay behind it against the real loop, prompt files,
the CLI, failure handling, the batch axis on a toy testbed, the `evaluate` metric, the hf-assisted assistant's
training data, and the GPU check's miniature."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import VOCAB, make_inputs, make_qwen_target
from transformers import LlamaConfig, LlamaForCausalLM

import specvlm_hf
from specvlm_hf import SpeculativeConfig, SpecVLMDraftModel, SpecVLMEagle3DraftModel, speculative_generate
from specvlm_hf.benchmark import BenchmarkConfig, run_benchmark
from specvlm_hf.benchmark.calibration import replay, replay_context
from specvlm_hf.benchmark.methods import (
    COMPRESSOR_METHODS,
    DRAFT_METHODS,
    EAGLE3_METHODS,
    METHOD_NAMES,
    PARALLEL_METHODS,
    TREE_METHODS,
    Method,
    ParallelAuto,
    ParallelFixed,
    UnknownMethodError,
    Vanilla,
    build_methods,
    check_method_names,
    row_tokens,
)
from specvlm_hf.benchmark.prompts import PromptFileError, Sample, load_prompts, select_prompts
from specvlm_hf.benchmark.runner import Resources, _draft, applicable_methods
from specvlm_hf.benchmark.stats import first_mismatch, paired_speedup, spread, tokens_per_forward
from specvlm_hf.benchmark.summary import paired_speedups, summarize
from specvlm_hf.benchmark.sweep import RunRecord, run_sweep
from specvlm_hf.benchmark.timing import Meter, module_bytes
from specvlm_hf.benchmark.tree_budget import (
    CostCurve,
    TreeEstimate,
    candidate_trees,
    choose_tree,
    neighbours,
    predict_speedup,
    search_tree,
)
from specvlm_hf.compressor import compressor_for
from specvlm_hf.testbed import store

METRIC_DIR = Path(specvlm_hf.__file__).parent / "metrics_hub" / "speculative_decoding"


@pytest.fixture(scope="module")
def assistant():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def tiny_samples(n=2):
    return [Sample(f"tiny:{i}", ("short", "long")[i % 2], make_inputs(i, 5, True)) for i in range(n)]


# ------------------------------------------------------------------------------------------------ a whole tiny run
def test_tiny_run_writes_the_json_schema(target, draft, assistant, tmp_path):
    config = BenchmarkConfig(
        num_samples=2,
        repeats=1,
        max_new_tokens=8,
        calibration_samples=1,
        calibration_tokens=8,
        search_budget=2,
        warmup_tokens=2,
        output=str(tmp_path),
        device="cpu",
    )
    specvlm_draft = SpecVLMDraftModel.from_target(target)
    specvlm_draft.set_compressor(compressor_for("elastic", 64, (4, 4), ["pool:4", "resampler:2", "text"]))
    eagle3_draft = SpecVLMEagle3DraftModel.from_target(target)
    resources = Resources(
        target, None, draft, assistant, specvlm_draft, eagle3_draft, info={"target": {"source": "tiny"}}
    )
    result = run_benchmark(config, resources=resources, samples=tiny_samples())
    data = json.loads((tmp_path / "benchmark.json").read_text())
    ran = [m for m in METHOD_NAMES if m not in PARALLEL_METHODS]  # no parallel draft held (a minute more on CPU)

    assert set(data) == {"schema_version", "environment", "config", "models", "trees", "cost_curve", "summary", "runs"}
    for key in (
        "device",
        "device_name",
        "dtype",
        "torch_threads",
        "cpu_model",
        "torch",
        "transformers",
        "load_average",
    ):
        assert key in data["environment"]
    assert data["environment"]["dtype"] == "float32"
    assert len(data["runs"]) == len(ran) * 2 * 2  # methods x samples x temperatures (1 repeat)
    for run in data["runs"]:
        assert run["error"] is None
        assert sum(run["tokens_per_forward"]) == run["new_tokens"] == 8
        assert run["target_forwards"] == len(run["tokens_per_forward"])
        assert run["wall_time"] > 0 and run["peak_memory_bytes"] > 0
        if run["method"] == "vanilla":
            assert run["tokens_per_forward"] == [1] * 8
        if run["temperature"] == 0:
            assert run["matches_vanilla"] is True  # lossless, every method
        if run["method"] == "eaglevlm-fixed":
            assert run["step_time"] >= run["verify_time"] + run["draft_time"]
    summary = {(s["method"], s["temperature"]): s for s in data["summary"]}
    assert summary[("vanilla", 0.0)]["mean_accepted_length"] == 1.0
    assert summary[("vanilla", 0.0)]["speedup"]["median"] == pytest.approx(1.0)
    assert summary[("eaglevlm-fixed", 0.0)]["exact_match_rate"] == 1.0
    assert 0 <= summary[("eaglevlm-fixed", 0.0)]["overhead_share"] < 1
    assert summary[("vanilla", 0.0)]["memory_ratio"] == pytest.approx(1.0)
    assert set(summary[("eaglevlm-fixed", 0.0)]["speedup_by_kind"]) == {"short", "long"}
    trees = {t["temperature"]: t for t in data["trees"]}
    assert set(trees) == {0.0, 1.0}
    for t, tree in trees.items():
        assert tree["mode"] == "search" and tree["shapes_scored"] <= 2
        assert tree["measured_speedup"] == summary[("eaglevlm-fixed", t)]["speedup"]["median"]
        assert 0.05 < tree["predicted_speedup"] < 20  # a plain step's time over a predicted step's, on the tiny model
        assert tree["cost_curve_relative"]["1"] == 1.0
    for name in ("speedup.png", "accepted_lengths.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = result.markdown()
    assert all(f"| {m} |" in table for m in ran) and "tree depth=" in table


def test_fixed_tree_is_used_as_given(target, draft):
    config = BenchmarkConfig(
        methods=("eaglevlm-fixed",),
        num_samples=1,
        repeats=1,
        max_new_tokens=6,
        temperatures=(0,),
        tree="3,2,6",
        warmup_tokens=0,
        device="cpu",
    )
    result = run_benchmark(config, resources=Resources(target, None, draft), samples=tiny_samples(1))
    assert result.trees == [
        {
            "temperature": 0.0,
            "mode": "fixed",
            "depth": 3,
            "top_k": 2,
            "total_tokens": 6,
            "measured_speedup": result.summaries[1].speedup.median,
        }
    ]
    assert [s.method for s in result.summaries] == ["vanilla", "eaglevlm-fixed"]


def test_batch_axis_on_the_tiny_testbed(tiny_testbed, tmp_path):
    target, processor = tiny_testbed
    torch.manual_seed(0)
    draft = SpecVLMDraftModel.from_target(target)
    side = processor.tokenizer.padding_side
    with pytest.raises(ValueError, match="batch_sizes"):
        BenchmarkConfig(batch_sizes=(0, 2))
    with pytest.raises(ValueError, match="prepared samples"):
        run_benchmark(BenchmarkConfig(batch_sizes=(2,)), resources=Resources(target, processor), samples=[])
    config = BenchmarkConfig(
        methods=("eaglevlm-fixed", "prompt-lookup"),  # an -auto method would measure the tree costs per batch size
        kind="long",
        num_samples=3,  # batches of 2: [p0, p1], [p2, p0#2]
        repeats=1,
        max_new_tokens=8,
        temperatures=(0,),
        tree="3,2,6",
        warmup_tokens=2,
        batch_sizes=(1, 2),
        output=str(tmp_path),
        device="cpu",
    )
    result = run_benchmark(config, resources=Resources(target, processor, draft))
    data = json.loads((tmp_path / "benchmark.json").read_text())
    assert processor.tokenizer.padding_side == side  # left padding only for the batches

    runs = data["batches"]["runs"]
    assert {(r["method"], r["batch_size"]) for r in runs} == {("vanilla", 2), ("eaglevlm-fixed", 2)}
    samples = data["config"]["samples"]
    assert [r["rows"] for r in runs if r["method"] == "vanilla"] == [samples[:2], [samples[2], samples[0] + "#2"]]
    assert len(data["batches"]["notes"]) == 1 and "1 row(s) repeating" in data["batches"]["notes"][0]
    for run in runs:
        assert run["error"] is None and run["wall_time"] > 0
        assert len(run["row_new_tokens"]) == len(run["row_target_forwards"]) == 2
        assert all(0 < n <= 8 for n in run["row_new_tokens"])
    summary = {(s["method"], s["batch_size"]): s for s in data["batches"]["summary"]}
    assert set(summary) == {(m, b) for m in ("vanilla", "eaglevlm-fixed", "prompt-lookup") for b in (1, 2)}
    assert summary[("prompt-lookup", 2)]["skipped"] and summary[("prompt-lookup", 2)]["runs"] == 0
    for method in ("vanilla", "eaglevlm-fixed"):
        s = summary[(method, 2)]
        assert s["rows_equal"] == s["rows_compared"] == 4  # lossless per row at T = 0
        mine = {r["batch"]: r for r in runs if r["method"] == method}
        forwards = sum(sum(r["row_target_forwards"]) for r in mine.values())
        assert s["mean_accepted_length"] == pytest.approx(sum(r["new_tokens"] for r in mine.values()) / forwards)
        ratios = [
            (mine[r["batch"]]["new_tokens"] / mine[r["batch"]]["wall_time"]) / (r["new_tokens"] / r["wall_time"])
            for r in runs
            if r["method"] == "vanilla"
        ]
        assert s["speedup"]["median"] == pytest.approx(float(np.median(ratios)))
    assert summary[("eaglevlm-fixed", 1)]["rows_equal"] == summary[("eaglevlm-fixed", 1)]["rows_compared"] == 3
    table = result.markdown()
    assert "| eaglevlm-fixed | 0 | 2 |" in table and "| vanilla | 0 | 2 |" in table
    assert "| eaglevlm-fixed | 0 | 1 |" in table
    assert "| prompt-lookup | 0 | 2 | skipped" in table and "| 4/4 |" in table


def test_parallel_methods_run_a_parallel_draft(target, draft, tmp_path, caplog):
    parallel = SpecVLMDraftModel.from_target(target).enable_parallel_drafting(3)
    tree = SpeculativeConfig(depth=3, top_k=2, total_tokens=6)
    methods = build_methods(["parallel-fixed", "parallel-auto"], parallel_draft=parallel, trees={0.0: tree})
    assert list(methods) == ["vanilla", *PARALLEL_METHODS] and "parallel-fixed" in TREE_METHODS
    assert isinstance(methods["parallel-fixed"], ParallelFixed) and methods["parallel-fixed"].tree(0) == tree
    assert isinstance(methods["parallel-auto"], ParallelAuto) and methods["parallel-auto"].models == (parallel,)
    with pytest.raises(ValueError, match="'parallel-fixed' needs a parallel draft"):
        build_methods(["parallel-fixed"], draft=draft)

    parallel.save_pretrained(tmp_path / "parallel")
    loaded, source = _draft(str(tmp_path / "parallel"), target, "--parallel-draft", parallel=True)
    assert loaded.config.parallel_depth == 3 and source == str(tmp_path / "parallel")
    with caplog.at_level("WARNING", logger="specvlm_hf.benchmark.runner"):
        random, source = _draft(None, target, "--parallel-draft", parallel=True)
    assert random.config.parallel_depth == 6 and source == "random init (untrained)"
    assert "no --parallel-draft given" in caplog.text


def test_runner_refuses_a_draft_that_is_not_parallel(tiny_testbed, tmp_path, capsys):
    from specvlm_hf.cli import main

    target, _ = tiny_testbed
    SpecVLMDraftModel.from_target(target).save_pretrained(tmp_path / "plain")
    argv = ["bench", "--target", target.name_or_path, "--methods", "parallel-auto",
            "--parallel-draft", str(tmp_path / "plain"), "--num-samples", "1", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "is not a parallel draft (parallel_depth 1); train one with specvlm-hf train --parallel-depth N" in err


# ------------------------------------------------------------------------------------------------ arithmetic
def record(method, sample, wall, tokens, temperature=0.0, repeat=0, **kw):
    return RunRecord(
        method, temperature, sample, "", repeat, 0, wall_time=wall, new_tokens=tokens, target_forwards=tokens, **kw
    )


def test_paired_speedups_on_synthetic_timings():
    records = [
        record("vanilla", "a", 2.0, 100),
        record("spec", "a", 1.0, 100),  # 2x
        record("vanilla", "b", 3.0, 100),
        record("spec", "b", 1.0, 100),  # 3x
        record("vanilla", "c", 1.0, 100),
        record("spec", "c", 2.0, 100),  # 0.5x
        record("vanilla", "a", 2.0, 100, repeat=1),
        record("spec", "a", 0.5, 100, repeat=1),  # 4x, paired by repeat
        record("vanilla", "d", 1.0, 10),
        RunRecord("spec", 0.0, "d", "", 0, 0, error="boom"),  # failed: no pair
        record("vanilla", "a", 1.0, 50, temperature=1.0),
        record("spec", "a", 1.0, 100, temperature=1.0),  # 2x tok/s
    ]
    assert sorted(paired_speedups(records, "spec", 0.0)) == [0.5, 2.0, 3.0, 4.0]
    assert paired_speedups(records, "spec", 1.0) == [2.0]
    s = spread(paired_speedups(records, "spec", 0.0))
    assert (s.median, s.q1, s.q3, s.min, s.max, s.n) == (2.5, 1.625, 3.25, 0.5, 4.0, 4)
    assert paired_speedup(1.0, 10, 2.0, 10) == 2.0
    with pytest.raises(ValueError, match="positive"):
        paired_speedup(0.0, 10, 1.0, 10)
    spec = next(s for s in summarize(records) if s.method == "spec" and s.temperature == 0.0)
    assert (spec.runs, spec.failed, spec.errors) == (5, 1, ["d@0: boom"])
    assert spread([]) is None


def test_tokens_per_forward_and_mismatch():
    # Plain decoding: one token per forward; prompt of 10, 4 new tokens.
    assert tokens_per_forward([0, 10, 11, 12], 10, 14) == [1, 1, 1, 1]
    # Tree loop: prefill emits 1, then steps accept 3 and 2 tokens, the last step emits 2.
    assert tokens_per_forward([0, 10, 13, 15], 10, 18) == [1, 3, 2, 2]
    # transformers' assisted decoding verifies candidates in its first forward: 3 tokens, then 1.
    assert tokens_per_forward([0, 12], 10, 14) == [3, 1]
    assert tokens_per_forward([], 10, 10) == []
    assert first_mismatch([1, 2, 3], [1, 2, 3]) is None
    assert first_mismatch([1, 2, 4], [1, 2, 3]) == 2
    assert first_mismatch([1, 2], [1, 2, 3]) == 2
    # A batch row's tokens end at its first end token: the padding after it is not the row's.
    assert row_tokens([5, 2, 0, 0], (2,)) == [5, 2] and row_tokens([5, 6], (2,)) == [5, 6]


# ------------------------------------------------------------------------------------------------ tree budget
def synthetic_acceptance(tree: SpeculativeConfig) -> float:
    """Tokens per step of a draft whose top-ranked candidates each hold the target's next token with probability
    1/2: a level of the tree with `width` siblings is accepted with probability 1 - 0.5^width, and the tree spreads
    its `total_tokens - 1` nodes over its levels."""
    width = min(tree.top_k, max(1, (tree.total_tokens - 1) // tree.depth))
    per_level = 1 - 0.5**width
    return 1 + sum(per_level**i for i in range(1, min(tree.depth, tree.total_tokens - 1) + 1))


def brute_force(curve, draft_per_level, plain_step, overhead):
    best = None
    for tree in candidate_trees():
        tokens = synthetic_acceptance(tree)
        value = tokens * plain_step / (curve.at(tree.total_tokens) + draft_per_level * tree.depth + overhead)
        if best is None or value > best[0] + 1e-12:
            best = (value, tree)
    return best


@pytest.mark.parametrize(
    ("slope", "sizes_ok"),
    [(0.12, lambda n: n <= 16), (0.0005, lambda n: n >= 64)],
    ids=["cpu-like-steep", "gpu-like-flat"],
)
def test_chooser_picks_the_known_optimum(slope, sizes_ok):
    sizes = (1, 2, 4, 8, 16, 32, 64, 96)
    curve = CostCurve(sizes, tuple(1.0 + slope * (q - 1) for q in sizes))
    estimates = [TreeEstimate(t, synthetic_acceptance(t), 0.05 * t.depth) for t in candidate_trees()]
    choice = choose_tree(estimates, curve, plain_step=1.1, overhead=0.1)
    value, optimum = brute_force(curve, 0.05, 1.1, 0.1)
    assert choice.tree == optimum
    assert choice.predicted_speedup == pytest.approx(value)
    assert choice.scored[0][1] >= choice.scored[-1][1]
    assert sizes_ok(choice.tree.total_tokens)  # small trees on a steep T(q), large ones on a flat one


def test_cost_curve_interpolates_and_predicts():
    curve = CostCurve((1, 8, 16), (1.0, 1.5, 3.0))
    assert curve.at(4) == pytest.approx(1 + 0.5 * 3 / 7)
    assert curve.at(24) == pytest.approx(4.5)  # extrapolated from the last segment
    assert curve.relative() == {1: 1.0, 8: 1.5, 16: 3.0}
    estimate = TreeEstimate(
        SpeculativeConfig(depth=4, top_k=2, total_tokens=8), tokens_per_step=3.0, draft_seconds=0.5
    )
    assert predict_speedup(estimate, curve, plain_step=1.0, overhead=0.0) == pytest.approx(3.0 / 2.0)
    with pytest.raises(ValueError, match="start"):
        CostCurve((2, 4), (1.0, 2.0))


def test_search_reaches_the_optimum_of_a_unimodal_landscape():
    def tokens(tree):  # peaks at depth 5, top_k 4, total_tokens 16
        return (
            10
            - (tree.depth - 5) ** 2 / 4
            - (math.log2(tree.top_k) - 2) ** 2
            - (math.log2(tree.total_tokens) - 4) ** 2 / 2
        )

    calls = []

    def estimate(tree):
        calls.append(tree)
        return TreeEstimate(tree, tokens(tree), 0.0)

    chain = SpeculativeConfig(depth=4, top_k=1, total_tokens=5)
    assert {(t.depth, t.top_k, t.total_tokens) for t in neighbours(chain, candidate_trees())} == {
        (3, 1, 4),
        (5, 1, 6),
        (4, 2, 4),
    }
    flat = CostCurve((1, 96), (1.0, 1.0))
    starts = [
        SpeculativeConfig(depth=4, top_k=1, total_tokens=5),
        SpeculativeConfig(depth=8, top_k=8, total_tokens=96),
    ]
    choice = search_tree(estimate, flat, 1.0, 0.0, starts=starts, lattice=candidate_trees(), budget=60)
    assert choice.tree == SpeculativeConfig(depth=5, top_k=4, total_tokens=16)
    assert len(calls) == len(set(calls)) <= 60  # each shape measured once
    small = search_tree(estimate, flat, 1.0, 0.0, starts=starts, lattice=candidate_trees(), budget=3)
    assert len(small.scored) == 3


def test_replay_accepts_what_the_loop_accepts(target, draft):
    for seed, tree in [
        (0, SpeculativeConfig(depth=4, top_k=1, total_tokens=5)),
        (1, SpeculativeConfig(depth=5, top_k=8, total_tokens=64)),
    ]:
        sample = Sample("s", "", make_inputs(seed, 5, True))
        out = speculative_generate(
            target,
            draft,
            **sample.inputs,
            max_new_tokens=30,
            do_sample=False,
            depth=tree.depth,
            tree_top_k=tree.top_k,
            total_tokens=tree.total_tokens,
        )
        emitted, seconds = replay(draft, target, replay_context(target, sample, out.sequences), tree)
        assert emitted == out.stats.accepted_lengths
        assert len(seconds) == len(emitted) and min(seconds) > 0


# ------------------------------------------------------------------------------------------------ inputs and errors
def test_jsonl_prompts_and_bad_rows(tmp_path):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    good = [
        {
            "image": "a.png",
            "conversations": [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Red."}],
        },
        {"image": "a.png", "prompt": "Describe it.", "kind": "long"},
        {"prompt": "No image here."},
    ]
    (tmp_path / "ok.jsonl").write_text("\n".join(json.dumps(r) for r in good) + "\n")
    prompts = load_prompts(str(tmp_path / "ok.jsonl"))
    assert [(p.question, p.reference, p.kind, p.image is not None) for p in prompts] == [
        ("What colour?", "Red.", "", True),
        ("Describe it.", None, "long", True),
        ("No image here.", None, "", False),
    ]
    assert prompts[0].chat()[0]["content"][0] == {"type": "image"}

    rows = [
        json.dumps(good[0]),
        '{"image": "a.png", "prompt": ',
        json.dumps({"image": "missing.png", "prompt": "x"}),
        json.dumps({"image": "a.png"}),
        json.dumps(good[1]),
    ]
    (tmp_path / "bad.jsonl").write_text("\n".join(rows) + "\n")
    with pytest.raises(PromptFileError) as err:
        load_prompts(str(tmp_path / "bad.jsonl"))
    message = str(err.value)
    assert "3 bad row(s)" in message
    assert "bad.jsonl:2: malformed JSON" in message
    assert "bad.jsonl:3: image not found" in message and "missing.png" in message
    assert "bad.jsonl:4:" in message
    assert "bad.jsonl:1:" not in message and "bad.jsonl:5:" not in message
    with pytest.raises(FileNotFoundError):
        load_prompts(str(tmp_path / "nowhere.jsonl"))


def test_dataset_prompts_from_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    image = Image.new("RGB", (8, 8), "blue")
    data = datasets.Dataset.from_dict(
        {"image": [image, image], "question": ["What colour?", "Is it round?"], "answer": ["Blue.", "No."]}
    )
    data.save_to_disk(str(tmp_path / "ds"))
    prompts = load_prompts(str(tmp_path / "ds"))
    assert [(p.id, p.question, p.reference) for p in prompts] == [
        ("ds:0", "What colour?", "Blue."),
        ("ds:1", "Is it round?", "No."),
    ]
    assert prompts[0].image.size == (8, 8)


def test_select_prompts_mixes_kinds():
    from specvlm_hf.benchmark.prompts import Prompt

    prompts = [Prompt(f"s{i}", "q", kind="short") for i in range(4)] + [Prompt("l0", "q", kind="long")]
    assert [p.id for p in select_prompts(prompts, 3)] == ["s0", "l0", "s1"]
    assert [p.id for p in select_prompts(prompts, None, "long")] == ["l0"]


def test_testbed_prompt_sources_split_shapes_from_cards():
    from specvlm_hf.benchmark.prompts import load_prompts
    from specvlm_hf.testbed import heldout_prompts

    shapes, cards = load_prompts("testbed"), load_prompts("testbed-cards")
    assert [(p.id, p.question) for p in shapes] == [
        (f"heldout:{i}", p.question) for i, p in enumerate(heldout_prompts())
    ]
    assert len({p.id for p in cards}) == len(cards) == len(heldout_prompts(cards=True)) - len(shapes)
    assert all("digit" in p.reference or "word" in p.reference for p in cards if p.kind == "long")
    text = load_prompts("testbed-text")
    assert [(p.question, p.kind) for p in text] == [(p.question, p.kind) for p in shapes]
    assert all(p.image is None and p.chat()[0]["content"] == [{"type": "text", "text": p.question}] for p in text)


def test_tree_calibration_prefers_long_answers():
    from specvlm_hf.benchmark.runner import select_prompt_sets

    config = BenchmarkConfig.quick_preset()  # the testbed's held-out set, 4 mixed prompts, one calibration prompt
    chosen, calibration, overlap = select_prompt_sets(config)
    assert {p.kind for p in chosen} == {"short", "long"} and not overlap
    assert [p.kind for p in calibration] == ["long"] and calibration[0] not in chosen


def test_unknown_method_lists_the_valid_ones(capsys):
    with pytest.raises(UnknownMethodError) as err:
        check_method_names(["vanilla", "medusa"])
    assert "medusa" in str(err.value) and all(name in str(err.value) for name in METHOD_NAMES)
    assert check_method_names(["eaglevlm-fixed"]) == ("vanilla", "eaglevlm-fixed")
    from specvlm_hf.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--methods", "vanilla,medusa"])
    assert exit_.value.code == 2
    assert "valid methods: vanilla, hf-assisted, prompt-lookup, eaglevlm" in capsys.readouterr().err


@pytest.mark.skipif(
    not (store.SHIPPED_QWEN2_VL_DRAFT_DIR / "config.json").is_file(), reason="no Qwen2-VL draft shipped in this checkout"
)
def test_without_methods_the_run_takes_those_that_apply_to_the_target(target):
    qwen, qwen_testbed = BenchmarkConfig(target="testbed-qwen2-vl"), store.SHIPPED_QWEN2_VL_DIR
    assert applicable_methods(qwen, None, qwen_testbed) == ("vanilla", "prompt-lookup", *DRAFT_METHODS)
    given = BenchmarkConfig(target="testbed-qwen2-vl", eagle3_draft="runs/e3", assistant="runs/lm")
    assert applicable_methods(given, None, qwen_testbed) == (
        "vanilla", "hf-assisted", "prompt-lookup", *DRAFT_METHODS, *EAGLE3_METHODS
    )  # fmt: skip
    assert applicable_methods(BenchmarkConfig(), target) == METHOD_NAMES  # the tiny LLaVA: a patch grid
    qwen_target = make_qwen_target("qwen2_vl")
    assert not set(COMPRESSOR_METHODS) & set(applicable_methods(BenchmarkConfig(), qwen_target))
    chosen = BenchmarkConfig(methods=("eaglevlm-auto",))
    assert applicable_methods(chosen, qwen_target) == ("vanilla", "eaglevlm-auto")


def test_earlier_method_and_tree_spellings_still_work_with_a_warning():
    with pytest.warns(FutureWarning, match="'eaglevlm-default' is now 'eaglevlm-auto'"):
        names = check_method_names(["eaglevlm", "eaglevlm-default", "specvlm", "specvlm-default", "eagle3-default"])
    assert names == ("vanilla", "eaglevlm-fixed", "eaglevlm-auto", "specvlm-fixed", "specvlm-auto", "eagle3-auto")
    with pytest.warns(FutureWarning, match="--tree auto is now --tree search"):
        config = BenchmarkConfig(tree="auto")
    assert config.tree == "search" and config.fixed_tree is None


def test_cli_help(capsys):
    from specvlm_hf.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for flag in (
        "--methods",
        "--num-samples",
        "--repeats",
        "--max-new-tokens",
        "--temperatures",
        "--batch-size",
        "--tree",
        "--draft",
        "--target",
        "--prompts",
        "--output",
        "--quick",
        "--device",
        "--dtype",
    ):
        assert flag in out
    assert " ".join(out.split()).count("(default: search)") == 1 and "default: 256" in out


def test_cli_reports_a_bad_prompt_file(tmp_path, capsys):
    from specvlm_hf.cli import main

    (tmp_path / "p.jsonl").write_text("not json\n")
    assert main(["bench", "--prompts", str(tmp_path / "p.jsonl"), "--target", str(tmp_path)]) == 2
    assert "p.jsonl:1: malformed JSON" in capsys.readouterr().err


class Flaky(Method):
    """Fails on the second sample it sees."""

    name = "flaky"

    def __init__(self):
        self.calls = 0

    def _generate(self, target, inputs, config, temperature):
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("out of luck")
        return target.generate(**inputs, generation_config=config), None


def test_method_result_reports_sigma(target):
    result = Vanilla().generate(target, make_inputs(0, 5, True), temperature=0.0, max_new_tokens=5)
    assert (result.new_tokens, result.target_forwards, result.mean_accepted_length) == (5, 5, 1.0)


def test_failing_method_is_recorded_and_the_run_goes_on(target):
    methods = {"vanilla": Vanilla(), "flaky": Flaky()}
    records = run_sweep(
        target,
        tiny_samples(3),
        methods,
        temperature=0.0,
        repeats=1,
        max_new_tokens=4,
        device=torch.device("cpu"),
        warmup_tokens=0,
    )
    flaky = [r for r in records if r.method == "flaky"]
    assert [r.ok for r in flaky] == [True, False, True]
    assert flaky[1].error == "RuntimeError: out of luck" and flaky[1].wall_time is None
    assert len(records) == 6
    summary = next(s for s in summarize(records) if s.method == "flaky")
    assert (summary.failed, summary.runs, summary.exact_match, summary.compared) == (1, 3, 2, 2)
    from specvlm_hf.benchmark.report import failure_lines, markdown_table

    assert "| flaky | 0 |" in markdown_table(summarize(records)) and "| 1/3 |" in markdown_table(summarize(records))
    assert any("out of luck" in line for line in failure_lines(summarize(records)))


# ------------------------------------------------------------------------------------------------ measurement
def test_meter_sees_a_transient_allocation_and_module_bytes_counts_storage_once():
    meter = Meter(torch.device("cpu"))
    if not meter.measures_memory:
        pytest.skip("the kernel does not allow resetting the resident-set high-water mark")
    m = meter.measure(lambda: float(torch.ones(16 * 2**20).sum()))  # 64 MiB, freed before returning
    assert m.value == 16 * 2**20 and m.seconds > 0
    assert m.transient_bytes >= 60 * 2**20
    linear = torch.nn.Linear(4, 4, bias=False)
    tied = torch.nn.Sequential(linear, linear)
    assert module_bytes(tied) == module_bytes(linear) == 4 * 4 * 4


def test_evaluate_metric_loads_by_local_path(monkeypatch):
    evaluate = pytest.importorskip("evaluate")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
    metric = evaluate.load(str(METRIC_DIR))
    predictions = [
        {"method": "eaglevlm-fixed", "wall_time": 1.0, "new_tokens": 12, "target_forwards": 4, "tokens": [5, 6, 7]},
        {"method": "eaglevlm-fixed", "wall_time": 0.5, "new_tokens": 12, "target_forwards": 3, "tokens": [5, 6, 9]},
        {"method": "prompt-lookup", "wall_time": 2.0, "new_tokens": 12, "target_forwards": 12, "tokens": [5, 6, 7]},
    ]
    references = [{"wall_time": 2.0, "new_tokens": 12, "tokens": [5, 6, 7]}] * 3
    result = metric.compute(predictions=predictions, references=references)
    assert result["eaglevlm-fixed"]["speedup_median"] == pytest.approx(3.0)  # 2x and 4x
    assert result["eaglevlm-fixed"]["mean_accepted_length"] == pytest.approx(24 / 7)
    assert (result["eaglevlm-fixed"]["exact_match"], result["eaglevlm-fixed"]["exact_match_rate"]) == (1, 0.5)
    assert result["prompt-lookup"]["speedup_median"] == pytest.approx(1.0)
    assert result["prompt-lookup"]["mean_accepted_length"] == pytest.approx(1.0)


def test_gpu_check_miniature_runs_on_cpu(tmp_path):
    from specvlm_hf.benchmark.gpu_check import run_check

    report = run_check(tmp_path, device="cpu", tiny=True, budget_s=600)  # the time boxes are upper bounds
    assert not any("error" in report[part] for part in ("lossless", "benchmark", "costs")), report
    for dtype in ("bfloat16", "float16"):
        assert report["lossless"][dtype]["compared"] >= 3
        assert 0.0 <= report["lossless"][dtype]["rate"] <= 1.0
    costs = report["costs"]
    assert list(costs["cost_curve_relative"])[:2] == [1, 2] and costs["cost_curve_relative"][1] == 1.0
    assert set(costs["loop"]) == {"chain", "tree", "wide"}
    assert all(0 <= loop["overhead_share"] < 1 for loop in costs["loop"].values())
    assert set(costs["draft_level_seconds"]) == {1, 2, 4, 8} and len(costs["auto_tree"]) == 3
    assert "auto tree picks" in (tmp_path / "gpu_check.md").read_text()
    assert json.loads((tmp_path / "gpu_check.json").read_text())["tiny"] is True
    assert "# GPU check" in (tmp_path / "gpu_check.md").read_text()
    assert (tmp_path / "benchmark" / "benchmark.json").is_file()


def test_assistant_trains_on_answers_and_assists_losslessly(tiny_testbed, tmp_path):
    from specvlm_hf.benchmark.assistant_lm import (
        AssistantConfig,
        assistant_conversations,
        build_assistant,
        encode_conversation,
        image_token_count,
        load_assistant,
        read_record,
    )
    from specvlm_hf.benchmark.methods import HFAssisted
    from specvlm_hf.benchmark.prompts import Prompt

    target, processor = tiny_testbed
    conversations = assistant_conversations(4, seed=1, testbed_dir=target.name_or_path)
    image_tokens = image_token_count(processor)
    encoded = encode_conversation(processor, image_tokens, conversations[0], max_length=4096)
    ids, labels = encoded["input_ids"], encoded["labels"]
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    assert ids.count(image_id) == image_tokens
    supervised = processor.tokenizer.decode([t for t, label in zip(ids, labels) if label != -100])
    turns = conversations[0][1]
    assert all(answer in supervised for _, answer in turns)
    assert not any(question.split("\n")[0] in supervised for question, _ in turns)
    assert supervised.count(processor.tokenizer.eos_token) == len(turns)

    config = AssistantConfig(max_steps=2, batch_size=2, conversations=4, warmup_steps=0)
    build_assistant(target, processor, conversations, tmp_path / "assistant", config)
    assert read_record(tmp_path / "assistant")["steps"] == 2
    assistant = load_assistant(tmp_path / "assistant", target)
    assert assistant.config.num_hidden_layers == 2

    inputs = Prompt("p", "What colour is the object?", Image.new("RGB", (48, 48), "red")).inputs(processor)
    assert int((inputs["input_ids"] == image_id).sum()) == image_tokens and "pixel_values" in inputs
    plain = Vanilla().generate(target, inputs, temperature=0.0, max_new_tokens=12)
    assisted = HFAssisted(assistant).generate(target, inputs, temperature=0.0, max_new_tokens=12)
    assert assisted.tokens == plain.tokens
