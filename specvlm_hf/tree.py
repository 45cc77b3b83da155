"""Pure tensor operations on the EAGLE-2 dynamic draft tree (SpecVLM §1.3): per-level expansion, reranking of all
scored nodes to `total_tokens`, and the verification buffers (ancestor mask, depth positions, root-to-leaf paths).

Node 0 of a tree is the root: the last emitted token, not yet in the target's cache. Every other node is a drafted
token whose parent has a smaller index, so node order is a topological order.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass(frozen=True)
class DraftTree:
    """
    A draft token tree ready for one verification forward.

    Attributes:
        tokens (`torch.LongTensor` of shape `(num_nodes,)`): node tokens; `tokens[0]` is the root.
        parents (`list[int]` of length `num_nodes`): parent node of each node, `-1` for the root.
        depths (`torch.LongTensor` of shape `(num_nodes,)`): distance to the root = position offset of each node.
        mask (`torch.BoolTensor` of shape `(num_nodes, num_nodes)`): `mask[i, j]` is True iff `j` is `i` or an
            ancestor of `i`: the tree attention pattern.
        paths (`torch.LongTensor` of shape `(num_leaves, max_depth + 1)`): root-to-leaf node indices, `-1` padded.
        children (`list[list[int]]`): children of each node in index order (best draft score first within a level).
    """

    tokens: torch.Tensor
    parents: list[int]
    depths: torch.Tensor
    mask: torch.Tensor
    paths: torch.Tensor
    children: list[list[int]]

    @property
    def num_nodes(self) -> int:
        return len(self.parents)

    @cached_property
    def token_list(self) -> list[int]:
        """`tokens` on the host, read once per tree."""
        return self.tokens.tolist()


def build_tree(tokens: torch.Tensor, parents: list[int]) -> DraftTree:
    """
    Builds the verification buffers of a tree from its parent pointers.

    Args:
        tokens (`torch.LongTensor` of shape `(num_nodes,)`): node tokens, root first.
        parents (`list[int]`): `parents[0] == -1` and `0 <= parents[i] < i` for `i > 0`.
    """
    if not parents or parents[0] != -1:
        raise ValueError("node 0 must be the root (parent -1)")
    if len(parents) != tokens.shape[0]:
        raise ValueError(f"{tokens.shape[0]} tokens but {len(parents)} parents")
    ancestry: list[list[int]] = [[0]]  # ancestry[i] = root-to-i node indices
    children: list[list[int]] = [[] for _ in parents]
    for node in range(1, len(parents)):
        parent = parents[node]
        if not 0 <= parent < node:
            raise ValueError(f"node {node} has parent {parent}; parents must precede their children")
        ancestry.append(ancestry[parent] + [node])
        children[parent].append(node)
    rows = [node for node, line in enumerate(ancestry) for _ in line]
    cols = [j for line in ancestry for j in line]
    mask = torch.zeros(len(parents), len(parents), dtype=torch.bool)
    mask[rows, cols] = True
    leaves = [node for node in range(len(parents)) if not children[node]]
    width = max(len(ancestry[leaf]) for leaf in leaves)
    paths = torch.tensor([ancestry[leaf] + [-1] * (width - len(ancestry[leaf])) for leaf in leaves])
    depths = torch.tensor([len(line) - 1 for line in ancestry])
    device = tokens.device
    return DraftTree(
        tokens=tokens,
        parents=list(parents),
        depths=depths.to(device),
        mask=mask.to(device),
        paths=paths.to(device),
        children=children,
    )


def expand_level(scores: torch.Tensor, log_probs: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Proposes the `top_k` most likely children of every frontier node.

    Args:
        scores (`torch.FloatTensor` of shape `(..., k)`): cumulative log-probabilities of the frontier nodes (leading
            dimensions: rows of a batch).
        log_probs (`torch.FloatTensor` of shape `(..., k, vocab_size)`): the draft's next-token log-probabilities at
            each frontier node.

    Returns:
        `(tokens, cumulative_scores)`, both of shape `(..., k, top_k)`: child tokens and `parent score + log p(child)`.
    """
    child_log_probs, child_tokens = log_probs.topk(top_k, dim=-1)
    # log p <= 0, so a child never outscores its parent: any top-n by score is ancestor-closed (see rerank_nodes).
    return child_tokens, scores[..., None] + child_log_probs.clamp(max=0.0)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """
    Float additive attention mask, the one format that eager, SDPA and flex attention all read correctly (a boolean
    mask is silently wrong under eager attention).

    Args:
        allowed (`torch.BoolTensor` of shape `(q_len, kv_len)`, or `(rows, q_len, kv_len)` per row): True where a
            query may attend.

    Returns:
        `torch.FloatTensor` of shape `(1, 1, q_len, kv_len)`, or `(rows, 1, q_len, kv_len)`: 0 where allowed,
        `finfo(dtype).min` elsewhere.
    """
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None] if mask.dim() == 3 else mask[None, None]


def tree_attention_mask(tree_mask: torch.Tensor, past_len: int, dtype: torch.dtype) -> torch.Tensor:
    """Mask of `(1, 1, num_nodes, past_len + num_nodes)`: every node sees the whole past and its own ancestors."""
    past = torch.ones(tree_mask.shape[0], past_len, dtype=torch.bool, device=tree_mask.device)
    return additive_mask(torch.cat([past, tree_mask], dim=1), dtype)


def causal_attention_mask(q_len: int, past_len: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Mask of `(1, 1, q_len, past_len + q_len)`: query `i` sees the past and new positions `<= i`."""
    allowed = torch.ones(q_len, past_len + q_len, dtype=torch.bool, device=device).tril(diagonal=past_len)
    return additive_mask(allowed, dtype)


def rerank_nodes(scores: torch.Tensor, parents: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Keeps the `keep` best scored nodes (EAGLE-2 reranking) and renumbers them as a tree below a root.

    Ties are broken towards the smaller pool index; since a parent precedes its children in the pool and never scores
    below them, the kept set is ancestor-closed.

    Args:
        scores (`torch.FloatTensor` of shape `(pool_size,)`): cumulative draft log-probabilities of all scored nodes.
        parents (`torch.LongTensor` of shape `(pool_size,)`): pool index of each node's parent, `-1` for the root.
        keep (`int`): nodes to keep (the root excluded).

    Returns:
        `(selected, tree_parents)`: the kept pool indices in increasing order, shape `(n,)` with
        `n = min(keep, pool_size)`, and their parents as tree node indices (root = 0, kept node `i` = `i + 1`).
    """
    order = torch.sort(scores, descending=True, stable=True).indices[:keep]
    selected = order.sort().values
    tree_index = torch.full_like(parents, -1)
    tree_index[selected] = torch.arange(1, selected.shape[0] + 1, device=parents.device)
    parent_pool = parents[selected]
    tree_parents = torch.where(parent_pool >= 0, tree_index[parent_pool.clamp(min=0)], 0)
    return selected, tree_parents
