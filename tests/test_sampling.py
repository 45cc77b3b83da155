"""T > 0 end to end: on a tiny-vocabulary LLaVA, the first two tokens of speculative sampling follow the target's
exact joint distribution (as plain sampling does), and the same test rejects a deliberately wrong acceptance rule."""

import copy
from collections import Counter

import pytest
import torch
from drafters import RandomDraft
from stats import fits
from test_verify import wrong_rule
from tiny import make_inputs, make_target
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

import specvlm_hf.generation
from specvlm_hf import SpeculativeConfig, SpecVLMDraftModel, speculative_generate
from specvlm_hf._compat import CACHE_KWARG

V = 8
N = 1200


@pytest.fixture(scope="module")
def small_target():
    return make_target(seed=3, vocab=V, logit_scale=2.0)


@pytest.fixture(scope="module")
def prompt():
    return make_inputs(1, 3, True, vocab=V)


def exact_joint(target, inputs, temperature: float = 1.0, top_p: float = 1.0) -> dict:
    """p(t1, t2) = p(t1 | prompt) p(t2 | prompt, t1), warped by the same processors generate() applies."""
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature), TopPLogitsWarper(top_p)])

    def probs(logits):
        return torch.softmax(warpers(None, logits[None].float())[0], dim=-1)

    with torch.no_grad():
        prefill = target(**inputs, use_cache=True)
        first = probs(prefill.logits[0, -1])
        joint = {}
        for t1 in range(V):  # decoded tokens are plain text tokens, as in generate(), even the image token id
            step = target(input_ids=torch.tensor([[t1]]), **{CACHE_KWARG: copy.deepcopy(prefill[CACHE_KWARG])})
            second = probs(step.logits[0, -1])
            for t2 in range(V):
                joint[(t1, t2)] = float(first[t1] * second[t2])
    return joint


def sample_pairs(generate, n: int) -> Counter:
    torch.manual_seed(1234)
    return Counter(tuple(generate()[0, -2:].tolist()) for _ in range(n))


def test_speculative_sampling_matches_target(small_target, prompt):
    joint = exact_joint(small_target, prompt)
    kwargs = dict(max_new_tokens=2, do_sample=True)
    plain = sample_pairs(lambda: small_target.generate(**prompt, **kwargs), N)
    assert fits(plain, joint, N)  # the exact joint is right: plain sampling follows it
    source = RandomDraft(V, SpeculativeConfig(depth=3, top_k=3, total_tokens=8))
    ours = sample_pairs(lambda: speculative_generate(small_target, source, **prompt, **kwargs).sequences, N)
    assert fits(ours, joint, N)
    draft = SpecVLMDraftModel.from_target(small_target)
    ours = sample_pairs(lambda: small_target.generate(**prompt, assistant_model=draft, **kwargs), N)
    assert fits(ours, joint, N)


def test_temperature_and_top_p_are_honoured(small_target, prompt):
    joint = exact_joint(small_target, prompt, temperature=0.6, top_p=0.8)
    assert sum(p == 0 for p in joint.values()) > 0  # top-p really removes tokens here
    kwargs = dict(max_new_tokens=2, do_sample=True, temperature=0.6, top_p=0.8)
    source = RandomDraft(V, SpeculativeConfig(depth=3, top_k=3, total_tokens=8))
    ours = sample_pairs(lambda: speculative_generate(small_target, source, **prompt, **kwargs).sequences, N)
    assert fits(ours, joint, N)
    assert all(joint[pair] > 0 for pair in ours)


def test_wrong_acceptance_rule_is_detected(small_target, prompt, monkeypatch):
    joint = exact_joint(small_target, prompt)
    monkeypatch.setattr(specvlm_hf.generation, "accept_sampling", wrong_rule)
    source = RandomDraft(V, SpeculativeConfig(depth=3, top_k=3, total_tokens=8))
    kwargs = dict(max_new_tokens=2, do_sample=True)
    wrong = sample_pairs(lambda: speculative_generate(small_target, source, **prompt, **kwargs).sequences, N)
    assert not fits(wrong, joint, N)
