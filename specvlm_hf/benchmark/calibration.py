"""Measures the inputs of the tree budget (`tree_budget.py`) on the current device, on calibration prompts:

- plain decoding: seconds per token of `target.generate` after the first, and the first token's time (image
  encoding + prefill); its output is the calibration continuation (greedy at T = 0, sampled at T > 0);
- T(q): the loop's own verification forward (`loop.verify`) of q tree tokens, over a cached prefix of prompt + half
  the continuation;
- per tree shape, by *replay*: the real `TreeDrafter` is driven along the fixed continuation exactly as the decoding
  loop drives it (the loop's own `prompt_draft_state` / `step_draft_state`, target features from one causal forward
  over the whole sequence), and each
  step accepts the longest drafted path that matches the continuation. At T = 0 this is what the loop accepts (the
  continuation is the target's argmax chain); at T > 0 it has the loop's distribution, since recursive rejection over
  deterministic siblings accepts a child exactly when a token sampled from the target is that child. The replay
  times the draft's steps but runs no target verification, so a shape costs drafting only;
- the loop's own overhead per step, and how much slower verification and drafting run inside the loop than in
  isolation: one profiled real generation (`profile_loop`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from transformers import DynamicCache

from ..adapters import PromptLayout, get_adapter
from ..clock import time_call
from ..configuration import SpeculativeConfig
from ..loop import prompt_draft_state, step_draft_state, target_forward
from ..tree import DraftTree
from ..tuning import CostCurve, measure_verify_curve
from .methods import EagleVLMFixed, generation_config
from .prompts import Sample
from .tree_budget import TreeChoice, TreeEstimate, candidate_trees, search_tree, snap

logger = logging.getLogger(__name__)

# Where the local search starts: a chain, a middle tree and EAGLE-2's wide default (snapped onto the lattice).
SEARCH_STARTS = (
    SpeculativeConfig(depth=4, top_k=1, total_tokens=5),
    SpeculativeConfig(depth=5, top_k=4, total_tokens=16),
    SpeculativeConfig(depth=6, top_k=8, total_tokens=64),
)


@dataclass(frozen=True)
class ReplayContext:
    """
    A calibration sequence with the target's view of it, computed once.

    Attributes:
        input_ids (`torch.LongTensor` of shape `(1, seq_len)`): prompt + continuation.
        prompt_len (`int`)
        embeds (`torch.FloatTensor` of shape `(1, seq_len, hidden_size)`): the text model's input embeddings.
        features (`torch.FloatTensor` of shape `(1, seq_len, hidden_size)`): its features (one causal forward).
        layout (`PromptLayout`): the prompt's positions and visual slots.
    """

    input_ids: torch.Tensor
    prompt_len: int
    embeds: torch.Tensor
    features: torch.Tensor
    layout: PromptLayout


@dataclass(frozen=True)
class PlainDecoding:
    """Plain `generate()` on a calibration prompt: its output and its costs."""

    sequence: torch.Tensor
    first_token_seconds: float
    seconds_per_token: float


@dataclass(frozen=True)
class LoopProfile:
    """Seconds per verification step of one profiled real generation: target verification, drafting, the rest."""

    tree: SpeculativeConfig
    verify: float
    draft: float
    overhead: float


@dataclass(frozen=True)
class TreeCalibration:
    """
    Everything the tree choice at one temperature rests on (reported in the JSON).

    Attributes:
        curve (`CostCurve`): T(q) measured in isolation; the choice used `curve.scaled(verify_scale)`.
        plain_step (`float`), first_token_seconds (`float`): plain decoding's seconds per token and first token.
        loop (`LoopProfile`): the profiled real generation the scales and the overhead come from.
        verify_scale, draft_scale (`float`): in-loop over isolated time, for verification and for drafting.
    """

    temperature: float
    choice: TreeChoice
    curve: CostCurve
    plain_step: float
    first_token_seconds: float
    loop: LoopProfile
    verify_scale: float
    draft_scale: float
    calibration_samples: tuple[str, ...]

    @property
    def loop_curve(self) -> CostCurve:
        return self.curve.scaled(self.verify_scale)


@torch.no_grad()
def measure_plain_decoding(
    target, sample: Sample, temperature: float, max_new_tokens: int, seed: int
) -> PlainDecoding:
    """Times `target.generate` for 1 and for `max_new_tokens` tokens (after one discarded call)."""
    device = target.device

    def run(n: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return target.generate(**sample.inputs, generation_config=generation_config(target, temperature, n))

    run(min(8, max_new_tokens))  # warm-up
    _, first = time_call(lambda: run(1), device)
    sequence, total = time_call(lambda: run(max_new_tokens), device)
    new = sequence.shape[1] - sample.prompt_len
    per_token = (total - first) / (new - 1) if new > 1 else first
    return PlainDecoding(sequence, first, per_token)


@torch.no_grad()
def replay_context(target, sample: Sample, sequence: torch.Tensor, layers=None) -> ReplayContext:
    """The target's embeddings and features over `sequence` (the prompt's image scattered into its slots); the
    features are what a draft reading `layers` (its `feature_layers`) sees (`loop.target_forward`)."""
    adapter = get_adapter(target)
    prompt_len = sample.prompt_len
    prompt_ids = sequence[:, :prompt_len]
    layout = adapter.layout(prompt_ids, {k: v for k, v in sample.inputs.items() if k != "input_ids"})
    # The continuation is plain text even where a token equals the image placeholder id.
    prompt_embeds = adapter.embed(prompt_ids, layout.visual_features)
    embeds = torch.cat([prompt_embeds, adapter.embed_tokens(sequence[:, prompt_len:])], dim=1)
    _, features = target_forward(adapter, embeds, layout.continued(sequence.shape[1]), DynamicCache(), layers=layers)
    return ReplayContext(sequence, prompt_len, embeds, features, layout)


def matched_path_length(tree: DraftTree, continuation: Sequence[int]) -> int:
    """Drafted tokens on the longest root-to-node path that spells a prefix of `continuation`."""
    tokens = tree.tokens.tolist()

    def depth_from(node: int, level: int) -> int:
        if level == len(continuation):
            return 0
        return max(
            (1 + depth_from(c, level + 1) for c in tree.children[node] if tokens[c] == continuation[level]), default=0
        )

    return depth_from(0, 0)


@torch.no_grad()
def replay(draft, target, context: ReplayContext, tree: SpeculativeConfig) -> tuple[list[int], list[float]]:
    """
    Drives a fresh `TreeDrafter` of shape `tree` along `context` like the decoding loop does.

    Returns:
        `(tokens_per_step, draft_seconds)`: tokens each verification step would emit, and the seconds of each
        `propose` call (the first includes the draft's pass over the prompt).
    """
    drafter = draft.new_drafter(target, tree)
    adapter = get_adapter(target)
    device = target.device
    ids, p, embeds, features = context.input_ids, context.prompt_len, context.embeds, context.features
    total = ids.shape[1]
    state = prompt_draft_state(adapter, ids[:, : p + 1], embeds[:, :p], features[:, :p], context.layout.visual_mask[0])
    root, emitted, seconds = p, [], []
    continuation = ids[0].tolist()
    while root < total - 1:
        proposed, elapsed = time_call(lambda s=state: drafter.propose(s), device)
        accepted = matched_path_length(proposed, continuation[root + 1 : root + 1 + tree.depth])
        n = min(accepted + 1, total - 1 - root)  # accepted drafts + the bonus token, cut where the output ends
        emitted.append(n)
        seconds.append(elapsed)
        state = step_draft_state(adapter, ids[:, : root + accepted + 2], features[:, root : root + accepted + 1], root)
        root += n
    return emitted, seconds


def estimate_tree(draft, target, contexts: Sequence[ReplayContext], tree: SpeculativeConfig) -> TreeEstimate:
    """Replays `tree` on every context: mean tokens per step and mean draft seconds per step over all of them (means,
    not medians: the loop pays every slow step)."""
    emitted, steps, prefill = [], [], []
    for context in contexts:
        n, seconds = replay(draft, target, context, tree)
        emitted += n
        prefill.append(seconds[0])
        steps += seconds[1:] or seconds
    return TreeEstimate(tree, float(np.mean(emitted)), float(np.mean(steps)), float(np.mean(prefill)))


@torch.no_grad()
def measure_cost_curve(target, context: ReplayContext, sizes: Sequence[int], repeats: int = 7) -> CostCurve:
    """T(q) for each q in `sizes` (`tuning.measure_verify_curve`: the loop's own `verify`) over a cached prefix of the
    prompt plus half of the context's continuation."""
    adapter = get_adapter(target)
    prefix = context.prompt_len + (context.input_ids.shape[1] - context.prompt_len) // 2
    cache = DynamicCache()
    adapter.forward(context.embeds[:, :prefix], context.layout.continued(prefix), cache)
    return measure_verify_curve(adapter, cache, prefix, context.layout, sizes, repeats)


def profile_loop(
    target, draft, sample: Sample, tree: SpeculativeConfig, temperature: float, max_new_tokens: int, seed: int
) -> LoopProfile:
    """Profiles a real generation with `tree` (after a discarded one)."""
    method = EagleVLMFixed(draft, {float(temperature): tree})
    for _ in range(2):
        torch.manual_seed(seed)
        result = method.generate(target, sample.inputs, temperature=temperature, max_new_tokens=max_new_tokens)
    steps = max(1, result.target_forwards - 1)
    other = max(0.0, result.step_time - result.verify_time - result.draft_time)
    return LoopProfile(tree, result.verify_time / steps, result.draft_time / steps, other / steps)


def calibrate_tree(
    target,
    draft,
    samples: Sequence[Sample],
    *,
    temperature: float,
    max_new_tokens: int,
    budget: int,
    seed: int = 0,
    curve: CostCurve | None = None,
    lattice: Sequence[SpeculativeConfig] | None = None,
) -> TreeCalibration:
    """
    Chooses the tree shape for one temperature: measures plain decoding on `samples` (`max_new_tokens` each), the cost
    curve (unless given: it does not depend on the temperature), one profiled real generation, and searches the
    lattice (`tree_budget.search_tree`) replaying at most `budget` shapes.

    Isolated timings run warmer than the loop, where target and draft evict each other's weights from the CPU caches,
    so the cost curve and the replayed draft times are scaled by the ratio of the profiled generation's verify and
    draft time per step to their isolated values for the same shape (`verify_scale`, `draft_scale`).
    """
    lattice = list(lattice or candidate_trees())
    plains = [measure_plain_decoding(target, s, temperature, max_new_tokens, seed) for s in samples]
    contexts = [replay_context(target, s, plain.sequence, draft.feature_layers) for s, plain in zip(samples, plains)]
    if curve is None:
        sizes = sorted({t.total_tokens for t in lattice})
        curve = measure_cost_curve(target, max(contexts, key=lambda c: c.input_ids.shape[1]), sizes)
    longest = max(range(len(samples)), key=lambda i: plains[i].sequence.shape[1])
    reference = snap(SEARCH_STARTS[1], lattice)
    loop = profile_loop(target, draft, samples[longest], reference, temperature, max_new_tokens, seed)
    replayed = {reference: estimate_tree(draft, target, contexts, reference)}
    verify_scale = loop.verify / curve.at(reference.total_tokens)
    draft_scale = loop.draft / replayed[reference].draft_seconds

    def estimate(tree: SpeculativeConfig) -> TreeEstimate:
        if tree not in replayed:
            replayed[tree] = estimate_tree(draft, target, contexts, tree)
        found = replayed[tree]
        logger.info(
            "tree %s: %.2f tokens/step, draft %.2f ms/step (isolated)",
            _label(tree),
            found.tokens_per_step,
            found.draft_seconds * 1e3,
        )
        return replace(found, draft_seconds=found.draft_seconds * draft_scale)

    plain_step = float(np.median([p.seconds_per_token for p in plains]))
    choice = search_tree(
        estimate,
        curve.scaled(verify_scale),
        plain_step,
        loop.overhead,
        starts=SEARCH_STARTS,
        lattice=lattice,
        budget=budget,
    )
    return TreeCalibration(
        temperature=float(temperature),
        choice=choice,
        curve=curve,
        plain_step=plain_step,
        first_token_seconds=float(np.median([p.first_token_seconds for p in plains])),
        loop=loop,
        verify_scale=verify_scale,
        draft_scale=draft_scale,
        calibration_samples=tuple(s.id for s in samples),
    )


def _label(tree: SpeculativeConfig) -> str:
    return f"{tree.depth},{tree.top_k},{tree.total_tokens}"
