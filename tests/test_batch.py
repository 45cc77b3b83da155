"""Batches: `generate(**batch, assistant_model=...)` and `speculative_generate` on left-padded prompts give every row
what plain batched `generate()` gives it on the same batch (greedy, float32), token for token: rows with and without
images, rows that stop early (an end token, then padding; a stopping criterion or stop string without an end token,
then decoding on), `max_new_tokens` inside an accepted path, no `attention_mask`, one padded row; drafters that
accept different numbers of tokens per row and step (an oracle, a partly lying oracle, random trees, the real draft
on fixed trees and the auto tree, EAGLE-3, a visual compressor), on LLaVA, LLaVA-NeXT (an image size per row) and
Qwen2-VL / Qwen2.5-VL (image, video and text rows). The returned cache is plain decoding's, the statistics add up
per row, and at T > 0 each row passes the sampling certificate. Every architecture at batch 2 and 4:
`test_conformance.py`; random batches: `test_fuzz.py`."""

from __future__ import annotations

import pytest
import torch
from drafters import BatchOracleDraft, OracleDraft, PartialOracleDraft, RandomDraft, RowwiseDraft
from test_fuzz import tokenizer_for
from test_sampling import (
    DEPTH,
    HISTORY_FREE,
    N_OTHER_DRAFTS,
    NEW_TOKENS,
    WIDTH,
    ExactTarget,
    SamplingOracleDraft,
    V,
    assert_certified,
    certify,
)
from tiny import (
    VOCAB,
    left_pad,
    make_inputs,
    make_next_inputs,
    make_next_target,
    make_qwen_inputs,
    make_qwen_target,
    make_target,
)
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList

from specvlm_hf import (
    SpeculativeConfig,
    SpecVLMCompressor,
    SpecVLMCompressorConfig,
    SpecVLMDraftModel,
    speculative_generate,
)
from specvlm_hf.drafter import TreeDrafter

PAD = 0  # tiny.make_target's pad id
# (seed, text_len, image) per row: prompts of 20, 10, 22 and 2 tokens, so 2, 12, 0 and 20 padding slots.
ROWS = [(0, 3, True), (1, 9, False), (2, 5, True), (3, 1, False)]
NEW = 20
EOS = 2  # the config's end token, which these rows do not emit
ORACLE_TREE = SpeculativeConfig(5, 2, 11)
TREES = {"wide": SpeculativeConfig(3, 3, 8), "chain": SpeculativeConfig(5, 1, 5), "deep": SpeculativeConfig(6, 2, 12)}


@pytest.fixture(autouse=True)
def _one_thread():
    """The tiny targets' forwards are fastest on one thread (as in `test_sampling`)."""
    torch.set_num_threads(1)


def llava_batch(rows=ROWS, **kwargs) -> dict:
    return left_pad([make_inputs(*row) for row in rows], PAD, **kwargs)


def plain(target, batch: dict, n: int = NEW, **kwargs) -> torch.Tensor:
    return target.generate(**batch, max_new_tokens=n, do_sample=False, **kwargs)


def pads(batch: dict) -> list[int]:
    mask = batch.get("attention_mask")
    return [0] * batch["input_ids"].shape[0] if mask is None else (1 - mask).sum(dim=1).tolist()


def unpadded(batch: dict, sequences: torch.Tensor) -> list[list[int]]:
    """Each row of `sequences` without its left padding: what the loop's draft state of the row holds."""
    return [sequences[row, pad:].tolist() for row, pad in enumerate(pads(batch))]


def oracle(batch: dict, expected: torch.Tensor, config: SpeculativeConfig = ORACLE_TREE, truth: str = "random"):
    """A `BatchOracleDraft` knowing each row's continuation in `expected` (plain decoding's output for `batch`)."""
    return BatchOracleDraft(unpadded(batch, expected), VOCAB, config, seed=1, truth=truth)


def assert_same_rows(out: torch.Tensor, expected: torch.Tensor, case: str = "") -> None:
    """`out` is plain batched decoding's `expected`; otherwise fails naming the first row that differs and where."""
    assert out.shape == expected.shape, f"{case}: shape {tuple(out.shape)} instead of {tuple(expected.shape)}"
    for row in range(expected.shape[0]):
        differ = (out[row] != expected[row]).nonzero()
        if len(differ):
            i = int(differ[0])
            pytest.fail(
                f"{case}: row {row} differs first at sequence index {i}: {out[row, i : i + 4].tolist()} instead of "
                f"{expected[row, i : i + 4].tolist()}"
            )


def new_tokens(batch: dict, expected: torch.Tensor, eos: int | None = None) -> list[int]:
    """Per row, the tokens plain decoding generated: up to and including the first end token `eos`."""
    new = expected[:, batch["input_ids"].shape[1] :].tolist()
    return [row.index(eos) + 1 if eos in row else len(row) for row in new]


def assert_row_stats(stats, counts: list[int]) -> None:
    """The statistics of a batch add up per row: `counts[b]` new tokens in row `b`, the prefill's first token and
    then each step's accepted length (bonus included); the totals sum over rows."""
    assert stats.row_new_tokens == counts
    assert [sum(lengths) + 1 for lengths in stats.row_accepted_lengths] == counts
    assert stats.new_tokens == sum(counts)
    assert stats.accepted_lengths == [n for lengths in stats.row_accepted_lengths for n in lengths]
    assert stats.row_target_forwards == [len(lengths) + 1 for lengths in stats.row_accepted_lengths]
    assert stats.target_forwards == sum(stats.row_target_forwards)


def end_token(new: torch.Tensor, row: int, at: int = 2) -> int:
    """A token that row `row` of `new` (a free run's new tokens) emits at index `at` or later and no other row emits:
    an end token that stops that row alone."""
    others = set(torch.cat([new[:row], new[row + 1 :]]).flatten().tolist())
    return next(int(t) for t in new[row, at:] if int(t) not in others)


def assert_cache_is_plains(ours, theirs) -> None:
    assert len(ours.layers) == len(theirs.layers)
    for mine, plains in zip(ours.layers, theirs.layers):
        assert mine.keys.shape == plains.keys.shape
        torch.testing.assert_close(mine.keys, plains.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mine.values, plains.values, atol=1e-5, rtol=1e-5)


class StopOn(StoppingCriteria):
    """A user's criterion, row by row: a row is done once its last token is one of `tokens` (not an end-token
    criterion: plain decoding decodes a finished row on while others run)."""

    def __init__(self, *tokens: int):
        self.tokens = torch.tensor(tokens)

    def __call__(self, input_ids, scores, **kwargs):
        return torch.isin(input_ids[:, -1], self.tokens)


# ------------------------------------------------------------------------------------------------ LLaVA drafters
@pytest.mark.parametrize("rows", [2, 4])
@pytest.mark.parametrize("kind", ["oracle", "partial-oracle", "random"])
def test_drafters_match_plain_batched_generate(target, kind, rows):
    """An oracle (every row accepts whole paths), one that tells the truth for a random number of levels per row and
    step (rows accept different numbers of tokens: the cache's holes) and random trees (almost all rejected)."""
    batch = llava_batch(ROWS[:rows])
    expected = plain(target, batch, 30)
    if kind == "random":
        shapes = [(1, 1, 2), (3, 2, 6), (4, 3, 13), (7, 2, 16)]
        source = RowwiseDraft([RandomDraft(VOCAB, SpeculativeConfig(*shapes[row]), row) for row in range(rows)])
    else:
        source = oracle(batch, expected, SpeculativeConfig(5, 3, 14), "full" if kind == "oracle" else "random")
    out = speculative_generate(target, source, **batch, max_new_tokens=30, do_sample=False)
    assert_same_rows(out.sequences, expected, kind)
    assert_row_stats(out.stats, [30] * rows)
    steps = list(zip(*out.stats.row_accepted_lengths))
    if kind == "oracle":
        assert all(n == 6 for lengths in out.stats.row_accepted_lengths for n in lengths[:-1])
    if kind == "partial-oracle":
        assert sum(len(set(step)) > 1 for step in steps) >= 3  # rows accepted different lengths in one step


@pytest.mark.parametrize("tree", [*TREES, "auto"])
def test_real_draft_on_fixed_trees_and_the_auto_tree(target, draft, tree):
    """The real draft class (random weights): both entry points, three rows of different padding."""
    batch = llava_batch([ROWS[1], ROWS[0], ROWS[3]])
    expected = plain(target, batch)
    knobs = {} if tree == "auto" else dict(depth=TREES[tree].depth, total_tokens=TREES[tree].total_tokens)
    assistant = draft if tree == "auto" else draft.with_tree(tree_top_k=TREES[tree].top_k, **knobs)
    assert_same_rows(target.generate(**batch, max_new_tokens=NEW, do_sample=False, assistant_model=assistant),
                     expected, f"{tree} tree, generate()")  # fmt: skip
    tree_top_k = None if tree == "auto" else TREES[tree].top_k
    out = speculative_generate(target, draft, **batch, max_new_tokens=NEW, do_sample=False, tree_top_k=tree_top_k,
                               **knobs)  # fmt: skip
    assert_same_rows(out.sequences, expected, f"{tree} tree")
    assert_row_stats(out.stats, [NEW] * 3)


@pytest.mark.parametrize("family", ["eagle", "eagle3"])
def test_each_row_drafts_as_it_drafts_alone(target, draft, deep_target, eagle3_draft, family, monkeypatch):
    """The draft sees each row of a batch as that row alone (its padding masked, its own positions): at every root
    position where a row drafted in the batch and alone, the draft's log-probabilities for the root's children are the
    same within float rounding. (Output equality cannot tell: a worse draft only costs speed. Trees themselves are
    not compared: the batch's larger matmuls may round differently, which flips the random draft's near-ties.)"""
    from specvlm_hf.draft_step import LeanDraftForward

    target, draft = (deep_target, eagle3_draft) if family == "eagle3" else (target, draft)
    steps, roots = [], []  # per drafted step: [(root position, root log-probabilities)] per row
    propose, logits = TreeDrafter.propose_rows, LeanDraftForward.logits

    def recording_propose(self, states):
        roots.clear()
        proposed = propose(self, states)
        steps.append([(state.input_ids.shape[1] - 1, roots[0][i]) for i, state in enumerate(states)])
        return proposed

    def recording_logits(self, hidden):
        out = logits(self, hidden)
        if not roots:  # a step's first logits are the roots' (rows, vocab_size)
            roots.append(torch.log_softmax(out.float(), dim=-1))
        return out

    monkeypatch.setattr(TreeDrafter, "propose_rows", recording_propose)
    monkeypatch.setattr(LeanDraftForward, "logits", recording_logits)
    # One numerics for both (`auto` may choose per batch size, by measured costs).
    assistant = draft.with_tree(depth=4, tree_top_k=3, total_tokens=12, draft_numerics="reference")
    kwargs = dict(max_new_tokens=10, do_sample=False, eos_token_id=EOS, assistant_model=assistant)
    target.generate(**llava_batch(ROWS), **kwargs)
    batched = [step for step in steps if len(step) == len(ROWS)]  # the steps before a row left
    assert len(batched) >= 3
    for row, spec in enumerate(ROWS):
        steps.clear()
        target.generate(**make_inputs(*spec), **kwargs)
        alone = dict(step[0] for step in steps)
        compared = [position for position, _ in (step[row] for step in batched) if position in alone]
        assert len(compared) >= 2 and compared[0] == batched[0][row][0], f"row {row}: positions {compared}"
        for position, scores in (step[row] for step in batched):
            if position in alone:
                torch.testing.assert_close(scores, alone[position], atol=1e-4, rtol=0, msg=f"row {row} at {position}")


def test_eagle3_draft(deep_target, eagle3_draft):
    """EAGLE-3 (three target layers' states per row), on a fixed tree and the auto tree, with a row that stops at an
    end token (its draft cache rows leave the batch)."""
    batch = llava_batch(ROWS)
    free = plain(deep_target, batch)
    eos = end_token(free[:, batch["input_ids"].shape[1] :], 2)
    expected = plain(deep_target, batch, eos_token_id=eos)
    for assistant in (eagle3_draft.with_tree(depth=4, tree_top_k=2, total_tokens=8), eagle3_draft):
        out = deep_target.generate(**batch, max_new_tokens=NEW, do_sample=False, eos_token_id=eos,
                                   assistant_model=assistant)  # fmt: skip
        assert_same_rows(out, expected, "EAGLE-3")
    assert_same_rows(plain(deep_target, batch, assistant_model=eagle3_draft), free, "EAGLE-3, no end token")


def test_compressor_draft(target):
    """A draft with the elastic visual compressor: each row's prompt through it (a text-only first row), a row that
    stops at an end token."""
    compressor = SpecVLMCompressor(
        SpecVLMCompressorConfig(hidden_size=64, grid=[4, 4], branches=["pool:4", "resampler:2", "text"])
    ).eval()
    torch.manual_seed(0)
    draft = SpecVLMDraftModel.from_target(target).set_compressor(compressor)
    batch = llava_batch([ROWS[1], ROWS[0], ROWS[2]])
    free = plain(target, batch)
    eos = end_token(free[:, batch["input_ids"].shape[1] :], 1)
    for kwargs, expected in (({}, free), ({"eos_token_id": eos}, plain(target, batch, eos_token_id=eos))):
        for assistant in (draft.with_tree(depth=3, tree_top_k=3, total_tokens=8), draft):
            out = target.generate(**batch, max_new_tokens=NEW, do_sample=False, assistant_model=assistant, **kwargs)
            assert_same_rows(out, expected, f"compressor {kwargs}")
    assert sum(compressor.branch_counts.values()) >= 2


# ------------------------------------------------------------------------------------------------ stopping
@pytest.mark.parametrize("kind", ["oracle", "real", "auto"])
def test_an_end_token_stops_one_row(target, draft, kind):
    """Row 1 stops at an end token a few tokens in and is padded as plain decoding pads it; the others go on."""
    batch = llava_batch(ROWS)
    free = plain(target, batch, 30)
    eos = end_token(free[:, batch["input_ids"].shape[1] :], 1, at=3)
    expected = plain(target, batch, 30, eos_token_id=eos)
    assert (expected[1] == PAD).sum() > (batch["attention_mask"][1] == 0).sum()  # padded after its end token
    source = {"oracle": oracle(batch, expected), "real": draft.with_tree(depth=4, tree_top_k=3, total_tokens=10)}
    out = speculative_generate(target, source.get(kind, draft), **batch, max_new_tokens=30, do_sample=False,
                               eos_token_id=eos)  # fmt: skip
    assert_same_rows(out.sequences, expected, f"{kind}, end token {eos}")
    assert_row_stats(out.stats, new_tokens(batch, expected, eos))
    if kind == "oracle":  # row 1 drafted until it was done, then left the batch
        present = [1 in rows for rows in source["oracle"].drafters[0].steps]
        assert present == [True] * len(out.stats.row_accepted_lengths[1]) + [False] * (len(present) - sum(present))
        assert not present[-1]


@pytest.mark.parametrize("row", [0, 2])
def test_an_end_token_as_a_rows_first_token(target, draft, row):
    """A row whose first new token (the prefill's) is an end token is done before any draft step; the others go
    on."""
    batch = llava_batch(ROWS[:3])
    first = int(plain(target, batch, 1)[row, -1])
    expected = plain(target, batch, eos_token_id=first)
    assert expected[row, -NEW:].tolist() == [first] + [PAD] * (NEW - 1)
    out = target.generate(**batch, max_new_tokens=NEW, do_sample=False, eos_token_id=first,
                          assistant_model=draft.with_tree(depth=3, tree_top_k=2, total_tokens=6))  # fmt: skip
    assert_same_rows(out, expected, f"end token {first}")


def test_a_criterion_without_an_end_token_decodes_finished_rows_on(target, draft):
    """A user's criterion and no end token (`eos_token_id=None`): plain decoding decodes a finished row on while others
    run, and stops where the last row finished. Row 0 stops early, then every row stops before `max_new_tokens`."""
    batch = llava_batch(ROWS)
    prompt_len = batch["input_ids"].shape[1]
    new = plain(target, batch, 30)[:, prompt_len:]
    early = end_token(new, 0, at=2)
    cases = {"others run to the end": (early,), "all stop early": (early, *new[1:, 8].tolist())}
    for case, tokens in cases.items():
        expected = plain(target, batch, 30, eos_token_id=None, stopping_criteria=[StopOn(*tokens)])
        if case == "all stop early":
            assert expected.shape[1] < prompt_len + 30
        for source in (oracle(batch, expected), draft.with_tree(depth=4, tree_top_k=2, total_tokens=8)):
            out = plain(target, batch, 30, eos_token_id=None, stopping_criteria=[StopOn(*tokens)],
                        assistant_model=source)  # fmt: skip
            assert_same_rows(out, expected, case)


def test_statistics_add_up_when_finished_rows_decode_on(target):
    """No end token and a criterion that stops every row early: plain decoding stops where the last row finished, and
    the rows' tokens past that length are cut from the output. Each row's accepted lengths count the tokens it keeps
    (the prefill's and each step's), as they do when rows stop at an end token."""
    batch = llava_batch(ROWS)
    prompt_len = batch["input_ids"].shape[1]
    new = plain(target, batch, 30)[:, prompt_len:]
    criteria = [StopOn(end_token(new, 0, at=2), *new[1:, 8].tolist())]
    expected = plain(target, batch, 30, eos_token_id=None, stopping_criteria=criteria)
    source = oracle(batch, expected, truth="full")
    out = speculative_generate(target, source, **batch, max_new_tokens=30, do_sample=False, eos_token_id=None,
                               stopping_criteria=criteria)  # fmt: skip
    assert_same_rows(out.sequences, expected)
    assert_row_stats(out.stats, [expected.shape[1] - prompt_len] * len(ROWS))


def test_a_row_at_max_new_tokens_leaves_the_batch(target):
    """Without an end token a row that reached `max_new_tokens` can never grow the output: it leaves the batch
    (no more verification of it), and its accepted lengths add up to its new tokens. Row 0's drafts are all
    accepted, row 1's never."""
    batch = llava_batch(ROWS[:2])
    expected = plain(target, batch)
    references = unpadded(batch, expected)
    source = RowwiseDraft(
        [OracleDraft(references[0], VOCAB, ORACLE_TREE), PartialOracleDraft(references[1], VOCAB, ORACLE_TREE, 0)]
    )
    out = speculative_generate(target, source, **batch, max_new_tokens=NEW, do_sample=False)
    assert_same_rows(out.sequences, expected)
    assert len(out.stats.row_accepted_lengths[0]) <= 4  # 1 + 4 x 6 >= 20
    assert_row_stats(out.stats, [NEW, NEW])


@pytest.mark.parametrize("eos", [None, EOS])
def test_stop_strings(target, draft, eos):
    """A stop string that row 0 meets a few tokens in (a word-level tokenizer over the vocabulary), without an end
    token (row 0 decodes on) and with one (row 0 is padded)."""
    tokenizer = tokenizer_for(VOCAB)
    batch = llava_batch(ROWS[:3])
    prompt_len = batch["input_ids"].shape[1]
    free = plain(target, batch)
    text = tokenizer.decode(free[0, prompt_len + 2 : prompt_len + 5])
    others = [tokenizer.decode(free[row, prompt_len:]) for row in (1, 2)]
    stop = next(
        text[i : i + n]
        for n in (5, 4, 3)
        for i in range(len(text) - n + 1)
        if not any(text[i : i + n] in o for o in others)
    )
    kwargs = dict(stop_strings=[stop], tokenizer=tokenizer, eos_token_id=eos)
    expected = plain(target, batch, **kwargs)
    if eos is not None:
        assert (expected[0, prompt_len:] == PAD).any()  # row 0 stopped and was padded
    for source in (oracle(batch, expected), draft.with_tree(depth=4, tree_top_k=2, total_tokens=8)):
        out = speculative_generate(target, source, **batch, max_new_tokens=NEW, do_sample=False, **kwargs)
        assert_same_rows(out.sequences, expected, f"stop string {stop!r}")


@pytest.mark.parametrize("max_new_tokens", [1, 2, 5, 9, 13])
def test_max_new_tokens_inside_an_accepted_path(target, max_new_tokens):
    """An oracle accepted along whole paths (depth 6): the last step's path is cut where `max_new_tokens` ends."""
    batch = llava_batch(ROWS[:3])
    expected = plain(target, batch, max_new_tokens, eos_token_id=EOS)
    source = oracle(batch, plain(target, batch, 30), SpeculativeConfig(6, 2, 13), truth="full")
    out = speculative_generate(target, source, **batch, max_new_tokens=max_new_tokens, do_sample=False,
                               eos_token_id=EOS)  # fmt: skip
    assert_same_rows(out.sequences, expected, f"{max_new_tokens=}")
    assert_row_stats(out.stats, [max_new_tokens] * 3)


def test_history_dependent_processors(target, draft):
    """Processors that read each row's history (padding included, as plain decoding passes it), so the loop walks
    each row's tree node by node."""
    batch = llava_batch(ROWS)
    kwargs = dict(no_repeat_ngram_size=2, min_new_tokens=6, sequence_bias=[[[47], 3.0]], eos_token_id=[7, 9])
    expected = plain(target, batch, **kwargs)
    for source in (oracle(batch, expected), draft.with_tree(depth=4, tree_top_k=2, total_tokens=8)):
        out = speculative_generate(target, source, **batch, max_new_tokens=NEW, do_sample=False, **kwargs)
        assert_same_rows(out.sequences, expected, "processors")


@pytest.mark.parametrize("penalty", ["repetition_penalty", "encoder_repetition_penalty"])
def test_penalties_built_for_the_batch(target, draft, penalty):
    """generate() builds these two penalties for the whole batch (the prompt's padding per row to skip; the prompts'
    ids), and the loop calls them one row at a time: each row must still get plain decoding's penalty."""
    batch = llava_batch(ROWS[:3])
    expected = plain(target, batch, **{penalty: 1.8})
    out = target.generate(
        **batch,
        max_new_tokens=NEW,
        do_sample=False,
        assistant_model=draft.with_tree(depth=3, tree_top_k=2, total_tokens=6),
        **{penalty: 1.8},
    )
    assert_same_rows(out, expected, penalty)


# ------------------------------------------------------------------------------------------------ inputs
def test_batch_without_attention_mask(target, draft):
    """Rows of one length and no mask; padded rows and no mask (generate() infers it from the pad id)."""
    for case, rows in (("one length", [(4, 5, True), (5, 5, True), (6, 21, False)]), ("padded", ROWS[:3])):
        batch, masked = llava_batch(rows, attention_mask=False), llava_batch(rows)
        expected = plain(target, batch)
        assert torch.equal(expected, plain(target, masked))
        for source in (oracle(masked, expected), draft.with_tree(depth=3, tree_top_k=2, total_tokens=6), draft):
            out = target.generate(**batch, max_new_tokens=NEW, do_sample=False, assistant_model=source)
            assert_same_rows(out, expected, case)


def test_one_left_padded_row(target, draft):
    """A batch of one row with left padding: equal output and plain decoding's cache."""
    row = make_inputs(6, 4, True)
    batch = dict(row, input_ids=torch.nn.functional.pad(row["input_ids"], (3, 0), value=PAD),
                 attention_mask=torch.nn.functional.pad(torch.ones_like(row["input_ids"]), (3, 0)))  # fmt: skip
    kwargs = dict(max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True)
    expected = target.generate(**batch, **kwargs)
    for source in (oracle(batch, expected.sequences), draft.with_tree(depth=3, tree_top_k=2, total_tokens=6), draft):
        out = target.generate(**batch, **kwargs, assistant_model=source)
        assert_same_rows(out.sequences, expected.sequences, "one padded row")
        assert_cache_is_plains(out.past_key_values, expected.past_key_values)


@pytest.mark.parametrize("eos", [True, False])
def test_returned_cache_is_plain_decodings(target, draft, eos):
    """`return_dict_in_generate=True`: the cache has plain decoding's layout and entries, padding included, rows that
    finished early included (an end token: padded; a criterion alone: decoded on)."""
    batch = llava_batch(ROWS)
    new = plain(target, batch, 24)[:, batch["input_ids"].shape[1] :]
    early = [end_token(new, 1, at=3), end_token(new, 3, at=6)]
    if eos:
        kwargs = dict(eos_token_id=early)
    else:
        kwargs = dict(eos_token_id=None, stopping_criteria=StoppingCriteriaList([StopOn(*early)]))
    expected = target.generate(**batch, max_new_tokens=24, do_sample=False, return_dict_in_generate=True, **kwargs)
    for source in (oracle(batch, expected.sequences), draft.with_tree(depth=4, tree_top_k=2, total_tokens=8)):
        out = target.generate(**batch, max_new_tokens=24, do_sample=False, return_dict_in_generate=True,
                              assistant_model=source, **kwargs)  # fmt: skip
        assert_same_rows(out.sequences, expected.sequences, "cache")
        assert_cache_is_plains(out.past_key_values, expected.past_key_values)


# ------------------------------------------------------------------------------------------------ other architectures
def test_llava_next_rows_with_images_of_different_sizes():
    """AnyRes rows: one image 16x16, two of 6x20 and 16x16 (different crop counts, padded in the batch), none, one
    of 16x32; a row that stops at an end token."""
    target = make_next_target()
    torch.manual_seed(0)
    draft = SpecVLMDraftModel.from_target(target)
    sizes = [[[16, 16]], [[6, 20], [16, 16]], [], [[16, 32]]]
    batch = left_pad([make_next_inputs(target, s, seed=i, text_len=5) for i, s in enumerate(sizes)], PAD)
    free = plain(target, batch)
    eos = end_token(free[:, batch["input_ids"].shape[1] :], 1, at=3)
    for kwargs, expected in (({}, free), ({"eos_token_id": eos}, plain(target, batch, eos_token_id=eos))):
        for source in (oracle(batch, expected), draft.with_tree(depth=3, tree_top_k=3, total_tokens=8), draft):
            out = target.generate(**batch, max_new_tokens=NEW, do_sample=False, assistant_model=source, **kwargs)
            assert_same_rows(out, expected, f"LLaVA-NeXT {kwargs}")


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_rows_of_an_image_a_video_and_text(kind):
    """M-RoPE rows (an image, a video at 2 s per temporal grid on Qwen2.5-VL, text only); the video row stops at an
    end token and leaves the batch; the returned cache is plain decoding's."""
    target = make_qwen_target(kind)
    torch.manual_seed(0)
    draft = SpecVLMDraftModel.from_target(target)
    seconds = 2.0 if kind == "qwen2_5_vl" else None
    rows = [
        make_qwen_inputs([("text", 3), ("image", (1, 4, 6)), ("text", 3)], seed=1),
        make_qwen_inputs([("text", 2), ("video", (2, 4, 4)), ("text", 3)], seed=2, seconds_per_grid=seconds),
        make_qwen_inputs([("text", 5)], seed=3),
    ]
    batch = left_pad(rows, target.generation_config.pad_token_id)
    free = plain(target, batch)
    eos = end_token(free[:, batch["input_ids"].shape[1] :], 1, at=3)
    for kwargs in ({}, {"eos_token_id": eos}):
        expected = target.generate(**batch, max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True,
                                   **kwargs)  # fmt: skip
        for source in (
            oracle(batch, expected.sequences),
            draft.with_tree(depth=3, tree_top_k=3, total_tokens=8),
            draft,
        ):
            out = target.generate(**batch, max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True,
                                  assistant_model=source, **kwargs)  # fmt: skip
            assert_same_rows(out.sequences, expected.sequences, f"{kind} {kwargs}")
            assert_cache_is_plains(out.past_key_values, expected.past_key_values)


# ------------------------------------------------------------------------------------------------ sampling
def test_sampling_keeps_each_rows_distribution():
    """T > 0 at batch 2 (a text row padded to an image row): each row's new tokens pass the sampling certificate
    against that row's exact conditionals, with an oracle drafting from them (long paths accepted) and with the real
    draft through generate()."""
    target = make_target(seed=1, vocab=V, logit_scale=9.0, layers=1)
    rows = [make_inputs(1, 3, False, vocab=V), make_inputs(2, 3, True, vocab=V)]
    batch = left_pad(rows, PAD)
    exact = [ExactTarget(target, row, HISTORY_FREE) for row in rows]
    kwargs = HISTORY_FREE.generate_kwargs()

    def draw(generate, seed: int) -> list[list[tuple[int, ...]]]:
        torch.manual_seed(seed)
        samples = [[], []]
        for _ in range(N_OTHER_DRAFTS):
            sequences = generate()
            for row in (0, 1):
                samples[row].append(tuple(sequences[row, -NEW_TOKENS:].tolist()))
        return samples

    source = RowwiseDraft([SamplingOracleDraft(e, DEPTH, WIDTH, seed=row) for row, e in enumerate(exact)])
    accepted = []

    def speculative():
        out = speculative_generate(target, source, **batch, **kwargs)
        accepted.extend(out.stats.accepted_lengths)
        return out.sequences

    for row, samples in enumerate(draw(speculative, seed=2)):
        assert_certified(certify(samples, exact[row]))
    assert sum(n > 2 for n in accepted) >= N_OTHER_DRAFTS  # long paths accepted
    draft = SpecVLMDraftModel.from_target(target)
    for row, samples in enumerate(draw(lambda: target.generate(**batch, **kwargs, assistant_model=draft), seed=5)):
        assert_certified(certify(samples, exact[row]))


def test_sampling_certificate_tells_the_rows_apart():
    """The per-row certificate has the power to catch a row decoded with another row's distribution: row 0's plain
    samples fail against row 1's conditionals."""
    target = make_target(seed=1, vocab=V, logit_scale=9.0, layers=1)
    rows = [make_inputs(1, 3, False, vocab=V), make_inputs(2, 3, True, vocab=V)]
    batch = left_pad(rows, PAD)
    torch.manual_seed(7)
    samples = [tuple(target.generate(**batch, **HISTORY_FREE.generate_kwargs())[0, -NEW_TOKENS:].tolist())
               for _ in range(N_OTHER_DRAFTS)]  # fmt: skip
    assert_certified(certify(samples, ExactTarget(target, rows[0], HISTORY_FREE)))
    assert not all(check.passed for check in certify(samples, ExactTarget(target, rows[1], HISTORY_FREE)))
