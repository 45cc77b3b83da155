"""Configurations: what a draft *is* (`SpecVLMDraftConfig`, saved with its weights) and how it *drafts*
(`SpeculativeConfig`, runtime knobs that never enter a checkpoint). Knob names follow EAGLE-2 / SpecVLM §1.3."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from transformers import PretrainedConfig


class SpecVLMDraftConfig(PretrainedConfig):
    r"""
    Architecture of an EAGLE-style draft head for a vision-language target (SpecVLM's EagleVLM, paper §3.3).

    The draft fuses `concat(embedding of token t+1, target feature at t)` through `fc: Linear(2h -> h)` and runs
    `num_hidden_layers` Llama decoder layers (with input RMSNorm, SpecVLM's one change to EAGLE). The target's token
    embedding and `lm_head` are borrowed at run time and never stored here. The attention fields mirror the target's
    text config so the decoder layer is a stock `LlamaDecoderLayer`.

    Args:
        hidden_size (`int`, defaults to 4096): width of the target's text model (`h`).
        intermediate_size (`int`, defaults to 11008): MLP width of the draft's decoder layer.
        num_hidden_layers (`int`, defaults to 1): decoder layers in the draft (the paper uses one).
        num_attention_heads (`int`, defaults to 32), num_key_value_heads (`int`, *optional*), head_dim (`int`,
            *optional*): attention shape of the draft's layer.
        vocab_size (`int`, defaults to 32064): the target's vocabulary size; checked when binding to a target.
        rms_norm_eps (`float`, defaults to 1e-6), hidden_act (`str`, defaults to `"silu"`), attention_bias (`bool`),
            attention_dropout (`float`), mlp_bias (`bool`), max_position_embeddings (`int`), rope_parameters (`dict`):
            as in `LlamaConfig`; copied from the target by `SpecVLMDraftModel.from_target`.
        fc_bias (`bool`, defaults to `True`): bias of the fusion layer (EAGLE uses one).
        target_model_type (`str`, defaults to `"llava"`): `model_type` of the target this draft was made for.
        image_token_id (`int`, *optional*): the target's image placeholder id (informational, checked on bind).
        compressor (`dict`, *optional*): the `SpecVLMCompressorConfig` fields (`record()`) of the elastic visual compressor
            this draft was trained with; its weights are saved with the draft's. `None`: the draft sees every visual
            token (EagleVLM).
    """

    model_type = "specvlm_draft"

    def __init__(
        self,
        hidden_size: int = 4096,
        intermediate_size: int = 11008,
        num_hidden_layers: int = 1,
        num_attention_heads: int = 32,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        vocab_size: int = 32064,
        rms_norm_eps: float = 1e-6,
        hidden_act: str = "silu",
        attention_bias: bool = False,
        attention_dropout: float = 0.0,
        mlp_bias: bool = False,
        max_position_embeddings: int = 4096,
        rope_parameters: dict | None = None,
        initializer_range: float = 0.02,
        fc_bias: bool = True,
        target_model_type: str = "llava",
        image_token_id: int | None = None,
        compressor: dict | None = None,
        **kwargs,
    ):
        if hidden_size % num_attention_heads != 0 and head_dim is None:
            raise ValueError(
                f"hidden_size={hidden_size} is not a multiple of num_attention_heads={num_attention_heads}"
            )
        if num_hidden_layers < 1:
            raise ValueError(f"num_hidden_layers must be >= 1, got {num_hidden_layers}")
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.vocab_size = vocab_size
        self.rms_norm_eps = rms_norm_eps
        self.hidden_act = hidden_act
        self.attention_bias = attention_bias
        self.attention_dropout = attention_dropout
        self.mlp_bias = mlp_bias
        self.max_position_embeddings = max_position_embeddings
        self.rope_parameters = dict(rope_parameters or {"rope_type": "default", "rope_theta": 10000.0})
        self.initializer_range = initializer_range
        self.fc_bias = fc_bias
        self.target_model_type = target_model_type
        self.image_token_id = image_token_id
        self.compressor = compressor.record() if isinstance(compressor, PretrainedConfig) else compressor
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)


# EAGLE-2's tree, used for any knob left unset when others are set.
EAGLE2_TREE = {"depth": 5, "top_k": 8, "total_tokens": 32}


@dataclass(frozen=True)
class SpeculativeConfig:
    """
    Runtime knobs of the EAGLE-2 dynamic draft tree. Not part of any checkpoint: the same draft can draft a chain on a
    CPU and a wide tree on a GPU.

    With no tree knob set (the default) the tree is **auto**: `tuning.TreeTuner` picks depth and width every step from
    the costs measured on this device and the acceptance so far. Setting any knob fixes the tree; knobs left unset
    then take EAGLE-2's values (depth 5, top_k 8, total_tokens 32).

    Args:
        depth (`int`, *optional*): draft levels below the root, i.e. the most draft tokens one step can accept
            (a step emits at most `depth + 1` tokens with the target's bonus token). Costs `depth` draft forwards.
        top_k (`int`, *optional*): children proposed per expanded node, and nodes expanded per level.
            `top_k=1` drafts a chain.
        total_tokens (`int`, *optional*): tree size sent to the target in one verification forward, root
            included. The best `total_tokens - 1` drafted nodes by cumulative draft log-probability are kept.
        profile (`bool`, defaults to `False`): record time spent in target and draft forwards (`SpeculativeStats`);
            synchronises CUDA around each phase, so leave it off outside benchmarks.
    """

    depth: int | None = field(default=None, metadata={"help": "Draft levels below the root (auto when unset)."})
    top_k: int | None = field(default=None, metadata={"help": "Children per expanded node (auto when unset)."})
    total_tokens: int | None = field(
        default=None, metadata={"help": "Tree tokens verified per target forward, root included (auto when unset)."}
    )
    profile: bool = field(default=False, metadata={"help": "Time target and draft forwards apart (syncs CUDA)."})

    def __post_init__(self):
        for name, low in (("depth", 1), ("top_k", 1), ("total_tokens", 2)):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
                raise ValueError(f"SpeculativeConfig.{name} must be an integer >= {low}, got {value!r}")

    @property
    def is_auto(self) -> bool:
        """True when no tree knob is set: the tree is chosen per step by `tuning.TreeTuner`."""
        return self.depth is None and self.top_k is None and self.total_tokens is None

    def fixed(self) -> SpeculativeConfig:
        """This config with unset knobs at EAGLE-2's values (for a config with some knobs set)."""
        return replace(self, **{k: v for k, v in EAGLE2_TREE.items() if getattr(self, k) is None})

    @property
    def max_nodes(self) -> int:
        """Nodes the drafter scores before reranking: `top_k` at level 1, `top_k**2` at each deeper level (of the
        fixed tree, `fixed()`; an auto tree's shape changes per step)."""
        tree = self.fixed()
        return tree.top_k + (tree.depth - 1) * tree.top_k**2

    def with_overrides(self, **overrides) -> SpeculativeConfig:
        """A copy with the non-`None` overrides applied (and validated)."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})
