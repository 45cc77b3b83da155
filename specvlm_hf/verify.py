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
    LogitNormalization,
    LogitsProcessorList,
    MinPLogitsWarper,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from .tree import DraftTree

# Processors whose output is a pure function of the scores (no token history, no state): applied to all tree nodes
# at once. Exact types only: a subclass may keep state. With any other processor in the list the walk calls the
# whole list once per emitted token with that token's history, exactly as plain decoding does.
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
    LogitNormalization,
)


def is_history_free(logits_processor: LogitsProcessorList) -> bool:
    """True if every processor is one of `HISTORY_FREE_PROCESSORS` (exact type)."""
    return all(type(processor) in HISTORY_FREE_PROCESSORS for processor in logits_processor)


@dataclass(frozen=True)
class Acceptance:
    """
    Attributes:
        path (`list[int]`): accepted tree nodes, root first; `len(path) - 1` drafted tokens were accepted.
        next_token (`int`): the target's token after the last accepted node (the bonus token).
    """

    path: list[int]
    next_token: int


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
    # One transfer: p(node) under its parent's distribution, and the size of each node's support.
    child_p = probs[parents, tree.tokens[1:]].double()
    support = (probs > 0).sum(dim=-1).double()
    values = torch.cat([child_p, support]).tolist()
    child_p, support = [0.0] + values[: tree.num_nodes - 1], values[tree.num_nodes - 1 :]
    uniforms = torch.rand(tree.num_nodes, dtype=torch.float64).tolist()
    node, path = 0, [0]
    while True:
        children = tree.children[node]
        tokens = [tree.token_list[child] for child in children]
        j = try_children(tokens, [child_p[c] for c in children], int(support[node]), [uniforms[c] for c in children])
        if j is None:
            return Acceptance(path=path, next_token=sample_residual(probs[node], tokens))
        node = children[j]
        path.append(node)


def accept_node(tree: DraftTree, node: int, scores: torch.Tensor, do_sample: bool) -> tuple[int | None, int]:
    """
    One node of the same rules, for processed scores computed node by node: the target's token at `node` and the
    child that carries it (`None` if no child does: the token is the bonus token and the step ends).

    Args:
        scores (`torch.FloatTensor` of shape `(vocab_size,)`): the target's processed scores at `node`.
    """
    children = tree.children[node]
    tokens = [tree.token_list[child] for child in children]
    if not do_sample:
        token = int(scores.argmax())
        return next((child for child, t in zip(children, tokens) if t == token), None), token
    probs = torch.softmax(scores, dim=-1)
    if not children:
        return None, int(torch.multinomial(probs, 1))
    index = torch.tensor(tokens, device=probs.device)
    values = torch.cat([probs[index].double(), (probs > 0).sum().double().view(1)]).tolist()
    uniforms = torch.rand(len(children), dtype=torch.float64).tolist()
    j = try_children(tokens, values[:-1], int(values[-1]), uniforms)
    if j is None:
        return None, sample_residual(probs, tokens)
    return children[j], tokens[j]


def try_children(tokens: list[int], probs: list[float], support: int, uniforms: list[float]) -> int | None:
    """
    Recursive rejection over one node's drafted children: the index of the accepted child, or `None`.

    Args:
        tokens (`list[int]`): the children's tokens, in trial order.
        probs (`list[float]`): p(token) under the node's target distribution p.
        support (`int`): number of tokens with p > 0.
        uniforms (`list[float]`): one U[0, 1) draw per child.
    """
    residual, rejected, rejected_support = 1.0, set(), 0
    for j, (token, p) in enumerate(zip(tokens, probs)):
        if token in rejected:  # a duplicate sibling has probability 0 under the residual
            continue
        # Accept with probability p / residual. When this child holds the only mass left, that ratio is exactly 1,
        # whatever rounding left in `residual`: the residual is never empty after a rejection.
        if p > 0 and (rejected_support + 1 == support or uniforms[j] * residual < p):
            return j
        residual -= p
        rejected.add(token)
        rejected_support += p > 0
    return None


def sample_residual(probs: torch.Tensor, rejected: list[int]) -> int:
    """
    The bonus token: a sample of `probs` (shape `(vocab_size,)`) with the `rejected` tokens zeroed and renormalised.
    """
    row = probs.clone()
    if rejected:
        row[torch.tensor(rejected, device=row.device)] = 0.0
    if not bool(row.sum() > 0):
        raise RuntimeError(
            "The target's distribution has no mass left at this node (all probabilities are zero or NaN); check the "
            "logits processors (temperature, top_k, top_p, bad words) for a setting that removes every token."
        )
    return int(torch.multinomial(row, 1))
