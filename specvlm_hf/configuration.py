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
        parallel_depth (`int`, defaults to 1): parallel drafting (P-EAGLE): above 1, the draft drafts depths 2 to
            `parallel_depth` of a tree in one forward, each from a mask entry (learned `mask_embeds` and
            `mask_features` in place of a token's embedding and feature) that reads the committed context and the
            mask entries before it; 1: one forward per depth (EAGLE-2).
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
        parallel_depth: int = 1,
        **kwargs,
    ):
        if parallel_depth < 1:
            raise ValueError(f"parallel_depth must be >= 1 (1: no parallel drafting), got {parallel_depth}")
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
        self.parallel_depth = parallel_depth
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)


class SpecVLMEagle3DraftConfig(SpecVLMDraftConfig):
    r"""
    Architecture of an EAGLE-3 draft (Li et al. 2025) for a vision-language target: the layout vLLM's
    `Eagle3LlamaForCausalLM` loads from a speculators `eagle3` config.

    At draft position t the draft reads the target's hidden states at t from three of its layers (low, middle, high:
    `aux_hidden_state_layer_ids`), each RMS-normed (`fc_norm`) and fused by `fc: Linear(3h -> h)` without bias, and
    the embedding of the token at t+1. Its first decoder layer attends over `concat(input_norm(embedding),
    hidden_norm(fused))` (q/k/v read `2h`), a final `norm` and the draft's own `lm_head` (over `draft_vocab_size`
    tokens, mapped to the target's ids by `d2t`) give the next-token logits, and the pre-norm output feeds the next
    level in place of the fused target states. The token embedding is the target's, borrowed as for EAGLE-2-style
    drafts. At `<image>` slots the draft reads the placeholder token's embedding, as serving engines feed EAGLE-3 drafts
    of VLM targets: it sees the image through the target's hidden states there.

    Args (besides `SpecVLMDraftConfig`'s, where `fc_bias` must be `False` and `compressor` `None`):
        aux_hidden_state_layer_ids (`list[int]`, set by `from_target` to `eagle3_layer_ids(L)` for a target of `L`
            layers, EAGLE-3's `[2, L // 2, L - 3]` from 8 layers): the target layers whose input
            hidden states (transformers' `hidden_states[i]`, vLLM's aux layer `i`) the draft fuses; `0 <= i < L`.
        draft_vocab_size (`int`, *optional*): rows of the draft's `lm_head`; the target's vocabulary when unset. A
            smaller draft vocabulary keeps the tokens in the `d2t` buffer (`d2t[i]` = target id of draft token `i`
            minus `i`, the engines' convention).
        norm_before_residual (`bool`, defaults to `True`): the first layer's residual is the normed fused state
            (speculators' default for `eagle3`), else the fused state itself.
        fc_norm (`bool`, defaults to `True`): RMSNorm each of the three target states before `fc` (their scales
            differ by layer).
    """

    model_type = "specvlm_eagle3_draft"

    def __init__(
        self,
        aux_hidden_state_layer_ids: list[int] | None = None,
        draft_vocab_size: int | None = None,
        norm_before_residual: bool = True,
        fc_norm: bool = True,
        **kwargs,
    ):
        kwargs.setdefault("fc_bias", False)
        super().__init__(**kwargs)
        if self.fc_bias:
            raise ValueError("An EAGLE-3 draft's fc has no bias (the engines' layout); fc_bias must be False.")
        if self.compressor:
            raise ValueError(
                "An EAGLE-3 draft sees the image through the target's hidden states at the image slots and takes no "
                "visual compressor; train an EAGLE-2-style SpecVLMDraftModel for the elastic compressor."
            )
        if self.parallel_depth > 1:
            raise ValueError(
                "Parallel drafting (parallel_depth > 1) is built for EAGLE-2-style drafts; an EAGLE-3 draft drafts "
                "one depth per forward (parallel_depth=1)."
            )
        ids = list(aux_hidden_state_layer_ids or [])
        if aux_hidden_state_layer_ids is not None and (
            len(ids) != 3 or any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in ids)
        ):
            raise ValueError(f"aux_hidden_state_layer_ids must be three layer indices >= 0, got {ids!r}")
        self.aux_hidden_state_layer_ids = ids or None
        if draft_vocab_size is not None and not 1 <= draft_vocab_size <= self.vocab_size:
            raise ValueError(f"draft_vocab_size must be in [1, vocab_size={self.vocab_size}], got {draft_vocab_size}")
        self.draft_vocab_size = draft_vocab_size or self.vocab_size
        self.norm_before_residual = norm_before_residual
        self.fc_norm = fc_norm


def eagle3_layer_ids(num_layers: int) -> list[int]:
    """EAGLE-3's low, middle and high target layers for a target of `num_layers` layers: `[2, L // 2, L - 3]` (vLLM's
    default) from 8 layers; `[1, L // 2, L - 1]` from 4; `[0, L // 2, L - 1]` below (a layer may repeat)."""
    if num_layers >= 8:
        return [2, num_layers // 2, num_layers - 3]
    return [1 if num_layers >= 4 else 0, num_layers // 2, num_layers - 1]


# EAGLE-2's tree, used for any knob left unset when others are set.
EAGLE2_TREE = {"depth": 5, "top_k": 8, "total_tokens": 32}
DRAFT_NUMERICS = ("auto", "reference", "onednn", "onednn-bf16", "int8")  # `draft_step.NUMERICS` and auto


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
        draft_numerics (`str`, defaults to `"auto"`): the kernels of the draft's linear maps (`draft_step.NUMERICS`):
            `"reference"` (its modules' own float arithmetic), `"onednn"` (weights prepacked for oneDNN, CPU) or
            `"onednn-bf16"` (the same in bfloat16, on CPUs with bf16 instructions) or `"int8"` (weight-only int8 for a
            tree level's few rows, on CPUs with bf16 instructions); `"auto"` takes the fastest
            measured on this device (`tuning.device_costs`). The target's verification alone decides the output, so
            the numerics change the speed and what the draft proposes, never the output.
    """

    depth: int | None = field(default=None, metadata={"help": "Draft levels below the root (auto when unset)."})
    top_k: int | None = field(default=None, metadata={"help": "Children per expanded node (auto when unset)."})
    total_tokens: int | None = field(
        default=None, metadata={"help": "Tree tokens verified per target forward, root included (auto when unset)."}
    )
    profile: bool = field(default=False, metadata={"help": "Time target and draft forwards apart (syncs CUDA)."})
    draft_numerics: str = field(
        default="auto", metadata={"help": "The draft's kernels: auto, reference, onednn, onednn-bf16 or int8."}
    )

    def __post_init__(self):
        for name, low in (("depth", 1), ("top_k", 1), ("total_tokens", 2)):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
                raise ValueError(f"SpeculativeConfig.{name} must be an integer >= {low}, got {value!r}")
        if self.draft_numerics not in DRAFT_NUMERICS:
            raise ValueError(
                f"SpeculativeConfig.draft_numerics must be one of {', '.join(DRAFT_NUMERICS)}, got {self.draft_numerics!r}"
            )

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
