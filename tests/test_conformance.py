"""Conformance: every supported architecture decodes through its adapter exactly as plain `generate()` does.

Each entry of `ARCHITECTURES` gives a tiny target of ours, the target transformers' own model tester configures for
that architecture (odd vocabulary sizes, special ids and widths: `tiny.py`), both with peaked attention so that a token
verified at a wrong position changes the output (a random tiny model attends almost uniformly, and nearly all of the
decoding tests below missed an off-by-one position without it), a target of vocabulary `V` for the sampling
certificate, and named prompt cases (text only, one image, several images, a video where the architecture takes one).
For each architecture and both targets:

* greedy equality with plain `generate()` through `generate(assistant_model=...)` and `speculative_generate`, over
  every prompt case, two fixed tree shapes and the auto tree, each on two seeds of its own;
* a random drafter over many tree shapes (almost every draft rejected) and an oracle drafter (long paths accepted:
  mean accepted length > 3 at depths 4, 5 and 7), an end token inside an accepted path and `max_new_tokens` ending
  inside one: plain `generate()`'s output every time;
* cache compaction after a tree forward equals the cache rebuilt from the prompt and the accepted path, at the
  positions the adapter's layout gives (0, 1, 2, ... or M-RoPE's);
* left-padded batches of 2 and 4 rows of the prompt cases (a text row beside visual ones): plain batched
  `generate()`'s output for the real draft on a fixed tree and the auto tree, and for an oracle whose rows accept
  different numbers of tokens per step, one row stopping at an end token, and the returned cache;

and per architecture, T > 0 on the tiny vocabulary: the exact conditionals (`LayoutExactTarget`) are generate()'s own
scores, and speculative sampling passes `test_sampling`'s certificate against them.

Adding an architecture: its adapter in `specvlm_hf/adapters.py` and its entry in `ARCHITECTURES`.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from drafters import BatchOracleDraft, OracleDraft, RandomDraft
from test_sampling import (
    HISTORY_FREE,
    N_OTHER_DRAFTS,
    NEW_TOKENS,
    ExactTarget,
    V,
    assert_certified,
    certify,
    draw,
    speculative_draw,
)
from tiny import (
    left_pad,
    make_llava_prompt,
    make_llava_tester_target,
    make_next_inputs,
    make_next_target,
    make_next_tester_target,
    make_qwen_inputs,
    make_qwen_target,
    make_qwen_tester_target,
    make_target,
    sharp_attention,
)
from transformers import DynamicCache

from specvlm_hf import SpeculativeConfig, SpecVLMDraftModel, SpecVLMEagle3DraftModel, speculative_generate
from specvlm_hf.adapters import get_adapter
from specvlm_hf.cache import commit_accepted
from specvlm_hf.draft_step import available_numerics
from specvlm_hf.tree import build_tree, tree_attention_mask


@dataclass(frozen=True)
class Architecture:
    """
    One supported architecture.

    Attributes:
        target: builds our tiny target.
        tester: builds the target transformers' model tester for the architecture configures.
        small: builds a target of vocabulary `V` (the sampling certificate's).
        prompts: named prompt cases, `(target, seed) -> generate() inputs`, ids and sizes read from the target's
            config: "text", "image" (one image; the certificate's prompt), "images" (several), "video".
    """

    target: Callable
    tester: Callable
    small: Callable
    prompts: dict[str, Callable]


def sharp(build: Callable) -> Callable:
    """`build` with peaked attention (`tiny.sharp_attention`): a token verified at a wrong position changes the
    output."""
    return lambda: sharp_attention(build())


def llava_prompt(images: int, text_len: int = 3) -> Callable:
    return lambda target, seed: make_llava_prompt(target, images, seed=seed, text_len=text_len)


def next_prompt(*image_sizes, text_len: int = 3) -> Callable:
    return lambda target, seed: make_next_inputs(target, list(image_sizes), seed=seed, text_len=text_len)


def qwen_prompt(*segments) -> Callable:
    def build(target, seed):
        vocab, merge = target.config.text_config.vocab_size, target.config.vision_config.spatial_merge_size
        return make_qwen_inputs(segments, seed=seed, vocab=vocab, merge=merge)

    return build


QWEN_PROMPTS = {
    "text": qwen_prompt(("text", 7)),
    "image": qwen_prompt(("text", 3), ("image", (1, 4, 6)), ("text", 3)),
    "images": qwen_prompt(("text", 2), ("image", (1, 4, 4)), ("text", 2), ("image", (1, 2, 6)), ("text", 2)),
    "video": qwen_prompt(("text", 2), ("video", (4, 2, 2)), ("text", 3)),
}
# The testers (tiny.py): LLaVA's has vocabulary 99, image token id 0 and pad id = bos id; LLaVA-NeXT's image token 98,
# heads of 16 and one 8x8 AnyRes pinpoint (a wide image keeps no tile tokens); Qwen's image token 4, video token 5,
# 4 text layers and no spatial merging (one visual token per patch).
ARCHITECTURES = {
    "llava": Architecture(
        target=sharp(make_target),
        tester=sharp(make_llava_tester_target),
        small=lambda: make_target(seed=1, vocab=V, logit_scale=9.0, layers=1),
        prompts={"text": llava_prompt(0, text_len=7), "image": llava_prompt(1), "images": llava_prompt(2)},
    ),
    "llava_next": Architecture(
        target=sharp(make_next_target),
        tester=sharp(make_next_tester_target),
        small=lambda: make_next_target(seed=2, vocab=V, logit_scale=9.0),
        # Images of different sizes: AnyRes gives them different numbers of visual tokens.
        prompts={
            "text": next_prompt(text_len=8),
            "image": next_prompt([16, 16]),
            "images": next_prompt([6, 20], [16, 16]),
        },
    ),
    "qwen2_vl": Architecture(
        target=sharp(lambda: make_qwen_target("qwen2_vl")),
        tester=sharp(lambda: make_qwen_tester_target("qwen2_vl")),
        small=lambda: make_qwen_target("qwen2_vl", seed=2, vocab=V, logit_scale=9.0),
        prompts=QWEN_PROMPTS,
    ),
    "qwen2_5_vl": Architecture(
        target=sharp(lambda: make_qwen_target("qwen2_5_vl")),
        tester=sharp(lambda: make_qwen_tester_target("qwen2_5_vl")),
        small=lambda: make_qwen_target("qwen2_5_vl", seed=2, vocab=V, logit_scale=9.0),
        prompts=QWEN_PROMPTS,
    ),
}
VARIANTS = [(name, variant) for name in ARCHITECTURES for variant in ("tiny", "tester")]
CASES = [(name, variant, prompt) for name, variant in VARIANTS for prompt in ARCHITECTURES[name].prompts]
# The real draft's trees: a wide one, a chain, and the auto tree (no knob set).
# The draft's numerics here: the packed bfloat16 kernels where the CPU has them (what `auto` picks on such a CPU).
FASTEST = available_numerics(torch.device("cpu"), torch.float32)[-1]
TREES = {"wide": SpeculativeConfig(3, 3, 8), "chain": SpeculativeConfig(5, 1, 5), "auto": SpeculativeConfig()}
RANDOM_SHAPES = [(1, 1, 2), (2, 4, 9), (3, 2, 6), (5, 1, 5), (4, 3, 13), (7, 2, 16)]  # (depth, top_k, total_tokens)
NEW = 20  # new tokens per greedy run


@pytest.fixture(autouse=True)
def _one_thread():
    """The tiny targets' forwards are fastest on one thread (as in `test_sampling`)."""
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def bound():
    """`bound(name, variant)`: the target (`variant` "tiny" or "tester") and a random-weight draft bound to it, in the
    fastest numerics this CPU has (`FASTEST`), built once per module."""
    built = {}

    def get(name: str, variant: str, family: str = "eagle"):
        if (name, variant) not in built:
            built[name, variant] = getattr(ARCHITECTURES[name], "target" if variant == "tiny" else "tester")()
        if (name, variant, family) not in built:
            torch.manual_seed(0)
            draft_class = SpecVLMEagle3DraftModel if family == "eagle3" else SpecVLMDraftModel
            draft = built[name, variant, family] = draft_class.from_target(built[name, variant])
            draft.speculative_config = SpeculativeConfig(draft_numerics=FASTEST)
        return built[name, variant], built[name, variant, family]

    return get


def plain(target, inputs: dict, n: int = NEW, **kwargs) -> torch.Tensor:
    return target.generate(**inputs, max_new_tokens=n, do_sample=False, **kwargs)


def vocabulary(target) -> int:
    return get_adapter(target).lm_head.weight.shape[0]


def assert_same(out: torch.Tensor, expected: torch.Tensor, case: str) -> None:
    """`out` is plain decoding's `expected` (both `(1, seq_len)`); otherwise fails naming the case and the first
    differing token."""
    if torch.equal(out, expected):
        return
    n = min(out.shape[1], expected.shape[1])
    differ = (out[0, :n] != expected[0, :n]).nonzero()
    first = int(differ[0]) if len(differ) else n
    pytest.fail(
        f"{case}: first difference at sequence index {first}: {out[0, first : first + 1].tolist()} instead of "
        f"{expected[0, first : first + 1].tolist()} (lengths {out.shape[1]} and {expected.shape[1]})"
    )


# The EAGLE-2-style draft on every case; the EAGLE-3 draft (its own inputs: three layers' states, placeholder
# embeddings) on every architecture's tiny target and every prompt case.
GREEDY_CASES = [(*case, "eagle") for case in CASES] + [(*case, "eagle3") for case in CASES if case[1] == "tiny"]


@pytest.mark.parametrize(("name", "variant", "prompt", "family"), GREEDY_CASES)
def test_greedy_equals_plain_generate(bound, name, variant, prompt, family):
    """Both entry points with the real draft classes (random weights: most drafts rejected), an EAGLE-2-style draft
    and an EAGLE-3 one (which reads three layers' hidden states from the target's forwards), each tree on two prompts
    of its own (seeds 0 to 5)."""
    target, draft = bound(name, variant, family)
    for seed, (tree, config) in enumerate(t for t in TREES.items() for _ in range(2)):
        inputs = ARCHITECTURES[name].prompts[prompt](target, seed)
        expected = plain(target, inputs)
        knobs = dict(depth=config.depth, total_tokens=config.total_tokens)
        assistant = draft if config.is_auto else draft.with_tree(tree_top_k=config.top_k, **knobs)
        routed = target.generate(**inputs, max_new_tokens=NEW, do_sample=False, assistant_model=assistant)
        assert_same(routed, expected, f"{name}/{variant} {prompt!r} seed {seed} {tree} tree, generate()")
        spec = speculative_generate(
            target, draft, **inputs, max_new_tokens=NEW, do_sample=False, tree_top_k=config.top_k, **knobs
        )
        assert_same(spec.sequences, expected, f"{name}/{variant} {prompt!r} seed {seed} {tree} tree")
        assert spec.stats.new_tokens == NEW


def assert_same_rows(out: torch.Tensor, expected: torch.Tensor, case: str) -> None:
    """`assert_same` for each row of a batch (`(rows, seq_len)` both)."""
    assert out.shape == expected.shape, f"{case}: shape {tuple(out.shape)} instead of {tuple(expected.shape)}"
    for row in range(expected.shape[0]):
        assert_same(out[row : row + 1], expected[row : row + 1], f"{case}, row {row}")


# Batches of the prompt cases, each architecture's text row among visual ones: 2 rows ("text", "image"), 4 rows (every
# case, cycled). Both draft families on the tiny targets, the EAGLE-2-style one on the testers'.
BATCH_CASES = [(name, variant, rows, "eagle") for name, variant in VARIANTS for rows in (2, 4)] + [
    (name, "tiny", rows, "eagle3") for name in ARCHITECTURES for rows in (2, 4)
]


@pytest.mark.parametrize(("name", "variant", "rows", "family"), BATCH_CASES)
def test_batches_equal_plain_batched_generate(bound, name, variant, rows, family):
    """A left-padded batch through `generate(assistant_model=...)`: the real draft on a fixed tree and the auto tree,
    and an oracle that tells the truth for a random number of levels per row and step (rows accept different numbers
    of tokens), also with an end token that stops one row alone (which then leaves the batch); the oracle's returned
    cache is plain decoding's."""
    target, draft = bound(name, variant, family)
    prompts = ARCHITECTURES[name].prompts
    cases = list(itertools.islice(itertools.cycle(prompts), rows))
    batch = left_pad([prompts[case](target, 20 + seed) for seed, case in enumerate(cases)],
                     target.generation_config.pad_token_id)  # fmt: skip
    prompt_len, pads = batch["input_ids"].shape[1], (1 - batch["attention_mask"]).sum(dim=1).tolist()
    label = f"{name}/{variant} {family} batch of {cases}"
    expected = plain(target, batch)
    for assistant in (draft.with_tree(depth=4, tree_top_k=2, total_tokens=8), draft):
        routed = target.generate(**batch, max_new_tokens=NEW, do_sample=False, assistant_model=assistant)
        assert_same_rows(routed, expected, label)
    new = expected[:, prompt_len:]
    others = [set(torch.cat([new[:row], new[row + 1 :]]).flatten().tolist()) for row in range(rows)]
    ends = [int(t) for row in range(rows) for t in new[row, 2:] if int(t) not in others[row]][:1]  # stops one row
    for eos in [None, *ends]:
        kwargs = dict(max_new_tokens=NEW, do_sample=False, eos_token_id=eos, return_dict_in_generate=True)
        reference = target.generate(**batch, **kwargs)
        references = [reference.sequences[row, pad:].tolist() for row, pad in enumerate(pads)]
        oracle = BatchOracleDraft(references, vocabulary(target), SpeculativeConfig(5, 2, 11), truth="random")
        out = target.generate(**batch, **kwargs, assistant_model=oracle)
        assert_same_rows(out.sequences, reference.sequences, f"{label}, oracle, end token {eos}")
        for ours, theirs in zip(out.past_key_values.layers, reference.past_key_values.layers, strict=True):
            assert ours.keys.shape == theirs.keys.shape, f"{label}: cache of shape {tuple(ours.keys.shape)}"
            torch.testing.assert_close(ours.keys, theirs.keys, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(ours.values, theirs.values, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("name", "variant"), VARIANTS)
def test_random_drafts_of_many_shapes(bound, name, variant):
    """Random trees of random tokens, from a single node to deep and wide ones, over every prompt case."""
    target, _ = bound(name, variant)
    prompts = ARCHITECTURES[name].prompts
    for seed, (shape, prompt) in enumerate(zip(RANDOM_SHAPES, itertools.cycle(prompts))):
        inputs = prompts[prompt](target, 10 + seed)
        source = RandomDraft(vocabulary(target), SpeculativeConfig(*shape), seed)
        out = speculative_generate(target, source, **inputs, max_new_tokens=NEW, do_sample=False)
        assert_same(out.sequences, plain(target, inputs), f"{name}/{variant} {prompt!r} random tree {shape}")


@pytest.mark.parametrize(("name", "variant"), VARIANTS)
def test_an_oracle_is_accepted_along_long_paths(bound, name, variant):
    """An oracle drafter on the several-images prompt: mean accepted length > 3 at depth >= 4; an end token inside an
    accepted path and `max_new_tokens` ending inside one stop where plain decoding stops."""
    target, _ = bound(name, variant)
    inputs = ARCHITECTURES[name].prompts["images"](target, 5)
    prompt_len, vocab = inputs["input_ids"].shape[1], vocabulary(target)
    expected = plain(target, inputs, n=48)
    for depth in (4, 5, 7):  # two nodes per level: the tree reaches `depth`
        oracle = OracleDraft(expected[0].tolist(), vocab, SpeculativeConfig(depth, 2, 2 * depth + 1))
        out = speculative_generate(target, oracle, **inputs, max_new_tokens=48, do_sample=False)
        assert_same(out.sequences, expected, f"{name}/{variant} oracle depth {depth}")
        assert out.stats.mean_accepted_length > 3
    oracle = OracleDraft(expected[0].tolist(), vocab, SpeculativeConfig(depth=6, top_k=2, total_tokens=12))
    for at in (2, 9):  # an end token 3 (10) new tokens in, or earlier where the continuation has it earlier
        eos = int(expected[0, prompt_len + at])
        expected_eos = plain(target, inputs, n=48, eos_token_id=eos)
        assert expected_eos[0, -1] == eos and expected_eos.shape[1] <= prompt_len + at + 1
        out = speculative_generate(target, oracle, **inputs, max_new_tokens=48, do_sample=False, eos_token_id=eos)
        assert_same(out.sequences, expected_eos, f"{name}/{variant} oracle, end token {eos}")
    for max_new_tokens in (1, 2, 5, 9, 17):
        out = speculative_generate(target, oracle, **inputs, max_new_tokens=max_new_tokens, do_sample=False)
        assert_same(out.sequences, plain(target, inputs, n=max_new_tokens), f"{name}/{variant} {max_new_tokens=}")
        assert out.stats.new_tokens == max_new_tokens


@pytest.mark.parametrize(("name", "variant"), VARIANTS)
def test_commit_equals_rebuilt_cache(bound, name, variant):
    """A tree forward at the layout's positions, then `commit_accepted` of one root-to-node path, leaves the cache the
    target builds from scratch on the prompt and that path; the tree's features along the path are the rebuilt
    ones."""
    target, _ = bound(name, variant)
    adapter, prompts = get_adapter(target), ARCHITECTURES[name].prompts
    for seed, prompt in zip(range(6), itertools.cycle(prompts)):
        rng = random.Random(seed)
        inputs = prompts[prompt](target, seed)
        with torch.no_grad():
            layout = adapter.layout(inputs["input_ids"], inputs)
            embeds = adapter.embed(inputs["input_ids"], layout.visual_features)  # [1, prompt_len, hidden]
            prompt_len = embeds.shape[1]
            cache = DynamicCache()
            adapter.forward(embeds, layout.positions, cache)
            n = rng.randint(2, 12)
            tokens = torch.randint(vocabulary(target), (n,), generator=torch.Generator().manual_seed(seed))
            tree = build_tree(tokens, [-1] + [rng.randrange(i) for i in range(1, n)])
            mask = tree_attention_mask(tree.mask, prompt_len, embeds.dtype)
            positions = layout.positions_at(prompt_len + tree.depths)  # the root at index prompt_len
            tree_features = adapter.forward(adapter.embed_tokens(tree.tokens)[None], positions, cache, mask)
            leaf = rng.randrange(n)
            path = next(p for p in tree.paths.tolist() if leaf in p)
            path = path[: path.index(leaf) + 1]
            commit_accepted(cache, prompt_len, path)

            rebuilt = DynamicCache()
            full = torch.cat([embeds, adapter.embed_tokens(tree.tokens[path])[None]], dim=1)
            reference = adapter.forward(full, layout.continued(full.shape[1]), rebuilt)
        assert cache.get_seq_length() == rebuilt.get_seq_length() == prompt_len + len(path)
        for ours, theirs in zip(cache.layers, rebuilt.layers):
            torch.testing.assert_close(ours.keys, theirs.keys, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(ours.values, theirs.values, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(tree_features[0, path], reference[0, prompt_len:], atol=1e-5, rtol=1e-5)


class LayoutExactTarget(ExactTarget):
    """`test_sampling.ExactTarget` through the adapter, for any architecture: p(. | prompt + prefix) from one forward
    of the text model at the positions plain decoding gives (the prompt's layout continued: 0, 1, 2, ... or
    M-RoPE's)."""

    def __init__(self, target, prompt: dict, setting):
        self.target, self.prompt, self.processors = target, prompt, setting.processors()
        self.table = {}
        self.adapter = get_adapter(target)
        self.layout = self.adapter.layout(prompt["input_ids"], prompt)
        self.prompt_embeds = self.adapter.embed(prompt["input_ids"], self.layout.visual_features)

    def fill(self, prefixes) -> None:
        missing = list(dict.fromkeys(prefix for prefix in prefixes if prefix not in self.table))
        if not missing:
            return
        new = torch.tensor(missing, dtype=torch.long).view(len(missing), -1)
        with torch.no_grad():
            embeds = torch.cat([self.prompt_embeds.expand(len(missing), -1, -1), self.adapter.embed_tokens(new)], 1)
            positions = self.layout.continued(embeds.shape[1])  # [1, seq_len] or [3, 1, seq_len]
            positions = positions.expand(*positions.shape[:-2], len(missing), -1)
            logits = self.adapter.logits(self.adapter.forward(embeds, positions)[:, -1])
        ids = torch.cat([self.prompt["input_ids"].expand(len(missing), -1), new], dim=1)
        probs = torch.softmax(self.processors(ids, logits).double(), dim=-1).numpy()
        self.table.update(zip(missing, probs))


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_sampling_keeps_the_target_distribution(name):
    """T > 0 with an image: the exact conditionals are generate()'s own scores, and speculative sampling (an oracle
    drafting from them, and the real draft class through generate()) passes the sampling certificate against them."""
    architecture = ARCHITECTURES[name]
    target = architecture.small()
    prompt = architecture.prompts["image"](target, 3)
    exact = LayoutExactTarget(target, prompt, HISTORY_FREE)
    kwargs = HISTORY_FREE.generate_kwargs()
    torch.manual_seed(0)
    for _ in range(5):
        out = target.generate(**prompt, **kwargs, output_scores=True, return_dict_in_generate=True)
        new = tuple(out.sequences[0, -NEW_TOKENS:].tolist())
        for position, scores in enumerate(out.scores):
            expected = exact(new[:position])
            np.testing.assert_allclose(torch.softmax(scores[0].double(), dim=-1).numpy(), expected, atol=1e-5)
    samples, accepted = speculative_draw(target, exact, HISTORY_FREE, N_OTHER_DRAFTS, seed=2)
    assert sum(accepted.values()) >= 2 * N_OTHER_DRAFTS
    assert_certified(certify(samples, exact))
    draft = SpecVLMDraftModel.from_target(target)
    samples = draw(lambda: target.generate(**prompt, **kwargs, assistant_model=draft), N_OTHER_DRAFTS, seed=5)
    assert_certified(certify(samples, exact))
