"""Drafting: the protocol the decoding loop drafts through, and `TreeDrafter`, which grows the EAGLE-2 dynamic tree
with a `SpecVLMDraftModel` (SpecVLM §1.3) while keeping the draft's own KV cache across steps."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch

from .configuration import SpeculativeConfig
from .draft_step import LeanDraftForward
from .tree import DraftTree, build_tree, causal_attention_mask, expand_level, rerank_nodes


@dataclass(frozen=True)
class DraftState:
    """
    What the target committed since the previous draft step.

    Attributes:
        input_ids (`torch.LongTensor` of shape `(1, seq_len)`): every token so far; the last one is the tree's root.
        inputs_embeds (`torch.FloatTensor` of shape `(1, n, hidden_size)`): the target's input embeddings of the
            tokens at positions `positions + 1` (visual tokens at `<image>` slots).
        features (`torch.FloatTensor` of shape `(1, n, feature_size)`): the target's features at `positions`, or
            the hidden states entering the drafter's `feature_layers` there, concatenated.
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
    """Proposes a token tree from the decoding state. One instance serves one `generate()` call: `begin` once after
    prefill, then per step `propose` and `observe`. `feature_layers` says what the loop hands it of the target in
    `DraftState.features`: the target's features (`None`), or the hidden states entering those target layers."""

    feature_layers: tuple[int, ...] | None = None

    def begin(self, adapter, do_sample: bool, prompt_len: int, end_tokens: tuple[int, ...] = ()) -> None:
        """Called once before the first `propose`. `end_tokens` are the ids that end generation (`eos_token_id`):
        nothing after one of them can be emitted, so a drafter need not draft past them."""

    def propose(self, state: DraftState) -> DraftTree:
        raise NotImplementedError

    def describe(self) -> dict:
        """What this call's drafter saw of the prompt, for `SpeculativeStats` (`compressor_branch`,
        `draft_visual_tokens`); empty when it has nothing to say."""
        return {}

    def observe(self, tree: DraftTree, path: list[int], finished: bool) -> None:
        """The last proposed tree's outcome: `path`, the nodes whose tokens were emitted (root first: the accepted
        drafts' parents, then the node the target's own token follows); `finished` when a stopping criterion cut the
        step."""


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


# The tree stops growing once the draft's probability that the answer has ended inside it reaches this: every
# deeper node then has a chance below 1 - END_MASS of being reached, worth less than a level costs (a level costs
# 10-20% of a target step on CPU, and a drafted token saves at most one step).
END_MASS = 0.9


class TreeDrafter(Drafter):
    """
    EAGLE-2 dynamic tree with a `SpecVLMDraftModel`: catch up on the committed positions, take the `top_k` children of
    the root, then `depth - 1` times expand the `top_k` best frontier nodes by cumulative log-probability; finally
    keep the `total_tokens - 1` best of all scored nodes. The draft runs through `LeanDraftForward`, whose cache holds
    the committed positions followed, during a step, by the tree's levels. With an auto `config` the shape comes from
    the draft's `TreeTuner` each step.

    When the tuner picks a plain step, `propose` returns the root alone (the target's forward is then plain decoding's)
    and keeps the committed positions to feed at the next step that drafts (the prompt's included).

    A drafted end token (`eos_token_id`) is never expanded: if the target accepts it, generation stops there, and if
    it does not, the path leaves the tree there, so its children could never be emitted. The tree stops growing when
    every frontier node is an end token or when the drafted end tokens hold `END_MASS` of the draft's probability
    (short answers then cost one or two draft levels, not `depth`; this needs a host sync per level).
    """

    def __init__(self, draft, config: SpeculativeConfig):
        self.draft = draft
        self.config = config if config.is_auto else config.fixed()
        self.forward = LeanDraftForward(draft)
        self.feature_layers = draft.feature_layers
        self.tuner = None
        self.shape = self.config
        self._started = self._drafted = 0.0
        self._prompt_step = False  # the step whose drafting included the draft's pass over the prompt
        self._end_tokens = None  # LongTensor of end-token ids, or None
        self._levels = 0  # draft levels the last step ran
        self._pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # not yet fed: (embeds, ...)
        self._described: dict = {}

    def begin(self, adapter, do_sample: bool, prompt_len: int, end_tokens: tuple[int, ...] = ()) -> None:
        if self.config.is_auto:
            self.tuner = self.draft.tree_tuner(adapter, do_sample, prompt_len)
            self.tuner.start_call()
        if end_tokens:
            self._end_tokens = torch.tensor(end_tokens, device=self.draft.fc.weight.device)

    def describe(self) -> dict:
        return dict(self._described)

    def observe(self, tree: DraftTree, path: list[int], finished: bool) -> None:
        if self.tuner is None:
            return
        now = time.perf_counter()
        if self.shape is None:
            self.tuner.observe_plain(now - self._started)
        else:
            drafted, total = self._drafted - self._started, now - self._started
            ranks = [tree.children[tree.parents[node]].index(node) for node in path[1:]]
            shape = replace(self.shape, depth=self._levels)  # as drafted: a chain stops at an end token
            self.tuner.observe(shape, ranks, drafted, total, finished, timed=not self._prompt_step)

    @torch.no_grad()
    def propose(self, state: DraftState) -> DraftTree:
        self._started = time.perf_counter()
        embeds, features, position_ids = state.inputs_embeds, state.features, state.position_ids
        if state.image_mask is not None:
            embeds, features, position_ids = self.draft.prompt_input(state)
            self._described = self.draft.describe_prompt(state, embeds)
        self._pending.append((embeds, features, position_ids))
        if self.tuner is not None:
            self.shape = self.tuner.choose()
            if self.shape is None:  # a plain step: verify the root alone, feed the draft later
                return build_tree(state.input_ids[0, -1:], [-1])
        self._prompt_step = self.forward.cache.length == 0  # this step's drafting includes the prompt
        if len(self._pending) == 1:
            embeds, features, position_ids = self._pending[0]
        else:
            embeds, features, position_ids = (torch.cat(parts, dim=1) for parts in zip(*self._pending))
        self._pending = []
        k, depth = self.shape.top_k, self.shape.depth
        root = state.input_ids[0, -1]
        root_position = state.input_ids.shape[1] - 1
        self.forward.reserve_positions(root_position + depth)  # the deepest level sits at root_position + depth - 1
        cache = self.forward.cache
        committed = cache.length + embeds.shape[1]  # cache entries of committed positions after the catch-up
        hidden = self.forward(embeds, features, position_ids, causal_attention_mask(
            embeds.shape[1], cache.length, self.draft.fc.weight.dtype, embeds.device
        ))  # fmt: skip
        device, dtype = hidden.device, hidden.dtype
        embed = self.draft.embed_tokens

        # Level 1: the root's top_k children. Pool = every scored node: tokens, scores, parent pool index (-1 = root).
        log_probs = torch.log_softmax(self.draft.compute_logits(hidden[0, -1:]).float(), dim=-1)  # [1, V]
        tokens, scores = expand_level(log_probs.new_zeros(1), log_probs, k)
        tokens, scores = tokens[0], scores[0]  # [k]
        if self.tuner is not None:
            self.tuner.observe_mass(log_probs[0].topk(max(self.tuner.widths)).values.exp())
        ended = self._end_mass(tokens, scores)
        pool_tokens, pool_scores = [tokens], [scores]
        pool_parents = [torch.full_like(tokens, -1)]
        frontier = torch.arange(k, device=device)  # pool indices of the frontier
        frontier_hidden = hidden[0, -1:].expand(k, -1)  # predicted feature feeding each frontier node
        scores = self._without_end_tokens(tokens, scores)
        # Tree part of the level mask, over the tree entries fed so far and the frontier's own: every node sees the
        # committed cache, its ancestors and itself. A chain's node sees every entry, so its mask is all zeros.
        eye = torch.eye(k, dtype=torch.bool, device=device)
        tree_allowed = eye
        n_pool = k

        self._levels = 1
        for level in range(1, depth):
            if self._end_tokens is not None and bool(scores.isinf().all() | (ended >= END_MASS)):
                break  # every frontier node is an end token, or the draft expects the answer to have ended
            self._levels = level + 1
            # Feed the frontier (depth `level`) at position root + level - 1.
            mask = torch.zeros(1, 1, k, committed + level * k, dtype=dtype, device=device)
            if k > 1:
                mask[0, 0, :, committed:].masked_fill_(~tree_allowed, torch.finfo(dtype).min)
            positions = torch.full((1, k), root_position + level - 1, device=device)
            out = self.forward(embed(tokens)[None], frontier_hidden[None], positions, mask)
            log_probs = torch.log_softmax(self.draft.compute_logits(out[0]).float(), dim=-1)  # [k, V]
            child_tokens, child_scores = expand_level(scores, log_probs, k)  # [k, k]
            pool_tokens.append(child_tokens.flatten())
            pool_scores.append(child_scores.flatten())
            ended = ended + self._end_mass(pool_tokens[-1], pool_scores[-1])
            pool_parents.append(frontier.repeat_interleave(k))
            best = child_scores.flatten().topk(k).indices  # next frontier, as indices into this level's k*k
            parent_slot = best // k
            if k > 1:
                tree_allowed = torch.cat([tree_allowed[parent_slot], eye], dim=1)
            frontier = n_pool + best
            frontier_hidden = out[0, parent_slot]
            tokens, scores = (
                child_tokens.flatten()[best],
                self._without_end_tokens(child_tokens.flatten()[best], child_scores.flatten()[best]),
            )
            n_pool += k * k

        cache.truncate(committed)  # drop the tree entries, keep the committed prefix
        pool = torch.cat(pool_scores)
        keep = self.shape.total_tokens - 1
        if self._end_tokens is not None and k > 1:
            keep = min(keep, int(pool.isfinite().sum()))  # no child of an end token
        selected, tree_parents = rerank_nodes(pool, torch.cat(pool_parents), keep)
        tree_tokens = torch.cat([root.view(1), torch.cat(pool_tokens)[selected]])
        tree = build_tree(tree_tokens, [-1] + tree_parents.tolist())  # tolist() waits for the device
        self._drafted = time.perf_counter()
        return tree

    def _end_mass(self, tokens: torch.Tensor, scores: torch.Tensor) -> torch.Tensor | float:
        """The draft's probability that the answer ends at one of these nodes: the sum of `exp(score)` over the end
        tokens among `tokens` (their paths are disjoint, so the events are too)."""
        if self._end_tokens is None:
            return 0.0
        return scores.exp().masked_fill(~torch.isin(tokens, self._end_tokens), 0.0).sum()

    def _without_end_tokens(self, tokens: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Frontier `scores` (shape `(k,)`) with `-inf` at end tokens: their children score `-inf` and are dropped."""
        if self._end_tokens is None:
            return scores
        return scores.masked_fill(torch.isin(tokens, self._end_tokens), float("-inf"))
