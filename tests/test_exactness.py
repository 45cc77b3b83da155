"""Less common generate() arguments behave exactly as in plain generate() (float32, greedy unless stated), or are
refused with an error naming them: the returned cache, user stopping criteria and EOS at every offset of an accepted
path, tensor EOS, stateful and history-free processors, classifier-free guidance, sliding windows, a caller's cache,
the tree's width knob, the sampling residual, stock speculative options, and the generate() route on an untested
transformers."""

import copy

import pytest
import torch
from drafters import OracleDraft
from tiny import VOCAB, make_inputs, make_target
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.generation.stopping_criteria import (
    EosTokenCriteria,
    MaxLengthCriteria,
    StoppingCriteria,
    StoppingCriteriaList,
)

import specvlm_hf.loop
import specvlm_hf.verify
from specvlm_hf import DraftSource, SpeculativeConfig, SpecVLMDraftModel, integration, speculative_generate
from specvlm_hf._compat import CACHE_KWARG
from specvlm_hf.drafter import Drafter
from specvlm_hf.tree import build_tree
from specvlm_hf.verify import accept_node, accept_sampling


@pytest.fixture(scope="module")
def inputs():
    return make_inputs(3, 5, True)


@pytest.fixture(scope="module")
def oracle(target, inputs):
    """A drafter whose deep paths are accepted, so generation stops inside an accepted path."""
    full = target.generate(**inputs, max_new_tokens=60, do_sample=False)[0].tolist()
    return OracleDraft(full, VOCAB, SpeculativeConfig(depth=6, top_k=2, total_tokens=12))


def both(target, source, inputs, **kwargs):
    """(plain generate(), generate(assistant_model=source)) with the same arguments."""
    plain = target.generate(**inputs, do_sample=False, **copy.deepcopy(kwargs))
    ours = target.generate(**inputs, do_sample=False, assistant_model=source, **copy.deepcopy(kwargs))
    return plain, ours


def cache_of(output):
    return getattr(output, CACHE_KWARG)


def next_logits(target, sequences, cache):
    """The target's logits after `sequences`, continuing from `cache` (which holds all positions but the last)."""
    position = torch.tensor([[sequences.shape[1] - 1]])
    out = target(input_ids=sequences[:, -1:], position_ids=position, **{CACHE_KWARG: copy.deepcopy(cache)})
    return out.logits[0, -1]


# The returned cache --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("max_new_tokens", [1, 3, 8, 9])
@pytest.mark.parametrize("stop", ["max_new_tokens", "eos"])
def test_returned_cache_is_cut_to_the_returned_sequence(target, inputs, oracle, max_new_tokens, stop):
    kwargs = dict(max_new_tokens=max_new_tokens, return_dict_in_generate=True)
    if stop == "eos":
        free = target.generate(**inputs, max_new_tokens=20, do_sample=False)[0, inputs["input_ids"].shape[1] :]
        kwargs.update(max_new_tokens=20, eos_token_id=int(free[max_new_tokens - 1]))
    plain, ours = both(target, oracle, inputs, **kwargs)
    assert torch.equal(ours.sequences, plain.sequences)
    assert cache_of(ours).get_seq_length() == cache_of(plain).get_seq_length() == plain.sequences.shape[1] - 1
    torch.testing.assert_close(
        next_logits(target, ours.sequences, cache_of(ours)),
        next_logits(target, plain.sequences, cache_of(plain)),
        atol=1e-4,
        rtol=1e-4,
    )


# Stopping criteria ---------------------------------------------------------------------------------------------------
class Recorder(StoppingCriteria):
    """Stops after `after` calls; records what each call received."""

    def __init__(self, after: int):
        self.after, self.calls = after, []

    def __call__(self, input_ids, scores, **kwargs):
        self.calls.append((input_ids.shape[1], None if scores is None else len(scores)))
        return torch.full((input_ids.shape[0],), len(self.calls) >= self.after, dtype=torch.bool)


@pytest.mark.parametrize(
    "criteria",
    [
        lambda free: EosTokenCriteria(eos_token_id=free[4]),
        lambda free: EosTokenCriteria(eos_token_id=torch.tensor([free[5], 90])),
        lambda free: MaxLengthCriteria(max_length=30),
    ],
    ids=["eos", "eos-tensor", "max-length"],
)
def test_user_stopping_criteria_of_stock_types_are_kept(target, inputs, oracle, criteria):
    free = target.generate(**inputs, max_new_tokens=20, do_sample=False)[0, inputs["input_ids"].shape[1] :].tolist()
    kwargs = dict(max_new_tokens=20, stopping_criteria=StoppingCriteriaList([criteria(free)]))
    plain, ours = both(target, oracle, inputs, **kwargs)
    assert plain.shape[1] < inputs["input_ids"].shape[1] + 20  # the user's criterion did stop plain decoding early
    assert torch.equal(ours, plain)


@pytest.mark.parametrize("output_scores", [False, True])
def test_custom_criteria_are_called_as_plain_generate_calls_them(target, inputs, oracle, output_scores):
    free = target.generate(**inputs, max_new_tokens=20, do_sample=False)[0, inputs["input_ids"].shape[1] :].tolist()
    eos = next(token for i, token in enumerate(free) if i >= 4 and free.index(token) == i)
    recorders = {}
    for name in ("plain", "ours"):
        recorders[name] = Recorder(after=100)
        kwargs = dict(
            max_new_tokens=20,
            eos_token_id=eos,  # EOS fires inside an accepted path: the criteria after it are still called
            stopping_criteria=StoppingCriteriaList([recorders[name]]),
            return_dict_in_generate=True,
            output_scores=output_scores,
        )
        source = oracle if name == "ours" else None
        target.generate(**inputs, do_sample=False, assistant_model=source, **kwargs)
    assert recorders["ours"].calls == recorders["plain"].calls
    assert len(recorders["plain"].calls) == free.index(eos) + 1
    assert (recorders["plain"].calls[0][1] is None) is (not output_scores)


def test_a_criterion_that_stops_after_n_calls(target, inputs, oracle):
    plain, ours = both(target, oracle, inputs, max_new_tokens=20, stopping_criteria=[Recorder(after=5)])
    assert plain.shape[1] == inputs["input_ids"].shape[1] + 5
    assert torch.equal(ours, plain)


@pytest.fixture(scope="module")
def varied(target):
    """A prompt whose first 14 greedy tokens are all distinct (an end token placed at any of them stops plain decoding
    there), its greedy continuation, and an oracle whose paths of depth 6 are accepted whole."""
    inputs = make_inputs(21, 6, True)
    full = target.generate(**inputs, max_new_tokens=60, do_sample=False)[0].tolist()
    new = full[inputs["input_ids"].shape[1] :]
    assert len(set(new[:14])) == 14
    return inputs, new, OracleDraft(full, VOCAB, SpeculativeConfig(depth=6, top_k=2, total_tokens=12))


class Unchanged(LogitsProcessor):
    """Returns the scores as they are; not a history-free type, so the loop calls it node by node."""

    def __call__(self, input_ids, scores):
        return scores


@pytest.mark.parametrize("offset", range(7))
@pytest.mark.parametrize("stop", ["eos", "criterion"])
@pytest.mark.parametrize("walk", ["batched", "node-by-node"])
def test_a_stop_at_every_offset_of_an_accepted_path(target, varied, walk, stop, offset):
    """The first verification step accepts the oracle's whole path (6 drafts and the target's own token); an end
    token, or a criterion, fires at the token chosen at node `offset` of that path: emission stops there, mid-path,
    with output and returned cache as plain decoding's, whether the nodes' scores are processed at once or one
    node at a time (`walk_tree`)."""
    inputs, new, oracle = varied
    if stop == "eos":
        kwargs = dict(eos_token_id=new[1 + offset])  # new[0] comes from the prefill's logits, new[1:8] from the path
    else:
        kwargs = dict(stopping_criteria=StoppingCriteriaList([Recorder(after=2 + offset)]))
    if walk == "node-by-node":
        kwargs["logits_processor"] = [Unchanged()]
    plain, ours = both(target, oracle, inputs, max_new_tokens=20, return_dict_in_generate=True, **kwargs)
    assert plain.sequences.shape[1] == inputs["input_ids"].shape[1] + 2 + offset
    assert torch.equal(ours.sequences, plain.sequences)
    assert ours.speculative_stats.accepted_lengths == [offset + 1]
    assert cache_of(ours).get_seq_length() == cache_of(plain).get_seq_length()


# EOS -----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("as_tensor", [lambda t: torch.tensor([t]), lambda t: torch.tensor([t, 3]), lambda t: [90, t]])
def test_eos_token_id_as_a_tensor_or_list(target, inputs, oracle, draft, as_tensor):
    free = target.generate(**inputs, max_new_tokens=20, do_sample=False)[0, inputs["input_ids"].shape[1] :].tolist()
    for source in (oracle, draft):
        plain, ours = both(target, source, inputs, max_new_tokens=20, eos_token_id=as_tensor(free[5]))
        assert plain.shape[1] <= inputs["input_ids"].shape[1] + 6
        assert torch.equal(ours, plain)


# Logits processors ---------------------------------------------------------------------------------------------------
class CountingPenalty(LogitsProcessor):
    """Stateful on purpose: penalises the token it saw last call, and counts its calls."""

    def __init__(self):
        self.calls, self.last = 0, None

    def __call__(self, input_ids, scores):
        self.calls += 1
        scores = scores.clone()
        if self.last is not None:
            scores[:, self.last] -= 3.0
        self.last = int(input_ids[0, -1])
        return scores


@pytest.mark.parametrize("source_kind", ["oracle", "draft"])
def test_stateful_user_processor_is_called_once_per_token(target, inputs, oracle, draft, source_kind):
    source = oracle if source_kind == "oracle" else draft
    plain_proc, our_proc = CountingPenalty(), CountingPenalty()
    plain = target.generate(**inputs, max_new_tokens=16, do_sample=False, logits_processor=[plain_proc])
    ours = target.generate(
        **inputs, max_new_tokens=16, do_sample=False, logits_processor=[our_proc], assistant_model=source
    )
    assert torch.equal(ours, plain)
    assert our_proc.calls == plain_proc.calls == 16


class NeedsExtra(LogitsProcessor):
    """Takes an argument beyond `(input_ids, scores)`, which `generate()` never passes."""

    def __call__(self, input_ids, scores, extra):
        return scores


def test_processors_are_inspected_as_plain_decoding_inspects_them(target, inputs, draft):
    """A processor taking more than `(input_ids, scores)` raises as in plain decoding, every call (the inspection is
    kept per class); one that does not is applied without `LogitsProcessorList`'s inspection."""
    fixed = draft.with_tree(depth=3, tree_top_k=2, total_tokens=6)  # a fixed tree: the loop itself runs
    kwargs = dict(max_new_tokens=6, do_sample=False)
    with pytest.raises(ValueError, match="NeedsExtra") as plain:
        target.generate(**inputs, **kwargs, logits_processor=[NeedsExtra()])
    for _ in range(2):
        with pytest.raises(ValueError, match="NeedsExtra") as ours:
            target.generate(**inputs, **kwargs, logits_processor=[NeedsExtra()], assistant_model=fixed)
        assert str(ours.value) == str(plain.value)
    counting = LogitsProcessorList([CountingPenalty()])
    assert isinstance(specvlm_hf.loop.without_inspection(counting), specvlm_hf.loop.Processors)
    extra = LogitsProcessorList([CountingPenalty(), NeedsExtra()])
    assert specvlm_hf.loop.without_inspection(extra) is extra


class SiblingsDraft(DraftSource):
    """An oracle whose tree holds, at each of `depth` levels under the true token, the `siblings` and then the
    reference's next token (`reference[len(ids):]`)."""

    def __init__(self, reference: list[int], siblings: list[int], depth: int):
        self.reference, self.siblings = reference, siblings
        width = len(siblings) + 1
        self.speculative_config = SpeculativeConfig(depth=depth, top_k=width, total_tokens=1 + depth * width)

    def new_drafter(self, target) -> Drafter:
        return _SiblingsDrafter(self)


class _SiblingsDrafter(Drafter):
    def __init__(self, source: SiblingsDraft):
        self.source = source

    def propose(self, state):
        ids = state.input_ids[0].tolist()
        tokens, parents, parent = [ids[-1]], [-1], 0
        for token in self.source.reference[len(ids) : len(ids) + self.source.speculative_config.depth]:
            level = [t for t in self.source.siblings if t != token] + [token]
            tokens += level
            parents += [parent] * len(level)
            parent = len(tokens) - 1
        return build_tree(torch.tensor(tokens), parents)


def test_history_free_processors_score_every_node_at_once(target, varied, monkeypatch):
    """`suppress_tokens` alone is history-free (`is_history_free`): each step's nodes are processed in one call and
    accepted by `accept_greedy`, never node by node, and the output is plain greedy's. Every level of the tree holds
    the suppressed tokens beside the true one, and the target prefers them at some nodes: a node whose scores were
    not processed would accept one or emit one."""
    inputs, new, _ = varied
    suppressed = new[12:14]  # greedy loops on these two from its 13th token on
    kwargs = dict(max_new_tokens=24, do_sample=False, suppress_tokens=suppressed)
    plain = target.generate(**inputs, **kwargs)
    emitted = plain[0, inputs["input_ids"].shape[1] :].tolist()
    assert emitted[:12] == new[:12] and emitted[12] != new[12]  # suppression changes a token a tree node chooses
    source = SiblingsDraft(plain[0].tolist(), suppressed, depth=5)
    greedy_calls = []

    def accept_greedy(tree, target_tokens):
        greedy_calls.append(tree.num_nodes)
        return specvlm_hf.verify.accept_greedy(tree, target_tokens)

    def accept_node(*args):
        raise AssertionError("history-free processors were called node by node")

    monkeypatch.setattr(specvlm_hf.loop, "accept_greedy", accept_greedy)
    monkeypatch.setattr(specvlm_hf.loop, "accept_node", accept_node)
    out = speculative_generate(target, source, **inputs, **kwargs)
    assert torch.equal(out.sequences, plain)
    assert len(greedy_calls) == out.stats.target_forwards  # every step's tree, the prefill's root alone included
    assert max(greedy_calls) == source.speculative_config.total_tokens
    assert out.stats.mean_accepted_length > 4


def test_classifier_free_guidance_matches(target, draft):
    text_only = make_inputs(4, 6, False)  # the unconditional pass reruns the target on text alone
    full = target.generate(**text_only, max_new_tokens=30, do_sample=False, guidance_scale=1.5)[0].tolist()
    oracle = OracleDraft(full, VOCAB, SpeculativeConfig(depth=5, top_k=2, total_tokens=10))
    for source in (oracle, draft):
        plain, ours = both(target, source, text_only, max_new_tokens=14, guidance_scale=1.5)
        assert torch.equal(ours, plain)
        negative = {"negative_prompt_ids": torch.tensor([[1, 7, 8]]), "guidance_scale": 2.0}
        assert torch.equal(*both(target, source, text_only, max_new_tokens=14, **negative))
    assert not torch.equal(plain, target.generate(**text_only, max_new_tokens=14, do_sample=False))


# What the loop cannot honour -----------------------------------------------------------------------------------------
def test_sliding_window_text_model_is_refused(draft):
    windowed = make_target(seed=0)
    windowed.config.text_config.sliding_window = 8
    windowed.model.language_model.config.sliding_window = 8
    bound = SpecVLMDraftModel.from_target(make_target(seed=0))
    bound.bind(windowed)
    for use_cache in (True, False):
        with pytest.raises(ValueError, match=r"sliding_attention layers \(sliding_window=8\)"):
            windowed.generate(**make_inputs(0, 4), assistant_model=bound, max_new_tokens=4, use_cache=use_cache)


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ({"use_cache": False}, "use_cache=False"),
        ({"prefill_chunk_size": 4}, "prefill_chunk_size"),
        ({"output_hidden_states": True, "return_dict_in_generate": True}, "output_hidden_states"),
        ({"position_ids": torch.tensor([[0] * 5 + list(range(17))])}, "position_ids"),
    ],
    ids=["use_cache", "prefill_chunk_size", "output_hidden_states", "position_ids"],
)
def test_options_the_loop_cannot_honour_are_refused(target, draft, inputs, option, message):
    with pytest.raises(ValueError, match=message):
        target.generate(**inputs, assistant_model=draft, max_new_tokens=4, **option)


def test_an_offloaded_cache_is_refused(target, draft, inputs):
    from transformers import DynamicCache

    cache = DynamicCache()
    cache.offloading = True
    with pytest.raises(ValueError, match="offloaded cache"):
        target.generate(**inputs, assistant_model=draft, max_new_tokens=4, **{CACHE_KWARG: cache})


def test_speculative_generate_hands_criteria_the_same_scores(target, inputs, draft):
    # Without return_dict_in_generate plain decoding passes scores=None, even with output_scores.
    for return_dict in (False, True):
        plain, ours = Recorder(after=100), Recorder(after=100)
        kwargs = dict(max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=return_dict)
        target.generate(**inputs, stopping_criteria=[plain], **kwargs)
        speculative_generate(target, draft, **inputs, stopping_criteria=[ours], **kwargs)
        assert ours.calls == plain.calls
        assert (plain.calls[0][1] is None) is (not return_dict)


# A caller's cache ----------------------------------------------------------------------------------------------------
def test_a_callers_empty_cache_is_filled_in_place(target, inputs, draft):
    from transformers import DynamicCache

    plain_cache, our_cache = DynamicCache(), DynamicCache()
    plain = target.generate(**inputs, max_new_tokens=9, do_sample=False, **{CACHE_KWARG: plain_cache})
    ours = target.generate(
        **inputs, max_new_tokens=9, do_sample=False, assistant_model=draft, **{CACHE_KWARG: our_cache}
    )
    assert torch.equal(ours, plain)
    assert our_cache.get_seq_length() == plain_cache.get_seq_length() == plain.shape[1] - 1


# top_k and tree_top_k ------------------------------------------------------------------------------------------------
def test_top_k_means_sampling_top_k_as_in_generate(target, inputs, draft):
    reference = target.generate(**inputs, max_new_tokens=12, do_sample=False)
    torch.manual_seed(5)
    ours = speculative_generate(target, draft, **inputs, max_new_tokens=12, do_sample=True, top_k=1, tree_top_k=4)
    assert torch.equal(ours.sequences, reference)  # sampling with top_k=1 is greedy, as in generate()


def test_top_k_on_greedy_warns_that_the_tree_knob_is_tree_top_k(target, inputs, draft):
    with pytest.warns(FutureWarning, match="tree_top_k"):
        speculative_generate(target, draft, **inputs, max_new_tokens=4, do_sample=False, top_k=4)


# The sampling residual -----------------------------------------------------------------------------------------------
def test_children_covering_the_whole_support_never_leave_an_empty_residual(monkeypatch):
    # p sums to slightly below 1 in float32, and the children hold all of it: the last child must be accepted even
    # when its uniform draw is the largest possible.
    probs = torch.tensor([0.3, 0.3, 0.4 - 3e-7, 0.0])
    tree = build_tree(torch.tensor([3, 0, 1, 2]), [-1, 0, 0, 0])
    monkeypatch.setattr(torch, "rand", lambda n, dtype=None: torch.full((n,), 1.0 - 1e-12, dtype=dtype))
    acceptance = accept_sampling(tree, torch.stack([probs] * 4))
    assert acceptance.path == [0, 3]
    assert accept_node(tree, 0, probs.log(), do_sample=True)[0] == 3


def test_a_distribution_without_mass_is_a_clear_error():
    with pytest.raises(RuntimeError, match="no mass left"):
        specvlm_hf.verify.sample_residual(torch.zeros(4), [])


# Options of transformers' own assisted decoding ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "option",
    [
        {"prompt_lookup_num_tokens": 3},
        {"num_assistant_tokens": 5},
        {"assistant_confidence_threshold": 0.2},
        {"num_assistant_tokens_schedule": "heuristic"},
        {"assistant_early_exit": 1},
        {"max_matching_ngram_size": 3},
        {"assistant_lookbehind": 5},
        {"target_lookbehind": 5},
        {"assistant_ensemble_weight": 0.5},
        {"use_mtp": True},
        {"speculation_type": "dflash"},
    ],
    ids=lambda option: next(iter(option)),
)
def test_stock_speculative_options_are_refused_by_name(target, inputs, draft, option):
    name = next(iter(option))
    with pytest.raises(ValueError, match=f"`{name}="):
        target.generate(**inputs, assistant_model=draft, max_new_tokens=4, **option)


# The generate() route ------------------------------------------------------------------------------------------------
def test_changed_hooks_guard_generate_and_speculative_generate_keeps_working(target, draft, monkeypatch):
    class Changed(type(target)):
        def _assisted_decoding(self, input_ids, candidate_generator, **model_kwargs):  # another signature
            raise AssertionError("stock assisted decoding must not run")

    monkeypatch.setattr(integration, "_route_error", None)
    assert integration.hook_mismatch(Changed) is not None
    assert integration.install(Changed) is False
    changed = Changed._from_config(target.config).eval()
    changed.load_state_dict(target.state_dict())
    changed.generation_config = copy.deepcopy(target.generation_config)
    inputs = make_inputs(0, 4)
    with pytest.raises(RuntimeError, match=r"changed GenerationMixin._assisted_decoding.*transformers>=5\.20"):
        changed.generate(**inputs, assistant_model=draft, max_new_tokens=4)
    # Without a draft, generate() is untouched.
    reference = target.generate(**inputs, max_new_tokens=12)
    assert torch.equal(changed.generate(**inputs, max_new_tokens=12), reference)
    # speculative_generate takes generate()'s public custom_generate hook instead, streamer included.
    from transformers.generation.streamers import BaseStreamer

    class Collect(BaseStreamer):
        def __init__(self):
            self.tokens, self.ended = [], False

        def put(self, value):
            self.tokens += value.flatten().tolist()

        def end(self):
            self.ended = True

    streamer = Collect()
    out = speculative_generate(target, draft, **inputs, max_new_tokens=12, streamer=streamer, num_beams=1)
    assert torch.equal(out.sequences, reference)
    assert streamer.ended and streamer.tokens == reference[0].tolist()
    assert out.stats.target_forwards < 12 or out.stats.new_tokens == 12
    with pytest.raises(ValueError, match="greedy search or sampling only"):
        speculative_generate(target, draft, **inputs, max_new_tokens=4, num_beams=2)
    with pytest.raises(ValueError, match="does not pass `tokenizer` on"):
        speculative_generate(target, draft, **inputs, max_new_tokens=4, tokenizer=object(), stop_strings=["a"])


def test_the_route_is_installed_in_the_tested_range():
    assert integration.hook_mismatch() is None
    assert integration.install() is True


def test_assistant_tokenizer_is_refused(target, inputs, draft):
    with pytest.raises(ValueError, match="assistant_tokenizer"):
        target.generate(
            **inputs, assistant_model=draft, max_new_tokens=4, tokenizer=object(), assistant_tokenizer=object()
        )
