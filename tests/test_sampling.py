"""
T > 0 end to end: speculative sampling through `generate()` emits exactly the target's distribution.

The certificate (`certify`) checks sequences of NEW_TOKENS new tokens against the exact conditional p(token | prompt +
prefix) of every prefix, which `ExactTarget` computes with a plain forward of the target and the processors generate()
builds (checked against generate()'s own scores, and by plain sampling passing the certificate). At every position,
and over all positions pooled:

* conditional chi-square: the tokens grouped by prefix, each group against its prefix's conditional (complete, where
  the groups are large enough);
* token and rank chi-squares: the count of each token, and of each rank under its conditional (0 = most likely),
  against the sum of its conditional probabilities over all draws, whatever their prefixes (`predictive_chi_square`).
  A wrong acceptance rule moves mass between the drafted (most likely) tokens and the rest, whichever tokens these are;
* token and rank z-scans: the same deviations one category at a time (`predictive_z_scores`), the sharpest test of a
  single token's (rank's) probability.

Critical values are Bonferroni-style (Z_CHI_SQUARE, Z_SCAN): a correct implementation fails a setting with
probability below 0.5% (simulated with exact draws: 2 failed certificates in 1,600, at 300 to 20,000 sequences).

What the draws exercise: `SamplingOracleDraft` drafts from the target's own processed distribution, so depth-3 paths
are often accepted to the leaves (asserted); 6 new tokens take at least two verification steps (the prefill emits one,
a step at most four); a vocabulary of 16 that top_k (5 or 4) and top_p (0.9 or 0.85) both cut (asserted);
temperature 0.7 and 1.3; a repetition penalty, with which the loop walks the tree node by node (`accept_node`) instead
of accepting over all nodes at once (`accept_sampling`). Three deliberately wrong acceptance rules fail it, on both
paths.

Two tiers. A few hundred sequences per run: gross errors, and every wrong rule (`-m "not slow"` runs only these).
The certificate (`-m certificate`, part of the default suite and CI) draws N_CERTIFICATE = 20,000 sequences per
setting, CERTIFICATE_ROWS = 100 per generate() call (the prompt repeated as a batch: each row its own trees and
draws; the fast tier draws one prompt per call), about a minute per setting on one CPU core. Its power: moving delta of
probability onto or off one token (or rank) at one position moves the mean of that category's z-score by at least
2 delta sqrt(n), since the variance of its count is at most n / 4. For delta = 2% that is 5.66 against a threshold
of 4.26: power >= 0.91 for any token, whatever its probability (tokens too rare to be scanned are left to the
chi-squares, which a 2% shift onto them overwhelms). In simulation
(exact draws, the most likely token raised by 2% in every prefix at one position, 4 x 40 runs) the certificate caught
152 of 160; at 1.5%, 27 of 40. A 1% shift at every position moves the pooled z-score by at least
2 x 0.01 x sqrt(120,000) = 6.9: power >= 0.99 (80 of 80 in simulation).
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch
from drafters import RandomDraft, RowwiseDraft
from stats import chi_square_critical, conditional_chi_square, predictive_chi_square, predictive_z_scores
from tiny import make_inputs, make_target
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import specvlm_hf.verify
from specvlm_hf import Drafter, DraftSource, SpeculativeConfig, SpecVLMDraftModel, speculative_generate
from specvlm_hf.tree import build_tree

V = 16
NEW_TOKENS = 6
DEPTH = 3  # of the drafted trees
WIDTH = 2  # likely children drafted per node
# Critical values, Bonferroni-style: 18 chi-squares per setting at the upper 1e-4 level (z = 3.72 in Wilson-Hilferty),
# at most 142 z-scores at the two-sided 2e-5 level; 0.18% + 0.28% < 0.5%.
Z_CHI_SQUARE = 3.72
Z_SCAN = 4.26
N_FAST = 300
N_WRONG = 250
N_OTHER_DRAFTS = 150
N_CERTIFICATE = 20_000
CERTIFICATE_ROWS = 100


@dataclass(frozen=True)
class Setting:
    """Sampling arguments of generate()."""

    name: str
    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float = 1.0

    def generate_kwargs(self) -> dict:
        kwargs = dict(do_sample=True, max_new_tokens=NEW_TOKENS, temperature=self.temperature)
        kwargs.update(top_k=self.top_k, top_p=self.top_p)
        if self.repetition_penalty != 1.0:
            kwargs["repetition_penalty"] = self.repetition_penalty
        return kwargs

    def processors(self) -> LogitsProcessorList:
        """The processors `GenerationMixin._get_logits_processor` builds for these arguments, in its order."""
        processors = []
        if self.repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(self.repetition_penalty))
        processors.append(TemperatureLogitsWarper(self.temperature))
        if self.top_k:
            processors.append(TopKLogitsWarper(self.top_k))
        processors.append(TopPLogitsWarper(self.top_p))
        return LogitsProcessorList(processors)


HISTORY_FREE = Setting("history-free", temperature=0.7, top_k=5, top_p=0.9)
PENALISED = Setting("repetition-penalty", temperature=1.3, top_k=4, top_p=0.85, repetition_penalty=1.3)
SETTINGS = [pytest.param(HISTORY_FREE, id=HISTORY_FREE.name), pytest.param(PENALISED, id=PENALISED.name)]


class ExactTarget:
    """
    p(. | prompt + prefix) under one setting: a plain forward of the target over the whole sequence (no cache), the
    setting's processors on the last position's logits, softmax. Memoised per prefix (a tuple of new tokens).

    The prompt's input embeddings (image features in place) are taken once from a forward on the prompt; new tokens
    are embedded as text, as decoding embeds them, even the image token id.
    """

    def __init__(self, target, prompt: dict, setting: Setting):
        self.target, self.prompt, self.processors = target, prompt, setting.processors()
        self.table: dict[tuple[int, ...], np.ndarray] = {}
        captured = {}
        hook = target.model.language_model.register_forward_pre_hook(
            lambda module, args, kwargs: captured.update(kwargs), with_kwargs=True
        )
        with torch.no_grad():
            target(**prompt)
        hook.remove()
        self.prompt_embeds = captured["inputs_embeds"]  # [1, prompt_len, hidden]

    def __call__(self, prefix: tuple[int, ...]) -> np.ndarray:
        if prefix not in self.table:
            self.fill([prefix])
        return self.table[prefix]

    def fill(self, prefixes: list[tuple[int, ...]]) -> None:
        """Computes the missing ones among `prefixes`, all of one length, in one batched forward."""
        missing = list(dict.fromkeys(prefix for prefix in prefixes if prefix not in self.table))
        if not missing:
            return
        new = torch.tensor(missing, dtype=torch.long).view(len(missing), -1)
        embeds = self.prompt_embeds.expand(len(missing), -1, -1)
        with torch.no_grad():
            embeds = torch.cat([embeds, self.target.get_input_embeddings()(new)], dim=1)
            logits = self.target(inputs_embeds=embeds).logits[:, -1]
        ids = torch.cat([self.prompt["input_ids"].expand(len(missing), -1), new], dim=1)
        probs = torch.softmax(self.processors(ids, logits).double(), dim=-1).numpy()
        self.table.update(zip(missing, probs))


class SamplingOracleDraft(DraftSource):
    """
    Drafts as a well-trained draft does at T > 0, from the target's own processed distribution: each node's children
    are its `width` most likely tokens and one other token drawn uniformly (mostly one the filters removed, a child of
    probability 0), in random order; the likely children are expanded again, down to `depth`.
    """

    def __init__(self, exact: ExactTarget, depth: int, width: int, seed: int = 0):
        self.exact, self.depth, self.width = exact, depth, width
        self.prompt_len = exact.prompt["input_ids"].shape[1]
        self.rng = random.Random(seed)  # one stream for all generate() calls: every call drafts new trees
        nodes = 1 + (width + 1) * sum(width**level for level in range(depth))
        self.speculative_config = SpeculativeConfig(depth=depth, top_k=width + 1, total_tokens=nodes)

    def new_drafter(self, target) -> Drafter:
        return _SamplingOracleDrafter(self)


class _SamplingOracleDrafter(Drafter):
    def __init__(self, source: SamplingOracleDraft):
        self.source = source

    def propose(self, state):
        source, ids = self.source, state.input_ids[0].tolist()
        tokens, parents = [ids[-1]], [-1]
        frontier = [(0, tuple(ids[source.prompt_len :]))]  # (node, new tokens up to and including the node)
        for _ in range(source.depth):
            source.exact.fill([prefix for _, prefix in frontier])
            next_frontier = []
            for node, prefix in frontier:
                order = np.argsort(-source.exact(prefix), kind="stable").tolist()
                likely = order[: source.width]
                children = likely + [source.rng.choice(order[source.width :])]
                source.rng.shuffle(children)
                for token in children:
                    tokens.append(token)
                    parents.append(node)
                    if token in likely:
                        next_frontier.append((len(tokens) - 1, prefix + (token,)))
            frontier = next_frontier
        return build_tree(torch.tensor(tokens, device=state.input_ids.device), parents)


@dataclass(frozen=True)
class Check:
    """One test of the certificate: it passes while `stat < critical`."""

    name: str
    stat: float
    critical: float

    @property
    def passed(self) -> bool:
        return self.stat < self.critical

    def __str__(self) -> str:
        return f"{self.name}: {self.stat:.2f} vs {self.critical:.2f}"


def chi_square_check(name: str, stat_df: tuple[float, int]) -> Check:
    stat, df = stat_df
    return Check(f"{name} chi-square (df {df})", stat, chi_square_critical(df, Z_CHI_SQUARE))


def z_check(name: str, z: np.ndarray) -> Check:
    return Check(f"{name} max |z| of {len(z)}", float(np.abs(z).max(initial=0.0)), Z_SCAN)


def certify(samples: list[tuple[int, ...]], exact: ExactTarget) -> list[Check]:
    """Every test of the certificate, per position then over all positions (see the module docstring)."""
    draws = np.array(samples)  # [n, NEW_TOKENS]
    rows = np.arange(len(samples))
    checks, pooled = [], {"token": ([], []), "rank": ([], [])}
    for position in range(NEW_TOKENS):
        prefixes = [sample[:position] for sample in samples]
        exact.fill(prefixes)
        probs = np.stack([exact(prefix) for prefix in prefixes])  # [n, V]
        tokens = draws[:, position]
        groups: dict[tuple[int, ...], np.ndarray] = {}
        for prefix, token in zip(prefixes, tokens):
            groups.setdefault(prefix, np.zeros(V, dtype=np.int64))[token] += 1
        stat_df = conditional_chi_square((counts, exact(prefix)) for prefix, counts in groups.items())
        checks.append(chi_square_check(f"position {position} conditional", stat_df))
        # The rank of a token: how many tokens are more likely under its conditional (0 = the most likely).
        ranks = (probs > probs[rows, tokens][:, None]).sum(axis=1)
        for space, outcomes, predicted in (("token", tokens, probs), ("rank", ranks, -np.sort(-probs, axis=1))):
            pooled[space][0].append(outcomes)
            pooled[space][1].append(predicted)
            if position == 0 and space == "rank":
                continue  # one prefix: ranks are tokens renamed
            if position > 0:  # with one prefix this chi-square is the conditional one
                checks.append(
                    chi_square_check(f"position {position} {space}", predictive_chi_square(outcomes, predicted))
                )
            checks.append(z_check(f"position {position} {space}", predictive_z_scores(outcomes, predicted)))
    for space, (outcomes, predicted) in pooled.items():
        outcomes, predicted = np.concatenate(outcomes), np.concatenate(predicted)
        checks.append(chi_square_check(f"all positions {space}", predictive_chi_square(outcomes, predicted)))
        checks.append(z_check(f"all positions {space}", predictive_z_scores(outcomes, predicted)))
    return checks


def assert_certified(checks: list[Check]) -> None:
    failed = [str(check) for check in checks if not check.passed]
    assert not failed, "not the target's distribution:\n" + "\n".join(failed)


def draw(generate, n: int, seed: int) -> list[tuple[int, ...]]:
    """The new tokens of `n` sequences from `generate()` (which returns sequences, one or more rows per call), from
    one torch seed."""
    torch.manual_seed(seed)
    samples = []
    while len(samples) < n:
        samples.extend(tuple(row) for row in generate()[:, -NEW_TOKENS:].tolist())
    return samples[:n]


def speculative_draw(target, exact: ExactTarget, setting: Setting, n: int, seed: int, rows: int = 1):
    """`n` sequences by speculative sampling with `SamplingOracleDraft`, `rows` per call (the prompt repeated as a
    batch: each row drafts its own trees and makes its own draws), and the count of each accepted length."""
    oracle = SamplingOracleDraft(exact, DEPTH, WIDTH, seed=seed)
    source = oracle if rows == 1 else RowwiseDraft([oracle] * rows)
    prompt = exact.prompt if rows == 1 else {name: value.expand(rows, -1) for name, value in exact.prompt.items()}
    accepted = Counter()

    def generate():
        output = speculative_generate(target, source, **prompt, **setting.generate_kwargs())
        accepted.update(output.stats.accepted_lengths)
        return output.sequences

    return draw(generate, n, seed), accepted


# --- Deliberately wrong acceptance rules: replacements for `try_children` / `sample_residual` in specvlm_hf.verify. --
def try_children_unnormalised(tokens, probs, support, uniforms):
    """Wrong: child j is accepted with probability p(c_j), not p(c_j) / (1 - p(c_1) - ... - p(c_{j-1})). As in the
    right rule, the last token of the support left is accepted surely, so the residual is never empty."""
    rejected = 0
    for j, (p, u) in enumerate(zip(probs, uniforms)):
        if p > 0 and (rejected + 1 == support or u < p):
            return j
        rejected += p > 0
    return None


def sample_residual_untouched(probs, rejected):
    """Wrong: the bonus token is drawn from p itself, the rejected children left in."""
    return int(torch.multinomial(probs, 1))


WRONG_RULES = {
    # Trials against p instead of the residual; the bonus still from the correct residual.
    "no-renormalisation": {"try_children": try_children_unnormalised},
    # The rejected children never leave p: trials against p, bonus from p.
    "no-residual-zeroing": {"try_children": try_children_unnormalised, "sample_residual": sample_residual_untouched},
    # Correct trials, bonus from p.
    "bonus-from-p": {"sample_residual": sample_residual_untouched},
}


@pytest.fixture(autouse=True)
def _one_thread():
    """The tiny target's forwards are fastest on one thread (2.4x faster than two on a busy 2-core machine)."""
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def small_target():
    return make_target(seed=1, vocab=V, logit_scale=9.0, layers=1)


@pytest.fixture(scope="module")
def text_prompt():
    return make_inputs(1, 3, False, vocab=V)


@pytest.fixture(scope="module")
def exact_targets(small_target, text_prompt):
    """One `ExactTarget` per setting, shared by the tests of this module (its table only grows)."""
    return {setting.name: ExactTarget(small_target, text_prompt, setting) for setting in (HISTORY_FREE, PENALISED)}


@pytest.mark.parametrize("setting", SETTINGS)
def test_exact_conditional_is_what_generate_samples(small_target, text_prompt, setting):
    """`ExactTarget` is what plain sampling samples from: generate()'s own processed scores, step by step."""
    exact = ExactTarget(small_target, text_prompt, setting)
    torch.manual_seed(0)
    for _ in range(10):
        out = small_target.generate(
            **text_prompt, **setting.generate_kwargs(), output_scores=True, return_dict_in_generate=True
        )
        new = tuple(out.sequences[0, -NEW_TOKENS:].tolist())
        for position, scores in enumerate(out.scores):
            expected = exact(new[:position])
            np.testing.assert_allclose(torch.softmax(scores[0].double(), dim=-1).numpy(), expected, atol=1e-5)
    # Both filters cut: top_p leaves fewer than top_k tokens after some of these prefixes, and top_k fewer than top_p
    # alone would keep after others (the vocabulary is larger than top_k).
    sizes = [int((probs > 0).sum()) for probs in exact.table.values()]
    top_p_only = ExactTarget(small_target, text_prompt, replace(setting, top_k=0))
    assert min(sizes) < setting.top_k
    assert max(int((top_p_only(prefix) > 0).sum()) for prefix in exact.table) > setting.top_k


def test_plain_sampling_passes_the_certificate(small_target, text_prompt, exact_targets):
    """The certificate's exact conditionals are right: plain sampling (no draft) passes it."""
    exact = exact_targets[PENALISED.name]
    samples = draw(lambda: small_target.generate(**text_prompt, **PENALISED.generate_kwargs()), N_FAST, seed=1)
    assert_certified(certify(samples, exact))


@pytest.mark.parametrize("setting", SETTINGS)
def test_speculative_sampling_passes_the_certificate(small_target, exact_targets, setting):
    exact = exact_targets[setting.name]
    samples, accepted = speculative_draw(small_target, exact, setting, N_FAST, seed=2)
    # Several steps per sequence, and acceptance to the tree's leaves (every drafted token of a path) is common.
    assert sum(accepted.values()) >= 2 * N_FAST
    assert accepted[DEPTH + 1] >= 0.1 * sum(accepted.values())
    assert_certified(certify(samples, exact))


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("rule", WRONG_RULES)
def test_wrong_acceptance_rule_fails_the_certificate(small_target, exact_targets, setting, rule, monkeypatch):
    for name, replacement in WRONG_RULES[rule].items():
        monkeypatch.setattr(specvlm_hf.verify, name, replacement)
    exact = exact_targets[setting.name]
    samples, _ = speculative_draw(small_target, exact, setting, N_WRONG, seed=3)
    assert not all(check.passed for check in certify(samples, exact))


def test_drafts_of_other_shapes_pass_the_certificate(small_target):
    """Random trees (`RandomDraft`) and the real `SpecVLMDraftModel` through `generate(assistant_model=...)`, with an
    image in the prompt."""
    prompt = make_inputs(2, 3, True, vocab=V)
    exact = ExactTarget(small_target, prompt, HISTORY_FREE)
    kwargs = HISTORY_FREE.generate_kwargs()
    source = RandomDraft(V, SpeculativeConfig(depth=DEPTH, top_k=3, total_tokens=10))
    samples = draw(
        lambda: speculative_generate(small_target, source, **prompt, **kwargs).sequences, N_OTHER_DRAFTS, seed=4
    )
    assert_certified(certify(samples, exact))
    draft = SpecVLMDraftModel.from_target(small_target)
    samples = draw(lambda: small_target.generate(**prompt, **kwargs, assistant_model=draft), N_OTHER_DRAFTS, seed=5)
    assert_certified(certify(samples, exact))


@pytest.mark.slow
@pytest.mark.certificate
@pytest.mark.parametrize("setting", SETTINGS)
def test_certificate(small_target, exact_targets, setting):
    """The high-power tier: N_CERTIFICATE sequences per setting (power in the module docstring), CERTIFICATE_ROWS
    per call."""
    exact = exact_targets[setting.name]
    samples, accepted = speculative_draw(small_target, exact, setting, N_CERTIFICATE, seed=6, rows=CERTIFICATE_ROWS)
    assert accepted[DEPTH + 1] >= 0.1 * sum(accepted.values())
    assert_certified(certify(samples, exact))
