"""Differential fuzzing of the tree loop against plain `generate()` (greedy, float32).

Hypothesis draws a tiny random LLaVA (hidden size, layers, attention heads with and without GQA, vocabulary, image
token count, sdpa or eager attention), a prompt with or without an image, a drafter (random trees, an oracle that tells
the truth for a random number of levels, the real draft class with random weights drafting one depth per forward
or in parallel, on a drawn tree shape or the auto tree), a tree shape, and generation
arguments from the README's table: `max_new_tokens` or `max_length`, EOS as an int, a list or a tensor, min new tokens
and min length, repetition and encoder repetition penalties, no-repeat n-grams, bad words, sequence bias, suppressed
tokens (always or at the first step), forced EOS, the exponential length penalty, classifier-free guidance with or
without a negative prompt, a history-dependent `prefix_allowed_tokens_fn`, watermarking, a user's stateful logits
processor, renormalised logits and inf/nan removal, user stopping criteria (stock EOS and max-length criteria, custom
ones that stop on a token or after some calls), stop strings, a streamer, an empty caller's cache, and
`return_dict_in_generate` with scores and logits. Each case runs through `target.generate(assistant_model=...)` or
`speculative_generate` and is compared with plain `generate()`: the sequences token for token, the scores and logits,
what the custom criteria and the user's processor were called with and what the streamer received, the loop's token
count, and the returned (or the caller's) cache: its length, its entries, and the target's logits continuing from it.

Batches get their own cases: 1 to 4 left-padded rows (random prompt lengths, with and without an image, with or
without the `attention_mask`), an oracle whose rows accept different numbers of tokens per step, the real draft (one depth
per forward or in parallel) or random trees per row, end tokens, row-wise stopping criteria and stop strings that stop rows early, and the
row-wise logits processors; the sequences, the returned cache and the per-row statistics are checked against plain
batched `generate()`.

The fast profiles (100 cases, 40 batches) run in the default suite; `pytest -m fuzz_long tests/test_fuzz.py` runs
the long ones (3,000 cases, 1,000 batches).
"""

from __future__ import annotations

import copy
import functools
import itertools
from dataclasses import dataclass, field

import pytest
import torch
from drafters import BatchOracleDraft, PartialOracleDraft, RandomDraft, RowwiseDraft
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from tiny import PATCH, left_pad, make_target
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    DynamicCache,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedTokenizerFast,
    WatermarkingConfig,
)
from transformers.generation.stopping_criteria import (
    EosTokenCriteria,
    MaxLengthCriteria,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation.streamers import BaseStreamer

from specvlm_hf import SpeculativeConfig, SpecVLMDraftModel, speculative_generate
from specvlm_hf._compat import CACHE_KWARG
from specvlm_hf.draft_step import available_numerics

FAST = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
LONG = settings(FAST, max_examples=3000)
BATCH_FAST = settings(FAST, max_examples=40)
BATCH_LONG = settings(FAST, max_examples=1000)
TOLERANCE = dict(atol=1e-4, rtol=1e-4)
STOP_ALPHABET = "abc"
NUMERICS = ("auto", *available_numerics(torch.device("cpu"), torch.float32))  # the real draft's, all of this CPU's


# Targets, prompts, tokenizers ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TargetSpec:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    image_side: int  # in patches: image_side**2 image tokens
    attention: str
    logit_scale: float
    seed: int

    @property
    def image_token(self) -> int:
        return self.vocab - 1


@dataclass(frozen=True)
class Prompt:
    """`[bos, before..., <image> x image tokens, after...]`, or the same without the image tokens."""

    seed: int
    before: int
    after: int
    image: bool
    attention_mask: bool


@functools.lru_cache(maxsize=32)
def build(spec: TargetSpec):
    """`(target, draft)`: the tiny LLaVA and a `SpecVLMDraftModel` with random weights bound to it."""
    target = make_target(
        seed=spec.seed,
        attn_implementation=spec.attention,
        hidden=spec.hidden,
        layers=spec.layers,
        logit_scale=spec.logit_scale,
        vocab=spec.vocab,
        heads=spec.heads,
        kv_heads=spec.kv_heads,
        image_size=spec.image_side * PATCH,
    )
    torch.manual_seed(spec.seed + 1)
    return target, SpecVLMDraftModel.from_target(target)


@functools.lru_cache(maxsize=32)
def build_parallel(spec: TargetSpec):
    """A `SpecVLMDraftModel` with random weights bound to `build(spec)`'s target, drafting depths 2..5 in one forward
    (parallel drafting)."""
    target, _ = build(spec)
    torch.manual_seed(spec.seed + 2)
    return SpecVLMDraftModel.from_target(target).enable_parallel_drafting(5)


def prompt_inputs(spec: TargetSpec, prompt: Prompt) -> dict:
    g = torch.Generator().manual_seed(prompt.seed)
    text = torch.randint(3, spec.vocab - 1, (prompt.before + prompt.after,), generator=g)
    image = torch.full((spec.image_side**2 if prompt.image else 0,), spec.image_token)
    ids = torch.cat([torch.tensor([1]), text[: prompt.before], image, text[prompt.before :]])[None]
    inputs = {"input_ids": ids}
    if prompt.image:
        size = spec.image_side * PATCH
        inputs["pixel_values"] = torch.randn(1, 3, size, size, generator=g)
    if prompt.attention_mask:
        inputs["attention_mask"] = torch.ones_like(ids)
    return inputs


@functools.lru_cache(maxsize=32)
def tokenizer_for(vocab: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the model's vocabulary: short strings of `STOP_ALPHABET`, decoded without spaces,
    so stop strings can match inside a token and across tokens. "abcdef" is the prefix `StopStringCriteria` probes
    the tokenizer with."""
    words = ("".join(p) for n in itertools.count(1) for p in itertools.product(STOP_ALPHABET, repeat=n))
    strings = ["<pad>", "<s>", "</s>", "abcdef", *itertools.islice(words, vocab - 5), "<image>"]
    backend = Tokenizer(models.WordLevel({s: i for i, s in enumerate(strings)}, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend)


# Stopping criteria -------------------------------------------------------------------------------------------------
class Recorder(StoppingCriteria):
    """Stops after `after` calls, or once the last token is `token`; records what every call received."""

    def __init__(self, after: int | None = None, token: int | None = None):
        self.after, self.token, self.calls = after, token, []

    def __call__(self, input_ids, scores, **kwargs):
        self.calls.append((input_ids[0].tolist(), None if scores is None else len(scores)))
        stop = (self.after is not None and len(self.calls) >= self.after) or int(input_ids[0, -1]) == self.token
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool)


class LastTokenPenalty(LogitsProcessor):
    """A user's stateful processor: lowers the score of the token it saw last call by `penalty`; records each call's
    tokens."""

    def __init__(self, penalty: float):
        self.penalty, self.last, self.calls = penalty, None, []

    def __call__(self, input_ids, scores):
        self.calls.append(input_ids[0].tolist())
        scores = scores.clone()
        if self.last is not None:
            scores[:, self.last] -= self.penalty
        self.last = int(input_ids[0, -1])
        return scores


class Collect(BaseStreamer):
    """A streamer that keeps what it receives."""

    def __init__(self):
        self.chunks, self.ended = [], False

    def put(self, value):
        self.chunks.append(value.tolist())

    def end(self):
        self.ended = True


def allowed_tokens(modulus: int, vocab: int, batch_id: int, input_ids: torch.Tensor) -> list[int]:
    """A `prefix_allowed_tokens_fn` that depends on the history: bans every `modulus`-th token, shifted by the last."""
    return [t for t in range(vocab) if (t + int(input_ids[-1])) % modulus]


class RowToken(StoppingCriteria):
    """Stops each row whose last token is `token`, row by row (as a batch's criteria must: the loop calls them one
    row at a time)."""

    def __init__(self, token: int):
        self.token = token

    def __call__(self, input_ids, scores, **kwargs):
        return input_ids[:, -1] == self.token


def make_criterion(kind: str, value, prompt_len: int) -> StoppingCriteria:
    if kind == "eos":
        return EosTokenCriteria(eos_token_id=torch.tensor(value))
    if kind == "max_length":
        return MaxLengthCriteria(max_length=prompt_len + value)
    if kind == "after":
        return Recorder(after=value)
    if kind == "row_token":
        return RowToken(value)
    return Recorder(token=value)


# Cases --------------------------------------------------------------------------------------------------------------
@dataclass
class Case:
    """One drawn case; `check(Case(...))` with a printed falsifying example reproduces it."""

    target: TargetSpec
    prompt: Prompt
    route: str  # "generate" (assistant_model=) or "speculative_generate"
    drafter: str  # "random", "oracle", "real" or "parallel" (the real draft class, drafting in parallel)
    tree: SpeculativeConfig
    truth_depth: int  # oracle: levels on which it tells the truth
    draft_seed: int
    new_tokens: int
    length_arg: str  # "max_new_tokens", or "max_length" (prompt + new_tokens)
    eos: int | tuple[int, ...] | None
    eos_as_tensor: bool
    processors: dict = field(default_factory=dict)  # generate() arguments that add logits processors, as data
    criteria: tuple = ()  # (kind, value) pairs, see make_criterion
    stop_strings: list[str] | None = None
    return_dict: bool = False
    auto_tree: bool = False  # "real" and "parallel" drafters: the default auto tree instead of `tree`
    numerics: str = "auto"  # "real" and "parallel" drafters: its `draft_numerics`
    output_scores: bool = False
    output_logits: bool = False
    user_cache: bool = False  # pass an empty DynamicCache, which generate() fills in place
    streamer: bool = False

    def generate_kwargs(self, prompt_len: int) -> dict:
        """Fresh `generate()` arguments (stopping criteria hold state)."""
        kwargs = dict(
            do_sample=False,
            return_dict_in_generate=self.return_dict,
            output_scores=self.output_scores,
            output_logits=self.output_logits,
        )
        kwargs[self.length_arg] = self.new_tokens + (prompt_len if self.length_arg == "max_length" else 0)
        for name, value in self.processors.items():
            if name == "prefix_allowed_tokens_fn":
                value = functools.partial(allowed_tokens, value, self.target.vocab)
            elif name == "watermarking_config":
                value = WatermarkingConfig(**value)
            elif name == "logits_processor":
                value = LogitsProcessorList([LastTokenPenalty(value)])
            elif name == "negative_prompt_ids":
                value = torch.tensor([value])
            kwargs[name] = copy.deepcopy(value)
        if isinstance(self.eos, tuple):
            kwargs["eos_token_id"] = torch.tensor(self.eos) if self.eos_as_tensor else list(self.eos)
        elif self.eos is not None:
            kwargs["eos_token_id"] = self.eos
        if self.criteria:
            kwargs["stopping_criteria"] = StoppingCriteriaList(
                make_criterion(kind, value, prompt_len) for kind, value in self.criteria
            )
        if self.stop_strings is not None:
            kwargs.update(stop_strings=self.stop_strings, tokenizer=tokenizer_for(self.target.vocab))
        if self.user_cache:
            kwargs[CACHE_KWARG] = DynamicCache()
        if self.streamer:
            kwargs["streamer"] = Collect()
        return kwargs


def target_specs():
    def spec(heads, **rest):
        return TargetSpec(heads=heads[0], kv_heads=heads[1], **rest)

    return st.builds(
        spec,
        hidden=st.sampled_from([32, 48, 64, 96]),  # multiples of 2 * heads: rotary needs an even head size
        heads=st.sampled_from([(1, 1), (2, 2), (2, 1), (4, 4), (4, 2), (4, 1)]),  # (query, key-value): MHA and GQA
        layers=st.integers(1, 3),
        vocab=st.integers(24, 128),
        image_side=st.integers(2, 4),
        attention=st.sampled_from(["sdpa", "eager"]),
        logit_scale=st.sampled_from([3.0, 6.0, 12.0]),
        seed=st.integers(0, 3),
    )


def maybe(strategy, odds: int = 2):
    """`None`, or once in `odds + 1` draws a value of `strategy`; shrinks to `None`."""
    return st.sampled_from([False] * odds + [True]).flatmap(lambda on: strategy if on else st.none())


def _watermark(scheme: str, min_greenlist_ratio: float):
    """A `watermarking_config` with `seeding_scheme` and a greenlist ratio in [min_greenlist_ratio, 0.5]."""
    return st.fixed_dictionaries(
        dict(
            bias=st.floats(0.5, 4.0),
            greenlist_ratio=st.floats(min_greenlist_ratio, 0.5),
            seeding_scheme=st.just(scheme),
            context_width=st.integers(1, 3),
        )
    )


@st.composite
def cases(draw) -> Case:
    spec = draw(target_specs())
    prompt = draw(
        st.builds(
            Prompt,
            seed=st.integers(0, 1000),
            before=st.integers(0, 3),
            after=st.integers(1, 8),
            image=st.booleans(),
            attention_mask=st.booleans(),
        )
    )
    target, _ = build(spec)
    inputs = prompt_inputs(spec, prompt)
    prompt_len = inputs["input_ids"].shape[1]
    free = target.generate(**inputs, do_sample=False, max_new_tokens=30)[0, prompt_len:].tolist()
    # Tokens the free greedy continuation emits, so EOS, stop tokens and penalties bite; sometimes any token.
    token = st.one_of(st.sampled_from(free), st.integers(0, spec.vocab - 1))
    tokens = st.lists(token, min_size=1, max_size=3)

    new_tokens = draw(st.integers(1, 30))
    eos = draw(maybe(st.one_of(token, tokens.map(tuple)), odds=1))
    eos_as_tensor = isinstance(eos, tuple) and draw(st.booleans())
    options = {
        "min_new_tokens": st.integers(0, new_tokens),
        "min_length": st.integers(0, prompt_len + new_tokens),
        "guidance_scale": st.floats(1.1, 3.0),
        "negative_prompt_ids": st.lists(token, min_size=1, max_size=4).map(lambda ids: [1, *ids]),
        "repetition_penalty": st.floats(0.5, 3.0),
        "encoder_repetition_penalty": st.floats(0.5, 3.0),
        "no_repeat_ngram_size": st.integers(1, 4),
        "bad_words_ids": st.lists(tokens, min_size=1, max_size=3),
        "sequence_bias": st.lists(st.tuples(tokens, st.floats(-8.0, 8.0)).map(list), min_size=1, max_size=3),
        "suppress_tokens": tokens,
        "begin_suppress_tokens": tokens,
        "forced_eos_token_id": token,
        "renormalize_logits": st.just(True),
        "remove_invalid_values": st.just(True),
        "prefix_allowed_tokens_fn": st.integers(2, 5),
        # selfhash tries the 40 best tokens, and plain generate() itself fails on a smaller vocabulary or when none of
        # them is green (an empty float index tensor): 0.9**40 = 1.5% per step at greenlist_ratio 0.1, 0.7**40 < 1e-6
        # at 0.3.
        "watermarking_config": st.one_of(
            _watermark("lefthash", 0.1), *([_watermark("selfhash", 0.3)] if spec.vocab >= 40 else [])
        ),
        "logits_processor": st.floats(0.5, 5.0),  # LastTokenPenalty
    }
    if eos is not None:
        options["exponential_decay_length_penalty"] = st.tuples(st.integers(0, 10), st.floats(1.0, 2.0))
    names = draw(maybe(st.lists(st.sampled_from(sorted(options)), unique=True, min_size=1, max_size=4), odds=1))
    processors = {name: draw(options[name]) for name in names or ()}
    # generate() itself refuses to force a token it suppresses.
    assume(processors.get("forced_eos_token_id") not in processors.get("suppress_tokens", []))
    criterion = st.one_of(
        st.tuples(st.just("eos"), tokens),
        st.tuples(st.just("max_length"), st.integers(1, 30)),
        st.tuples(st.just("after"), st.integers(1, 30)),
        st.tuples(st.just("on_token"), token),
    )
    criteria = draw(maybe(st.lists(criterion, min_size=1, max_size=3).map(tuple), odds=1)) or ()
    stop_strings = draw(maybe(st.lists(st.text(STOP_ALPHABET, min_size=3, max_size=6), min_size=1, max_size=3)))

    route = draw(st.sampled_from(["generate", "speculative_generate"]))
    return_dict = route == "speculative_generate" or draw(st.booleans())  # speculative_generate sets it
    depth = draw(st.integers(1, 7))
    return Case(
        target=spec,
        prompt=prompt,
        route=route,
        drafter=draw(st.sampled_from(["oracle", "real", "random", "parallel"])),
        tree=SpeculativeConfig(depth=depth, top_k=draw(st.integers(1, 6)), total_tokens=draw(st.integers(2, 40))),
        truth_depth=draw(st.one_of(st.just(depth), st.integers(0, depth))),
        draft_seed=draw(st.integers(0, 1000)),
        new_tokens=new_tokens,
        length_arg=draw(st.sampled_from(["max_new_tokens", "max_length"])),
        eos=eos,
        eos_as_tensor=eos_as_tensor,
        processors=processors,
        auto_tree=draw(st.booleans()),
        numerics=draw(st.sampled_from(NUMERICS)),
        criteria=criteria,
        stop_strings=stop_strings,
        return_dict=return_dict,
        output_scores=return_dict and draw(st.booleans()),
        output_logits=return_dict and draw(st.booleans()),
        user_cache=draw(st.booleans()),
        streamer=draw(st.booleans()),
    )


# The check ---------------------------------------------------------------------------------------------------------
def call_logs(kwargs: dict) -> list:
    """What every recording criterion and processor was called with, and what the streamer received."""
    recorders = [*kwargs.get("stopping_criteria", []), *kwargs.get("logits_processor", [])]
    logs = [r.calls for r in recorders if isinstance(r, (Recorder, LastTokenPenalty))]
    if "streamer" in kwargs:
        logs.append((kwargs["streamer"].chunks, kwargs["streamer"].ended))
    return logs


def returned_cache(output, kwargs: dict):
    """The cache a caller gets back: the output's (`return_dict_in_generate`), else the one it passed, else `None`."""
    cache = getattr(output, CACHE_KWARG, None)
    return cache if cache is not None else kwargs.get(CACHE_KWARG)


def next_logits(target, sequences: torch.Tensor, cache) -> torch.Tensor:
    """The target's logits after `sequences`, continuing from `cache` (all positions but the last)."""
    position = torch.tensor([[sequences.shape[1] - 1]])
    with torch.no_grad():
        out = target(input_ids=sequences[:, -1:], position_ids=position, **{CACHE_KWARG: copy.deepcopy(cache)})
    return out.logits[0, -1]


def assert_steps_close(ours, plain) -> None:
    """Per-token scores or logits: both absent, or the same count and values."""
    assert (ours is None) == (plain is None)
    if plain is not None:
        assert len(ours) == len(plain)
        for mine, theirs in zip(ours, plain):
            torch.testing.assert_close(mine, theirs, **TOLERANCE)


def check(case: Case) -> None:
    """Runs `case` through plain `generate()` and through the tree loop, and compares everything both return."""
    target, draft = build(case.target)
    inputs = prompt_inputs(case.target, case.prompt)
    prompt_len = inputs["input_ids"].shape[1]

    plain_kwargs = case.generate_kwargs(prompt_len)
    plain = target.generate(**inputs, **plain_kwargs)
    plain_sequences = plain.sequences if case.return_dict else plain

    cfg = case.tree
    if case.drafter == "parallel":
        draft = build_parallel(case.target)
    if case.drafter in ("real", "parallel"):
        draft = draft.with_tree(draft_numerics=case.numerics)
        source = draft
    elif case.drafter == "oracle":
        source = PartialOracleDraft(
            plain_sequences[0].tolist(), case.target.vocab, cfg, case.truth_depth, case.draft_seed
        )
    else:
        source = RandomDraft(case.target.vocab, cfg, case.draft_seed)
    our_kwargs = case.generate_kwargs(prompt_len)
    fixed_real = case.drafter in ("real", "parallel") and not case.auto_tree
    if case.route == "speculative_generate":
        knobs = dict(depth=cfg.depth, tree_top_k=cfg.top_k, total_tokens=cfg.total_tokens)
        ours = speculative_generate(target, source, **inputs, **(knobs if fixed_real else {}), **our_kwargs)
        stats = ours.stats
    else:
        if fixed_real:
            source = draft.with_tree(depth=cfg.depth, tree_top_k=cfg.top_k, total_tokens=cfg.total_tokens)
        ours = target.generate(**inputs, assistant_model=source, **our_kwargs)
        stats = ours.speculative_stats if case.return_dict else None
    our_sequences = ours.sequences if case.return_dict else ours

    assert our_sequences.tolist() == plain_sequences.tolist()
    assert call_logs(our_kwargs) == call_logs(plain_kwargs)
    if stats is not None:
        assert stats.new_tokens == plain_sequences.shape[1] - prompt_len
        assert sum(stats.accepted_lengths) + 1 == stats.new_tokens  # + the prefill's token
    if case.route == "generate" and case.return_dict:
        assert_steps_close(ours.scores, plain.scores)
        assert_steps_close(ours.logits, plain.logits)
    our_cache, plain_cache = returned_cache(ours, our_kwargs), returned_cache(plain, plain_kwargs)
    if case.route == "generate":
        assert (our_cache is None) == (plain_cache is None)
    if our_cache is not None:  # speculative_generate returns none: only a caller's cache
        assert our_cache.get_seq_length() == plain_cache.get_seq_length() == plain_sequences.shape[1] - 1
        for mine, theirs in zip(our_cache.layers, plain_cache.layers, strict=True):
            torch.testing.assert_close(mine.keys, theirs.keys, **TOLERANCE)
            torch.testing.assert_close(mine.values, theirs.values, **TOLERANCE)
        torch.testing.assert_close(
            next_logits(target, our_sequences, our_cache),
            next_logits(target, plain_sequences, plain_cache),
            **TOLERANCE,
        )


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matrices: one thread is several times faster than two, and does not fight a parallel job."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@FAST
@given(case=cases())
def test_tree_loop_matches_plain_generate(case):
    check(case)


@pytest.mark.slow
@pytest.mark.fuzz_long
@LONG
@given(case=cases())
def test_tree_loop_matches_plain_generate_long(case):
    check(case)


# Batches ------------------------------------------------------------------------------------------------------------
PAD = 0  # tiny.make_target's pad id; prompts never hold it


@dataclass
class BatchCase(Case):
    """A drawn batch: the rows' `prompts` (each Prompt's `attention_mask` is unused: `batch_mask` says whether the
    batch has one; without it generate() infers it from the pad id). `prompt` is unused. The oracle
    (`BatchOracleDraft`) tells the truth on every level (`truth="full"`) or on a random number of levels per row
    and step (`"random"`); `criteria` are row-wise (`eos`, `max_length`, `row_token`)."""

    prompts: tuple[Prompt, ...] = ()
    batch_mask: bool = True
    truth: str = "random"

    def inputs(self) -> dict:
        return left_pad([prompt_inputs(self.target, p) for p in self.prompts], PAD, attention_mask=self.batch_mask)

    @property
    def pads_finished_rows(self) -> bool:
        """An end-token criterion is installed: plain decoding pads a finished row (else it decodes it on)."""
        return self.eos is not None or any(kind == "eos" for kind, _ in self.criteria)


@st.composite
def batch_cases(draw) -> BatchCase:
    spec = draw(target_specs())
    prompt = st.builds(Prompt, seed=st.integers(0, 1000), before=st.integers(0, 3), after=st.integers(1, 8),
                       image=st.booleans(), attention_mask=st.just(True))  # fmt: skip
    prompts = tuple(draw(st.lists(prompt, min_size=1, max_size=4)))
    batch_mask = draw(st.booleans())
    target, _ = build(spec)
    inputs = left_pad([prompt_inputs(spec, p) for p in prompts], PAD, attention_mask=batch_mask)
    prompt_len = inputs["input_ids"].shape[1]
    free = target.generate(**inputs, do_sample=False, max_new_tokens=30)[:, prompt_len:]
    # Tokens the rows' free greedy continuations emit, so end tokens and stop tokens stop some rows and not others.
    token = st.one_of(st.sampled_from(free.flatten().tolist()), st.integers(0, spec.vocab - 1))
    tokens = st.lists(token, min_size=1, max_size=3)

    new_tokens = draw(st.integers(1, 30))
    eos = draw(maybe(st.one_of(token, tokens.map(tuple)), odds=1))
    eos_as_tensor = isinstance(eos, tuple) and draw(st.booleans())
    # With the pad id among the end tokens generate() infers no mask: the batch would not be left-padded for either.
    assume(batch_mask or PAD not in (eos if isinstance(eos, tuple) else (eos,)))
    # The processors that compute row by row (the batch-bound ones are refused: test_errors.py), the two repetition
    # penalties among them: generate() builds them with one value per row, which the loop slices.
    options = {
        "min_new_tokens": st.integers(0, new_tokens),
        "min_length": st.integers(0, prompt_len + new_tokens),
        "repetition_penalty": st.floats(0.5, 3.0),
        "encoder_repetition_penalty": st.floats(0.5, 3.0),
        "no_repeat_ngram_size": st.integers(1, 4),
        "bad_words_ids": st.lists(tokens, min_size=1, max_size=3),
        "sequence_bias": st.lists(st.tuples(tokens, st.floats(-8.0, 8.0)).map(list), min_size=1, max_size=3),
        "suppress_tokens": tokens,
        "begin_suppress_tokens": tokens,
        "forced_eos_token_id": token,
        "renormalize_logits": st.just(True),
        "remove_invalid_values": st.just(True),
        "watermarking_config": st.one_of(
            _watermark("lefthash", 0.1), *([_watermark("selfhash", 0.3)] if spec.vocab >= 40 else [])
        ),
    }
    if eos is not None:
        options["exponential_decay_length_penalty"] = st.tuples(st.integers(0, 10), st.floats(1.0, 2.0))
    names = draw(maybe(st.lists(st.sampled_from(sorted(options)), unique=True, min_size=1, max_size=3), odds=1))
    processors = {name: draw(options[name]) for name in names or ()}
    assume(processors.get("forced_eos_token_id") not in processors.get("suppress_tokens", []))
    criterion = st.one_of(
        st.tuples(st.just("eos"), tokens),
        st.tuples(st.just("max_length"), st.integers(1, 30)),
        st.tuples(st.just("row_token"), st.sampled_from(free.flatten().tolist())),  # stops some rows early
    )
    criteria = draw(maybe(st.lists(criterion, min_size=1, max_size=2).map(tuple), odds=1)) or ()
    stop_strings = draw(maybe(st.lists(st.text(STOP_ALPHABET, min_size=3, max_size=6), min_size=1, max_size=2)))
    route = draw(st.sampled_from(["generate", "speculative_generate"]))
    depth = draw(st.integers(1, 7))
    return BatchCase(
        target=spec,
        prompt=prompts[0],
        prompts=prompts,
        batch_mask=batch_mask,
        route=route,
        drafter=draw(st.sampled_from(["oracle", "real", "random", "parallel"])),
        tree=SpeculativeConfig(depth=depth, top_k=draw(st.integers(1, 6)), total_tokens=draw(st.integers(2, 40))),
        truth=draw(st.sampled_from(["random", "full"])),
        truth_depth=depth,
        draft_seed=draw(st.integers(0, 1000)),
        new_tokens=new_tokens,
        length_arg=draw(st.sampled_from(["max_new_tokens", "max_length"])),
        eos=eos,
        eos_as_tensor=eos_as_tensor,
        processors=processors,
        auto_tree=draw(st.booleans()),
        numerics=draw(st.sampled_from(NUMERICS)),
        criteria=criteria,
        stop_strings=stop_strings,
        return_dict=route == "speculative_generate" or draw(st.booleans()),
        user_cache=draw(st.booleans()),
    )


def check_batch(case: BatchCase) -> None:
    """Runs `case` through plain batched `generate()` and through the tree loop; compares the sequences, the returned
    cache and the per-row statistics."""
    target, draft = build(case.target)
    inputs = case.inputs()
    rows, prompt_len = inputs["input_ids"].shape
    plain_kwargs = case.generate_kwargs(prompt_len)
    plain = target.generate(**inputs, **plain_kwargs)
    plain_sequences = plain.sequences if case.return_dict else plain

    cfg = case.tree
    if case.drafter == "oracle":
        pads = (inputs["input_ids"] != PAD).int().argmax(dim=1).tolist()  # leading padding per row
        references = [plain_sequences[row, pad:].tolist() for row, pad in enumerate(pads)]
        source = BatchOracleDraft(references, case.target.vocab, cfg, case.draft_seed, case.truth)
    elif case.drafter == "random":
        source = RowwiseDraft([RandomDraft(case.target.vocab, cfg, case.draft_seed + row) for row in range(rows)])
    else:
        knobs = dict(depth=cfg.depth, tree_top_k=cfg.top_k, total_tokens=cfg.total_tokens)
        draft = build_parallel(case.target) if case.drafter == "parallel" else draft
        draft = draft.with_tree(draft_numerics=case.numerics)
        source = draft if case.auto_tree else draft.with_tree(**knobs)
    our_kwargs = case.generate_kwargs(prompt_len)
    if case.route == "speculative_generate":
        ours = speculative_generate(target, source, **inputs, **our_kwargs)
        stats = ours.stats
    else:
        ours = target.generate(**inputs, assistant_model=source, **our_kwargs)
        stats = ours.speculative_stats if case.return_dict else None
    our_sequences = ours.sequences if case.return_dict else ours

    assert our_sequences.tolist() == plain_sequences.tolist()
    if stats is not None and rows > 1:
        counts = stats.row_new_tokens
        assert stats.new_tokens == sum(counts)
        assert stats.accepted_lengths == [n for lengths in stats.row_accepted_lengths for n in lengths]
        assert stats.row_target_forwards == [len(lengths) + 1 for lengths in stats.row_accepted_lengths]
        assert stats.target_forwards == sum(stats.row_target_forwards)
        assert max(counts) == our_sequences.shape[1] - prompt_len
        if case.pads_finished_rows:  # a row's tokens end where its count says, padding after
            assert [sum(lengths) + 1 for lengths in stats.row_accepted_lengths] == counts
            for row, count in enumerate(counts):
                assert (our_sequences[row, prompt_len + count :] == PAD).all()
    elif stats is not None:
        assert stats.new_tokens == plain_sequences.shape[1] - prompt_len == sum(stats.accepted_lengths) + 1
    our_cache, plain_cache = returned_cache(ours, our_kwargs), returned_cache(plain, plain_kwargs)
    if our_cache is not None:
        assert len(our_cache.layers) == len(plain_cache.layers)
        for mine, theirs in zip(our_cache.layers, plain_cache.layers):
            assert mine.keys.shape == theirs.keys.shape
            torch.testing.assert_close(mine.keys, theirs.keys, **TOLERANCE)
            torch.testing.assert_close(mine.values, theirs.values, **TOLERANCE)


@BATCH_FAST
@given(case=batch_cases())
def test_batches_match_plain_generate(case):
    check_batch(case)


@pytest.mark.slow
@pytest.mark.fuzz_long
@BATCH_LONG
@given(case=batch_cases())
def test_batches_match_plain_generate_long(case):
    check_batch(case)
