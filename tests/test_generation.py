"""LOSSLESS: tree speculative decoding returns exactly `target.generate(do_sample=False)` (float32) on LLaVA, for a
real draft, a random drafter (mostly rejected) and an oracle drafter (long paths accepted), across prompts, tree
shapes, attention kernels, EOS inside the tree and generate() arguments (processors, streamers, scores). The oracle's
accepted length and max_new_tokens inside a path, for every architecture: `test_conformance.py`."""

import itertools

import pytest
import torch
from drafters import OracleDraft, RandomDraft
from tiny import IMAGE_TOKEN, VOCAB, make_inputs

from specvlm_hf import SpeculativeConfig, SpecVLMDraftModel, speculative_generate

SHAPES = {
    "chain": SpeculativeConfig(depth=4, top_k=1, total_tokens=5),
    "wide": SpeculativeConfig(depth=2, top_k=6, total_tokens=16),
    "deep": SpeculativeConfig(depth=7, top_k=2, total_tokens=20),
    "default": SpeculativeConfig(depth=5, top_k=4, total_tokens=24),
}
PROMPTS = [(seed, text_len, image) for seed, (text_len, image) in
           enumerate(itertools.product([1, 5, 11], [True, False]))]  # fmt: skip


def greedy(target, inputs, max_new_tokens, **kwargs):
    return target.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, **kwargs)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("seed", "text_len", "image"), PROMPTS)
def test_real_draft_matches_greedy(target, draft, shape, seed, text_len, image):
    inputs = make_inputs(seed, text_len, image)
    reference = greedy(target, inputs, 24)
    cfg = SHAPES[shape]
    out = speculative_generate(
        target,
        draft,
        **inputs,
        max_new_tokens=24,
        do_sample=False,
        depth=cfg.depth,
        tree_top_k=cfg.top_k,
        total_tokens=cfg.total_tokens,
    )
    assert torch.equal(out.sequences, reference)
    assert out.stats.new_tokens == 24
    assert sum(out.stats.accepted_lengths) + 1 == 24


@pytest.mark.parametrize("kind", ["oracle", "random"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("seed", "text_len", "image"), PROMPTS[::2])
def test_doubles_match_greedy(target, kind, shape, seed, text_len, image):
    inputs = make_inputs(seed, text_len, image)
    reference = greedy(target, inputs, 30)
    cfg = SHAPES[shape]
    source = (
        OracleDraft(reference[0].tolist(), VOCAB, cfg, seed) if kind == "oracle" else RandomDraft(VOCAB, cfg, seed)
    )
    out = speculative_generate(target, source, **inputs, max_new_tokens=30, do_sample=False)
    assert torch.equal(out.sequences, reference)
    if kind == "oracle":
        # Every drafted path is the truth: each step accepts min(depth, what is left) drafts plus the bonus.
        assert out.stats.mean_accepted_length > min(cfg.depth, cfg.total_tokens - 1) * 0.7


@pytest.mark.parametrize("kind", ["oracle", "real"])
@pytest.mark.parametrize("eos_at", [0, 1, 3, 8, 13])
def test_eos_inside_the_tree(target, draft, kind, eos_at):
    inputs = make_inputs(7, 4, True)
    free = greedy(target, inputs, 20)[0, inputs["input_ids"].shape[1] :].tolist()
    eos = free[eos_at]
    reference = greedy(target, inputs, 20, eos_token_id=eos)
    assert reference[0, -1] == eos and reference.shape[1] == inputs["input_ids"].shape[1] + free.index(eos) + 1
    cfg = SpeculativeConfig(depth=6, top_k=2, total_tokens=14)
    source = OracleDraft(free, VOCAB, cfg) if kind == "oracle" else draft.with_tree(depth=6, tree_top_k=2, total_tokens=14)
    # The oracle must see the prompt too to index the continuation.
    if kind == "oracle":
        source.reference = inputs["input_ids"][0].tolist() + free
    out = speculative_generate(target, source, **inputs, max_new_tokens=20, do_sample=False, eos_token_id=eos)
    assert torch.equal(out.sequences, reference)


@pytest.mark.parametrize("seed", range(4))
def test_eager_attention_matches_greedy(eager_target, seed):
    inputs = make_inputs(seed, 6, seed % 2 == 0)
    reference = greedy(eager_target, inputs, 20)
    draft = SpecVLMDraftModel.from_target(eager_target)
    out = speculative_generate(eager_target, draft, **inputs, max_new_tokens=20, do_sample=False)
    assert torch.equal(out.sequences, reference)
    source = OracleDraft(greedy(eager_target, inputs, 40)[0].tolist(), VOCAB, SpeculativeConfig(5, 3, 16))
    assert torch.equal(speculative_generate(eager_target, source, **inputs, max_new_tokens=20).sequences, reference)


def test_generate_with_assistant_model_runs_the_tree_loop(target, draft):
    inputs = make_inputs(2, 5, True)
    reference = greedy(target, inputs, 16)
    out = target.generate(
        **inputs,
        assistant_model=draft,
        max_new_tokens=16,
        do_sample=False,
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
    )
    assert torch.equal(out.sequences, reference)
    assert out.speculative_stats.new_tokens == 16
    assert len(out.scores) == len(out.logits) == 16
    plain = target.generate(
        **inputs, max_new_tokens=16, do_sample=False, return_dict_in_generate=True, output_scores=True
    )
    for ours, theirs in zip(out.scores, plain.scores):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_logits_processors_follow_each_path(target, draft):
    inputs = make_inputs(4, 6, True)
    kwargs = dict(
        max_new_tokens=24,
        do_sample=False,
        repetition_penalty=1.8,
        no_repeat_ngram_size=2,
        min_new_tokens=10,
        suppress_tokens=[5, 6],
        eos_token_id=[7, 9],
    )
    reference = target.generate(**inputs, **kwargs)
    source = OracleDraft(reference[0].tolist(), VOCAB, SpeculativeConfig(5, 3, 16))
    assert torch.equal(speculative_generate(target, source, **inputs, **kwargs).sequences, reference)
    assert torch.equal(target.generate(**inputs, assistant_model=draft, **kwargs), reference)


def test_streamers_receive_every_token(target, draft):
    from transformers.generation.streamers import BaseStreamer

    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value.flatten().tolist())

        def end(self):
            self.ended = True

    inputs = make_inputs(5, 4, True)
    reference = greedy(target, inputs, 18)
    streamer = Collect()
    out = target.generate(**inputs, assistant_model=draft, max_new_tokens=18, do_sample=False, streamer=streamer)
    assert torch.equal(out, reference)
    assert streamer.ended
    assert sum(streamer.chunks, []) == reference[0].tolist()  # the prompt first, then the new tokens in order


def test_image_tokens_are_never_confused_with_text(target, draft):
    # The same text with another image changes the continuation: the loop really scatters the image features.
    a = make_inputs(0, 5, True)
    b = dict(a, pixel_values=torch.randn_like(a["pixel_values"]))
    out_a = speculative_generate(target, draft, **a, max_new_tokens=12, do_sample=False).sequences
    out_b = speculative_generate(target, draft, **b, max_new_tokens=12, do_sample=False).sequences
    assert torch.equal(out_a, greedy(target, a, 12)) and torch.equal(out_b, greedy(target, b, 12))
    assert not torch.equal(out_a, out_b)
    assert (a["input_ids"] == IMAGE_TOKEN).sum() == 16


@pytest.mark.parametrize("seed", range(40))
def test_emitting_a_path_at_once_equals_emitting_it_token_by_token(seed):
    """`Emitter.emit_path` without per-token work (only length and end-token criteria) appends the same tokens and
    finishes at the same length as `emit` called per token, whatever the end tokens, the (several) max lengths and
    where they fall in the path."""
    from transformers import GenerationConfig
    from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria, StoppingCriteriaList

    from specvlm_hf.loop import Emitter

    rng = torch.Generator().manual_seed(seed)
    start = int(torch.randint(1, 6, (1,), generator=rng))
    criteria = StoppingCriteriaList(
        [MaxLengthCriteria(start + int(torch.randint(0, 8, (1,), generator=rng))) for _ in range(1 + seed % 2)]
    )
    if seed % 3:
        criteria.append(EosTokenCriteria(torch.randint(0, 6, (1 + seed % 2,), generator=rng)))
    config = GenerationConfig()
    tokens = torch.randint(0, 6, (1 + seed % 7,), generator=rng).tolist()
    scores = torch.zeros(len(tokens), 6)
    ids = torch.zeros(1, start, dtype=torch.long)
    fast, slow = Emitter(ids, criteria, config), Emitter(ids, criteria, config)
    assert not fast._per_token
    n = fast.emit_path(tokens, list(range(len(tokens))), scores, scores)
    slow._per_token = True
    assert slow.emit_path(tokens, list(range(len(tokens))), scores, scores) == n
    assert fast.input_ids.tolist() == slow.input_ids.tolist()
    assert (fast.finished, fast.finished_length, fast.done) == (slow.finished, slow.finished_length, slow.done)
