"""`SpecVLMDraftModel`: the EAGLE-style draft head of SpecVLM (EagleVLM, paper §3.3).

At draft position t the input is `concat(e_{t+1}, f_t)`: `e_{t+1}` is what the target's text model consumed at
position t+1 (the token embedding, or at an `<image>` slot the projected visual token), and `f_t` is the target's
feature at t (its post-norm last hidden state, the input of `lm_head`). `fc: Linear(2h -> h)` fuses them, one Llama
decoder layer (with input RMSNorm, SpecVLM's change to EAGLE) predicts `f_{t+1}`, and the target's own `lm_head` turns
it into next-token logits. Pairing visual tokens with the target's features at the image positions lets the draft see
the image directly, not only through the target's text features. The visual part of the draft's prefill passes
through `self.compressor`: the identity (EagleVLM), or the elastic visual compressor (`compressor.py`, SpecVLM) the
draft was trained with, named in its config and saved with its weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from ._compat import CACHE_KWARG
from .adapters import get_adapter
from .compressor import SpecVLMCompressor, SpecVLMCompressorConfig
from .configuration import SpeculativeConfig, SpecVLMDraftConfig
from .drafter import DraftSource, DraftState, TreeDrafter, TreeDraftSpec, tree_knobs
from .peft_wrappers import unwrap_peft
from .tree import causal_attention_mask
from .tuning import MAX_DEPTH, TreeTuner, device_costs

# `from_pretrained` keywords that also locate the config
_CONFIG_KWARGS = ("revision", "cache_dir", "force_download", "local_files_only", "token", "subfolder")


class IdentityCompressor(nn.Module):
    """The draft's visual input, uncompressed (EagleVLM): every visual token of the target enters the draft's cache.
    Same signature as `SpecVLMCompressor.forward`."""

    def forward(self, inputs_embeds, features, position_ids, image_mask):
        return inputs_embeds, features, position_ids


class SpecVLMDraftModel(PreTrainedModel, DraftSource):
    """
    EAGLE-style draft for a vision-language target. Borrow the target's token embedding and `lm_head` with
    `bind(target)` (done by `from_target` and `from_pretrained(..., target=target)`); they are never saved.
    """

    config_class = SpecVLMDraftConfig
    base_model_prefix = "draft"
    main_input_name = "inputs_embeds"
    _no_split_modules = ["LlamaDecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = False

    def __init__(self, config: SpecVLMDraftConfig):
        super().__init__(config)
        self._build_layers(config)
        self.rotary_emb = LlamaRotaryEmbedding(config)
        # Drafting knobs are runtime state, not architecture: never saved with the weights.
        self.speculative_config = SpeculativeConfig()
        self._borrowed: tuple[nn.Module, ...] | None = None  # (target, embed_tokens, lm_head), not registered
        self._tuners: dict[tuple, TreeTuner] = {}  # auto tree controllers by (device, dtype, do_sample, rows, numerics)
        self._auto_numerics: dict[tuple, str] = {}  # what draft_numerics="auto" means, by (device, dtype, rows)
        self.post_init()

    def _build_layers(self, config: SpecVLMDraftConfig) -> None:
        """The draft's own modules: `fc`, the decoder `layers`, the visual `compressor` and, for parallel drafting,
        the mask entry's inputs."""
        self.fc = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=config.fc_bias)
        self.layers = nn.ModuleList([LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.compressor = (
            SpecVLMCompressor(SpecVLMCompressorConfig(**config.compressor))
            if config.compressor
            else IdentityCompressor()
        )
        if config.parallel_depth > 1:
            self._add_mask_inputs()

    def _add_mask_inputs(self) -> None:
        """`mask_embeds` and `mask_features` (`(hidden_size,)` each): what a parallel draft reads at a mask entry in
        place of a token's embedding and the target's feature; `_init_mask_inputs` draws them."""
        weight = self.fc.weight
        for name in ("mask_embeds", "mask_features"):
            values = torch.empty(self.config.hidden_size, device=weight.device, dtype=weight.dtype)
            setattr(self, name, nn.Parameter(values))

    def _init_mask_inputs(self) -> None:
        """Draws the mask inputs as the other weights are drawn."""
        for parameter in (self.mask_embeds, self.mask_features):
            nn.init.normal_(parameter, std=self.config.initializer_range)

    def enable_parallel_drafting(self, depth: int) -> SpecVLMDraftModel:
        """Makes this draft draft depths 2 to `depth` in one forward (`SpecVLMDraftConfig.parallel_depth`), adding
        fresh mask inputs if it has none: they mean nothing until trained (`specvlm-hf train --parallel-depth`).
        Returns `self`."""
        if depth < 2:
            raise ValueError(f"parallel drafting drafts at least depth 2 in one forward; got depth {depth}")
        if self.feature_layers is not None:
            raise ValueError("Parallel drafting is built for EAGLE-2-style drafts, not EAGLE-3 drafts.")
        if not hasattr(self, "mask_embeds"):
            self._add_mask_inputs()
            self._init_mask_inputs()
        self.config.parallel_depth = depth
        self._tuners = {}
        return self

    def _init_weights(self, module) -> None:
        super()._init_weights(module)
        if module is self and hasattr(self, "mask_embeds"):
            self._init_mask_inputs()

    @classmethod
    def _family(cls, config) -> type[SpecVLMDraftModel]:
        """The model class of a draft config: EAGLE-3 configs load as `SpecVLMEagle3DraftModel`."""
        from .modeling_eagle3 import SpecVLMEagle3DraftModel

        eagle3 = config.model_type == SpecVLMEagle3DraftModel.config_class.model_type
        return SpecVLMEagle3DraftModel if eagle3 else SpecVLMDraftModel

    # ----------------------------------------------------------------------------------------------- binding
    @property
    def is_bound(self) -> bool:
        return self._borrowed is not None

    @property
    def target(self) -> nn.Module:
        return self._require_bound()[0]

    @property
    def embed_tokens(self) -> nn.Module:
        return self._require_bound()[1]

    @property
    def lm_head(self) -> nn.Module:
        return self._require_bound()[2]

    def _require_bound(self) -> tuple[nn.Module, ...]:
        if self._borrowed is None:
            raise RuntimeError(
                "This draft is not bound to a target: call `draft.bind(target)` or load it with "
                "`SpecVLMDraftModel.from_pretrained(path, target=target)`."
            )
        return self._borrowed

    def bind(self, target: nn.Module) -> SpecVLMDraftModel:
        """
        Borrows `target`'s token embedding and `lm_head` (frozen, not saved) after checking that this draft was made
        for it, and moves the draft to the target's device and dtype. A peft-wrapped target binds as the model inside
        the wrapper, which is what `generate()` decodes with (`adapters.unwrap_peft`). Returns `self`.
        """
        target = unwrap_peft(target)
        adapter = get_adapter(target)
        text_config = adapter.text_config
        problems = []
        if target.config.model_type != self.config.target_model_type:
            problems.append(f"model_type {target.config.model_type!r} != draft's {self.config.target_model_type!r}")
        if text_config.hidden_size != self.config.hidden_size:
            problems.append(f"hidden_size {text_config.hidden_size} != draft's {self.config.hidden_size}")
        if adapter.lm_head.weight.shape[0] != self.config.vocab_size:
            problems.append(f"vocabulary {adapter.lm_head.weight.shape[0]} != draft's {self.config.vocab_size}")
        if self.config.image_token_id is not None and adapter.image_token_id != self.config.image_token_id:
            problems.append(f"image_token_id {adapter.image_token_id} != draft's {self.config.image_token_id}")
        problems += self._misfits(adapter)
        if problems:
            raise ValueError("This draft does not fit the target: " + "; ".join(problems) + ".")
        if isinstance(self.compressor, SpecVLMCompressor):
            self.compressor.check_fits(self.config.hidden_size, adapter.patch_grid())
        self._borrowed = (target, adapter.embed_tokens, adapter.lm_head)
        self._tuners, self._auto_numerics = {}, {}
        self.to(device=adapter.lm_head.weight.device, dtype=adapter.lm_head.weight.dtype)
        return self

    def _misfits(self, adapter) -> list[str]:
        """What else makes the target unfit for this draft family, in words (none for EAGLE-2-style drafts)."""
        return []

    def set_compressor(self, compressor: SpecVLMCompressor | None) -> SpecVLMDraftModel:
        """Makes `compressor` (`None`: none, EagleVLM) this draft's visual input; it is then recorded in the draft's
        config and saved with its weights. Checked against the bound target's patch grid. Returns `self`."""
        if compressor is None:
            self.compressor, self.config.compressor = IdentityCompressor(), None
            return self
        grid = get_adapter(self.target).patch_grid() if self.is_bound else None
        compressor.check_fits(self.config.hidden_size, grid)
        weight = self.fc.weight
        self.compressor = compressor.to(device=weight.device, dtype=weight.dtype)
        self.config.compressor = compressor.config.record()
        return self

    @classmethod
    def from_target(cls, target: nn.Module, **overrides) -> SpecVLMDraftModel:
        """A freshly initialised draft sized from `target`'s text model and bound to it. `overrides` set config fields."""
        adapter = get_adapter(target)
        text = adapter.text_config
        fields = dict(
            **adapter.decoder_shape(),
            hidden_act=text.hidden_act,
            attention_bias=getattr(text, "attention_bias", False),
            mlp_bias=getattr(text, "mlp_bias", False),
            target_model_type=target.config.model_type,
            image_token_id=adapter.image_token_id,
        )
        fields.update(cls._target_fields(adapter))
        fields.update(overrides)
        draft = cls(cls.config_class(**fields))
        draft._init_from_target(adapter)
        return draft.bind(target)

    @classmethod
    def _target_fields(cls, adapter) -> dict:
        """Config fields of a fresh draft of this family that depend on the target (none here)."""
        return {}

    def _init_from_target(self, adapter) -> None:
        """Initialises the draft's weights that start as a copy of the target's (none here: embedding and `lm_head`
        are borrowed)."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, target: nn.Module | None = None, **kwargs):
        """`PreTrainedModel.from_pretrained`, then `bind(target)` when a target is given. A local folder holding a LoRA
        adapter of a draft (`specvlm-hf train --lora`) loads as its base draft with the adapter merged
        (`lora.load_lora_draft`: `base_draft=` overrides the base it names; other keywords load the base)."""
        from .lora import LORA_RECORD, load_lora_draft

        if (Path(str(pretrained_model_name_or_path)) / LORA_RECORD).exists():
            if args:
                raise TypeError(
                    "A LoRA adapter folder loads with keyword arguments only (base_draft=, revision=, ...)."
                )
            return load_lora_draft(pretrained_model_name_or_path, target, **kwargs)
        config = kwargs.get("config")
        if not isinstance(config, PretrainedConfig):
            config = AutoConfig.from_pretrained(
                pretrained_model_name_or_path, **{k: v for k, v in kwargs.items() if k in _CONFIG_KWARGS}
            )
        family = cls._family(config)
        if family is not cls and issubclass(family, cls):  # SpecVLMDraftModel.from_pretrained of an EAGLE-3 draft
            return family.from_pretrained(
                pretrained_model_name_or_path, *args, target=target, **{**kwargs, "config": config}
            )
        if not issubclass(family, cls):
            raise ValueError(
                f"{pretrained_model_name_or_path} holds a {config.model_type!r} draft; load it with "
                "SpecVLMDraftModel.from_pretrained."
            )
        draft = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        return draft.bind(target) if target is not None else draft

    # ----------------------------------------------------------------------------------------------- drafting
    # The draft reads the target's input embeddings, visual tokens at `<image>` slots (EagleVLM); `False`: the
    # token embeddings there (the placeholder's), as engines feed EAGLE-3 drafts.
    visual_embeds = True
    # The draft's output predicts the target's next features (EAGLE's feature regression applies).
    predicts_features = True

    @property
    def feature_layers(self) -> tuple[int, ...] | None:
        """The target layers whose hidden states the draft reads (`None`: the target's features, the `lm_head`
        input)."""
        return None

    def prompt_input(self, state: DraftState) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        What the draft reads of the prompt: `state`'s embeddings, features and positions through the draft's visual
        compressor (the identity for EagleVLM), each `(1, n', ...)` with `n' <= n` entries.

        Args:
            state (`DraftState`): the state after prefill, with its `image_mask`.
        """
        return self.compressor(state.inputs_embeds, state.features, state.position_ids, state.image_mask)

    def describe_prompt(self, state: DraftState, embeds: torch.Tensor) -> dict:
        """`SpeculativeStats` fields on what the draft saw of the prompt (`embeds` from `prompt_input`)."""
        text = int((~state.image_mask).sum())
        return {
            "compressor_branch": getattr(self.compressor, "last_branch", None),
            "draft_visual_tokens": embeds.shape[1] - text,
        }

    def with_tree(self, **knobs) -> TreeDraftSpec:
        """This draft with other tree knobs (`depth`, `tree_top_k`, `total_tokens`), `profile` or `draft_numerics`,
        for `generate(assistant_model=...)`. Any tree knob set fixes the tree; `speculative_config` is auto by default
        (`tuning.py`)."""
        return TreeDraftSpec(self, self.speculative_config.with_overrides(**tree_knobs(knobs)))

    def new_drafter(self, target: nn.Module, speculative_config: SpeculativeConfig | None = None) -> TreeDrafter:
        if self.target is not unwrap_peft(target):
            raise ValueError(
                "This draft is bound to another target model; bind it to this one with `draft.bind(target)`."
            )
        return TreeDrafter(self, speculative_config or self.speculative_config)

    def tree_tuner(self, adapter, do_sample: bool, prompt_len: int, rows: int = 1, numerics: str = "auto") -> TreeTuner:
        """The auto tree's controller for the bound target in this decoding mode, batch size and draft numerics (`auto`:
        the one the costs chose), kept across calls; the device's costs for that batch size are measured on first use
        (`tuning.device_costs`)."""
        numerics = self.auto_numerics(adapter, prompt_len, rows) if numerics == "auto" else numerics
        weight = self.fc.weight
        key = (weight.device, weight.dtype, bool(do_sample), rows, numerics)
        if key not in self._tuners:
            costs = device_costs(adapter, self, prompt_len, rows).with_numerics(numerics)
            depth = self.config.parallel_depth
            parallel = {"parallel": True, "max_depth": min(depth, MAX_DEPTH)} if depth > 1 else {}
            self._tuners[key] = TreeTuner(costs, **parallel)
        return self._tuners[key]

    def auto_numerics(self, adapter, prompt_len: int, rows: int = 1) -> str:
        """The draft numerics `"auto"` means for the bound target on this device and batch size: the choice of
        `tuning.device_costs`, kept across calls (the costs' lookup hashes both configs)."""
        weight = self.fc.weight
        key = (weight.device, weight.dtype, rows)
        if key not in self._auto_numerics:
            self._auto_numerics[key] = device_costs(adapter, self, prompt_len, rows).numerics
        return self._auto_numerics[key]

    # ----------------------------------------------------------------------------------------------- compute
    def forward(
        self,
        inputs_embeds: torch.Tensor,
        features: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache=None,
    ) -> torch.Tensor:
        """
        Predicts the target's next features.

        Args:
            inputs_embeds (`torch.FloatTensor` of shape `(batch, q_len, hidden_size)`): target input embeddings of the
                tokens at positions t+1.
            features (`torch.FloatTensor` of shape `(batch, q_len, hidden_size)`): target features at positions t.
            position_ids (`torch.LongTensor` of shape `(batch, q_len)`): positions t.
            attention_mask (`torch.FloatTensor` of shape `(1, 1, q_len, past_len + q_len)`, *optional*): additive
                mask; causal over the cache and the new positions when omitted.
            cache (`transformers.DynamicCache`, *optional*): the draft's own cache, extended in place.

        Returns:
            `torch.FloatTensor` of shape `(batch, q_len, hidden_size)`: predicted features at positions t+1.
        """
        hidden = self.fc(torch.cat([inputs_embeds, features.to(inputs_embeds.dtype)], dim=-1))
        return self._decode(hidden, self.layers, position_ids, attention_mask, cache)

    def _decode(self, hidden, layers, position_ids, attention_mask, cache, first=None) -> torch.Tensor:
        """Runs Llama decoder `layers` over `hidden` (`(batch, q_len, hidden_size)`), causal over the cache when no
        mask is given; `first(hidden, mask, position_ids, position_embeddings, cache)`, if given, runs before them."""
        if attention_mask is None:
            past_len = cache.get_seq_length() if cache is not None else 0
            attention_mask = causal_attention_mask(hidden.shape[1], past_len, hidden.dtype, hidden.device)
        position_embeddings = self.rotary_emb(hidden, position_ids)
        if first is not None:
            hidden = first(hidden, attention_mask, position_ids, position_embeddings, cache)
        for layer in layers:
            hidden = layer(
                hidden,
                attention_mask=attention_mask,
                position_ids=position_ids,
                position_embeddings=position_embeddings,
                use_cache=cache is not None,
                **{CACHE_KWARG: cache},
            )
            if isinstance(hidden, tuple):  # decoder layers returned tuples before 5.2x
                hidden = hidden[0]
        return hidden

    def compute_logits(self, hidden: torch.Tensor, head=None) -> torch.Tensor:
        """The target's `lm_head` over predicted features: `(..., hidden_size) -> (..., vocab_size)`. `head`, if given,
        runs in place of the `lm_head` (its weights in other kernels: `draft_step.DraftKernels`)."""
        return (head or self.lm_head)(hidden)

    def training_logits(self, hidden: torch.Tensor, target_logits: torch.Tensor):
        """`(draft_logits, target_logits)` over the vocabulary the draft proposes from, for the distillation loss:
        `compute_logits(hidden)` and the target's logits (`(n, vocab_size)` each)."""
        return self.compute_logits(hidden), target_logits
