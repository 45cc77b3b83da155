"""Drafting: the protocol the decoding loop drafts through, and `TreeDrafter`, which grows the EAGLE-2 dynamic tree
with a `SpecVLMDraftModel` (SpecVLM §1.3) while keeping the draft's own KV cache across steps."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from .cache import commit_accepted
from .configuration import SpeculativeConfig
from .tree import DraftTree, additive_mask, build_tree, expand_level, rerank_nodes


@dataclass(frozen=True)
class DraftState:
    """
    What the target committed since the previous draft step.

    Attributes:
        input_ids (`torch.LongTensor` of shape `(1, seq_len)`): every token so far; the last one is the tree's root.
        inputs_embeds (`torch.FloatTensor` of shape `(1, n, hidden_size)`): the target's input embeddings of the
            tokens at positions `positions + 1` (visual tokens at `<image>` slots).
        features (`torch.FloatTensor` of shape `(1, n, hidden_size)`): the target's features at `positions`.
        position_ids (`torch.LongTensor` of shape `(1, n)`): the newly committed positions, ending at `seq_len - 2`.
        image_mask (`torch.BoolTensor` of shape `(n,)`, *optional*): set on the first step only (the prompt), True
            where `inputs_embeds` is a visual token.
    """

    input_ids: torch.Tensor
    inputs_embeds: torch.Tensor
    features: torch.Tensor
    position_ids: torch.Tensor
    image_mask: torch.Tensor | None = None


class Drafter:
    """Proposes a token tree from the decoding state. One instance serves one `generate()` call."""

    def propose(self, state: DraftState) -> DraftTree:
        raise NotImplementedError


class DraftSource:
    """
    Anything `target.generate(..., assistant_model=...)` accepts to run the tree loop: it makes a fresh `Drafter` for
    each call. `SpecVLMDraftModel` is one; `draft.with_tree(...)` gives one with other tree knobs; tests add doubles.
    """

    speculative_config: SpeculativeConfig

    def new_drafter(self, target) -> Drafter:
        raise NotImplementedError

    def with_tree(self, **knobs) -> DraftSource:
        """This source with other `SpeculativeConfig` knobs (`depth`, `top_k`, `total_tokens`, `profile`)."""
        raise TypeError(f"{type(self).__name__} does not take tree knobs")


class TreeDraftSpec(DraftSource):
    """A bound `SpecVLMDraftModel` with its own `SpeculativeConfig`, leaving the model's default untouched."""

    def __init__(self, draft, speculative_config: SpeculativeConfig):
        self.draft = draft
        self.speculative_config = speculative_config

    def new_drafter(self, target) -> Drafter:
        return self.draft.new_drafter(target, self.speculative_config)

    def with_tree(self, **knobs) -> TreeDraftSpec:
        return TreeDraftSpec(self.draft, self.speculative_config.with_overrides(**knobs))


class TreeDrafter(Drafter):
    """
    EAGLE-2 dynamic tree with a `SpecVLMDraftModel`: catch up on the committed positions, take the `top_k` children of
    the root, then `depth - 1` times expand the `top_k` best frontier nodes by cumulative log-probability; finally
    keep the `total_tokens - 1` best of all scored nodes.
    """

    def __init__(self, draft, config: SpeculativeConfig):
        self.draft = draft
        self.config = config
        self.cache = DynamicCache()
        self.committed = 0  # draft cache entries that belong to committed positions

    def _run(self, embeds, features, position_ids, attention_mask=None) -> torch.Tensor:
        return self.draft(embeds, features, position_ids, attention_mask=attention_mask, cache=self.cache)

    @torch.no_grad()
    def propose(self, state: DraftState) -> DraftTree:
        k, depth = self.config.top_k, self.config.depth
        embeds, features, position_ids = state.inputs_embeds, state.features, state.position_ids
        if state.image_mask is not None:
            embeds, features, position_ids = self.draft.compressor(embeds, features, position_ids, state.image_mask)
        hidden = self._run(embeds, features, position_ids)
        self.committed += embeds.shape[1]
        root = state.input_ids[0, -1]
        root_position = int(position_ids[0, -1]) + 1
        embed = self.draft.embed_tokens

        # Level 1: the root's top_k children. Pool = every scored node: tokens, scores, parent pool index (-1 = root).
        log_probs = torch.log_softmax(self.draft.compute_logits(hidden[0, -1:]).float(), dim=-1)  # [1, V]
        tokens, scores = expand_level(log_probs.new_zeros(1), log_probs, k)
        tokens, scores = tokens[0], scores[0]  # [k]
        pool_tokens, pool_scores = [tokens], [scores]
        pool_parents = [torch.full_like(tokens, -1)]
        frontier = torch.arange(k, device=tokens.device)  # pool indices of the frontier
        frontier_hidden = hidden[0, -1:].expand(k, -1)  # predicted feature feeding each frontier node
        frontier_ancestry = torch.zeros(k, 0, dtype=torch.bool, device=tokens.device)  # over expanded entries
        n_pool = k

        for level in range(1, depth):
            # Feed the frontier (depth `level`) at position root + level - 1; each node sees the committed cache,
            # its expanded ancestors and itself.
            allowed = torch.cat(
                [
                    torch.ones(k, self.committed, dtype=torch.bool, device=tokens.device),
                    frontier_ancestry,
                    torch.eye(k, dtype=torch.bool, device=tokens.device),
                ],
                dim=1,
            )
            positions = torch.full((1, k), root_position + level - 1, device=tokens.device)
            out = self._run(
                embed(tokens)[None], frontier_hidden[None], positions, additive_mask(allowed, hidden.dtype)
            )
            log_probs = torch.log_softmax(self.draft.compute_logits(out[0]).float(), dim=-1)  # [k, V]
            child_tokens, child_scores = expand_level(scores, log_probs, k)  # [k, k]
            pool_tokens.append(child_tokens.flatten())
            pool_scores.append(child_scores.flatten())
            pool_parents.append(frontier.repeat_interleave(k))
            best = child_scores.flatten().topk(k).indices  # next frontier, as indices into this level's k*k
            parent_slot = best // k
            expanded_rows = torch.cat([frontier_ancestry, torch.eye(k, dtype=torch.bool, device=tokens.device)], 1)
            frontier_ancestry = expanded_rows[parent_slot]
            frontier = n_pool + best
            frontier_hidden = out[0, parent_slot]
            tokens, scores = child_tokens.flatten()[best], child_scores.flatten()[best]
            n_pool += k * k

        commit_accepted(self.cache, self.committed, [])  # drop the tree entries, keep the committed prefix
        selected, tree_parents = rerank_nodes(
            torch.cat(pool_scores), torch.cat(pool_parents), self.config.total_tokens - 1
        )
        tree_tokens = torch.cat([root.view(1), torch.cat(pool_tokens)[selected]])
        return build_tree(tree_tokens, [-1] + tree_parents.tolist())
