"""The hardware-aware tree budget (SpecVLM §1.1's bottleneck model): predicted speedup of a tree shape from the
target's verification cost curve T(q), the draft's cost per step and the tokens a step emits, and the choice of
`(depth, top_k, total_tokens)` that maximises it. Pure functions; `calibration.py` measures their inputs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..configuration import SpeculativeConfig
from ..tuning import CostCurve

DEPTHS = (1, 2, 3, 4, 5, 6, 7, 8)
TOP_KS = (1, 2, 4, 8)
SIZES = (4, 8, 12, 16, 24, 32, 48, 64, 96)


@dataclass(frozen=True)
class TreeEstimate:
    """
    What one tree shape does on the calibration prompts.

    Attributes:
        tree (`SpeculativeConfig`): the shape.
        tokens_per_step (`float`): mean tokens a verification step emits (accepted drafts + the bonus token).
        draft_seconds (`float`): draft time per step (tree growth included).
        draft_prefill_seconds (`float`): the draft's one-off pass over the prompt.
    """

    tree: SpeculativeConfig
    tokens_per_step: float
    draft_seconds: float
    draft_prefill_seconds: float = 0.0


@dataclass(frozen=True)
class TreeChoice:
    """The chosen shape, its predicted decoding speedup and every shape that was scored, best first."""

    tree: SpeculativeConfig
    predicted_speedup: float
    scored: tuple[tuple[TreeEstimate, float], ...]


def step_seconds(estimate: TreeEstimate, curve: CostCurve, overhead: float) -> float:
    """Seconds of one speculative step: verify `total_tokens` + draft + the loop's own overhead."""
    return curve.at(estimate.tree.total_tokens) + estimate.draft_seconds + overhead


def predict_speedup(estimate: TreeEstimate, curve: CostCurve, plain_step: float, overhead: float) -> float:
    """
    Decoding-phase speedup over plain decoding: `tokens_per_step * plain_step / (T(q) + draft + overhead)`.

    Args:
        plain_step (`float`): seconds per token of plain `generate()` after the first token.
        overhead (`float`): seconds per step outside target and draft forwards.
    """
    return estimate.tokens_per_step * plain_step / step_seconds(estimate, curve, overhead)


def choose_tree(estimates: Sequence[TreeEstimate], curve: CostCurve, plain_step: float, overhead: float) -> TreeChoice:
    """The shape with the highest predicted speedup (ties: fewer tree tokens, then shallower, then narrower)."""
    if not estimates:
        raise ValueError("choose_tree needs at least one scored tree shape")
    scored = [(e, predict_speedup(e, curve, plain_step, overhead)) for e in estimates]
    scored.sort(key=lambda item: (-item[1], item[0].tree.total_tokens, item[0].tree.depth, item[0].tree.top_k))
    return TreeChoice(tree=scored[0][0].tree, predicted_speedup=scored[0][1], scored=tuple(scored))


def _valid(depth: int, top_k: int, total_tokens: int) -> bool:
    return 2 <= total_tokens <= SpeculativeConfig(depth=depth, top_k=top_k).max_nodes + 1


def candidate_trees(
    depths: Sequence[int] = DEPTHS, top_ks: Sequence[int] = TOP_KS, sizes: Sequence[int] = SIZES
) -> list[SpeculativeConfig]:
    """The lattice of shapes: chains (`top_k=1`, `total_tokens=depth+1`) and trees with `total_tokens` in `sizes`
    no larger than the drafter can fill (`max_nodes + 1`)."""
    trees = []
    for depth in depths:
        for top_k in top_ks:
            totals = [depth + 1] if top_k == 1 else [n for n in sizes if _valid(depth, top_k, n)]
            trees += [SpeculativeConfig(depth=depth, top_k=top_k, total_tokens=n) for n in totals]
    return trees


def snap(tree: SpeculativeConfig, lattice: Sequence[SpeculativeConfig]) -> SpeculativeConfig:
    """The lattice shape closest to `tree` (same top_k and depth where possible)."""
    return min(
        lattice,
        key=lambda t: (abs(t.top_k - tree.top_k), abs(t.depth - tree.depth), abs(t.total_tokens - tree.total_tokens)),
    )


def _adjacent(values: Sequence[int], here: int) -> list[int]:
    """The values just below and just above `here` in `values`."""
    below, above = [v for v in values if v < here], [v for v in values if v > here]
    return ([max(below)] if below else []) + ([min(above)] if above else [])


def neighbours(tree: SpeculativeConfig, lattice: Sequence[SpeculativeConfig]) -> list[SpeculativeConfig]:
    """Shapes one step away along one axis: the next depth, the next top_k, the next total_tokens. A chain's
    neighbours are the chains one level shorter and longer, and the nearest-sized tree of the narrowest width."""
    axes = ("depth", "top_k", "total_tokens")
    found = []
    for axis in axes:
        line = [t for t in lattice if all(getattr(t, a) == getattr(tree, a) for a in axes if a != axis)]
        steps = _adjacent(sorted({getattr(t, axis) for t in line}), getattr(tree, axis))
        found += [t for t in line if getattr(t, axis) in steps]
    narrowest = min((t.top_k for t in lattice if t.top_k > 1), default=None)
    if tree.top_k == 1:
        chains = [t for t in lattice if t.top_k == 1]
        found += [t for t in chains if t.depth in _adjacent(sorted({c.depth for c in chains}), tree.depth)]
        trees = [t for t in lattice if t.depth == tree.depth and t.top_k == narrowest]
        if trees:
            found.append(min(trees, key=lambda t: (abs(t.total_tokens - tree.total_tokens), t.total_tokens)))
    elif tree.top_k == narrowest:
        found += [t for t in lattice if t.top_k == 1 and t.depth == tree.depth]
    return [t for t in dict.fromkeys(found) if t != tree]


def search_tree(
    estimate: Callable[[SpeculativeConfig], TreeEstimate],
    curve: CostCurve,
    plain_step: float,
    overhead: float,
    *,
    starts: Sequence[SpeculativeConfig],
    lattice: Sequence[SpeculativeConfig],
    budget: int,
) -> TreeChoice:
    """
    Scores every start (snapped onto the lattice: small, medium and large shapes), then hill-climbs from the best one,
    moving to the best neighbour while that raises the predicted speedup. Each shape is scored once with `estimate`
    (a measurement), at most `budget` shapes in all; the choice is `choose_tree` over everything scored.
    """
    if budget < 1:
        raise ValueError(f"search budget must be >= 1, got {budget}")
    scored: dict[SpeculativeConfig, TreeEstimate] = {}

    def value(tree: SpeculativeConfig) -> float | None:
        if tree not in scored:
            if len(scored) >= budget:
                return None
            scored[tree] = estimate(tree)
        return predict_speedup(scored[tree], curve, plain_step, overhead)

    starts = [(value(s), s) for s in dict.fromkeys(snap(s, lattice) for s in starts)]
    best, here = max(((v, s) for v, s in starts if v is not None), key=lambda m: m[0])
    while True:
        moves = [(value(t), t) for t in neighbours(here, lattice)]
        moves = [(v, t) for v, t in moves if v is not None and v > best]
        if not moves:
            break
        best, here = max(moves, key=lambda m: m[0])
    return choose_tree(list(scored.values()), curve, plain_step, overhead)


def predict_end_to_end(
    estimate: TreeEstimate, curve: CostCurve, plain_step: float, overhead: float, plain_seconds: float, new_tokens: int
) -> float:
    """
    End-to-end speedup predicted for a sample that plain decoding generated in `plain_seconds` (`new_tokens` tokens):
    the first token (image encoding + prefill) costs the same, the draft adds its prefill, and the other
    `new_tokens - 1` tokens take `(new_tokens - 1) / tokens_per_step` speculative steps instead of as many plain ones.
    """
    decoded = max(new_tokens - 1, 0)
    first = max(plain_seconds - decoded * plain_step, 0.0)
    steps = decoded / estimate.tokens_per_step
    return plain_seconds / (first + estimate.draft_prefill_seconds + steps * step_seconds(estimate, curve, overhead))
