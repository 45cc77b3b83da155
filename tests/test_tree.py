"""Pure tree operations: masks are ancestors only, positions are depths, paths cover every leaf, reranking keeps an
ancestor-closed set."""

import random

import pytest
import torch

from specvlm_hf.tree import (
    build_tree,
    causal_attention_mask,
    expand_level,
    rerank_nodes,
    tree_attention_mask,
)


def random_parents(rng: random.Random, n: int) -> list[int]:
    return [-1] + [rng.randrange(i) for i in range(1, n)]


def ancestors(parents: list[int], node: int) -> set[int]:
    out = {node}
    while parents[node] >= 0:
        node = parents[node]
        out.add(node)
    return out


@pytest.mark.parametrize("seed", range(20))
def test_build_tree_properties(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 40)
    parents = random_parents(rng, n)
    tree = build_tree(torch.arange(n), parents)
    for i in range(n):
        expected = ancestors(parents, i)
        assert set(torch.nonzero(tree.mask[i]).flatten().tolist()) == expected
        assert int(tree.depths[i]) == len(expected) - 1
    leaves = {i for i in range(n) if i not in parents}
    path_leaves = set()
    for path in tree.paths.tolist():
        nodes = [p for p in path if p >= 0]
        assert nodes[0] == 0
        assert all(parents[b] == a for a, b in zip(nodes, nodes[1:]))
        path_leaves.add(nodes[-1])
    assert path_leaves == leaves
    assert tree.children == [[c for c in range(n) if parents[c] == p] for p in range(n)]


def test_build_tree_rejects_bad_parents():
    with pytest.raises(ValueError, match="root"):
        build_tree(torch.arange(2), [0, 0])
    with pytest.raises(ValueError, match="precede"):
        build_tree(torch.arange(3), [-1, 2, 0])


def test_chain_is_a_tree_with_one_path():
    tree = build_tree(torch.arange(5), [-1, 0, 1, 2, 3])
    assert tree.paths.tolist() == [[0, 1, 2, 3, 4]]
    assert torch.equal(tree.mask, torch.ones(5, 5, dtype=torch.bool).tril())


@pytest.mark.parametrize("seed", range(30))
def test_rerank_is_ancestor_closed(seed):
    g = torch.Generator().manual_seed(seed)
    k, depth = 3, 4
    # Grow a pool the way the drafter does, with many exact ties (log p = 0 children) mixed in.
    scores, parents, frontier_scores, frontier = [], [], torch.zeros(1), torch.tensor([-1])
    for level in range(depth):
        log_probs = torch.log_softmax(torch.randn(frontier.shape[0], 10, generator=g) * 3, dim=-1)
        if level == 1:
            log_probs[0] = torch.tensor([0.0] + [-float("inf")] * 9)
        _, child_scores = expand_level(frontier_scores, log_probs, k)
        base = len(scores)
        scores += child_scores.flatten().tolist()
        parents += frontier.repeat_interleave(k).tolist()
        best = child_scores.flatten().topk(k).indices
        frontier, frontier_scores = base + best, child_scores.flatten()[best]
    keep = int(torch.randint(1, len(scores) + 1, (1,), generator=g))
    selected, tree_parents = rerank_nodes(torch.tensor(scores), torch.tensor(parents), keep)
    chosen = set(selected.tolist())
    assert len(chosen) == min(keep, len(scores))
    for pool_index in chosen:
        parent = parents[pool_index]
        assert parent == -1 or parent in chosen  # ancestor-closed
    # Tree parents point at earlier tree nodes and match the pool parents.
    order = selected.tolist()
    for i, (pool_index, tp) in enumerate(zip(order, tree_parents.tolist())):
        assert 0 <= tp < i + 1
        assert (tp == 0 and parents[pool_index] == -1) or order[tp - 1] == parents[pool_index]
    # The kept nodes are the best by score.
    threshold = min(scores[i] for i in chosen)
    assert all(s <= threshold for i, s in enumerate(scores) if i not in chosen)


def test_expand_level_cumulates_scores():
    log_probs = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]))
    tokens, scores = expand_level(torch.tensor([0.0, -1.0]), log_probs, 2)
    assert tokens.tolist() == [[0, 1], [2, 0]]
    assert torch.allclose(scores, torch.tensor([[0.5, 0.3], [0.8, 0.1]]).log() + torch.tensor([[0.0], [-1.0]]))


def test_masks_are_additive_floats():
    tree = build_tree(torch.arange(3), [-1, 0, 0])
    mask = tree_attention_mask(tree.mask, past_len=2, dtype=torch.float32)
    assert mask.shape == (1, 1, 3, 5)
    allowed = mask[0, 0] == 0
    assert allowed.tolist() == [
        [True, True, True, False, False],
        [True, True, True, True, False],
        [True, True, True, False, True],
    ]
    assert (mask[0, 0][~allowed] == torch.finfo(torch.float32).min).all()
    causal = causal_attention_mask(2, 3, torch.float16, torch.device("cpu"))
    assert (causal[0, 0] == 0).tolist() == [[True] * 4 + [False], [True] * 5]
