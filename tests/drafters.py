"""Test doubles that draft through the real `Drafter` interface: an oracle that knows the target's greedy
continuation (long paths get accepted), one that knows it only for its first levels, and a random drafter (almost
everything is rejected)."""

from __future__ import annotations

import random

import torch

from specvlm_hf import Drafter, DraftSource, DraftState, SpeculativeConfig
from specvlm_hf.tree import build_tree


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
        tokens, parents = [int(state.input_ids[0, -1])], [-1]
        parent = 0
        for token in truth:
            if len(tokens) >= cfg.total_tokens:
                break
            level = [token] + _siblings(self.rng, self.source.vocab, {token}, cfg.top_k - 1)
            self.rng.shuffle(level)
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
        return build_tree(torch.tensor(tokens, device=state.input_ids.device), parents)


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
