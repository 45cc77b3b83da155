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
  arithmetic `LlamaRotaryEmbedding.forward` does per position.

Invariant: given the same inputs and mask, `LeanDraftForward` returns bit for bit what the draft's `forward`
(`SpecVLMDraftModel`'s or `SpecVLMEagle3DraftModel`'s) returns with a `DynamicCache` holding the same entries (float32; `tests/test_draft_step.py`). Every value goes
through the same arithmetic; only where the keys, values and rotary angles live, and how the attention kernel reaches
a shared key/value head, differ.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, eager_attention_forward


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


class LeanDraftForward:
    """`SpecVLMDraftModel.forward` over a `StaticDraftCache` of `rows` sequences. One instance serves one decoding
    call."""

    def __init__(self, draft, capacity: int = 512, rows: int = 1):
        self.draft = draft
        config = draft.config
        self.head_dim = config.head_dim
        # SDPA on CPU is called directly (`_sdpa`); elsewhere (where GQA with a mask falls back to the math kernel) and
        # for any other implementation, through transformers' function.
        self.sdpa = config._attn_implementation == "sdpa" and draft.fc.weight.device.type == "cpu"
        self.attention = ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager_attention_forward)
        check_plain_modules(draft)
        weight = draft.fc.weight
        self.fc = (draft.fc.weight, draft.fc.bias)
        # EAGLE-3: the fused state's norms (`fc_norm`, `None` without), the first layer's `hidden_norm` and residual
        self.eagle3 = hasattr(draft.layers[0], "hidden_norm")
        if self.eagle3:
            fc_norm = draft.fc_norm
            self.fc_norm = None if fc_norm is None else [(n.weight, n.variance_epsilon) for n in fc_norm]
            self.hidden_norm = (draft.layers[0].hidden_norm.weight, draft.layers[0].hidden_norm.variance_epsilon)
            self.norm_before_residual = draft.layers[0].norm_before_residual
        # Per layer: the attention module (read by transformers' attention function), the two RMSNorms' (weight,
        # eps), the seven projections' (weight, bias) in order q, k, v, o, gate, up, down, and the MLP activation.
        self.layers = []
        for layer in draft.layers:
            attn, mlp = layer.self_attn, layer.mlp
            norms = [(n.weight, n.variance_epsilon) for n in (layer.input_layernorm, layer.post_attention_layernorm)]
            linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
            self.layers.append((attn, norms, [(m.weight, m.bias) for m in linears], mlp.act_fn))
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
        if self.eagle3:
            hidden, first_input = self._eagle3_input(inputs_embeds, features)
        else:
            hidden = F.linear(torch.cat([inputs_embeds, features.to(inputs_embeds.dtype)], dim=-1), *self.fc)
            first_input = _rms_norm(hidden, *self.layers[0][1][0])
        if self.rotary is not None:
            cos, sin = self.rotary(position_ids)
        else:
            cos, sin = self.draft.rotary_emb(hidden, position_ids)
        rows = inputs_embeds.shape[0]
        heads = (rows, q_len, -1, self.head_dim)
        for index, (attn, norms, projections, act) in enumerate(self.layers):
            normed = first_input if index == 0 else _rms_norm(hidden, *norms[0])
            query = F.linear(normed, *projections[0]).view(heads).transpose(1, 2)
            key = F.linear(normed, *projections[1]).view(heads).transpose(1, 2)
            value = F.linear(normed, *projections[2]).view(heads).transpose(1, 2)
            query, key = apply_rotary_pos_emb(query, key, cos, sin)
            keys, values = cache.write(index, start, key, value)
            dropout = attn.attention_dropout if attn.training else 0.0  # as LlamaAttention.forward
            if self.sdpa:
                out = _sdpa(query, keys, values, attention_mask, dropout, attn.scaling)
            else:
                out, _ = self.attention(
                    attn, query, keys, values, attention_mask, dropout=dropout, scaling=attn.scaling
                )
            hidden = hidden + F.linear(out.reshape(rows, q_len, -1).contiguous(), *projections[3])
            normed = _rms_norm(hidden, *norms[1])
            gated = act(F.linear(normed, *projections[4])) * F.linear(normed, *projections[5])
            hidden = hidden + F.linear(gated, *projections[6])
        cache.length = start + q_len
        return hidden

    def _eagle3_input(self, inputs_embeds: torch.Tensor, features: torch.Tensor):
        """`Eagle3DecoderLayer`'s residual and attention input, op for op: fuse wide target states
        (`SpecVLMEagle3DraftModel.fuse`), then `(residual, concat(input_norm(embeds), hidden_norm(state)))`."""
        if features.shape[-1] != inputs_embeds.shape[-1]:
            parts = features.to(self.fc[0].dtype).chunk(3, dim=-1)
            if self.fc_norm is not None:
                parts = [_rms_norm(part, *norm) for part, norm in zip(parts, self.fc_norm)]
            state = F.linear(torch.cat(parts, dim=-1), *self.fc)
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
