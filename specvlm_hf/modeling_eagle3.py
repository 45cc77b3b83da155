"""`SpecVLMEagle3DraftModel`: an EAGLE-3 draft (Li et al. 2025, "EAGLE-3: Scaling up Inference Acceleration of Large
Language Models via Training-Time Test") for a vision-language target, in the layout vLLM's `Eagle3LlamaForCausalLM`
runs (`export.py` writes it as a speculators `eagle3` checkpoint).

At draft position t the input is the embedding of the token at t+1 and the target's hidden states at t from three
layers (`aux_hidden_state_layer_ids`), fused: `x_t = fc(concat(fc_norm_i(a_t^i)))`, `(3h -> h)`. The first decoder
layer attends over `concat(input_norm(e_{t+1}), hidden_norm(x_t))` (2h-wide q/k/v) with residual `hidden_norm(x_t)`
(or `x_t`), the draft's own `norm` and `lm_head` give the logits, and the pre-norm output `g_t` stands in for `x` at
the next level: the draft never sees the target's states at drafted positions, and training-time test trains it that
way. At `<image>` slots the draft reads the placeholder token's embedding, as engines feed it; the image reaches it
through the target's hidden states at those slots.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm

from ._compat import CACHE_KWARG
from .configuration import SpecVLMEagle3DraftConfig, eagle3_layer_ids
from .drafter import DraftState
from .modeling_draft import IdentityCompressor, SpecVLMDraftModel


class Eagle3DecoderLayer(LlamaDecoderLayer):
    """The first decoder layer of an EAGLE-3 draft: a Llama layer whose q/k/v read `2h` (the normed token embedding
    beside the normed fused state) and whose residual stream starts from the fused state (`hidden_norm`)."""

    def __init__(self, config: SpecVLMEagle3DraftConfig, layer_idx: int = 0):
        super().__init__(config, layer_idx)
        attn, width = self.self_attn, 2 * config.hidden_size
        for name in ("q_proj", "k_proj", "v_proj"):
            old = getattr(attn, name)
            setattr(attn, name, nn.Linear(width, old.out_features, bias=old.bias is not None))
        self.hidden_norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.norm_before_residual = config.norm_before_residual

    def forward(self, inputs_embeds, hidden_states, attention_mask, position_ids, position_embeddings, cache=None):
        """
        Args:
            inputs_embeds, hidden_states (`torch.FloatTensor` of shape `(batch, q_len, hidden_size)`): token
                embeddings of positions t+1 and fused states (or the previous level's outputs) at t.

        Returns:
            `torch.FloatTensor` of shape `(batch, q_len, hidden_size)`: the layer's output residual stream.
        """
        normed = self.hidden_norm(hidden_states)
        residual = normed if self.norm_before_residual else hidden_states
        attended, _ = self.self_attn(
            hidden_states=torch.cat([self.input_layernorm(inputs_embeds), normed], dim=-1),
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=cache is not None,
            position_embeddings=position_embeddings,
            **{CACHE_KWARG: cache},
        )
        hidden_states = residual + attended
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class SpecVLMEagle3DraftModel(SpecVLMDraftModel):
    """
    EAGLE-3 draft for a vision-language target. Borrows the target's token embedding with `bind(target)`; its
    `lm_head` (initialised from the target's by `from_target`), final `norm` and `d2t` vocabulary map are its own.
    Drafts, trains, saves and loads like `SpecVLMDraftModel` (`SpecVLMDraftModel.from_pretrained` of an EAGLE-3
    folder returns this class).
    """

    config_class = SpecVLMEagle3DraftConfig
    _no_split_modules = ["Eagle3DecoderLayer", "LlamaDecoderLayer"]
    visual_embeds = False  # the placeholder's embedding at visual slots, as engines feed it
    predicts_features = False  # its output is its own state, not the target's features

    def _build_layers(self, config: SpecVLMEagle3DraftConfig) -> None:
        h, eps = config.hidden_size, config.rms_norm_eps
        self.fc_norm = nn.ModuleList([LlamaRMSNorm(h, eps=eps) for _ in range(3)]) if config.fc_norm else None
        self.fc = nn.Linear(3 * h, h, bias=False)
        self.layers = nn.ModuleList(
            [Eagle3DecoderLayer(config, 0)]
            + [LlamaDecoderLayer(config, i) for i in range(1, config.num_hidden_layers)]
        )
        self.norm = LlamaRMSNorm(h, eps=eps)
        # `lm_head` is the draft's own here (the base class borrows the target's under that name)
        self._modules["lm_head"] = nn.Linear(h, config.draft_vocab_size, bias=False)
        if config.draft_vocab_size < config.vocab_size:
            self.register_buffer("d2t", torch.zeros(config.draft_vocab_size, dtype=torch.long))
        else:
            self.d2t = None
        self.compressor = IdentityCompressor()

    @property
    def lm_head(self) -> nn.Module:
        return self._modules["lm_head"]

    @classmethod
    def _target_fields(cls, adapter) -> dict:
        return {"aux_hidden_state_layer_ids": eagle3_layer_ids(adapter.text_config.num_hidden_layers)}

    def _init_from_target(self, adapter) -> None:
        """The draft's `lm_head` starts as the target's (its rows for the draft vocabulary)."""
        with torch.no_grad():
            self.lm_head.weight.copy_(adapter.lm_head.weight[self.draft_token_ids()].to(self.lm_head.weight))

    def _misfits(self, adapter) -> list[str]:
        layers = adapter.text_config.num_hidden_layers
        ids = self.config.aux_hidden_state_layer_ids or []
        if len(ids) != 3 or any(not 0 <= i < layers for i in ids):
            return [f"aux_hidden_state_layer_ids {ids} are not three of the target's layers 0..{layers - 1}"]
        return []

    def draft_token_ids(self) -> torch.Tensor:
        """`(draft_vocab_size,)`: the target id of each draft token (`arange + d2t`)."""
        ids = torch.arange(self.config.draft_vocab_size, device=self.lm_head.weight.device)
        return ids if self.d2t is None else ids + self.d2t

    def set_draft_vocab(self, token_ids: torch.Tensor, target_lm_head: nn.Module) -> None:
        """Makes the `draft_vocab_size` target ids `token_ids` (sorted) the draft's vocabulary: `d2t` maps them, and
        the `lm_head` rows start as `target_lm_head`'s."""
        token_ids = torch.as_tensor(token_ids).sort().values.to(self.lm_head.weight.device)
        if self.d2t is None or token_ids.shape != self.d2t.shape or token_ids.unique().numel() != token_ids.numel():
            raise ValueError(
                f"A draft vocabulary is {self.config.draft_vocab_size} distinct target ids of a draft whose "
                f"draft_vocab_size is below vocab_size; got {tuple(token_ids.shape)}."
            )
        with torch.no_grad():
            self.d2t.copy_(token_ids - torch.arange(token_ids.numel(), device=token_ids.device))
            self.lm_head.weight.copy_(target_lm_head.weight[token_ids].to(self.lm_head.weight))

    # ----------------------------------------------------------------------------------------------- drafting
    @property
    def feature_layers(self) -> tuple[int, ...]:
        return tuple(self.config.aux_hidden_state_layer_ids)

    def prompt_input(self, state: DraftState) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The prompt's token embeddings (the placeholder's at visual slots), fused target states and positions."""
        n = state.features.shape[1]
        return self.embed_tokens(state.input_ids[:, -n:]), state.features, state.position_ids

    def describe_prompt(self, state: DraftState, embeds: torch.Tensor) -> dict:
        return {"compressor_branch": None, "draft_visual_tokens": int(state.image_mask.sum())}

    # ----------------------------------------------------------------------------------------------- compute
    def fuse(self, features: torch.Tensor) -> torch.Tensor:
        """`fc(concat(fc_norm_i(a^i)))`: `(..., 3 * hidden_size) -> (..., hidden_size)`."""
        parts = features.to(self.fc.weight.dtype).chunk(3, dim=-1)
        if self.fc_norm is not None:
            parts = [norm(part) for norm, part in zip(self.fc_norm, parts)]
        return self.fc(torch.cat(parts, dim=-1))

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        features: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache=None,
    ) -> torch.Tensor:
        """
        The draft's pre-norm output, which `compute_logits` reads and the next level takes as its `features`.

        Args:
            inputs_embeds (`torch.FloatTensor` of shape `(batch, q_len, hidden_size)`): token embeddings of the
                tokens at positions t+1.
            features (`torch.FloatTensor` of shape `(batch, q_len, 3 * hidden_size)` or `(batch, q_len,
                hidden_size)`): the target's hidden states at t from the three layers (`feature_layers`,
                concatenated), or the draft's own output for t (drafted positions).
            position_ids, attention_mask, cache: as in `SpecVLMDraftModel.forward`.

        Returns:
            `torch.FloatTensor` of shape `(batch, q_len, hidden_size)`.
        """
        h = self.config.hidden_size
        hidden = self.fuse(features) if features.shape[-1] != h else features.to(inputs_embeds.dtype)
        first = partial(self.layers[0], inputs_embeds)
        return self._decode(hidden, self.layers[1:], position_ids, attention_mask, cache, first=first)

    def training_logits(self, hidden: torch.Tensor, target_logits: torch.Tensor):
        """The draft's logits over its own vocabulary, and the target's restricted to it (renormalised by the loss's
        softmax): `(n, draft_vocab_size)` each."""
        logits = self.lm_head(self.norm(hidden))
        return logits, target_logits if self.d2t is None else target_logits[..., self.draft_token_ids()]

    def compute_logits(self, hidden: torch.Tensor, head=None) -> torch.Tensor:
        """`lm_head(norm(hidden))` over the target's vocabulary: `(..., hidden_size) -> (..., vocab_size)`; tokens
        outside the draft vocabulary get `-inf`. `head`, if given, runs in place of the `lm_head`."""
        logits = (head or self.lm_head)(self.norm(hidden))
        if self.d2t is None:
            return logits
        full = logits.new_full((*logits.shape[:-1], self.config.vocab_size), float("-inf"))
        full[..., self.draft_token_ids()] = logits
        return full
