"""The elastic visual compressor (SpecVLM §3.4): what the draft sees of the image. The target always sees every visual
token, so decoding stays lossless whatever the compressor does; it only shrinks the draft's prefill and KV cache.

**The draft's visual input.** At draft position t the draft reads the pair `(e_{t+1}, f_t)` (`modeling_draft.py`).
Where `e_{t+1}` is a visual token, the pair is a *visual pair*; each image gives `H x W` of them in patch-grid order.
The compressor maps each image's visual pairs, as vectors `x = concat(e, f)` of width `2h`, to fewer pairs, and leaves
every other position untouched. Each primitive is one branch:

| branch | output per image | parameters |
|---|---|---|
| `prune:r` | `m` pairs kept at random (a fixed draw at inference, a fresh one per example in training) | none |
| `prune_importance:r` | the `m` pairs whose target feature is most similar (cosine) to the prompt's last feature | none |
| `pool:r` | 2-D average pooling over the patch grid with a `kh x kw` window (`m` outputs) | none |
| `conv:r` | a depthwise strided convolution with the same window, initialised as the pooling | `2h * kh * kw` |
| `resampler:q` | one cross-attention layer: `q` learned queries over the pairs, values = the pairs | `q * d + 2h * d` |
| `text` | nothing: the draft reads the prompt's text only | none |

For a ratio r the window `kh x kw` is the one whose output count `m = ceil(H/kh) * ceil(W/kw)` is closest to
`H * W / r` (`window_for_ratio`); every ratio-r branch of a grid keeps the same `m`, so the `weight` mode can mix them.

**Positions.** Text positions never change: the draft's text positions stay the target's (so the decoding loop and
training index text the same way with or without a compressor). An output pair takes the mean position of the pairs
it summarises, rounded down (a kept pair keeps its own; a resampler query j of q sits at the centre of the j-th of q
equal spans of the image). The draft's cache then holds fewer entries than there are positions; RoPE only reads the
positions, so the gap is harmless.

**Modes** (`SpecVLMCompressorConfig.mode`): `select` (SpecVLM's default: a question-conditioned gate picks one
branch per input: Gumbel-softmax with a straight-through estimator in training, argmax at inference), `weight` (the
gate's softmax mixes branches of equal output length), `concat` (every branch's output, concatenated). The gate reads
the target's features at the prompt (the `lm_head` input, EAGLE's "second-to-top-layer" features): the mean over
text positions and the mean over visual positions, through a two-layer MLP. No extra target pass.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

BRANCH_KINDS = ("prune", "prune_importance", "pool", "conv", "resampler", "text")
MODES = ("select", "weight", "concat")
# SpecVLM's select-mode branches (paper §3.4): pruning and pooling at 10-20x, a 3x convolution, a 2-query resampler,
# and the text-only branch.
ELASTIC_BRANCHES = ("prune:20", "pool:10", "conv:3", "resampler:2", "text")
# `--compressor` names: SpecVLM's elastic selector, or one primitive at SpecVLM's preferred size (paper Table 4).
PRESETS = {
    "elastic": ELASTIC_BRANCHES,
    "prune": ("prune:20",),
    "prune_importance": ("prune_importance:20",),
    "pool": ("pool:10",),
    "conv": ("conv:3",),
    "resampler": ("resampler:2",),
    "text": ("text",),
}


@dataclass(frozen=True)
class Branch:
    """One primitive: `kind` in `BRANCH_KINDS` and its size (`ratio` for prune/pool/conv, `queries` for resampler)."""

    kind: str
    size: float | None = None

    @classmethod
    def parse(cls, spec: str) -> Branch:
        """`"pool:10"`, `"resampler:2"`, `"text"`, ... (a bare `prune`/`pool`/`conv` takes ratio 10, `resampler` 2
        queries)."""
        kind, _, size = str(spec).partition(":")
        if kind not in BRANCH_KINDS:
            raise ValueError(
                f"Unknown compressor branch {kind!r} in {spec!r}; valid branches: {', '.join(BRANCH_KINDS)} "
                "(with a size, e.g. 'pool:10', 'resampler:2', 'text')."
            )
        if kind == "text":
            if size:
                raise ValueError(f"The text branch takes no size, got {spec!r}.")
            return cls(kind)
        try:
            value = float(size) if size else (2.0 if kind == "resampler" else 10.0)
        except ValueError:
            raise ValueError(f"Bad size in compressor branch {spec!r}: expected a number after ':'.") from None
        if kind == "resampler":
            if value != int(value) or value < 1:
                raise ValueError(f"A resampler needs a whole number of queries >= 1, got {spec!r}.")
            return cls(kind, int(value))
        if value < 1:
            raise ValueError(f"A compression ratio must be >= 1, got {spec!r}.")
        return cls(kind, int(value) if value == int(value) else value)

    def __str__(self) -> str:
        return self.kind if self.size is None else f"{self.kind}:{self.size:g}"


def window_for_ratio(grid: tuple[int, int], ratio: float) -> tuple[int, int]:
    """
    The pooling window `(kh, kw)` over an `H x W` grid whose output count `ceil(H/kh) * ceil(W/kw)` is closest to
    `H * W / ratio` in log scale; ties go to the squarer window, then the smaller one.
    """
    height, width = grid
    n = height * width
    if ratio > n:
        raise ValueError(
            f"Compression ratio {ratio:g} is larger than the {n} visual tokens of a {height}x{width} image; "
            f"use a ratio <= {n} (or the text branch to drop them all)."
        )
    best = None
    for kh in range(1, height + 1):
        for kw in range(1, width + 1):
            m = math.ceil(height / kh) * math.ceil(width / kw)
            key = (abs(math.log(n / m) - math.log(ratio)), abs(kh - kw), kh * kw)
            if best is None or key < best[0]:
                best = (key, (kh, kw))
    return best[1]


class SpecVLMCompressorConfig(PretrainedConfig):
    r"""
    Architecture of an elastic visual compressor (SpecVLM §3.4; see `compressor.py`).

    Args:
        hidden_size (`int`, defaults to 4096): width `h` of the target's text model (a visual pair is `2h` wide).
        grid (`list[int]`, defaults to `[24, 24]`): the patch grid `[H, W]` of one image's visual tokens (LLaVA-1.5:
            24x24 = 576).
        branches (`list[str]`, defaults to SpecVLM's select set): e.g. `["prune:20", "pool:10", "conv:3",
            "resampler:2", "text"]`; see `BRANCH_KINDS`.
        mode (`str`, defaults to `"select"`): `select`, `weight` or `concat` (ignored with one branch).
        gate_hidden_size (`int`, defaults to 64): hidden width of the gate's MLP.
        gumbel_temperature (`float`, defaults to 1.0): temperature of the Gumbel-softmax in training.
        resampler_dim (`int`, defaults to 256): attention width of the resampler's queries and keys.
        resampler_heads (`int`, defaults to 4): attention heads of the resampler (divides `2h` and `resampler_dim`).
        seed (`int`, defaults to 0): the fixed draw of random pruning at inference.
        initializer_range (`float`, defaults to 0.02): std of the gate's and the resampler's initial weights.
    """

    model_type = "specvlm_compressor"

    def __init__(
        self,
        hidden_size: int = 4096,
        grid: list[int] | tuple[int, int] = (24, 24),
        branches: list[str] | tuple[str, ...] = ELASTIC_BRANCHES,
        mode: str = "select",
        gate_hidden_size: int = 64,
        gumbel_temperature: float = 1.0,
        resampler_dim: int = 256,
        resampler_heads: int = 4,
        seed: int = 0,
        initializer_range: float = 0.02,
        **kwargs,
    ):
        parsed = [Branch.parse(b) for b in branches]
        if not parsed:
            raise ValueError("A compressor needs at least one branch.")
        if mode not in MODES:
            raise ValueError(f"Unknown compressor mode {mode!r}; valid modes: {', '.join(MODES)}.")
        grid = [int(g) for g in grid]
        if len(grid) != 2 or min(grid) < 1:
            raise ValueError(f"grid must be [height, width] of the patch grid, got {grid!r}.")
        for branch in parsed:
            if branch.kind in ("prune", "prune_importance", "pool", "conv"):
                window_for_ratio(tuple(grid), branch.size)  # raises for a ratio above H * W
        if mode == "weight" and len(parsed) > 1:
            mixable = all(b.kind not in ("text", "resampler") for b in parsed)
            if not mixable or len({window_for_ratio(tuple(grid), b.size) for b in parsed}) != 1:
                raise ValueError(
                    "The weight mode mixes branches of equal output length: prune/prune_importance/pool/conv at one "
                    f"ratio (got {', '.join(map(str, parsed))})."
                )
        if 2 * hidden_size % resampler_heads or resampler_dim % resampler_heads:
            raise ValueError(
                f"resampler_heads={resampler_heads} must divide 2 * hidden_size={2 * hidden_size} and "
                f"resampler_dim={resampler_dim}."
            )
        self.hidden_size = hidden_size
        self.grid = grid
        self.branches = [str(b) for b in parsed]
        self.mode = mode
        self.gate_hidden_size = gate_hidden_size
        self.gumbel_temperature = gumbel_temperature
        self.resampler_dim = resampler_dim
        self.resampler_heads = resampler_heads
        self.seed = seed
        self.initializer_range = initializer_range
        super().__init__(**kwargs)

    def record(self) -> dict:
        """The architecture fields alone (what a draft's config records of its compressor)."""
        fields = ("hidden_size", "grid", "branches", "mode", "gate_hidden_size", "gumbel_temperature",
                  "resampler_dim", "resampler_heads", "seed", "initializer_range")  # fmt: skip
        return {name: getattr(self, name) for name in fields}

    @property
    def branch_specs(self) -> list[Branch]:
        return [Branch.parse(b) for b in self.branches]

    @property
    def uses_gate(self) -> bool:
        return len(self.branches) > 1 and self.mode in ("select", "weight")


@dataclass
class CompressedInput:
    """
    The draft's prompt input after compression, one row.

    Attributes:
        inputs_embeds, features (`torch.FloatTensor` of shape `(n', hidden_size)`)
        position_ids (`torch.LongTensor` of shape `(n',)`)
        source (`torch.LongTensor` of shape `(n',)`): the uncompressed index of each kept text position, `-1` at
            compressed visual pairs.
        branch (`str`, *optional*): the branch chosen for this input (select mode), else `None`.
    """

    inputs_embeds: torch.Tensor
    features: torch.Tensor
    position_ids: torch.Tensor
    source: torch.Tensor
    branch: str | None = None


class _Pool(nn.Module):
    """Average pooling over the grid with a `kh x kw` window (`ceil` mode: edge windows average what they cover)."""

    def __init__(self, window):
        super().__init__()
        self.window = tuple(window)

    def forward(self, x, positions, query, sample=False):
        """x `(images, H, W, 2h)`, positions `(images, H, W)` -> `(images, m, 2h)`, `(images, m)`. Every branch
        takes the prompt's last feature `query` `(2h / 2,)` and `sample` (training's random draws) too."""
        pooled = F.avg_pool2d(x.permute(0, 3, 1, 2), self.window, ceil_mode=True)
        where = F.avg_pool2d(positions[:, None].to(x.dtype), self.window, ceil_mode=True)
        return pooled.flatten(2).transpose(1, 2), where.flatten(1).floor().long()


class _Conv(nn.Module):
    """Depthwise strided convolution with the pooling's window, initialised to average (so it starts as `pool`);
    the grid is edge-padded to a whole number of windows."""

    def __init__(self, channels: int, window):
        super().__init__()
        self.window = tuple(window)
        self.conv = nn.Conv2d(channels, channels, self.window, stride=self.window, groups=channels, bias=False)

    def forward(self, x, positions, query, sample=False):
        kh, kw = self.window
        grid = x.permute(0, 3, 1, 2)
        pad_h, pad_w = -grid.shape[2] % kh, -grid.shape[3] % kw
        if pad_h or pad_w:
            grid = F.pad(grid, (0, pad_w, 0, pad_h), mode="replicate")
        out = self.conv(grid.to(self.conv.weight.dtype)).to(x.dtype)
        where = F.avg_pool2d(positions[:, None].to(x.dtype), self.window, ceil_mode=True)
        return out.flatten(2).transpose(1, 2), where.flatten(1).floor().long()


class _Prune(nn.Module):
    """Keeps `m` pairs per image in grid order: a random draw (fixed by `seed` at inference), or the `m` whose
    feature is most similar to `query` (the prompt's last target feature)."""

    def __init__(self, keep: int, importance: bool, seed: int):
        super().__init__()
        self.keep, self.importance, self.seed = keep, importance, seed

    def forward(self, x, positions, query, sample: bool = False):
        images, n = x.shape[0], x.shape[1] * x.shape[2]
        flat, where = x.reshape(images, n, -1), positions.reshape(images, n)
        if self.importance:
            features = flat[..., flat.shape[-1] // 2 :]
            scores = F.cosine_similarity(features.float(), query.float()[None, None], dim=-1)  # [images, n]
            kept = scores.topk(self.keep, dim=-1).indices
        else:
            generator = None if sample else torch.Generator(device="cpu").manual_seed(self.seed)
            kept = torch.stack([torch.randperm(n, generator=generator)[: self.keep] for _ in range(images)])
            kept = kept.to(x.device)
        kept = kept.sort(dim=-1).values
        return flat.gather(1, kept[..., None].expand(-1, -1, flat.shape[-1])), where.gather(1, kept)


class _Resampler(nn.Module):
    """One cross-attention layer: `q` learned queries attend over an image's pairs (keys = a linear map of the
    layer-normed pairs, values = the pairs themselves, per head a slice of their channels), so each output is a
    per-head convex combination of the pairs and stays in the draft's input space."""

    def __init__(self, channels: int, queries: int, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.queries = nn.Parameter(torch.zeros(queries, dim))
        self.norm = nn.LayerNorm(channels)
        self.key = nn.Linear(channels, dim, bias=False)

    def reset(self, std: float):
        with torch.no_grad():
            self.queries.normal_(0.0, std)
            self.key.weight.normal_(0.0, std)
            self.norm.reset_parameters()

    def forward(self, x, positions, query, sample=False):
        images, n, channels = x.shape[0], x.shape[1] * x.shape[2], x.shape[-1]
        flat = x.reshape(images, n, channels)
        heads, q = self.heads, self.queries.shape[0]
        keys = self.key(self.norm(flat.to(self.key.weight.dtype)))  # [images, n, dim]
        keys = keys.view(images, n, heads, -1).transpose(1, 2)  # [images, heads, n, dim / heads]
        queries = self.queries.view(q, heads, -1).transpose(0, 1)[None].expand(images, -1, -1, -1)
        values = flat.view(images, n, heads, -1).transpose(1, 2).to(keys.dtype)  # [images, heads, n, 2h / heads]
        out = F.scaled_dot_product_attention(queries, keys, values)  # [images, heads, q, 2h / heads]
        out = out.transpose(1, 2).reshape(images, q, channels).to(x.dtype)
        start = positions.reshape(images, n)[:, :1]
        centres = ((torch.arange(q, device=x.device) * 2 + 1) * n) // (2 * q)  # centre of the j-th of q spans
        return out, start + centres[None]


class _Text(nn.Module):
    """The text-only branch: no visual pair reaches the draft."""

    def forward(self, x, positions, query, sample=False):
        return x[:, :0].reshape(x.shape[0], 0, x.shape[-1]), positions.reshape(x.shape[0], -1)[:, :0]


class SpecVLMCompressor(PreTrainedModel):
    """
    The elastic visual compressor (see the module docstring). `forward` has the draft's visual-input signature
    (batch 1, the decoding loop's prompt step, always the inference behaviour); `compress_row` also serves training
    (`sample=True`) and returns the index bookkeeping. `branch_counts` counts the branch chosen per inference input
    since creation, `last_branch` is the last one's (the decoding loop reports it in `SpeculativeStats`).
    """

    config_class = SpecVLMCompressorConfig
    base_model_prefix = "compressor"
    main_input_name = "inputs_embeds"

    def __init__(self, config: SpecVLMCompressorConfig):
        super().__init__(config)
        grid = tuple(config.grid)
        channels = 2 * config.hidden_size
        modules = []
        for branch in config.branch_specs:
            if branch.kind == "text":
                modules.append(_Text())
            elif branch.kind == "resampler":
                modules.append(_Resampler(channels, branch.size, config.resampler_dim, config.resampler_heads))
            else:
                window = window_for_ratio(grid, branch.size)
                if branch.kind == "pool":
                    modules.append(_Pool(window))
                elif branch.kind == "conv":
                    modules.append(_Conv(channels, window))
                else:
                    keep = math.ceil(grid[0] / window[0]) * math.ceil(grid[1] / window[1])
                    modules.append(_Prune(keep, branch.kind == "prune_importance", config.seed))
        self.branches = nn.ModuleList(modules)
        self.gate = None
        if config.uses_gate:
            self.gate = nn.Sequential(
                nn.Linear(channels, config.gate_hidden_size),
                nn.GELU(),
                nn.Linear(config.gate_hidden_size, len(modules)),
            )
        self.branch_counts: Counter = Counter()
        self.last_branch: str | None = None  # the last inference input's branch
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, nn.Conv2d):  # a `_Conv` branch: start as the average pooling of its window
            module.weight.data.fill_(1.0 / (module.kernel_size[0] * module.kernel_size[1]))
        elif isinstance(module, _Resampler):
            module.reset(self.config.initializer_range)
        elif isinstance(module, nn.Linear) and module.bias is not None:  # the gate's layers
            nn.init.normal_(module.weight, 0.0, self.config.initializer_range)
            nn.init.zeros_(module.bias)

    @property
    def names(self) -> list[str]:
        return list(self.config.branches)

    def check_fits(self, hidden_size: int, grid: tuple[int, int] | None) -> None:
        """Raises a `ValueError` naming the mismatch unless this compressor fits a draft of `hidden_size` over a
        target whose images have the patch grid `grid` (`None`: not known to be a grid)."""
        problems = []
        if hidden_size != self.config.hidden_size:
            problems.append(f"hidden size {self.config.hidden_size} != the draft's {hidden_size}")
        if grid is not None and tuple(grid) != tuple(self.config.grid):
            problems.append(
                f"patch grid {self.config.grid[0]}x{self.config.grid[1]} != the target's {grid[0]}x{grid[1]}"
            )
        if problems:
            raise ValueError("This compressor was made for another target: " + "; ".join(problems) + ".")

    def gate_logits(self, features: torch.Tensor, spans: list[tuple[int, int]], prompt_len: int) -> torch.Tensor:
        """The gate's branch logits, shape `(num_branches,)`, from the prompt's features `(n, h)`: the mean over its
        text positions and the mean over its visual ones (`spans`: each image's `[start, end)`, inside the
        prompt)."""
        prompt = features[:prompt_len].to(self.gate[0].weight.dtype)
        visual_sum = sum(prompt[start:end].sum(0) for start, end in spans)
        n_visual = sum(end - start for start, end in spans)
        n_text = prompt_len - n_visual
        text_mean = (prompt.sum(0) - visual_sum) / max(n_text, 1)
        return self.gate(torch.cat([text_mean, visual_sum / n_visual]))

    def _choose(self, logits: torch.Tensor | None, sample: bool) -> tuple[list[int], torch.Tensor | None]:
        """Branches to run and their weights (a tensor with gradients in training; `None` = weight 1)."""
        n = len(self.branches)
        if n == 1 or self.config.mode == "concat":
            return list(range(n)), None
        if self.config.mode == "weight":
            return list(range(n)), torch.softmax(logits.float(), -1)
        if sample:  # straight-through Gumbel-softmax: forward one-hot, backward the soft sample's gradient
            weights = F.gumbel_softmax(logits.float(), tau=self.config.gumbel_temperature, hard=True)
            return [int(weights.argmax())], weights
        return [int(logits.argmax())], None

    def compress_row(
        self,
        inputs_embeds: torch.Tensor,
        features: torch.Tensor,
        position_ids: torch.Tensor,
        image_mask: torch.Tensor,
        prompt_len: int | None = None,
        sample: bool = False,
    ) -> CompressedInput:
        """
        Compresses one row's visual pairs, image by image, in place in the sequence.

        Args:
            inputs_embeds, features (`torch.FloatTensor` of shape `(n, hidden_size)`): the draft's inputs.
            position_ids (`torch.LongTensor` of shape `(n,)`)
            image_mask (`torch.BoolTensor` of shape `(n,)`): True where `inputs_embeds` is a visual token.
            prompt_len (`int`, *optional*): positions `< prompt_len` are the prompt (the gate's and the importance
                pruning's context; in training the answer follows). Default: the whole row.
            sample (`bool`): training's behaviour: a Gumbel-softmax choice and a fresh random pruning draw. Without
                it (inference) the gate's argmax and the fixed draw.

        Returns:
            `CompressedInput`.
        """
        n, hidden = inputs_embeds.shape
        prompt_len = n if prompt_len is None else prompt_len
        spans = self._image_spans(image_mask, prompt_len)  # host-side bookkeeping: one read of the mask
        if not spans:
            return CompressedInput(inputs_embeds, features, position_ids, torch.arange(n, device=position_ids.device))
        height, width = self.config.grid
        row = torch.cat([inputs_embeds, features.to(inputs_embeds.dtype)], -1)  # [n, 2h]: the pairs
        grid = torch.stack([row[start:end] for start, end in spans]).view(-1, height, width, 2 * hidden)
        where = torch.stack([position_ids[start:end] for start, end in spans]).view(-1, height, width)
        query = features[prompt_len - 1]
        logits = self.gate_logits(features, spans, prompt_len) if self.gate is not None else None
        chosen, weights = self._choose(logits, sample)
        outputs, out_positions = [], []
        for index in chosen:
            module = self.branches[index]
            out, pos = module(grid, where, query, sample)
            if weights is not None:
                out = out * weights[index].to(out.dtype)
            outputs.append(out)
            out_positions.append(pos)
        if self.config.mode == "weight" and len(chosen) > 1:
            out, pos = torch.stack(outputs).sum(0), out_positions[0]
        else:
            out, pos = torch.cat(outputs, 1), torch.cat(out_positions, 1)  # [images, m, 2h], [images, m]
        branch = self.names[chosen[0]] if self.config.mode == "select" or len(self.branches) == 1 else None
        if not sample:
            self.last_branch = branch
            if branch is not None:
                self.branch_counts[branch] += 1

        # Splice: text before image i, image i's pairs, ..., text after the last image.
        bounds = [0] + [b for span in spans for b in span] + [n]
        texts = list(zip(bounds[0::2], bounds[1::2]))  # the text spans around the images
        pieces, piece_positions, source = [row[texts[0][0] : texts[0][1]]], [position_ids[: texts[0][1]]], []
        source += range(*texts[0])
        m = out.shape[1]
        for i, (start, end) in enumerate(texts[1:]):
            pieces += [out[i].to(row.dtype), row[start:end]]
            piece_positions += [pos[i], position_ids[start:end]]
            source += [-1] * m
            source += range(start, end)
        spliced = torch.cat(pieces)
        return CompressedInput(
            spliced[:, :hidden], spliced[:, hidden:].to(features.dtype), torch.cat(piece_positions),
            torch.tensor(source, device=position_ids.device), branch,
        )  # fmt: skip

    def _image_spans(self, image_mask: torch.Tensor, prompt_len: int) -> list[tuple[int, int]]:
        """Each image's `[start, end)` in the row, checked: whole images of the patch grid, inside the prompt."""
        height, width = self.config.grid
        per_image = height * width
        flags = image_mask.tolist()
        runs, start = [], None
        for i, flag in enumerate(flags + [False]):
            if flag and start is None:
                start = i
            elif not flag and start is not None:
                runs.append((start, i))
                start = None
        total = sum(end - start for start, end in runs)
        if total % per_image or any((end - start) % per_image for start, end in runs):
            raise ValueError(
                f"The prompt has {total} visual tokens, not a whole number of images of {height}x{width} "
                f"= {per_image} tokens (the compressor's patch grid): the number of images does not match the image "
                "tokens, or the compressor was made for another vision tower."
            )
        if runs and runs[-1][1] > prompt_len:
            raise ValueError(f"Visual tokens at position {runs[-1][1] - 1} lie outside the prompt ({prompt_len}).")
        # adjacent images form one run: split it into images
        return [(s + k * per_image, s + (k + 1) * per_image) for s, e in runs for k in range((e - s) // per_image)]

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        features: torch.Tensor,
        position_ids: torch.Tensor,
        image_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        The draft's prompt input, compressed as at inference (the decoding loop's call; batch 1): the gate's argmax,
        the fixed pruning draw, whatever `self.training` says.

        Args:
            inputs_embeds, features (`torch.FloatTensor` of shape `(1, n, hidden_size)`)
            position_ids (`torch.LongTensor` of shape `(1, n)`)
            image_mask (`torch.BoolTensor` of shape `(n,)`)

        Returns:
            `(inputs_embeds, features, position_ids)` of shapes `(1, n', hidden_size)` and `(1, n')`.
        """
        row = self.compress_row(inputs_embeds[0], features[0], position_ids[0], image_mask)
        return row.inputs_embeds[None], row.features[None], row.position_ids[None]


def compressor_for(
    name: str, hidden_size: int, grid: tuple[int, int], branches: list[str] | None = None, mode: str = "select"
) -> SpecVLMCompressor | None:
    """
    A fresh compressor by `--compressor` name (`PRESETS`, or `none` for no compressor), for a draft of `hidden_size`
    over a target with the patch grid `grid`. `branches` (e.g. `["pool:3"]`) replace the preset's branches.
    """
    if name == "none":
        return None
    if name not in PRESETS:
        raise ValueError(f"Unknown compressor {name!r}; valid: none, {', '.join(PRESETS)}.")
    if grid is None:
        raise ValueError("The target's visual tokens do not form a patch grid; the compressor needs one.")
    config = SpecVLMCompressorConfig(
        hidden_size=hidden_size, grid=list(grid), branches=list(branches or PRESETS[name]), mode=mode
    )
    return SpecVLMCompressor(config)
