"""The draft's forward as the decoding loop runs it: the same arithmetic as `SpecVLMDraftModel.forward` (the path
training uses) without the generic decoder-layer machinery around it. The loop calls the draft once per tree level,
and on CPU a level costs more in framework overhead than in arithmetic, so this path

- keeps the draft's keys and values in preallocated buffers (`StaticDraftCache`): appending writes in place, and
  dropping the tree's entries after a step only moves a length (no concatenation, no copy);
- runs the layer's arithmetic directly on its weights (the same functional calls its modules make), skipping the
  module calls, decorators, keyword plumbing and cache dispatch of `LlamaDecoderLayer.forward`;
- under SDPA attention on CPU lets the kernel share each key/value head among its query heads (`enable_gqa`)
  instead of copying the whole cache `num_key_value_groups` times per level as transformers' SDPA function does when
  a mask is given (the copy cost as much as the attention); other devices and implementations run through
  transformers' function;
- reads the rotary cos/sin of default RoPE from a table computed once per call (`RotaryTable`), the same elementwise
  arithmetic `LlamaRotaryEmbedding.forward` does per position;
- runs its linear maps (and its logits head) through one of the draft **numerics** (`DraftKernels`): `reference`, the
  modules' own `F.linear`; on a CPU with oneDNN, `onednn` (the weights reordered once into oneDNN's blocked layout,
  q/k/v and gate/up each fused into one matmul) and `onednn-bf16` (the same in bfloat16 where the CPU has bf16
  instructions, but for the logits head), and `int8` (`Int8Linear`: weight-only int8 for a tree level's few rows,
  a quarter of the bytes to read, where the CPU has bf16 instructions). For the few rows of a tree level, float32
  `F.linear` takes a slow small-GEMM path and reads every weight once per level; the packed kernels cost 1.5-3.5x
  less there on some CPUs, int8 on others (chosen by measurement).

Invariant: with `reference` numerics, given the same inputs and mask, `LeanDraftForward` returns bit for bit what
the draft's `forward` (`SpecVLMDraftModel`'s or `SpecVLMEagle3DraftModel`'s) returns with a `DynamicCache` holding the
same entries (float32; `tests/test_draft_step.py`). Every value goes through the same arithmetic; only where the keys,
values and rotary angles live, and how the attention kernel reaches a shared key/value head, differ. The other
numerics round differently (`onednn` sums in another order, `onednn-bf16` keeps 8 bits of mantissa in the layer's
matmuls, `int8` also rounds each weight to 1/254 of its row's largest):
they change what the draft proposes, never what the target emits, which its verification alone decides. What they
may cost in acceptance is tested on the testbed's held-out prompts (`tests/test_draft_numerics.py`).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, eager_attention_forward

from .configuration import DRAFT_NUMERICS


class StaticDraftCache:
    """
    The draft's keys and values per layer, each `(rows, num_key_value_heads, capacity, head_dim)`; entries
    `[0, length)` are written (in a batch, which of them a row attends to is the caller's mask). Capacity doubles when
    a write would overflow it.
    """

    def __init__(
        self, num_layers: int, num_key_value_heads: int, head_dim: int, dtype, device, capacity: int = 512, rows=1
    ):
        shape = (rows, num_key_value_heads, capacity, head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def reserve(self, length: int) -> None:
        """Makes room for `length` entries, keeping the live ones."""
        if length <= self.capacity:
            return
        capacity = max(length, 2 * self.capacity)
        for buffers in (self.keys, self.values):
            for i, old in enumerate(buffers):
                new = old.new_empty(old.shape[:2] + (capacity,) + old.shape[3:])
                new[:, :, : self.length] = old[:, :, : self.length]
                buffers[i] = new

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keeps the rows `rows` (`(n,)` indices), in that order."""
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]

    def write(self, layer: int, start: int, keys: torch.Tensor, values: torch.Tensor):
        """Stores `keys`, `values` (`(rows, kv_heads, n, head_dim)`) at `[start, start + n)` of `layer` and returns the
        layer's entries `[0, start + n)` as views. The caller has reserved the room."""
        end = start + keys.shape[2]
        self.keys[layer][:, :, start:end] = keys
        self.values[layer][:, :, start:end] = values
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def truncate(self, length: int) -> None:
        """Drops the entries from `length` on (the last step's tree)."""
        self.length = min(self.length, length)


class RotaryTable:
    """
    The cos/sin of default RoPE (`LlamaRotaryEmbedding`, `rope_type="default"`) for positions `[0, capacity)`,
    computed once: `LlamaRotaryEmbedding.forward` is elementwise per position (position x inverse frequency, then cos
    and sin), so a row of the table is bit for bit what it returns for that position.
    """

    def __init__(self, rotary_emb, dtype, device, capacity: int = 512):
        self.rotary_emb, self.dtype, self.device = rotary_emb, dtype, device
        self._fill(capacity)

    def _fill(self, capacity: int) -> None:
        positions = torch.arange(capacity, device=self.device)[None]
        cos, sin = self.rotary_emb(torch.empty(0, dtype=self.dtype, device=self.device), positions)
        self.cos, self.sin = cos[0], sin[0]  # (capacity, head_dim)

    def reserve(self, positions: int) -> None:
        """Makes the table cover positions `[0, positions)` (at least doubling when it grows)."""
        if positions > self.cos.shape[0]:
            self._fill(max(positions, 2 * self.cos.shape[0]))

    def __call__(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(cos, sin)`, each `(rows, q_len, head_dim)`, at `position_ids` (`(rows, q_len)`, all reserved)."""
        return self.cos[position_ids], self.sin[position_ids]


NUMERICS = tuple(name for name in DRAFT_NUMERICS if name != "auto")
PACK_ROWS = 8  # the row count oneDNN's weight layout is chosen for: a tree level's nodes; any count runs


def available_numerics(device: torch.device, dtype: torch.dtype) -> tuple[str, ...]:
    """The numerics a draft with weights of `dtype` on `device` can run with: `reference` everywhere; on a CPU with
    oneDNN, for a float32 or bfloat16 draft, `onednn` (in the draft's dtype), and for a float32 draft on a CPU with
    bf16 kernels, `onednn-bf16` and `int8`."""
    if torch.device(device).type != "cpu" or not torch.backends.mkldnn.is_available():
        return ("reference",)
    if dtype not in (torch.float32, torch.bfloat16):
        return ("reference",)
    bf16 = dtype == torch.float32 and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if not bf16:
        return ("reference", "onednn")
    return ("reference", "onednn", "onednn-bf16", "int8")


class PackedLinear:
    """
    Linear maps sharing an input (`F.linear(x, W_i, b_i)` for each i) as one oneDNN matmul: the weights concatenated,
    converted to `dtype` and reordered once into oneDNN's blocked layout. Returns each map's output in the input's
    dtype: a tuple when there are several, unless `split` is False (then their outputs side by side).
    """

    def __init__(
        self, weights: list[torch.Tensor], biases: list[torch.Tensor | None], dtype: torch.dtype, split: bool = True
    ):
        self.dtype = dtype
        self.sizes = [weight.shape[0] for weight in weights] if split else [sum(w.shape[0] for w in weights)]
        weight = torch.cat(weights).to(dtype)
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS)
        if all(bias is None for bias in biases):
            self.bias = None
        else:
            parts = [weight.new_zeros(n) if bias is None else bias for bias, n in zip(biases, self.sizes)]
            self.bias = torch.cat(parts).to(dtype)

    def __call__(self, hidden: torch.Tensor):
        """`hidden` (`(..., in_features)`) -> `(..., out_features_i)` for each map."""
        out = torch.ops.mkldnn._linear_pointwise(hidden.to(self.dtype), self.weight, self.bias, "none", [None], "")
        out = out.to(hidden.dtype)
        return out.split(self.sizes, dim=-1) if len(self.sizes) > 1 else out


class DraftKernels:
    """
    The draft's arithmetic that its numerics decide, as `LeanDraftForward` calls it:

    - `fc(x)`, and per layer `layers[i] = (qkv, o, gate_up, down)`: `qkv(x)` (whatever `attention_inputs` reads),
      `o(x)`, `gate_up(x) -> (gate, up)`, `down(x)`;
    - `angles(cos, sin)` (each `(rows, q_len, head_dim)`): RoPE's angles as `attention_inputs` reads them;
      `attention_inputs(qkv(x), angles, shape)` -> query `(rows, heads, q_len, head_dim)`, key and value
      `(rows, kv_heads, q_len, head_dim)`, RoPE applied to query and key;
    - `head`: what `compute_logits(hidden, head=...)` runs in place of the `lm_head` (`None`: the `lm_head` itself).

    This class is the `reference` numerics: each module's own `F.linear` and `apply_rotary_pos_emb`, the draft's forward
    op for op. `Int8Kernels` changes only the linear maps (`linear`); `PackedKernels` also RoPE's arithmetic.
    """

    @staticmethod
    def linear(*linears):
        """The maps of `linears` (`nn.Linear`s) over one shared input, a tuple when there are several: here their own
        `F.linear`."""
        return _reference_linear(*linears)

    def __init__(self, draft, numerics: str = "reference"):
        self.numerics = numerics
        self.fc = self.linear(draft.fc)
        self.layers = [
            (self.linear(layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj),
             self.linear(layer.self_attn.o_proj), self.linear(layer.mlp.gate_proj, layer.mlp.up_proj),
             self.linear(layer.mlp.down_proj))
            for layer in draft.layers
        ]  # fmt: skip
        self.head = None

    @staticmethod
    def angles(cos: torch.Tensor, sin: torch.Tensor):
        return cos, sin

    @staticmethod
    def attention_inputs(projected, angles, shape: tuple[int, int, int]):
        """`shape`: `(rows, q_len, head_dim)`."""
        query, key, value = (part.reshape(*shape[:2], -1, shape[2]).transpose(1, 2) for part in projected)
        query, key = apply_rotary_pos_emb(query, key, *angles)
        return query, key, value


class PackedKernels(DraftKernels):
    """
    The `onednn` and `onednn-bf16` numerics: every linear map a `PackedLinear` in the draft's dtype, or for
    `onednn-bf16` in bfloat16 but for the logits head; q/k/v fused into one matmul and gate/up into another; RoPE as one complex multiplication
    over query and key together. For that, the q and k weight rows are permuted per head so that each pair RoPE rotates
    together, dimensions `(i, i + head_dim / 2)` (`rotate_half`), sits side by side as a complex number; query . key
    sums over the same pairs in another order, so attention is unchanged but for rounding (values are not permuted).
    """

    def __init__(self, draft, numerics: str):
        self.numerics = numerics
        dtype = torch.bfloat16 if numerics == "onednn-bf16" else draft.fc.weight.dtype
        head_dim = draft.config.head_dim
        self.heads, self.kv_heads = draft.config.num_attention_heads, draft.config.num_key_value_heads

        def packed(*linears, permute=()):
            weights = [_pair_rows(m.weight, head_dim) if m in permute else m.weight for m in linears]
            biases = [_pair_rows(m.bias, head_dim) if m in permute and m.bias is not None else m.bias for m in linears]
            return PackedLinear(weights, biases, dtype, split=False)

        self.fc = packed(draft.fc)
        self.layers = []
        for layer in draft.layers:
            attn, mlp = layer.self_attn, layer.mlp
            qkv = packed(attn.q_proj, attn.k_proj, attn.v_proj, permute=(attn.q_proj, attn.k_proj))
            gate_up = PackedLinear([mlp.gate_proj.weight, mlp.up_proj.weight], [mlp.gate_proj.bias, mlp.up_proj.bias],
                                   dtype)  # fmt: skip
            self.layers.append((qkv, packed(attn.o_proj), gate_up, packed(mlp.down_proj)))
        # The logits head stays in the draft's dtype: in bfloat16 the ranking of close candidates flips, which cost
        # acceptance on the testbed's held-out prompts; in float32 it cost none.
        self.head = PackedLinear([draft.lm_head.weight], [draft.lm_head.bias], draft.fc.weight.dtype)

    @staticmethod
    def angles(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """`cos + i sin` of each pair's angle, `(rows, q_len, 1, head_dim / 2)` complex (RoPE's cos and sin repeat
        their first half)."""
        half = cos.shape[-1] // 2
        return torch.complex(cos[..., :half].float(), sin[..., :half].float())[:, :, None]

    def attention_inputs(self, projected: torch.Tensor, angles: torch.Tensor, shape: tuple[int, int, int]):
        rows, q_len, head_dim = shape
        rotated_heads = self.heads + self.kv_heads
        pairs = projected[..., : rotated_heads * head_dim].reshape(rows, q_len, rotated_heads, head_dim // 2, 2)
        rotated = torch.view_as_real(torch.view_as_complex(pairs.float()) * angles).flatten(-2).to(projected.dtype)
        query = rotated[:, :, : self.heads].transpose(1, 2)
        key = rotated[:, :, self.heads :].transpose(1, 2)
        value = projected[..., rotated_heads * head_dim :].reshape(rows, q_len, self.kv_heads, head_dim)
        return query, key, value.transpose(1, 2)


# The most rows (tokens x sequences) `Int8Linear` multiplies in int8: a tree level's nodes and a step's committed
# positions. With more rows the product is compute-bound: the int8 kernel is then slower than float32's GEMM and
# bfloat16's faster than both (measured on a 2-core Xeon with AMX), so larger inputs (the draft's pass over the
# prompt) run in bfloat16.
INT8_ROWS = 8
INT8_BLOCK = 16  # `torch._weight_int8pack_mm`'s block of the inner dimension


class Int8Linear:
    """
    Linear maps sharing an input (`F.linear(x, W_i, b_i)` for each i) with their weights concatenated and quantized
    once to int8, symmetrically per output row (`scale = max |w| / 127`), for `torch._weight_int8pack_mm` (weight-only
    int8, bfloat16 input, the product scaled per row). A tree level reads its draft's weights once and multiplies a
    few rows by them, so on CPU its cost is reading the weights: int8 reads a quarter of float32's bytes, and a
    testbed-sized draft's int8 weights stay in the cores' L2 caches across levels. Inputs of more than `INT8_ROWS`
    rows (the prompt pass) are compute-bound instead, and multiply a bfloat16 copy of the weights. Returns each map's
    output in the input's dtype, as a tuple when there are several.
    """

    def __init__(self, *linears):
        self.sizes = [linear.weight.shape[0] for linear in linears]
        weight = torch.cat([linear.weight for linear in linears]).float()
        self.wide = weight.to(torch.bfloat16)  # (out_features, in_features), for more than INT8_ROWS rows
        scale = weight.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) * (1 / 127)
        # The kernel reads the inner dimension in blocks of 16 (other sizes crash it): zero columns pad it, and the
        # input is padded with zeros to match, which adds nothing to any product.
        self.pad = -weight.shape[1] % INT8_BLOCK
        weight = F.pad(weight, (0, self.pad))
        self.weight = torch.round(weight / scale[:, None]).to(torch.int8)  # (out_features, padded in_features)
        self.scale = scale.to(torch.bfloat16)
        biases = [linear.bias for linear in linears]
        self.bias = (
            None
            if all(b is None for b in biases)
            else torch.cat([weight.new_zeros(n) if b is None else b.float() for b, n in zip(biases, self.sizes)])
        )

    def __call__(self, hidden: torch.Tensor):
        """`hidden` (`(..., in_features)`) -> `(..., out_features_i)` for each map."""
        flat = hidden.reshape(-1, hidden.shape[-1]).to(torch.bfloat16)
        if flat.shape[0] > INT8_ROWS:
            out = F.linear(flat, self.wide)
        else:
            out = torch._weight_int8pack_mm(F.pad(flat, (0, self.pad)) if self.pad else flat, self.weight, self.scale)
        out = out.to(hidden.dtype)
        if self.bias is not None:
            out = out + self.bias.to(hidden.dtype)
        out = out.reshape(*hidden.shape[:-1], out.shape[-1])
        return out.split(self.sizes, dim=-1) if len(self.sizes) > 1 else out


class Int8Kernels(DraftKernels):
    """
    The `int8` numerics: every linear map of the layers and the `fc` an `Int8Linear`, q/k/v fused into one matmul and
    gate/up into another (the prompt pass through their bfloat16 copies); RoPE and attention as the reference's; the
    logits head the `lm_head`'s own float32 (in lower precision the ranking of close candidates flips, which costs
    acceptance).
    """

    linear = Int8Linear


def _pair_rows(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """A q or k projection's weight (`(heads * head_dim, in_features)`) or bias with each head's rows reordered
    `0, d/2, 1, d/2 + 1, ...`: RoPE's pairs side by side."""
    heads = weight.shape[0] // head_dim
    paired = weight.reshape(heads, 2, head_dim // 2, *weight.shape[1:]).transpose(1, 2)
    return paired.reshape(weight.shape)


def _reference_linear(*linears):
    """`F.linear` over each module's own weight and bias, as its `forward` calls it."""
    if len(linears) == 1:
        (linear,) = linears
        return lambda hidden: F.linear(hidden, linear.weight, linear.bias)
    return lambda hidden: tuple(F.linear(hidden, m.weight, m.bias) for m in linears)


# Kernels per draft and numerics, with the weights' identity they were packed from: packing reorders every weight, so
# it is done once per weights, not once per call. An optimizer step or a `.to()` changes a weight's version or storage
# and so repacks.
_KERNELS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def draft_kernels(draft, numerics: str) -> DraftKernels:
    """`DraftKernels(draft, numerics)`, reused while the draft's weights (and its `lm_head`) are unchanged. Raises a
    `ValueError` naming the numerics this device runs when `numerics` is not one of them."""
    weight = draft.fc.weight
    available = available_numerics(weight.device, weight.dtype)
    if numerics not in available:
        raise ValueError(
            f"draft_numerics={numerics!r} does not run here ({weight.device}, {weight.dtype}); available: "
            f"{', '.join(available)} (or 'auto': the fastest, measured)."
        )
    if numerics == "reference":
        return DraftKernels(draft)
    identity = _weights_identity([draft.lm_head.weight, *(p for p in draft.parameters())])
    kept = _KERNELS.setdefault(draft, {}).get(numerics)
    if kept is None or kept[0] != identity:
        kernels = Int8Kernels if numerics == "int8" else PackedKernels
        with torch.no_grad():
            kept = _KERNELS[draft][numerics] = (identity, kernels(draft, numerics))
    return kept[1]


def _weights_identity(weights: list[torch.Tensor]) -> tuple:
    """What tells whether packed copies of `weights` are stale: each weight's storage and version, and a sum over up
    to 64 of its elements spread across it, since some in-place updates do not count as a version (a fused
    optimizer's step: `torch.optim.AdamW(fused=True)`, the Trainer's default, leaves `_version` unchanged)."""
    with torch.no_grad():
        sums = torch.stack([w.reshape(-1)[:: max(1, w.numel() // 64)][:64].float().sum() for w in weights])
    return tuple((w.data_ptr(), w._version) for w in weights), tuple(sums.tolist())


class LeanDraftForward:
    """`SpecVLMDraftModel.forward` over a `StaticDraftCache` of `rows` sequences, with its linear maps in `numerics`
    (`DraftKernels`). One instance serves one decoding call."""

    def __init__(self, draft, capacity: int = 512, rows: int = 1, numerics: str = "reference"):
        self.draft = draft
        config = draft.config
        self.head_dim = config.head_dim
        # SDPA on CPU is called directly (`_sdpa`); elsewhere (where GQA with a mask falls back to the math kernel) and
        # for any other implementation, through transformers' function.
        self.sdpa = config._attn_implementation == "sdpa" and draft.fc.weight.device.type == "cpu"
        self.attention = ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager_attention_forward)
        check_plain_modules(draft)
        weight = draft.fc.weight
        self.kernels = draft_kernels(draft, numerics)
        # EAGLE-3: the fused state's norms (`fc_norm`, `None` without), the first layer's `hidden_norm` and residual
        self.eagle3 = hasattr(draft.layers[0], "hidden_norm")
        if self.eagle3:
            fc_norm = draft.fc_norm
            self.fc_norm = None if fc_norm is None else [(n.weight, n.variance_epsilon) for n in fc_norm]
            self.hidden_norm = (draft.layers[0].hidden_norm.weight, draft.layers[0].hidden_norm.variance_epsilon)
            self.norm_before_residual = draft.layers[0].norm_before_residual
        # Per layer: the attention module (read by transformers' attention function), the two RMSNorms' (weight,
        # eps), the layer's kernels (qkv, o, gate_up, down) and the MLP activation.
        self.layers = []
        for layer, kernels in zip(draft.layers, self.kernels.layers):
            norms = [(n.weight, n.variance_epsilon) for n in (layer.input_layernorm, layer.post_attention_layernorm)]
            self.layers.append((layer.self_attn, norms, kernels, layer.mlp.act_fn))
        self.cache = StaticDraftCache(
            len(draft.layers), config.num_key_value_heads, config.head_dim, weight.dtype, weight.device, capacity, rows
        )
        rotary = draft.rotary_emb
        self.rotary = (
            RotaryTable(rotary, weight.dtype, weight.device, capacity) if rotary.rope_type == "default" else None
        )

    def reserve_positions(self, positions: int) -> None:
        """Makes room for draft positions `[0, positions)`; the caller reserves before feeding a position."""
        if self.rotary is not None:
            self.rotary.reserve(positions)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The draft's `compute_logits` through this forward's numerics: `(..., hidden_size) -> (..., vocab_size)`."""
        return self.draft.compute_logits(hidden, head=self.kernels.head)

    def __call__(
        self,
        inputs_embeds: torch.Tensor,
        features: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> torch.Tensor:
        """
        Appends `q_len` positions to the cache and predicts the target's next features there.

        Args:
            inputs_embeds, features (`torch.FloatTensor` of shape `(rows, q_len, hidden_size)`): as in
                `SpecVLMDraftModel.forward`.
            position_ids (`torch.LongTensor` of shape `(rows, q_len)`): reserved (`reserve_positions`).
            attention_mask (`torch.FloatTensor` of shape `(rows or 1, 1, q_len, length + q_len)`): additive mask over
                the cache's written entries and the new ones.

        Returns:
            `torch.FloatTensor` of shape `(rows, q_len, hidden_size)`.
        """
        cache = self.cache
        q_len, start = inputs_embeds.shape[1], cache.length
        cache.reserve(start + q_len)
        kernels = self.kernels
        if self.eagle3:
            hidden, first_input = self._eagle3_input(inputs_embeds, features)
        else:
            hidden = kernels.fc(torch.cat([inputs_embeds, features.to(inputs_embeds.dtype)], dim=-1))
            first_input = _rms_norm(hidden, *self.layers[0][1][0])
        if self.rotary is not None:
            cos, sin = self.rotary(position_ids)
        else:
            cos, sin = self.draft.rotary_emb(hidden, position_ids)
        angles = kernels.angles(cos, sin)
        rows = inputs_embeds.shape[0]
        shape = (rows, q_len, self.head_dim)
        for index, (attn, norms, (qkv, o_proj, gate_up, down), act) in enumerate(self.layers):
            normed = first_input if index == 0 else _rms_norm(hidden, *norms[0])
            query, key, value = kernels.attention_inputs(qkv(normed), angles, shape)
            keys, values = cache.write(index, start, key, value)
            dropout = attn.attention_dropout if attn.training else 0.0  # as LlamaAttention.forward
            if self.sdpa:
                out = _sdpa(query, keys, values, attention_mask, dropout, attn.scaling)
            else:
                out, _ = self.attention(
                    attn, query, keys, values, attention_mask, dropout=dropout, scaling=attn.scaling
                )
            hidden = hidden + o_proj(out.reshape(rows, q_len, -1).contiguous())
            normed = _rms_norm(hidden, *norms[1])
            gate, up = gate_up(normed)
            hidden = hidden + down(act(gate) * up)
        cache.length = start + q_len
        return hidden

    def _eagle3_input(self, inputs_embeds: torch.Tensor, features: torch.Tensor):
        """`Eagle3DecoderLayer`'s residual and attention input, op for op: fuse wide target states
        (`SpecVLMEagle3DraftModel.fuse`), then `(residual, concat(input_norm(embeds), hidden_norm(state)))`."""
        if features.shape[-1] != inputs_embeds.shape[-1]:
            parts = features.to(self.draft.fc.weight.dtype).chunk(3, dim=-1)
            if self.fc_norm is not None:
                parts = [_rms_norm(part, *norm) for part, norm in zip(parts, self.fc_norm)]
            state = self.kernels.fc(torch.cat(parts, dim=-1))
        else:
            state = features.to(inputs_embeds.dtype)
        normed = _rms_norm(state, *self.hidden_norm)
        first_input = torch.cat([_rms_norm(inputs_embeds, *self.layers[0][1][0]), normed], dim=-1)
        return (normed if self.norm_before_residual else state), first_input


def _sdpa(query, keys, values, attention_mask, dropout: float, scaling: float) -> torch.Tensor:
    """
    `sdpa_attention_forward` without copying the keys and values per query head, bit for bit the same.

    Args:
        query (`(rows, heads, q_len, head_dim)`), keys and values (`(rows, kv_heads, kv_len, head_dim)`),
            attention_mask (`(rows or 1, 1, q_len, kv_len)`, additive).

    Returns:
        `(rows, q_len, heads, head_dim)`.
    """
    rows, heads, q_len, kv_heads = query.shape[0], query.shape[1], query.shape[2], keys.shape[1]
    if kv_heads == heads or q_len > 1:  # the kernel reads head h's keys and values at kv head h // groups
        out = F.scaled_dot_product_attention(
            query, keys, values, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
            enable_gqa=kv_heads != heads,
        )  # fmt: skip
    else:  # one query: a kv head's query heads become its rows (transformers' pack_gqa, the reference path's call)
        packed = query.reshape(rows, kv_heads, heads // kv_heads, query.shape[-1])
        out = F.scaled_dot_product_attention(
            packed, keys, values, attn_mask=attention_mask, dropout_p=dropout, scale=scaling
        ).reshape(rows, heads, 1, query.shape[-1])  # fmt: skip
    return out.transpose(1, 2)


def check_plain_modules(draft) -> None:
    """Raises a `ValueError` naming the module unless every module the lean path reads the weights of is a plain
    `nn.Linear` / `LlamaRMSNorm` without hooks or parametrizations (a peft adapter, a quantized layer or an offload
    hook would be skipped by reading `.weight` directly)."""
    from torch import nn
    from torch.nn.utils import parametrize
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    hooks = nn.modules.module
    if hooks._global_forward_hooks or hooks._global_forward_pre_hooks:
        raise ValueError("The draft's lean forward does not run global module hooks; remove them before drafting.")
    expected = {"fc": nn.Linear}
    if hasattr(draft.layers[0], "hidden_norm"):  # EAGLE-3
        expected["layers.0.hidden_norm"] = LlamaRMSNorm
        for i in range(len(draft.fc_norm or ())):
            expected[f"fc_norm.{i}"] = LlamaRMSNorm
    for i, layer in enumerate(draft.layers):
        attn, mlp = layer.self_attn, layer.mlp
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            expected[f"layers.{i}.self_attn.{name}"] = nn.Linear
        for name in ("gate_proj", "up_proj", "down_proj"):
            expected[f"layers.{i}.mlp.{name}"] = nn.Linear
        expected[f"layers.{i}.input_layernorm"] = expected[f"layers.{i}.post_attention_layernorm"] = LlamaRMSNorm
        expected[f"layers.{i}.self_attn"] = type(attn)
        expected[f"layers.{i}.mlp"] = type(mlp)
        expected[f"layers.{i}"] = type(layer)
    modules = dict(draft.named_modules())
    for name, kind in expected.items():
        module = modules.get(name)
        if type(module) is not kind or module._forward_hooks or module._forward_pre_hooks:
            raise ValueError(
                f"The draft's lean forward reads plain {kind.__name__} weights, but `{name}` is "
                f"{type(module).__name__} or has hooks (a peft adapter, quantization or offloading?); merge or remove "
                "it before drafting (e.g. peft's merge_and_unload())."
            )
        if parametrize.is_parametrized(module):
            raise ValueError(f"The draft's lean forward reads weights directly; `{name}` is parametrized.")


def _rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`LlamaRMSNorm.forward`, op for op."""
    dtype = hidden.dtype
    hidden = hidden.to(torch.float32)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    hidden = hidden * torch.rsqrt(variance + eps)
    return weight * hidden.to(dtype)
