"""Acceptance rules: greedy keeps the longest argmax-matching path; tree rejection sampling emits tokens distributed
exactly as the target's, and a plausible wrong rule is caught by the same statistical test."""

import random
from collections import Counter

import pytest
import torch
from stats import fits

from specvlm_hf.tree import build_tree
from specvlm_hf.verify import Acceptance, accept_greedy, accept_sampling

V = 5


def random_tree(rng: random.Random, n: int, vocab: int) -> tuple[list[int], list[int]]:
    """`n` nodes; siblings carry distinct tokens."""
    tokens, parents, children = [rng.randrange(vocab)], [-1], {0: set()}
    for i in range(1, n):
        parent = rng.choice([node for node in range(i) if len(children[node]) < vocab])
        token = rng.choice([t for t in range(vocab) if t not in children[parent]])
        children[parent].add(token)
        children[i] = set()
        tokens.append(token)
        parents.append(parent)
    return tokens, parents


def brute_force_greedy(tokens, parents, target_tokens):
    best = [0]
    for node in range(len(tokens)):
        path, cur = [], node
        while cur >= 0:
            path.append(cur)
            cur = parents[cur]
        path.reverse()
        if all(tokens[b] == target_tokens[a] for a, b in zip(path, path[1:])) and len(path) > len(best):
            best = path
    return best


@pytest.mark.parametrize("seed", range(40))
def test_accept_greedy_is_longest_matching_path(seed):
    rng = random.Random(seed)
    tokens, parents = random_tree(rng, rng.randint(1, 25), vocab=4)
    target_tokens = [rng.randrange(4) for _ in tokens]
    tree = build_tree(torch.tensor(tokens), parents)
    acceptance = accept_greedy(tree, torch.tensor(target_tokens))
    expected = brute_force_greedy(tokens, parents, target_tokens)
    assert len(acceptance.path) == len(expected)
    assert all(tokens[b] == target_tokens[a] for a, b in zip(acceptance.path, acceptance.path[1:]))
    assert acceptance.next_token == target_tokens[acceptance.path[-1]]


@pytest.mark.parametrize("seed", range(20))
def test_sampling_with_one_hot_target_equals_greedy(seed):
    rng = random.Random(seed)
    tokens, parents = random_tree(rng, rng.randint(1, 25), vocab=4)
    target_tokens = torch.tensor([rng.randrange(4) for _ in tokens])
    tree = build_tree(torch.tensor(tokens), parents)
    one_hot = torch.nn.functional.one_hot(target_tokens, 4).float()
    assert accept_sampling(tree, one_hot) == accept_greedy(tree, target_tokens)


# --- A synthetic target: p(. | context) for every context, and full decoding with a fresh random tree per step. ----
def target_probs(context: tuple) -> torch.Tensor:
    g = torch.Generator().manual_seed(hash(context) % (2**31))
    return torch.softmax(torch.randn(V, generator=g) * 1.5, dim=-1)


def draft_tree(rng: random.Random, context: tuple, n: int) -> tuple[list[int], list[int], list[tuple]]:
    """A random tree whose children are drawn from the target itself (likely tokens, as a trained draft proposes)."""
    tokens, parents, contexts, children = [-1], [-1], [context], {0: []}
    for i in range(1, n):
        parent = rng.choice([node for node in range(i) if len(children[node]) < 2])
        p = target_probs(contexts[parent]).tolist()
        for t in children[parent]:
            p[t] = 0.0
        token = rng.choices(range(V), weights=p)[0]
        children[parent].append(token)
        children[i] = []
        tokens.append(token)
        parents.append(parent)
        contexts.append(contexts[parent] + (token,))
    return tokens, parents, contexts


def decode(rule, n_tokens: int, rng: random.Random) -> tuple:
    """Emits `n_tokens` with `rule`, drafting a fresh random tree rooted at the current context each step."""
    out: list[int] = []
    while len(out) < n_tokens:
        tokens, parents, contexts = draft_tree(rng, tuple(out), rng.randint(1, 8))
        tree = build_tree(torch.tensor(tokens), parents)
        probs = torch.stack([target_probs(c) for c in contexts])
        acceptance = rule(tree, probs)
        out += [tokens[i] for i in acceptance.path[1:]] + [acceptance.next_token]
    return tuple(out[:n_tokens])


def exact_joint(n_tokens: int) -> dict:
    dist = {(): 1.0}
    for _ in range(n_tokens):
        dist = {seq + (t,): p * float(target_probs(seq)[t]) for seq, p in dist.items() for t in range(V)}
    return dist


def wrong_rule(tree, probs) -> Acceptance:
    """Plausible but wrong: accept each child with p(child) without renormalising, bonus from the untouched p."""
    node, path = 0, [0]
    while True:
        for child in tree.children[node]:
            if random.random() < float(probs[node, tree.tokens[child]]):
                node = child
                path.append(child)
                break
        else:
            break
    return Acceptance(path=path, next_token=int(torch.multinomial(probs[node], 1)))


def test_tree_sampling_matches_target_distribution():
    torch.manual_seed(0)
    rng = random.Random(0)
    n = 4000
    counts = Counter(decode(accept_sampling, 2, rng) for _ in range(n))
    assert fits(counts, exact_joint(2), n)


def test_statistical_test_catches_a_wrong_rule():
    torch.manual_seed(0)
    random.seed(0)
    rng = random.Random(0)
    n = 4000
    counts = Counter(decode(wrong_rule, 2, rng) for _ in range(n))
    assert not fits(counts, exact_joint(2), n)
