"""The tree a bound draft uses when the caller sets no knobs (`SpeculativeConfig()` is "auto"): an online controller
that picks depth and width every step from measured costs and the running acceptance.

- **Costs** (`DeviceCosts`): the target's verification time T(q) for q tree tokens (the loop's own `verify`) and the
  draft's time per level of width k, measured once per (device, target, draft) over a prefix as long as the first
  prompt (0.5-1 s on 2 CPU cores at testbed scale), made non-decreasing in q and k (`monotone`), kept in memory and
  on disk (`cache_dir()`), so a new process on the same machine measures nothing.
- **Acceptance** (`TreeTuner`): per width k and depth j, the probability alpha_j(k) that the target accepts a drafted
  token at depth j given it accepted its ancestors, estimated from the steps run so far (a step of width k also
  tells what every narrower width would have accepted: the leading drafts that were their siblings' first choices) (a Beta estimate whose prior
  is alpha_{j-1}(k), so depths not yet tried inherit the acceptance above them, which is what makes the controller
  try them). For a width k > 1 the prior is the chain's estimate scaled by the draft's own probability mass in its
  top k. The choice adds half a standard error to each estimate, so a shape unlucky in its first steps is retried.
- **Prompt classes**: a draft trained on image questions predicts answers to text-only prompts far worse, so calls
  on prompts without visual tokens keep acceptance counts of their own (`start_call(visual=False)`): after one such
  call the next starts from what text-only prompts got, instead of paying two or three rejected steps to learn it
  again. They keep in-loop scales of their own too: the costs were measured over a prefix as long as the first
  prompt, and a target step over a short text prompt can cost much less than one over a long image prompt, so one
  class's scales would misprice the other's steps. The measured costs are shared.
- **This call**: prompts differ (a text-only question the draft cannot predict, a described image it predicts well),
  so within a `generate()` call every alpha is scaled down by how this call's drafts fall short of the running
  estimate (accepted over expected, with `call_strength` pseudo-drafts on each side, at most 1): two or three
  rejected steps are enough to draft less, or not at all.
- **Choice**: the shape (depth d, width k, d*k + 1 tree tokens) that maximises expected tokens per second,
  `E(d, k) / (T(d*k + 1) * s_v + (c(1) + (d - 1) * c(k)) * s_d)`, with `E(d, k) = 1 + sum_i prod_{j<=i} alpha_j(k)`
  and `s_v`, `s_d` the running ratio of in-loop to isolated times (the loop evicts the draft's weights from the CPU
  caches, so isolated times run warm). A *plain step* (no draft: one token for T(1) x `s_p`, the running ratio of
  in-loop plain steps to T(1)) competes too, so where the draft is not accepted the loop decodes as plain
  `generate()` does (the draft catches up on those tokens when it drafts again); after `probe_every` plain steps in
  a row one step drafts again, to notice when acceptance comes back. A probe that has none of its drafts accepted
  doubles the gap to the next one (up to `max_probe_every`); one that does resets it.

- **When to start** (`starts_drafting`): the draft's pass over the prompt is paid once, at the first drafted step,
  and only tokens after it can repay it: an answer of one or two tokens loses to plain decoding whatever is drafted.
  Each class keeps the lengths of its recent answers and the price of that pass per prompt token (from earlier calls'
  first drafted steps), so, once it has seen a few answers, a call starts drafting at the step from which the
  answers that went on past it would, on average, repay the pass (optimal stopping over those lengths); until then
  its steps are plain. Where no start can pay (every recent answer short), the whole call is left to plain decoding.

- **Whole calls** (`CallChooser`): where even the loop's plain steps lose to plain `generate()` (its per-row work
  at large batch sizes, prompts the draft cannot predict), the call is left to plain `generate()` decoding: the
  tokens per row and second that calls of a prompt class reached each way decide, with the other way tried again
  after a gap that doubles while it keeps losing. Before drafted calls have given that evidence, the rate the
  costs predict at the prior acceptance stands in for drafting's, so a batch size where no tree can win clearly
  (verification compute-bound: T(2) near 2 T(1)) starts with plain decoding.

Any tree is verified losslessly, so the controller changes speed, never output. Explicit knobs (`depth`, `top_k`,
`total_tokens`) switch it off.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from transformers import DynamicCache

from .cache import commit_accepted
from .clock import time_call
from .configuration import SpeculativeConfig
from .tree import build_tree

logger = logging.getLogger(__name__)

VERIFY_SIZES = (1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 13, 17, 25, 33, 65)
# A batch's verification curve is measured for the sizes whose q x rows stays within this many tokens (sizes up to 9
# always); larger trees are extrapolated (`CostCurve.at`). At large batch sizes the larger trees would take most of
# the measurement, for shapes the auto tree does not pick there (the forward is compute-bound: T(q) grows linearly).
VERIFY_TOKENS = 2048
WIDTHS = (1, 2, 4, 8)
MAX_DEPTH = 10


@dataclass(frozen=True)
class CostCurve:
    """
    Seconds of one target verification forward of `q` tree tokens (embedding, tree mask, text model, `lm_head`) over
    a cached prefix of `prefix_len` tokens.

    Attributes:
        sizes (`tuple[int, ...]`): measured tree sizes q, increasing, starting at 1.
        seconds (`tuple[float, ...]`): T(q) for each size.
        prefix_len (`int`): cached tokens before the tree.
    """

    sizes: tuple[int, ...]
    seconds: tuple[float, ...]
    prefix_len: int = 0

    def __post_init__(self):
        if len(self.sizes) != len(self.seconds) or not self.sizes or self.sizes[0] != 1:
            raise ValueError(f"a cost curve needs matching sizes and seconds starting at q=1, got {self.sizes}")
        if any(b <= a for a, b in zip(self.sizes, self.sizes[1:])):
            raise ValueError(f"cost curve sizes must increase, got {self.sizes}")

    def at(self, q: int) -> float:
        """T(q), linearly interpolated between measured sizes (extrapolated from the last two beyond them, never
        downwards)."""
        if q > self.sizes[-1] and len(self.sizes) > 1:
            (q0, q1), (t0, t1) = self.sizes[-2:], self.seconds[-2:]
            return t1 + max(t1 - t0, 0.0) / (q1 - q0) * (q - q1)
        return float(np.interp(q, self.sizes, self.seconds))

    def scaled(self, factor: float) -> CostCurve:
        """The same curve with every T(q) multiplied by `factor`."""
        return CostCurve(self.sizes, tuple(t * factor for t in self.seconds), self.prefix_len)

    def relative(self) -> dict[int, float]:
        """T(q) / T(1) for each measured q."""
        return {q: t / self.seconds[0] for q, t in zip(self.sizes, self.seconds)}


@torch.no_grad()
def measure_verify_curve(
    adapter, cache, prefix_len: int, layout, sizes=VERIFY_SIZES, repeats: int = 5, rows: int = 1
) -> CostCurve:
    """
    T(q) for each q in `sizes` (1 added): the median over `repeats` rounds (after a warm-up round, rounds interleaved
    across q) of the loop's `verify` of a q-token tree per row over `cache`, which holds `prefix_len` entries of
    `rows` sequences whose prompts have `layout` (`adapters.PromptLayout`), and is cut back to them after each
    forward; made non-decreasing in q (`monotone`).
    """
    from .loop import verify  # loop imports drafter, which imports this module's users

    device = adapter.lm_head.weight.device
    sizes = sorted({1, *sizes})
    trees = {q: build_tree(torch.zeros(q, dtype=torch.long, device=device), [-1] + [0] * (q - 1)) for q in sizes}
    roots = torch.full((rows,), prefix_len, device=device)
    live = None if rows == 1 else torch.ones(rows, prefix_len, dtype=torch.bool, device=device)
    calls = {q: lambda t=trees[q]: verify(adapter, [t] * rows, cache, roots, layout, live=live) for q in sizes}
    seconds = interleaved_medians(calls, device, repeats, reset=lambda: commit_accepted(cache, prefix_len, []))
    return CostCurve(tuple(sizes), tuple(seconds.values()), prefix_len)


@torch.no_grad()
def measure_draft_levels(
    draft, prefix_len: int, widths=WIDTHS, repeats: int = 15, rows: int = 1, numerics: str = "reference"
) -> dict[int, float]:
    """Seconds of one draft level of each width k (k nodes of each of `rows` sequences through the lean draft
    forward in `numerics`, the `lm_head`, log-softmax and top-k) over a draft cache of `prefix_len` entries: the
    median over `repeats` rounds (after a warm-up round, rounds interleaved across k), made non-decreasing in k
    (`monotone`)."""
    from .draft_step import LeanDraftForward
    from .tree import causal_attention_mask

    weight = draft.fc.weight
    device, dtype, hidden = weight.device, weight.dtype, draft.config.hidden_size
    forward = LeanDraftForward(draft, capacity=prefix_len + max(widths), rows=rows, numerics=numerics)
    noise = torch.Generator(device=device).manual_seed(0)  # the caller's random stream stays untouched
    prefix = torch.randn(1, prefix_len + max(widths), hidden, device=device, dtype=dtype, generator=noise)
    prefix = prefix.expand(rows, -1, -1)
    forward(prefix[:, :prefix_len], prefix[:, :prefix_len], torch.arange(prefix_len, device=device).expand(rows, -1),
            causal_attention_mask(prefix_len, 0, dtype, device))  # fmt: skip

    def level(k: int) -> None:
        nodes = prefix[:, prefix_len : prefix_len + k]
        mask = torch.zeros(rows, 1, k, prefix_len + k, dtype=dtype, device=device)
        out = forward(nodes, nodes, torch.full((rows, k), prefix_len, device=device), mask)
        torch.log_softmax(forward.logits(out).float(), dim=-1).topk(k, dim=-1)
        forward.cache.truncate(prefix_len)

    return interleaved_medians({k: lambda k=k: level(k) for k in sorted(widths)}, device, repeats)


def interleaved_medians(calls: dict, device, repeats: int, reset=None) -> dict:
    """
    Seconds of each of `calls` (zero-argument callables, in increasing order of the work they do): the median over
    `repeats` rounds after a warm-up round, the rounds interleaved across the calls so that a slow spell of the
    machine hits every call alike; made non-decreasing in that order (`monotone`). `reset`, if given, runs after each
    call, untimed.
    """
    timings = {key: [] for key in calls}
    for round_ in range(repeats + 1):
        for key, call in calls.items():
            seconds = time_call(call, device)[1]
            if reset is not None:
                reset()
            if round_:
                timings[key].append(seconds)
    return dict(zip(calls, monotone([float(np.median(timings[key])) for key in calls])))


def monotone(values: list[float]) -> list[float]:
    """The non-decreasing sequence closest to `values` in squared error (pool adjacent violators). A forward over
    more tokens never costs less, so a measured cost below a smaller size's is noise (another process, a frequency
    step); left in, the tuner would take that size for free."""
    blocks: list[list[float]] = []  # [sum, count] of pooled neighbours
    for value in values:
        blocks.append([value, 1])
        while len(blocks) > 1 and blocks[-2][0] * blocks[-1][1] > blocks[-1][0] * blocks[-2][1]:
            total, count = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
    return [total / count for total, count in blocks for _ in range(int(count))]


# A faster draft numerics is chosen only if its levels cost at most this share of the reference's: the reference is
# exact, and a smaller gain is within the measurement's noise.
NUMERICS_GAIN = 0.95


@dataclass(frozen=True)
class DeviceCosts:
    """
    What one step costs on this device, measured in isolation: T(q), and one draft level per width k in `numerics`.

    Attributes:
        curve (`CostCurve`)
        draft_level (`dict[int, float]`): seconds of a draft level of width k, in `numerics`.
        numerics (`str`): the draft numerics these costs are for (`draft_step.NUMERICS`).
        levels (`dict[str, dict[int, float]]`): the draft levels of every numerics measured (`draft_level` among
            them), from which `choose_numerics` picked; empty when only `numerics` was measured.
    """

    curve: CostCurve
    draft_level: dict[int, float]
    numerics: str = "reference"
    levels: dict = field(default_factory=dict)

    def with_numerics(self, numerics: str) -> DeviceCosts:
        """These costs with the draft levels of `numerics` (measured here: a key of `levels`)."""
        if numerics == self.numerics:
            return self
        if numerics not in self.levels:
            raise ValueError(f"draft numerics {numerics!r} was not measured here (measured: {', '.join(self.levels)})")
        return replace(self, draft_level=self.levels[numerics], numerics=numerics)

    def to_json(self) -> dict:
        levels = {name: {str(k): v for k, v in level.items()} for name, level in self.levels.items()}
        return {"curve": asdict(self.curve), "draft_level": {str(k): v for k, v in self.draft_level.items()},
                "numerics": self.numerics, "levels": levels}  # fmt: skip

    @classmethod
    def from_json(cls, data: dict) -> DeviceCosts:
        """Raises `ValueError` unless `data` holds a curve from q = 1 and a cost for width 1, all finite and > 0."""
        curve = data["curve"]
        levels = {str(name): {int(k): float(v) for k, v in dict(level).items()}
                  for name, level in dict(data.get("levels", {})).items()}  # fmt: skip
        costs = cls(
            CostCurve(tuple(int(q) for q in curve["sizes"]), tuple(float(t) for t in curve["seconds"]),
                      int(curve["prefix_len"])),
            {int(k): float(v) for k, v in dict(data["draft_level"]).items()},
            str(data.get("numerics", "reference")),
            levels,
        )  # fmt: skip
        values = [*costs.curve.seconds, *costs.draft_level.values()]
        values += [v for level in levels.values() for v in level.values()]
        if 1 not in costs.draft_level or not all(np.isfinite(v) and v > 0 for v in values):
            raise ValueError(f"invalid tree costs: {data}")
        return costs


def choose_numerics(levels: dict[str, dict[int, float]]) -> str:
    """The draft numerics whose levels cost least summed over the widths, if that is at most `NUMERICS_GAIN` of the
    reference's (`levels` holds `"reference"`); else `"reference"`."""
    total = {name: sum(level.values()) for name, level in levels.items()}
    best = min(total, key=total.get)
    return best if total[best] <= NUMERICS_GAIN * total["reference"] else "reference"


def cache_dir() -> Path:
    """Where measured costs are kept: `$SPECVLM_HF_CACHE`, else `$HF_HOME/specvlm_hf` (`~/.cache/huggingface`)."""
    if os.environ.get("SPECVLM_HF_CACHE"):
        return Path(os.environ["SPECVLM_HF_CACHE"])
    from huggingface_hub.constants import HF_HOME

    return Path(HF_HOME) / "specvlm_hf"


COSTS_FORMAT = 3  # bump when what is measured changes


def costs_key(target, draft, rows: int = 1) -> str:
    """Identifies what the costs depend on: device (and CPU threads), dtype, the target's and the draft's
    architecture and attention kernels, the batch size. Weights do not change costs, so a retrained draft reuses
    them."""
    device = draft.fc.weight.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    parts = [
        str(COSTS_FORMAT),
        name,
        f"threads={torch.get_num_threads()}",
        str(draft.fc.weight.dtype),
        target.config.to_json_string(use_diff=False),
        str(target.config.get_text_config()._attn_implementation),
        draft.config.to_json_string(use_diff=False),
        str(draft.config._attn_implementation),
    ]
    if rows > 1:
        parts.append(f"rows={rows}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:20]


_MEMORY: dict[str, DeviceCosts] = {}


def device_costs(adapter, draft, prefix_len: int, rows: int = 1) -> DeviceCosts:
    """The costs of (this device, target, draft, batch size `rows`): from memory, else from disk, else measured over
    a synthetic prefix of `prefix_len` tokens per row and stored in both. A batch's costs are per step of the whole
    batch: its verification forward (`rows` trees) and its draft levels (`rows` rows each). The draft levels are
    measured in every numerics this device runs, and the costs are those of the one `choose_numerics` picks
    (`DeviceCosts.with_numerics` gives another's)."""
    from .draft_step import available_numerics
    from .loop import prefill  # loop imports drafter, which imports this module's users

    key = costs_key(adapter.target, draft, rows)
    if key in _MEMORY:
        return _MEMORY[key]
    path = cache_dir() / f"costs-{key}.json"
    try:
        costs = DeviceCosts.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # absent or damaged: measure again
        costs = None
    if costs is None:
        started = time.perf_counter()
        device = adapter.lm_head.weight.device
        cache = DynamicCache()
        noise = torch.Generator(device=device).manual_seed(0)  # the caller's random stream stays untouched
        vocab = adapter.lm_head.weight.shape[0]
        tokens = torch.randint(0, vocab, (1, prefix_len), device=device, generator=noise)
        tokens[adapter.visual_mask(tokens)] = 0  # text only: no visual slots
        tokens = tokens.expand(rows, -1)
        layout = adapter.layout(tokens, {})
        with torch.no_grad():
            prefill(adapter, tokens, layout, cache)
        levels = {numerics: measure_draft_levels(draft, prefix_len, rows=rows, numerics=numerics)
                  for numerics in available_numerics(draft.fc.weight.device, draft.fc.weight.dtype)}  # fmt: skip
        numerics = choose_numerics(levels)
        sizes = [q for q in VERIFY_SIZES if q <= 9 or q * rows <= VERIFY_TOKENS]
        curve = measure_verify_curve(adapter, cache, prefix_len, layout, sizes, rows=rows)
        costs = DeviceCosts(curve, levels[numerics], numerics, levels)
        logger.info("measured tree costs in %.2f s (cached in %s)", time.perf_counter() - started, path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(f".{os.getpid()}.tmp")
            partial.write_text(json.dumps(costs.to_json()))
            os.replace(partial, path)  # readers see the old file or the whole new one
        except OSError as error:  # a read-only home only costs a re-measure next process
            logger.warning("could not cache tree costs in %s: %s", path, error)
    _MEMORY[key] = costs
    return costs


# Calls draft without trying plain decoding while drafted calls reach (or, before any, are predicted to reach) at least
# this times plain decoding's rate as the costs predict it (1 / `CallChooser.plain_step` tokens per row and second);
# below it the measured rates decide.
PLAIN_PROBE_BELOW = 1.5
# The answer lengths each prompt class keeps (its most recent calls') for the choice of when to start drafting, and
# how many it needs before they may hold a call back from drafting at once: a few short answers say little about the
# next one, and holding back a long answer costs most of its speedup.
LENGTHS_KEPT = 32
LENGTHS_NEEDED = 8


@dataclass
class CallChooser:
    """
    Whether a `generate()` call runs the tree loop or plain decoding, for one prompt class (with or without visual
    tokens) of one `TreeTuner`, from the tokens per row and second after the prefill that calls reached each way:
    decayed sums of tokens and of seconds (`decay` per call), so a long answer weighs more than a short one, whose
    drafted steps cannot amortise the draft's pass over the prompt.

    Drafting's rate is `predicted` until drafted calls have decoded `evidence` tokens per row, and measured from then
    on. Calls draft while that rate is at least `PLAIN_PROBE_BELOW` times the plain rate the costs predict
    (1 / `plain_step`). Below it plain decoding runs, and once both ways have run, the better measured way; after `gap`
    calls the other runs once (a probe): `gap` doubles (up to `max_gap`) while the probe loses, and returns to
    `min_gap` when it wins. So a batch size whose costs predict no clear win (large batches, where verifying a
    tree per row costs nearly as many target forwards as plain steps would) starts with plain decoding, and
    drafting is measured at the first probe.
    """

    plain_step: float  # seconds of a step of plain decoding: T(1), as its class prices it (`TreeTuner`)
    predicted: float = float("inf")  # drafted tokens per row and second the costs predict before any evidence
    evidence: float = 64.0
    decay: float = 0.75
    min_gap: int = 8
    max_gap: int = 64
    tokens: dict = field(default_factory=lambda: {True: 0.0, False: 0.0})  # per row, decayed, per way (drafted?)
    seconds: dict = field(default_factory=lambda: {True: 0.0, False: 0.0})
    gap: int = 8
    since: int = 0  # calls since the other way last ran
    _probe: bool = False  # the last choice was a probe
    _drafted_tokens: float = 0.0  # tokens per row drafted calls decoded, undecayed
    lengths: deque = field(default_factory=lambda: deque(maxlen=LENGTHS_KEPT))  # recent calls' tokens per row

    def rate(self, drafted: bool) -> float | None:
        """Tokens per row and second of the calls run that way, or `None` before any."""
        return self.tokens[drafted] / self.seconds[drafted] if self.seconds[drafted] > 0 else None

    def draft(self) -> bool:
        """True: this call runs the tree loop; False: plain decoding."""
        self._probe = False
        drafted, plain = self.rate(True), self.rate(False)
        judged = self.predicted if self._drafted_tokens < self.evidence else drafted
        if judged >= PLAIN_PROBE_BELOW / self.plain_step:
            return True
        if plain is None:
            return False
        better = drafted is not None and drafted >= plain
        if self.since >= self.gap:
            self._probe = True
            return not better
        return better

    def observe(self, drafted: bool, tokens: float, seconds: float) -> None:
        """The call just run (`drafted` as `draft` chose) decoded `tokens` per row after the prefill's in
        `seconds`."""
        for sums, value in ((self.tokens, tokens), (self.seconds, seconds)):
            sums[drafted] = self.decay * sums[drafted] + value
        self.lengths.append(tokens)
        if drafted:
            self._drafted_tokens += tokens
        if self._probe:
            won = self.rate(True) >= self.rate(False) if drafted else self.rate(False) > self.rate(True)
            self.gap = self.min_gap if won else min(2 * self.gap, self.max_gap)
            self.since = 0
        else:
            self.since += 1


class TreeTuner:
    """
    Chooses the tree shape before each step and learns from its outcome (see the module docstring). One instance per
    (draft, target, decoding mode) lives across `generate()` calls.

    Args:
        costs (`DeviceCosts`)
        prior (`float`): alpha_1 before any step.
        strength (`float`): pseudo-steps the prior counts for.
        optimism (`float`): standard errors added to each alpha when choosing, so that a shape that was unlucky in
            its first steps is tried again.
        call_strength (`float`): pseudo-drafts on each side of a call's accepted-over-expected ratio.
        probe_every (`int`): plain steps in a row after which one step drafts again.
        max_probe_every (`int`): the longest gap between probes, which doubles after each rejected probe.
        parallel (`bool`): the draft drafts depths 2..d in one forward of d - 1 mask entries per row (parallel
            drafting), whatever the width: a step drafts for c(1) + c(d - 1) (the measured width nearest above d - 1,
            or the widest), not c(1) + (d - 1) * c(k).
    """

    def __init__(
        self,
        costs: DeviceCosts,
        prior: float = 0.8,
        strength: float = 8.0,
        optimism: float = 0.5,
        max_depth: int = MAX_DEPTH,
        call_strength: float = 2.0,
        probe_every: int = 8,
        max_probe_every: int = 64,
        parallel: bool = False,
    ):
        self.costs = costs
        self.prior, self.strength, self.optimism, self.max_depth = prior, strength, optimism, max_depth
        self.call_strength, self.probe_every, self.max_probe_every = call_strength, probe_every, max_probe_every
        self.widths = tuple(k for k in sorted(costs.draft_level) if k >= 1)
        # reached[k][j-1]: steps of width k whose depth-j level was drafted with every ancestor accepted;
        # accepted[k][j-1]: of those, steps where depth j was accepted too.
        self.reached = {k: np.zeros(max_depth) for k in self.widths}
        self.accepted = {k: np.zeros(max_depth) for k in self.widths}
        self.call_reached = {k: np.zeros(max_depth) for k in self.widths}  # the same counts, this call only
        self.call_accepted = {k: np.zeros(max_depth) for k in self.widths}
        self.visual = True  # the prompt class the counts, `mass` and scales belong to; `start_call` switches
        self._other_class = None  # the other class's `_class_state()`, once it was seen
        self.plain_streak = 0  # plain steps in a row, this call
        self.probe_gap = probe_every  # plain steps in a row before the next probe, this call
        self._probing = False  # the last chosen shape is a probe
        self._best = None  # (width, depth, tokens per second) of the best shape, until an observation changes it
        self.mass = {k: 0.0 for k in self.widths}  # sum over steps of the draft's top-k probability at level 1
        self.mass_steps = 0
        self.verify_scale = self.draft_scale = self.plain_scale = 1.0  # in-loop over isolated seconds
        self.prompt_price: float | None = None  # seconds of the draft's pass over the prompt per prompt token
        self.steps = 0
        self._pending_mass = None
        # Isolated seconds per width k for d = 1..max_depth: verification of d*k + 1 tokens, and drafting.
        depths = np.arange(1, max_depth + 1)
        level = costs.draft_level
        self._verify = {k: np.array([costs.curve.at(d * k + 1) for d in depths]) for k in self.widths}
        if parallel:
            entries = [level[min((w for w in self.widths if w >= d - 1), default=self.widths[-1])] for d in depths]
            self._draft = {k: level[1] + np.where(depths > 1, entries, 0.0) for k in self.widths}
        else:
            self._draft = {k: level[1] + (depths - 1) * level[k] for k in self.widths}
        predicted = self.predicted_rate()
        self.calls = {visual: CallChooser(costs.curve.at(1), predicted) for visual in (True, False)}  # per class

    def _beta(self, k: int, chain: np.ndarray | None) -> np.ndarray:
        """The Beta estimates of width k; their prior is `chain` scaled by the top-k mass, when given."""
        boosted = None
        if chain is not None and self.mass_steps:
            boosted = np.minimum(chain * self.mass[k] / max(self.mass[1], 1e-9), 0.98)
        out, prior = np.empty(self.max_depth), self.prior
        for j in range(self.max_depth):
            if boosted is not None:
                prior = boosted[j]
            out[j] = (self.accepted[k][j] + self.strength * prior) / (self.reached[k][j] + self.strength)
            prior = out[j]
        return out

    def _class_state(self) -> tuple:
        """What belongs to the current prompt class: the acceptance counts, the top-k mass, the in-loop scales and
        the price of the draft's pass over the prompt."""
        scales = (self.verify_scale, self.draft_scale, self.plain_scale, self.prompt_price)
        return self.reached, self.accepted, self.mass, self.mass_steps, *scales

    def start_call(self, visual: bool = True) -> None:
        """A new `generate()` call, on a prompt with visual tokens (`visual`) or without: the running counts and
        scales become that class's, and the call's own counts start empty."""
        if visual != self.visual:
            held = self._class_state()
            if self._other_class is None:
                fresh = ({k: np.zeros(self.max_depth) for k in self.widths} for _ in range(2))
                self._other_class = (*fresh, {k: 0.0 for k in self.widths}, 0, 1.0, 1.0, 1.0, None)
            (self.reached, self.accepted, self.mass, self.mass_steps, self.verify_scale, self.draft_scale,
             self.plain_scale, self.prompt_price) = self._other_class  # fmt: skip
            self._other_class, self.visual = held, visual
        for counts in (self.call_reached, self.call_accepted):
            for array in counts.values():
                array[:] = 0
        self.plain_streak, self.probe_gap, self._probing, self._best = 0, self.probe_every, False, None

    def _all_alphas(self, optimism: float) -> dict[int, np.ndarray]:
        """`alphas(k, optimism)` for every width, the chain's estimate computed once."""
        chain = self._beta(1, None)
        # This call against the running estimate: accepted drafts over those the estimate expected, as a Beta-like
        # ratio with `call_strength` pseudo-drafts, scaling every alpha (a call whose first drafts are rejected is
        # likely to reject the deeper ones too). It only lowers them: compounded over ten depths, a ratio of 1.035
        # from a few lucky steps raises E(10) by 14% and sends the choice to deep wide trees that do not deliver it.
        expected = float((self.call_reached[1] * chain).sum())
        ratio = min((float(self.call_accepted[1].sum()) + self.call_strength) / (expected + self.call_strength), 1.0)
        found = {}
        for k in self.widths:
            base = chain if k == 1 else self._beta(k, chain)
            base = np.minimum(base * ratio, 0.99)
            if optimism:
                spread = np.sqrt(base * (1 - base) / (self.reached[k] + self.strength))
                base = np.minimum(base + optimism * spread, 0.99)
            found[k] = base
        return found

    def alphas(self, k: int, optimism: float = 0.0) -> np.ndarray:
        """
        alpha_j(k) for j = 1..max_depth: a Beta estimate per depth whose prior is the chain's estimate scaled by the
        draft's top-k mass (width k > 1, once observed), else the estimate of the depth above (`prior` at depth 1);
        scaled by this call's accepted-over-expected ratio when below 1. `optimism` adds that many standard errors
        of the running estimate (exploration: shapes seldom tried get tried again).
        """
        return self._all_alphas(optimism)[k]

    def expected_tokens(self, k: int, optimism: float = 0.0) -> np.ndarray:
        """E(d, k) for d = 1..max_depth: the bonus token plus the expected accepted drafts."""
        return _expected_tokens(self.alphas(k, optimism))

    def step_seconds(self, k: int) -> np.ndarray:
        """Predicted in-loop seconds of a step of width k, for d = 1..max_depth."""
        return self._verify[k] * self.verify_scale + self._draft[k] * self.draft_scale

    def best_shape(self) -> tuple[int, int, float]:
        """`(width, depth, tokens per second)` of the drafted shape with the most expected tokens per second, from
        the acceptance estimates (with `optimism`) and the in-loop step costs."""
        alphas = self._all_alphas(self.optimism)
        rates = {k: _expected_tokens(alphas[k]) / self.step_seconds(k) for k in self.widths}
        k = max(self.widths, key=lambda w: rates[w].max())
        return k, int(rates[k].argmax()) + 1, float(rates[k].max())

    def predicted_rate(self) -> float:
        """Tokens per second of drafted steps before any step: the best shape's at the prior acceptance (with
        `optimism`) and the isolated costs."""
        return self.best_shape()[2]

    def choose(self) -> SpeculativeConfig | None:
        """The shape with the most expected tokens per second, or `None` for a plain step (no draft)."""
        if self._best is None:  # plain steps observe nothing, so a streak of them reuses one computation
            self._best = self.best_shape()
        k, depth, rate = self._best
        plain_rate = 1.0 / self.plain_seconds()
        self._probing = plain_rate > rate
        if self._probing and self.plain_streak < self.probe_gap:
            self.plain_streak += 1
            return None
        self.plain_streak = 0
        return SpeculativeConfig(depth=depth, top_k=k, total_tokens=depth * k + 1)

    def _start_values(self, emitted: int, tokens: int) -> tuple[float, float] | None:
        """
        `(start, wait)`: the seconds a call whose draft has not read its prompt expects to save over plain decoding
        if it starts drafting now, `emitted` tokens per row after the prefill's, and if it takes a plain step and
        then does what is best; `None` where that is unknown (no price yet, fewer than `LENGTHS_NEEDED` recent
        answers) or the call has outlasted every recent answer.

        Starting costs c = `prompt_price` x `tokens` (the prompt tokens the draft catches up on) once, and then R
        tokens left take R plain steps of t (`plain_seconds`) plainly, and drafted about max(R / E, 1) steps of s,
        for the best shape's E expected tokens per step of s seconds (the last step emits what is left, and no step
        emits less than one token). Of this class's recent answers (`CallChooser.lengths`), those of L > m tokens
        say what is left at m: start(m) = mean(R t - max(R / E, 1) s) - c over them, R = L - m, and wait(m) = (the
        share of them with L > m + 1) x V(m + 1), with V = max(start, wait), and V = 0 past the longest (a call
        that has not started by then never does).
        """
        lengths = self.calls[self.visual].lengths
        if self.prompt_price is None or len(lengths) < LENGTHS_NEEDED:
            return None
        known = np.sort(np.asarray(lengths, dtype=float))
        if known[-1] <= emitted:
            return None
        k, depth, rate = self._best or self.best_shape()
        step = self.step_seconds(k)[depth - 1]
        per_step, plain, cost = rate * step, self.plain_seconds(), self.prompt_price * tokens
        steps = np.arange(emitted, int(np.ceil(known[-1])))  # m with some answer longer than m
        outlast = known[None, :] > steps[:, None]  # (m, answers)
        count = outlast.sum(axis=1)
        left = known[None, :] - steps[:, None]
        saved = left * plain - np.maximum(left / per_step, 1.0) * step
        start = np.where(outlast, saved, 0.0).sum(axis=1) / count - cost
        value, wait = 0.0, 0.0
        for m in range(len(steps) - 1, -1, -1):
            wait = value * (count[m + 1] / count[m] if m + 1 < len(steps) else 0.0)
            value = max(start[m], wait)
        return float(start[0]), wait

    def starts_drafting(self, emitted: int, tokens: int) -> bool:
        """Whether a call whose draft has not read its prompt (`tokens` prompt tokens, over all rows) starts
        drafting at this step, `emitted` tokens per row after the prefill's, or takes a plain step (`_start_values`).
        It starts where that is unknown."""
        values = self._start_values(emitted, tokens)
        return values is None or values[0] >= values[1]

    def may_start(self, tokens: int) -> bool:
        """Whether a call of this class over `tokens` prompt tokens (over all rows) could gain by starting to draft
        at any step (`_start_values`): False where every recent answer is too short to repay the draft's pass."""
        values = self._start_values(0, tokens)
        return values is None or max(values) > 0

    def observe_mass(self, top_probs: torch.Tensor) -> None:
        """Records the draft's level-1 probabilities, sorted descending, shape `(>= max width,)`. They are read on
        the host at the next `observe`, after the step has synchronised anyway."""
        self._pending_mass = top_probs

    def _take_mass(self) -> None:
        top_probs, self._pending_mass = self._pending_mass, None
        if top_probs is None:
            return
        cumulative = top_probs.cumsum(0).tolist()
        for k in self.widths:
            self.mass[k] += cumulative[min(k, len(cumulative)) - 1]
        self.mass_steps += 1

    def plain_seconds(self) -> float:
        """Predicted in-loop seconds of a plain step of the current prompt class: T(1) times its plain steps'
        in-loop scale."""
        return self.costs.curve.at(1) * self.plain_scale

    def _price_plain_calls(self) -> None:
        """The current class's `CallChooser` prices a step of plain decoding at T(1), or at T(1) times the class's
        verification scale where that is below 1: its prompts are shorter than the prefix the costs were measured
        over (a step of plain decoding is a verification of one token). Above 1 it is the loop's own cost (drafting
        evicts the target's weights from the CPU caches), which plain decoding does not pay."""
        self.calls[self.visual].plain_step = self.costs.curve.at(1) * min(self.verify_scale, 1.0)

    def observe_plain(self, step_seconds: float) -> None:
        """Learns from one plain step that took `step_seconds` in all (its time in the loop against T(1))."""
        self.plain_scale += 0.2 * (step_seconds / self.costs.curve.at(1) - self.plain_scale)

    def observe(
        self,
        shape: SpeculativeConfig,
        ranks: list[int] | list[list[int]],
        draft_seconds: float,
        step_seconds: float,
        finished: bool | list[bool],
        prompt_tokens: int = 0,
    ) -> None:
        """
        Learns from one step of `shape`, whose accepted drafts were at `ranks` among their siblings (0 = the draft's
        first choice), that spent `draft_seconds` drafting and `step_seconds` in all. For a batch, `ranks` and
        `finished` hold one entry per row: every row's tree teaches acceptance, the step's time is the batch's.

        Verification tries a node's children in rank order (greedy: the target's token is one of them; sampling:
        recursive rejection in that order), so a tree of width w < `shape.top_k` would have accepted exactly the
        leading drafts of rank < w: one step teaches every width up to its own. A row whose output stopped inside
        its accepted drafts (`finished`; `ranks` then end with the draft it stopped on) says nothing past the cut:
        its drafts count as accepted up to there, with no rejection after them unless a narrower width's.
        `prompt_tokens` > 0: the step's drafting included the draft's pass over that many prompt tokens (the first
        drafted step of a call); what it took beyond the levels' predicted time prices that pass (`prompt_price`),
        and its times stay out of the scales.
        """
        self._take_mass()
        self._best = None
        if isinstance(finished, bool):
            ranks, finished = [ranks], [finished]
        if self._probing and not all(finished):
            accepted_any = any(row for row, done in zip(ranks, finished) if not done)
            self.probe_gap = min(2 * self.probe_gap, self.max_probe_every) if not accepted_any else self.probe_every
        k, depth = shape.top_k, shape.depth
        predicted_draft, predicted_verify = self._draft[k][depth - 1], self._verify[k][depth - 1]
        rate = 0.2  # exponential moving average of in-loop over isolated time, and of the prompt's price
        if prompt_tokens:
            price = max(draft_seconds - predicted_draft * self.draft_scale, 0.0) / prompt_tokens
            self.prompt_price = (
                price if self.prompt_price is None else self.prompt_price + rate * (price - self.prompt_price)
            )
        elif draft_seconds > 0 and step_seconds > draft_seconds:
            self.draft_scale += rate * (draft_seconds / predicted_draft - self.draft_scale)
            self.verify_scale += rate * ((step_seconds - draft_seconds) / predicted_verify - self.verify_scale)
            self._price_plain_calls()
        self.steps += 1
        for row_ranks, cut in zip(ranks, finished):
            for width in self.widths:
                if width > k:
                    break
                accepted = next((i for i, rank in enumerate(row_ranks) if rank >= width), len(row_ranks))
                seen = accepted if cut and accepted == len(row_ranks) else min(accepted + 1, depth)
                for reached, counts in ((self.reached, self.accepted), (self.call_reached, self.call_accepted)):
                    reached[width][:seen] += 1
                    counts[width][:accepted] += 1


def _expected_tokens(alphas: np.ndarray) -> np.ndarray:
    """E(d) for d = 1..len(alphas): 1 + sum_{i <= d} prod_{j <= i} alpha_j."""
    return 1.0 + np.cumsum(np.cumprod(alphas))
