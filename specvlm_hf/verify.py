"""Acceptance over a verified tree (SpecVLM §1.3, EAGLE `evaluate_posterior`): which drafted path the target keeps, and
the target's own next ("bonus") token after it. Both rules emit exactly what the target alone would emit: the argmax
path at T = 0, and at T > 0 a token distributed as the target's distribution p, by recursive rejection over siblings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.generation.logits_process import (
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    InfNanRemoveLogitsProcessor,
    LogitsProcessorList,
    MinPLogitsWarper,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from .tree import DraftTree

# Processors whose output depends only on the scores, not on the token history: applied to all nodes at once.
# Any other processor (repetition penalty, min length, ...) is applied node by node with that node's own path.
HISTORY_FREE_PROCESSORS = (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    MinPLogitsWarper,
    TypicalLogitsWarper,
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    SuppressTokensLogitsProcessor,
    InfNanRemoveLogitsProcessor,
)


@dataclass(frozen=True)
class Acceptance:
    """
    Attributes:
        path (`list[int]`): accepted tree nodes, root first; `len(path) - 1` drafted tokens were accepted.
        next_token (`int`): the target's token after the last accepted node (the bonus token).
    """

    path: list[int]
    next_token: int


def process_tree_logits(
    logits_processor: LogitsProcessorList, input_ids: torch.Tensor, tree: DraftTree, logits: torch.Tensor
) -> torch.Tensor:
    """
    Applies `generate()`'s logits processors to every tree node as if that node had been decoded alone.

    Args:
        input_ids (`torch.LongTensor` of shape `(1, seq_len)`): the sequence so far, ending with the tree's root.
        logits (`torch.FloatTensor` of shape `(num_nodes, vocab_size)`): target logits at each node.

    Returns:
        `torch.FloatTensor` of shape `(num_nodes, vocab_size)`: processed scores.
    """
    scores = logits
    node_ids = None
    for processor in logits_processor:
        if isinstance(processor, HISTORY_FREE_PROCESSORS):
            scores = processor(input_ids, scores)
            continue
        if node_ids is None:
            node_ids = _node_histories(input_ids, tree)
        scores = torch.cat([processor(ids, scores[i : i + 1]) for i, ids in enumerate(node_ids)])
    return scores


def _node_histories(input_ids: torch.Tensor, tree: DraftTree) -> list[torch.Tensor]:
    """For each node, the token history a plain decoder would hold there: `input_ids` + drafted path to the node."""
    histories = [input_ids]
    for node in range(1, tree.num_nodes):
        histories.append(torch.cat([histories[tree.parents[node]], tree.tokens[node : node + 1][None]], dim=1))
    return histories


def accept_greedy(tree: DraftTree, target_tokens: torch.Tensor) -> Acceptance:
    """
    T = 0: the longest root-to-node path on which every drafted token equals the target's argmax at its parent.

    Args:
        target_tokens (`torch.LongTensor` of shape `(num_nodes,)`): the target's argmax at each node.
    """
    paths = tree.paths  # [L, W]
    nodes, parents = paths[:, 1:], paths[:, :-1]
    matches = (nodes >= 0) & (tree.tokens[nodes.clamp(min=0)] == target_tokens[parents.clamp(min=0)])
    lengths = matches.long().cumprod(dim=1).sum(dim=1)  # accepted drafted tokens per path
    best = int(lengths.argmax())
    # One transfer: the best path, its accepted length, and the target's tokens along it.
    row = torch.cat([paths[best], lengths[best : best + 1], target_tokens[paths[best].clamp(min=0)]]).tolist()
    width = paths.shape[1]
    accepted = row[width]
    path = row[: accepted + 1]
    return Acceptance(path=path, next_token=row[width + 1 + accepted])


def accept_sampling(tree: DraftTree, probs: torch.Tensor) -> Acceptance:
    """
    T > 0: multi-candidate recursive rejection sampling over the tree (SpecInfer / EAGLE).

    At an accepted node with target distribution p, its drafted children c_1, c_2, ... (deterministic proposals) are
    tried in order: c_j is accepted with probability p(c_j) / (1 - p(c_1) - ... - p(c_{j-1})), i.e. p(c_j) under p with
    the rejected siblings zeroed and renormalised. If every child is rejected, the bonus token is sampled from that
    residual. Each trial is rejection sampling with a point-mass proposal, whose residual is "p without c", so the
    emitted token is distributed exactly as p, at every depth.

    Args:
        probs (`torch.FloatTensor` of shape `(num_nodes, vocab_size)`): the target's (processed) distribution at each
            node. Randomness comes from torch's global generators, as in `generate()`.
    """
    parents = torch.tensor(tree.parents[1:], dtype=torch.long, device=probs.device)
    # One transfer: p(node) under its parent's distribution, and the node tokens.
    child_p, child_tokens = torch.stack([probs[parents, tree.tokens[1:]].double(), tree.tokens[1:].double()]).tolist()
    uniforms = torch.rand(tree.num_nodes, dtype=torch.float64).tolist()
    node, path = 0, [0]
    while True:
        residual, rejected = 1.0, set()
        for child in tree.children[node]:
            token, p = child_tokens[child - 1], child_p[child - 1]
            if token in rejected:  # a duplicate sibling has probability 0 under the residual
                continue
            if uniforms[child] * residual < p:
                node = child
                path.append(child)
                break
            residual -= p
            rejected.add(token)
        else:
            break
    row = probs[node].clone()
    if tree.children[node]:
        row[tree.tokens[tree.children[node]]] = 0.0
    if not bool(row.sum() > 0):
        raise RuntimeError("The target's residual distribution is empty after rejecting all drafted children.")
    next_token = int(torch.multinomial(row, 1))
    return Acceptance(path=path, next_token=next_token)
