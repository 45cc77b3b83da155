"""Test doubles that draft through the real `Drafter` interface: an oracle that knows the target's greedy
continuation (long paths get accepted), one that knows it only for its first levels, and a random drafter (almost
everything is rejected), and the reference tree drafter that the lean one is compared with. For batches: an oracle
that knows every row's continuation (`BatchOracleDraft`) and `RowwiseDraft`, which drafts each row with a double of
one sequence. `RecordingDraft` drafts with a real draft and keeps what its drafters saw and proposed."""

from __future__ import annotations

import random

import torch
from transformers import DynamicCache

from specvlm_hf import Drafter, DraftSource, DraftState, SpeculativeConfig, TreeDrafter
from specvlm_hf.cache import commit_accepted
from specvlm_hf.tree import DraftTree, additive_mask, build_tree, expand_level, rerank_nodes


def _siblings(rng: random.Random, vocab: int, exclude: set[int], count: int) -> list[int]:
    pool = [t for t in range(vocab) if t not in exclude]
    return rng.sample(pool, min(count, len(pool)))


class OracleDraft(DraftSource):
    """Proposes a tree holding the true continuation `reference[len(ids):]` as one path (up to `depth` tokens),
    hidden among `top_k - 1` random siblings per level, within `total_tokens` nodes."""

    def __init__(self, reference: list[int], vocab: int, config: SpeculativeConfig, seed: int = 0):
        self.reference = reference
        self.vocab = vocab
        self.speculative_config = config
        self.seed = seed

    def new_drafter(self, target) -> Drafter:
        return _OracleDrafter(self, random.Random(self.seed))


class _OracleDrafter(Drafter):
    def __init__(self, source: OracleDraft, rng: random.Random):
        self.source, self.rng = source, rng

    def path(self, cur: int, depth: int) -> list[int]:
        """The drafted path after the first `cur` tokens: the reference's next `depth` tokens (fewer at its end)."""
        return self.source.reference[cur : cur + depth]

    def propose(self, state: DraftState) -> torch.Tensor:
        cfg = self.source.speculative_config
        truth = self.path(state.input_ids.shape[1], cfg.depth)
        return _tree_around(
            self.rng, int(state.input_ids[0, -1]), truth, self.source.vocab, cfg, state.input_ids.device
        )


def _tree_around(rng: random.Random, root: int, path: list[int], vocab: int, cfg: SpeculativeConfig, device):
    """A tree under `root` holding `path` as one path (cut to `total_tokens` nodes), with `top_k - 1` random siblings
    per level, in random order."""
    tokens, parents = [root], [-1]
    parent = 0
    for token in path:
        if len(tokens) >= cfg.total_tokens:
            break
        level = [token] + _siblings(rng, vocab, {token}, cfg.top_k - 1)
        rng.shuffle(level)
        level = level[: cfg.total_tokens - len(tokens)]
        if token not in level:
            level[-1] = token
        next_parent = None
        for t in level:
            tokens.append(t)
            parents.append(parent)
            if t == token:
                next_parent = len(tokens) - 1
        parent = next_parent
    return build_tree(torch.tensor(tokens, device=device), parents)


class PartialOracleDraft(OracleDraft):
    """An oracle that tells the truth for the first `truth_depth` levels only: below them its path goes on down to
    `depth` with random tokens, none of them the reference's (where the reference is known)."""

    def __init__(self, reference: list[int], vocab: int, config: SpeculativeConfig, truth_depth: int, seed: int = 0):
        super().__init__(reference, vocab, config, seed)
        self.truth_depth = truth_depth

    def new_drafter(self, target) -> Drafter:
        return _PartialOracleDrafter(self, random.Random(self.seed))


class _PartialOracleDrafter(_OracleDrafter):
    def path(self, cur: int, depth: int) -> list[int]:
        truth = self.source.reference[cur : cur + depth]
        path = truth[: self.source.truth_depth]
        for level in range(len(path), depth):
            wrong = set(truth[level : level + 1])
            path.extend(_siblings(self.rng, self.source.vocab, wrong, 1))
        return path


class RandomDraft(DraftSource):
    """Random trees of random tokens: `total_tokens` nodes, each under a random earlier node, depth <= `depth`."""

    def __init__(self, vocab: int, config: SpeculativeConfig, seed: int = 0):
        self.vocab = vocab
        self.speculative_config = config
        self.seed = seed

    def new_drafter(self, target) -> Drafter:
        return _RandomDrafter(self, random.Random(self.seed))


class _RandomDrafter(Drafter):
    def __init__(self, source: RandomDraft, rng: random.Random):
        self.source, self.rng = source, rng

    def propose(self, state: DraftState):
        cfg = self.source.speculative_config
        tokens, parents, depths = [int(state.input_ids[0, -1])], [-1], [0]
        children: dict[int, set[int]] = {0: set()}
        for _ in range(cfg.total_tokens - 1):
            candidates = [n for n in range(len(tokens)) if depths[n] < cfg.depth and len(children[n]) < cfg.top_k]
            if not candidates:
                break
            parent = self.rng.choice(candidates)
            token = _siblings(self.rng, self.source.vocab, children[parent], 1)[0]
            children[parent].add(token)
            children[len(tokens)] = set()
            tokens.append(token)
            parents.append(parent)
            depths.append(depths[parent] + 1)
        return build_tree(torch.tensor(tokens, device=state.input_ids.device), parents)


class ReferenceTreeDrafter(Drafter):
    """The EAGLE-2 tree grown through `SpecVLMDraftModel.forward` (the module path training uses) with a
    `DynamicCache`, masks built from boolean ancestry: the reference `TreeDrafter`'s lean path must match bit for bit."""

    def __init__(self, draft, config: SpeculativeConfig):
        self.draft = draft
        self.config = config
        self.cache = DynamicCache()
        self.committed = 0
        self.outputs: list[torch.Tensor] = []  # every draft forward's output, in order

    def _run(self, embeds, features, position_ids, attention_mask=None) -> torch.Tensor:
        out = self.draft(embeds, features, position_ids, attention_mask=attention_mask, cache=self.cache)
        self.outputs.append(out)
        return out

    @torch.no_grad()
    def propose(self, state: DraftState) -> DraftTree:
        k, depth = self.config.top_k, self.config.depth
        embeds, features, position_ids = state.inputs_embeds, state.features, state.position_ids
        if state.image_mask is not None:
            embeds, features, position_ids = self.draft.prompt_input(state)
        hidden = self._run(embeds, features, position_ids)
        self.committed += embeds.shape[1]
        root = state.input_ids[0, -1]
        root_position = int(position_ids[0, -1]) + 1
        embed = self.draft.embed_tokens
        log_probs = torch.log_softmax(self.draft.compute_logits(hidden[0, -1:]).float(), dim=-1)
        tokens, scores = expand_level(log_probs.new_zeros(1), log_probs, k)
        tokens, scores = tokens[0], scores[0]
        pool_tokens, pool_scores = [tokens], [scores]
        pool_parents = [torch.full_like(tokens, -1)]
        frontier = torch.arange(k, device=tokens.device)
        frontier_hidden = hidden[0, -1:].expand(k, -1)
        frontier_ancestry = torch.zeros(k, 0, dtype=torch.bool, device=tokens.device)
        n_pool = k
        for level in range(1, depth):
            eye = torch.eye(k, dtype=torch.bool, device=tokens.device)
            allowed = torch.cat(
                [torch.ones(k, self.committed, dtype=torch.bool, device=tokens.device), frontier_ancestry, eye], dim=1
            )
            positions = torch.full((1, k), root_position + level - 1, device=tokens.device)
            out = self._run(
                embed(tokens)[None], frontier_hidden[None], positions, additive_mask(allowed, hidden.dtype)
            )
            log_probs = torch.log_softmax(self.draft.compute_logits(out[0]).float(), dim=-1)
            child_tokens, child_scores = expand_level(scores, log_probs, k)
            pool_tokens.append(child_tokens.flatten())
            pool_scores.append(child_scores.flatten())
            pool_parents.append(frontier.repeat_interleave(k))
            best = child_scores.flatten().topk(k).indices
            parent_slot = best // k
            frontier_ancestry = torch.cat([frontier_ancestry, eye], 1)[parent_slot]
            frontier = n_pool + best
            frontier_hidden = out[0, parent_slot]
            tokens, scores = child_tokens.flatten()[best], child_scores.flatten()[best]
            n_pool += k * k
        commit_accepted(self.cache, self.committed, [])
        selected, tree_parents = rerank_nodes(
            torch.cat(pool_scores), torch.cat(pool_parents), self.config.total_tokens - 1
        )
        tree_tokens = torch.cat([root.view(1), torch.cat(pool_tokens)[selected]])
        return build_tree(tree_tokens, [-1] + tree_parents.tolist())


class ReferenceDraft(DraftSource):
    """A `SpecVLMDraftModel` drafting through `ReferenceTreeDrafter`; keeps the drafters it made."""

    def __init__(self, draft, config: SpeculativeConfig):
        self.draft = draft
        self.speculative_config = config
        self.drafters: list[ReferenceTreeDrafter] = []

    def new_drafter(self, target) -> Drafter:
        self.drafters.append(ReferenceTreeDrafter(self.draft, self.speculative_config))
        return self.drafters[-1]


class BatchOracleDraft(DraftSource):
    """
    An oracle for batches (`supports_batches`): row `b`'s tree holds the row's true continuation as one path, hidden
    among `top_k - 1` random siblings per level, within `total_tokens` nodes, as `OracleDraft`'s. `references[b]` is
    row `b`'s plain output without its left padding (what the loop's draft states hold).

    With `truth="random"` the path tells the truth for a random number of levels per row and step (0 to `depth`,
    then random wrong tokens): rows accept different numbers of tokens in one step, so the cache's holes are
    exercised. Every state is checked against its row's reference (a state of another row, or one that left the
    truth, fails loudly; past the reference's end the tree is the root alone or random); `steps` records each step's
    rows (batch indices) and `kept` every `keep_rows` call.
    """

    def __init__(self, references: list[list[int]], vocab: int, config: SpeculativeConfig, seed: int = 0,
                 truth: str = "full"):  # fmt: skip
        self.references, self.vocab, self.speculative_config = references, vocab, config
        self.seed, self.truth = seed, truth
        self.drafters: list[_BatchOracleDrafter] = []

    def new_drafter(self, target) -> Drafter:
        self.drafters.append(_BatchOracleDrafter(self, random.Random(self.seed)))
        return self.drafters[-1]


class _BatchOracleDrafter(Drafter):
    supports_batches = True

    def __init__(self, source: BatchOracleDraft, rng: random.Random):
        self.source, self.rng = source, rng
        self.rows: list[int] = []
        self.steps: list[list[int]] = []
        self.kept: list[list[int]] = []

    def begin(self, adapter, do_sample, prompt_len, end_tokens=(), rows=1, visual=True) -> None:
        self.rows = list(range(rows))

    def keep_rows(self, rows: list[int]) -> None:
        self.kept.append(list(rows))
        self.rows = [self.rows[i] for i in rows]

    def propose_rows(self, states: list[DraftState]) -> list[DraftTree]:
        assert len(states) == len(self.rows), f"{len(states)} states for rows {self.rows}"
        self.steps.append(list(self.rows))
        return [self._tree(row, state) for row, state in zip(self.rows, states)]

    def _tree(self, row: int, state: DraftState) -> DraftTree:
        source, cfg = self.source, self.source.speculative_config
        ids, reference = state.input_ids[0].tolist(), source.references[row]
        # A row that has met its criteria may decode on past its reference until the last row finishes (no end-token
        # criterion): only the tokens both have are compared.
        n = min(len(ids), len(reference))
        assert ids[:n] == reference[:n], f"row {row}'s state {ids} leaves its reference {reference}"
        truth = reference[len(ids) : len(ids) + cfg.depth]
        if source.truth == "random":
            told = self.rng.randint(0, cfg.depth)
            truth = truth[:told] + [
                _siblings(self.rng, source.vocab, set(truth[level : level + 1]), 1)[0]
                for level in range(told, cfg.depth)
            ]
        return _tree_around(self.rng, ids[-1], truth, source.vocab, cfg, state.input_ids.device)


class RowwiseDraft(DraftSource):
    """A batch drafter made of single-row sources, `sources[b]` drafting row `b` (as it drafts that row alone):
    `RandomDraft`, `OracleDraft` with the row's own reference, ..."""

    def __init__(self, sources: list[DraftSource]):
        self.sources = sources
        self.speculative_config = sources[0].speculative_config

    def new_drafter(self, target) -> Drafter:
        return _RowwiseDrafter([source.new_drafter(target) for source in self.sources])


class _RowwiseDrafter(Drafter):
    supports_batches = True

    def __init__(self, drafters: list[Drafter]):
        self.drafters = drafters

    def begin(self, adapter, do_sample, prompt_len, end_tokens=(), rows=1, visual=True) -> None:
        assert rows == len(self.drafters), f"{rows} rows for {len(self.drafters)} drafters"
        for drafter in self.drafters:
            drafter.begin(adapter, do_sample, prompt_len, end_tokens)

    def keep_rows(self, rows: list[int]) -> None:
        self.drafters = [self.drafters[row] for row in rows]

    def propose_rows(self, states: list[DraftState]) -> list[DraftTree]:
        assert len(states) == len(self.drafters), f"{len(states)} states for {len(self.drafters)} rows"
        return [drafter.propose(state) for drafter, state in zip(self.drafters, states)]

    def observe_rows(self, trees, paths, finished) -> None:
        for drafter, tree, path, done in zip(self.drafters, trees, paths, finished):
            drafter.observe(tree, path, done)


class RecordingDraft(DraftSource):
    """A real draft whose drafters (`RecordingTreeDrafter`, in `drafters`, one per call) keep what they saw and
    proposed."""

    def __init__(self, draft, config: SpeculativeConfig):
        self.draft, self.speculative_config, self.drafters = draft, config, []

    def new_drafter(self, target):
        self.drafters.append(RecordingTreeDrafter(self.draft, self.speculative_config))
        return self.drafters[-1]


class RecordingTreeDrafter(TreeDrafter):
    """A `TreeDrafter` that keeps every state the loop hands it and every tree it proposes, in order (steps, then
    rows)."""

    def __init__(self, draft, config: SpeculativeConfig):
        super().__init__(draft, config)
        self.states, self.trees = [], []

    def propose_rows(self, states):
        trees = super().propose_rows(states)
        self.states += states
        self.trees += trees
        return trees
