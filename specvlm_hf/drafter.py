"""Drafting: the protocol the decoding loop drafts through, and `TreeDrafter`, which grows the EAGLE-2 dynamic tree
with a `SpecVLMDraftModel` (SpecVLM §1.3), one draft forward per depth or, for a parallel draft, depths 2 and below
from one forward over mask entries, while keeping the draft's own KV cache across steps."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, replace

import torch

from .adapters import get_adapter
from .configuration import SpeculativeConfig
from .draft_step import LeanDraftForward
from .tree import DraftTree, additive_mask, build_tree, expand_level, rerank_nodes


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
    prefill, then per step `propose_rows` and `observe_rows`, one state, tree and path per row of the batch (rows
    that have finished are dropped with `keep_rows`). `feature_layers` says what the loop hands it of the target in
    `DraftState.features`: the target's features (`None`), or the hidden states entering those target layers.

    A drafter of one sequence implements `propose` and `observe`; `supports_batches` marks one that drafts several
    rows at once."""

    feature_layers: tuple[int, ...] | None = None
    supports_batches = False

    def begin(
        self,
        adapter,
        do_sample: bool,
        prompt_len: int,
        end_tokens: tuple[int, ...] = (),
        rows: int = 1,
        visual: bool = True,
    ) -> None:
        """Called once before the first `propose`. `end_tokens` are the ids that end generation (`eos_token_id`):
        nothing after one of them can be emitted, so a drafter need not draft past them. `rows`: the batch size;
        `visual`: whether any row's prompt has visual tokens."""

    def drafts_call(self, adapter, do_sample: bool, prompt_len: int, rows: int, visual: bool) -> bool:
        """Called before prefill: False leaves this call to plain decoding (`begin` is then never called). Arguments
        as for `begin`."""
        return True

    def observe_call(self, drafted: bool, tokens: float, seconds: float) -> None:
        """The call ran the tree loop (`drafted`) or plain decoding and decoded `tokens` new tokens per row after
        the prefill's in `seconds` (the prefill's time left out)."""

    def propose(self, state: DraftState) -> DraftTree:
        raise NotImplementedError

    def propose_rows(self, states: list[DraftState]) -> list[DraftTree]:
        """One tree per row, from each row's state (`DraftState`s of one sequence each)."""
        if len(states) != 1:
            raise ValueError(f"{type(self).__name__} drafts for one sequence at a time, got {len(states)} rows.")
        return [self.propose(states[0])]

    def describe(self) -> dict:
        """What this call's drafter saw of the prompt, for `SpeculativeStats` (`compressor_branch`,
        `draft_visual_tokens`); empty when it has nothing to say."""
        return {}

    def observe(self, tree: DraftTree, path: list[int], finished: bool) -> None:
        """The last proposed tree's outcome: `path`, the nodes whose tokens were emitted (root first: the accepted
        drafts' parents, then the node the target's own token follows); `finished` when the output stopped inside the
        accepted drafts: `path` then ends with the last accepted draft, and what the target says past it is unknown
        (a row that ends on the target's own token after `path` is not `finished`: that token rejected the drafts
        below `path`)."""

    def observe_rows(self, trees: list[DraftTree], paths: list[list[int]], finished: list[bool]) -> None:
        """`observe` for every row of the last `propose_rows`."""
        for tree, path, done in zip(trees, paths, finished):
            self.observe(tree, path, done)

    def keep_rows(self, rows: list[int]) -> None:
        """Keeps only the rows `rows` (indices into the current rows, increasing) for the next steps."""
        raise NotImplementedError(f"{type(self).__name__} does not decode batches")


class DraftSource:
    """
    Anything `target.generate(..., assistant_model=...)` accepts to run the tree loop: it makes a fresh `Drafter` for
    each call. `SpecVLMDraftModel` is one; `draft.with_tree(...)` gives one with other tree knobs; tests add doubles.
    """

    speculative_config: SpeculativeConfig
    # False where the call's output never carries the target's cache (`speculative_generate`): the loop then skips
    # laying a batch's cache out as plain decoding's, which costs a target forward.
    returns_cache = True

    def new_drafter(self, target) -> Drafter:
        raise NotImplementedError

    def with_tree(self, **knobs) -> DraftSource:
        """This source with other tree knobs (`depth`, `tree_top_k`, `total_tokens`, `profile`: `tree_knobs`)."""
        raise TypeError(f"{type(self).__name__} does not take tree knobs")


class WithoutCache(DraftSource):
    """`source` for a call whose output holds the sequences and statistics alone (`returns_cache` is False)."""

    returns_cache = False

    def __init__(self, source: DraftSource):
        self.source = source
        self.speculative_config = source.speculative_config

    def new_drafter(self, target) -> Drafter:
        return self.source.new_drafter(target)


def tree_knobs(knobs: dict) -> dict:
    """`with_tree`'s keyword arguments as `SpeculativeConfig` fields. The tree's width is `tree_top_k`, as in
    `speculative_generate` (where `top_k` is the sampling filter); the earlier spelling `top_k` is read as it, with a
    `FutureWarning`."""
    knobs = dict(knobs)
    if "top_k" in knobs:
        if "tree_top_k" in knobs:
            raise TypeError("with_tree() got both tree_top_k and top_k; the tree's width is tree_top_k")
        warnings.warn("with_tree(top_k=) is now with_tree(tree_top_k=)", FutureWarning, stacklevel=3)
        knobs["tree_top_k"] = knobs.pop("top_k")
    if "tree_top_k" in knobs:
        knobs["top_k"] = knobs.pop("tree_top_k")
    return knobs


class TreeDraftSpec(DraftSource):
    """A bound `SpecVLMDraftModel` with its own `SpeculativeConfig`, leaving the model's default untouched."""

    def __init__(self, draft, speculative_config: SpeculativeConfig):
        self.draft = draft
        self.speculative_config = speculative_config

    def new_drafter(self, target) -> Drafter:
        return self.draft.new_drafter(target, self.speculative_config)

    def with_tree(self, **knobs) -> TreeDraftSpec:
        return TreeDraftSpec(self.draft, self.speculative_config.with_overrides(**tree_knobs(knobs)))


# The tree stops growing once the draft's probability that the answer has ended inside it reaches this: every
# deeper node then has a chance below 1 - END_MASS of being reached, worth less than a level costs (a level costs
# 10-20% of a target step on CPU, and a drafted token saves at most one step).
END_MASS = 0.9


class TreeDrafter(Drafter):
    """
    EAGLE-2 dynamic tree with a `SpecVLMDraftModel`, for every row of a batch at once: catch up on the committed
    positions, take the `top_k` children of the root, then `depth - 1` times expand the `top_k` best frontier nodes by
    cumulative log-probability; finally keep the `total_tokens - 1` best of all scored nodes. Each row grows its own
    tree of one shared shape. The draft runs through `LeanDraftForward`, whose cache holds the committed positions
    followed, during a step, by the tree's levels. With an auto `config` the shape comes from the draft's `TreeTuner`
    each step.

    Rows commit different numbers of positions per step, so the cache's entries are shared slots: `self.live`
    (`(rows, length)`) says which slots hold a row's committed position, and every mask lets a row attend to its own
    live slots only. With one row every slot is live and the masks are those of a single sequence.

    When the tuner picks a plain step, `propose_rows` returns the roots alone (the target's forward is then plain
    decoding's) and keeps the committed positions to feed at the next step that drafts (the prompt's included). So a
    call starts drafting at the step the tuner says the draft's pass over the prompt pays from
    (`TreeTuner.starts_drafting`), and a call where no step would is left to plain decoding (`drafts_call`).

    A drafted end token (`eos_token_id`) is never expanded: if the target accepts it, generation stops there, and if
    it does not, the path leaves the tree there, so its children could never be emitted. The tree stops growing when
    in every row every frontier node is an end token or the drafted end tokens hold `END_MASS` of the draft's
    probability (short answers then cost one or two draft levels, not `depth`; this needs a host sync per level).
    """

    supports_batches = True

    def __init__(self, draft, config: SpeculativeConfig):
        self.draft = draft
        self.config = config if config.is_auto else config.fixed()
        self.forward: LeanDraftForward | None = None  # made at the first drafted step (`_draft_forward`)
        self._forward_args = None  # (adapter, prompt_len, rows, numerics) it is made with, set by `begin`
        self.feature_layers = draft.feature_layers
        self.tuner = None
        self.shape = self.config
        self._started = self._drafted = 0.0
        self._prompt_step = False  # the step whose drafting included the draft's pass over the prompt
        self._prompt_tokens = 0  # the prompt tokens (over all rows) that pass caught up on
        self._undrafted = 0  # plain steps before the draft read the prompt: tokens per row after the prefill's
        self._end_tokens = None  # LongTensor of end-token ids, or None
        self._levels = 0  # draft levels the last step ran
        self.live: torch.Tensor | None = None  # (rows, cache length) bool: slots holding a row's committed position
        # per row, not yet fed: [(embeds, features, position_ids)], each (1, n, ...), or the prompt's `DraftState`
        # first (the draft's view of the prompt, compressed, is made when the draft first reads it)
        self._pending: list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | DraftState]] = []
        self._described: dict = {}
        self._calls = None  # the auto tree's `CallChooser` for this call's prompt class

    def begin(
        self,
        adapter,
        do_sample: bool,
        prompt_len: int,
        end_tokens: tuple[int, ...] = (),
        rows: int = 1,
        visual: bool = True,
    ) -> None:
        device = self.draft.fc.weight.device
        self.live = torch.zeros(rows, 0, dtype=torch.bool, device=device)
        self._pending = [[] for _ in range(rows)]
        numerics = self.config.draft_numerics
        if self.config.is_auto:
            if self._calls is None:  # `drafts_call` did not start the call (the custom_generate route skips it)
                self.tuner = self.draft.tree_tuner(adapter, do_sample, prompt_len, rows, numerics)
                self.tuner.start_call(visual)
            numerics = self.tuner.costs.numerics
        self._forward_args = (adapter, prompt_len, rows, numerics)
        if end_tokens:
            self._end_tokens = torch.tensor(end_tokens, device=device)

    def drafts_call(self, adapter, do_sample: bool, prompt_len: int, rows: int, visual: bool) -> bool:
        if not self.config.is_auto:
            return True
        self.tuner = self.draft.tree_tuner(adapter, do_sample, prompt_len, rows, self.config.draft_numerics)
        self.tuner.start_call(visual)
        self._calls = self.tuner.calls[visual]
        return self._calls.draft() and self.tuner.may_start(rows * prompt_len)

    def observe_call(self, drafted: bool, tokens: float, seconds: float) -> None:
        if self._calls is not None:
            self._calls.observe(drafted, tokens, seconds)

    def _draft_forward(self) -> LeanDraftForward:
        """The call's lean forward, made at its first drafted step (a call that never drafts makes none), for the
        rows still decoding, in the numerics `begin` was told (`auto`: the one the device's costs chose for the
        call's batch size)."""
        if self.forward is None:
            adapter, prompt_len, rows, numerics = self._forward_args
            if numerics == "auto":
                numerics = self.draft.auto_numerics(adapter, prompt_len, rows)
            self.forward = LeanDraftForward(self.draft, rows=self.live.shape[0], numerics=numerics)
        return self.forward

    def describe(self) -> dict:
        return dict(self._described)

    def keep_rows(self, rows: list[int]) -> None:
        index = torch.tensor(rows, device=self.draft.fc.weight.device)
        if self.forward is not None:
            self.forward.cache.keep_rows(index)
        self.live = self.live[index]
        self._pending = [self._pending[row] for row in rows]

    def observe(self, tree: DraftTree, path: list[int], finished: bool) -> None:
        self.observe_rows([tree], [path], [finished])

    def observe_rows(self, trees: list[DraftTree], paths: list[list[int]], finished: list[bool]) -> None:
        if self.tuner is None:
            return
        now = time.perf_counter()
        if self.shape is None:
            self.tuner.observe_plain(now - self._started)
            return
        drafted, total = self._drafted - self._started, now - self._started
        ranks = [
            [tree.children[tree.parents[node]].index(node) for node in path[1:]] for tree, path in zip(trees, paths)
        ]
        shape = replace(self.shape, depth=self._levels)  # as drafted: a chain stops at an end token
        self.tuner.observe(shape, ranks, drafted, total, finished, self._prompt_tokens if self._prompt_step else 0)

    def propose(self, state: DraftState) -> DraftTree:
        return self.propose_rows([state])[0]

    @torch.no_grad()
    def propose_rows(self, states: list[DraftState]) -> list[DraftTree]:
        self._started = time.perf_counter()
        if self.live is None:  # driven without `begin` (a fixed tree, as the benchmark's replay drives it)
            self.live = torch.zeros(len(states), 0, dtype=torch.bool, device=self.draft.fc.weight.device)
            self._pending = [[] for _ in states]
            if self._forward_args is None:
                adapter = get_adapter(self.draft.target)
                self._forward_args = (adapter, states[0].input_ids.shape[1], len(states), self.config.draft_numerics)
        for row, state in enumerate(states):
            prompt = state.image_mask is not None
            self._pending[row].append(state if prompt else (state.inputs_embeds, state.features, state.position_ids))
        roots = [state.input_ids[0, -1:] for state in states]
        unread = self.forward is None or self.forward.cache.length == 0  # the draft has not read the prompt yet
        if self.tuner is not None:
            self.shape = self.tuner.choose()
            if self.shape is not None and unread:
                self._prompt_tokens = sum(state.input_ids.shape[1] for state in states)
                if not self.tuner.starts_drafting(self._undrafted, self._prompt_tokens):
                    self.shape = None
            if self.shape is None:  # a plain step: verify the roots alone, feed the draft later
                self._undrafted += unread
                return [build_tree(root, [-1]) for root in roots]
        self._prompt_step = unread  # this step's drafting includes the prompt
        if self.forward is None:  # made once a call (packing weights at a draft's first use), not the prompt's price
            built = time.perf_counter()
            self._draft_forward()
            self._started += time.perf_counter() - built
        if unread:
            self._pending = [
                [self._read_prompt(part, row) for part in parts] for row, parts in enumerate(self._pending)
            ]
        cache = self.forward.cache
        embeds, features, position_ids, lengths = _pad_rows(self._pending)
        self._pending = [[] for _ in states]
        rows, k, depth = len(states), self.shape.top_k, self.shape.depth
        device = embeds.device
        # The draft numbers a row's positions by its sequence indices: the root sits at index seq_len - 1.
        ends = [state.input_ids.shape[1] - 1 for state in states]
        root_positions = torch.tensor(ends, device=device)
        self.forward.reserve_positions(max(ends) + depth)  # the deepest level sits at root + depth - 1
        past = cache.length
        fed = torch.arange(embeds.shape[1], device=device) < lengths[:, None]  # (rows, n): entries, not padding
        live = torch.cat([self.live, fed], dim=1)  # (rows, committed)
        committed = live.shape[1]  # cache entries of committed positions after the catch-up
        dtype = self.draft.fc.weight.dtype
        causal = torch.ones(embeds.shape[1], committed, dtype=torch.bool, device=device).tril(diagonal=past)
        hidden = self.forward(embeds, features, position_ids, additive_mask(causal & live[:, None], dtype))
        self.live = live
        embed = self.draft.embed_tokens

        # Level 1: the roots' top_k children. Pool = every scored node: tokens, scores, parent pool index (-1 = root).
        root_hidden = hidden[torch.arange(rows, device=device), lengths - 1]  # (rows, hidden): each row's last entry
        log_probs = torch.log_softmax(self.forward.logits(root_hidden).float(), dim=-1)  # [rows, V]
        tokens, scores = expand_level(log_probs.new_zeros(rows), log_probs, k)  # [rows, k]
        if self.tuner is not None:
            self.tuner.observe_mass(log_probs[0].topk(max(self.tuner.widths)).values.exp())
        ended = self._end_mass(tokens, scores)
        pool_tokens, pool_scores = [tokens], [scores]
        pool_parents = [torch.full_like(tokens, -1)]
        frontier = torch.arange(k, device=device).expand(rows, k)  # pool indices of the frontier
        frontier_hidden = root_hidden[:, None].expand(rows, k, -1)  # predicted feature feeding each frontier node
        scores = self._without_end_tokens(tokens, scores)
        # Tree part of the level mask, over the tree entries fed so far and the frontier's own: every node sees its
        # row's committed entries, its ancestors and itself.
        eye = torch.eye(k, dtype=torch.bool, device=device).expand(rows, k, k)
        tree_allowed = eye
        n_pool = k
        past_allowed = live[:, None].expand(rows, k, committed)

        self._levels = 1
        marginals = None  # parallel drafting: (rows, depth - 1, V) log-probabilities of depths 2..depth
        if self.draft.config.parallel_depth > 1 and depth > 1:
            marginals = self._parallel_marginals(live, root_positions, depth - 1)
        for level in range(1, depth):
            if self._end_tokens is not None and bool((scores.isinf().all(dim=1) | (ended >= END_MASS)).all()):
                break  # in every row every frontier node is an end token, or the draft expects the answer has ended
            self._levels = level + 1
            if marginals is None:
                # Feed the frontier (depth `level`) at each row's root position + level - 1.
                mask = additive_mask(torch.cat([past_allowed, tree_allowed], dim=2), dtype)
                positions = (root_positions + level - 1)[:, None].expand(rows, k)
                out = self.forward(embed(tokens), frontier_hidden, positions, mask)  # [rows, k, hidden]
                log_probs = torch.log_softmax(self.forward.logits(out).float(), dim=-1)  # [rows, k, V]
            else:  # every frontier node's children come from the same marginal of depth `level + 1`
                log_probs = marginals[:, level - 1 : level].expand(rows, k, -1)
            child_tokens, child_scores = expand_level(scores, log_probs, k)  # [rows, k, k]
            child_tokens, child_scores = child_tokens.flatten(1), child_scores.flatten(1)  # [rows, k * k]
            pool_tokens.append(child_tokens)
            pool_scores.append(child_scores)
            ended = ended + self._end_mass(child_tokens, child_scores)
            pool_parents.append(frontier.repeat_interleave(k, dim=1))
            best = child_scores.topk(k, dim=1).indices  # next frontier, as indices into this level's k*k
            if marginals is None:
                parent_slot = best // k
                tree_allowed = torch.cat(
                    [tree_allowed.gather(1, parent_slot[..., None].expand_as(tree_allowed)), eye], 2
                )
                frontier_hidden = out.gather(1, parent_slot[..., None].expand(rows, k, out.shape[-1]))
            frontier = n_pool + best
            tokens = child_tokens.gather(1, best)
            scores = self._without_end_tokens(tokens, child_scores.gather(1, best))
            n_pool += k * k

        cache.truncate(committed)  # drop the tree entries, keep the committed prefix
        pool, parents, pool_tokens = (torch.cat(parts, dim=1) for parts in (pool_scores, pool_parents, pool_tokens))
        keep = self.shape.total_tokens - 1
        trees = []
        finite = pool.isfinite().sum(dim=1).tolist() if self._end_tokens is not None and k > 1 else None
        for row in range(rows):
            row_keep = keep if finite is None else min(keep, finite[row])  # no child of an end token
            selected, tree_parents = rerank_nodes(pool[row], parents[row], row_keep)
            tree_tokens = torch.cat([roots[row], pool_tokens[row, selected]])
            trees.append(build_tree(tree_tokens, [-1] + tree_parents.tolist()))  # tolist() waits for the device
        self._drafted = time.perf_counter()
        return trees

    def _read_prompt(self, part, row: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A pending entry as the draft's inputs: a prompt's `DraftState` becomes the draft's view of the prompt
        (`prompt_input`: its visual tokens compressed), described for the statistics for row 0."""
        if not isinstance(part, DraftState):
            return part
        embeds, features, position_ids = self.draft.prompt_input(part)
        if row == 0:
            self._described = self.draft.describe_prompt(part, embeds)
        return embeds, features, position_ids

    def _parallel_marginals(self, live: torch.Tensor, root_positions: torch.Tensor, entries: int) -> torch.Tensor:
        """
        Parallel drafting: the draft's log-probabilities for depths 2..`entries + 1` from one forward over `entries`
        mask entries per row, entry i (0-based) at the row's root position + i, seeing the row's committed entries and
        the mask entries before it (as `training.trainer.unrolled` trains them). The cache keeps them until the
        caller truncates it to the committed entries.

        Args:
            live (`(rows, committed)` bool): the cache slots holding each row's committed positions.
            root_positions (`(rows,)`): each row's root position.

        Returns:
            `(rows, entries, vocab_size)` float32.
        """
        rows, committed = live.shape
        device, dtype = live.device, self.draft.fc.weight.dtype
        embeds = self.draft.mask_embeds.to(dtype).expand(rows, entries, -1)
        features = self.draft.mask_features.to(dtype).expand(rows, entries, -1)
        positions = root_positions[:, None] + torch.arange(entries, device=device)
        causal = torch.ones(entries, entries, dtype=torch.bool, device=device).tril().expand(rows, -1, -1)
        allowed = torch.cat([live[:, None].expand(rows, entries, committed), causal], dim=2)
        out = self.forward(embeds, features, positions, additive_mask(allowed, dtype))  # (rows, entries, hidden)
        return torch.log_softmax(self.forward.logits(out).float(), dim=-1)

    def _end_mass(self, tokens: torch.Tensor, scores: torch.Tensor) -> torch.Tensor | float:
        """Per row, the draft's probability that the answer ends at one of these nodes (`(rows, n)` each): the sum of
        `exp(score)` over the end tokens among `tokens` (their paths are disjoint, so the events are too)."""
        if self._end_tokens is None:
            return 0.0
        return scores.exp().masked_fill(~torch.isin(tokens, self._end_tokens), 0.0).sum(dim=-1)

    def _without_end_tokens(self, tokens: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Frontier `scores` (shape `(rows, k)`) with `-inf` at end tokens: their children score `-inf` and are
        dropped."""
        if self._end_tokens is None:
            return scores
        return scores.masked_fill(torch.isin(tokens, self._end_tokens), float("-inf"))


def _pad_rows(pending: list[list[tuple[torch.Tensor, ...]]]):
    """
    Each row's not-yet-fed draft inputs, concatenated per row and right-padded with zeros into one batch.

    Args:
        pending: per row, a list of `(embeds, features, position_ids)`, each `(1, n_i, ...)`.

    Returns:
        `(embeds, features, position_ids, lengths)`: `(rows, n, ...)` each, `n` the longest row's, and `lengths`
        (`(rows,)`) the entries of each row (the rest is padding).
    """
    rows = [[torch.cat(parts, dim=1) for parts in zip(*row)] for row in pending]
    lengths = [row[0].shape[1] for row in rows]
    width = max(lengths)
    if len(rows) == 1:
        embeds, features, positions = rows[0]
    else:
        embeds, features, positions = (
            torch.cat([torch.nn.functional.pad(row[i][0], (0, 0) * (row[i].dim() - 2) + (0, width - n))[None]
                       for row, n in zip(rows, lengths)])
            for i in range(3)
        )  # fmt: skip
    return embeds, features, positions, torch.tensor(lengths, device=embeds.device)
