"""Per-architecture glue between the decoding loop and an unmodified Hugging Face target: how to embed tokens and
images, how to run the text model with a tree mask, and where its features are. No modeling file is forked."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from ._compat import CACHE_KWARG
from .peft_wrappers import unwrap_peft

# Attention kernels that take a float additive 4-D mask (a tree mask). Flash-attention only takes padding masks, and
# flex-attention's tensor-mask path crashed on CPU in testing, so both are refused rather than silently mis-masked.
TREE_MASK_ATTENTION = ("sdpa", "eager")


@dataclass(frozen=True)
class PromptLayout:
    """
    A batch of (left-padded) prompts as the target decodes them: their positions and their visual tokens
    (`adapter.layout`). Everything the loop writes about the target's positions goes through it, so a position scheme
    other than 0, 1, 2, ... (M-RoPE) is the adapter's business alone.

    Attributes:
        positions (`torch.LongTensor`): the prompts' position ids, shaped as the adapter's `forward` takes them:
            `(rows, prompt_len)` for 1-D rotary positions, `(3, rows, prompt_len)` for M-RoPE (Qwen2-VL). A row's
            padding is numbered as `generate()` numbers it.
        offset (`torch.LongTensor`): the position ids of sequence index `s >= prompt_len - 1` (the last prompt token
            and every generated one; padding counts as sequence indices) are `s + offset`, per row and axis; shaped
            `(rows, 1)` or `(3, rows, 1)`, to broadcast against `(rows, n)` indices (or `(n,)` with one row).
        visual_mask (`torch.BoolTensor` of shape `(rows, prompt_len)`): the slots that hold a visual token.
        visual_features (`torch.FloatTensor` of shape `(num_visual_tokens, hidden_size)`, *optional*): the visual
            tokens of every row, in slot order (row by row).
    """

    positions: torch.Tensor
    offset: torch.Tensor
    visual_mask: torch.Tensor
    visual_features: torch.Tensor | None

    def positions_at(self, index: torch.Tensor) -> torch.Tensor:
        """Position ids of sequence indices `index` (`(rows, n)`, or `(n,)` with one row; each `>= prompt_len - 1`),
        shaped like `positions`."""
        return index + self.offset

    def keep_rows(self, rows: torch.Tensor) -> PromptLayout:
        """The layout of rows `rows` (`(n,)` indices) alone; the visual tokens, consumed by the prefill, are left
        out."""
        return PromptLayout(
            positions=self.positions.index_select(-2, rows),
            offset=self.offset.index_select(-2, rows),
            visual_mask=self.visual_mask.index_select(0, rows),
            visual_features=None,
        )

    def continued(self, length: int) -> torch.Tensor:
        """Position ids of sequence indices `0, ..., length - 1` (the prompt, then its continuation), shaped like
        `positions`."""
        prompt_len = self.positions.shape[-1]
        after = torch.arange(prompt_len, max(length, prompt_len), device=self.positions.device)
        return torch.cat([self.positions, self.positions_at(after)], dim=-1)[..., :length]


class LlavaAdapter:
    """
    Glue for `LlavaForConditionalGeneration` (LLaVA-1.5 style: CLIP tower, projector, Llama-family text model).

    The target's *feature* at position t is the text model's final (post-norm) hidden state, the input of `lm_head`.
    """

    model_types = ("llava",)
    # generate() arguments of this architecture beyond the loop's own, all consumed before decoding starts
    model_kwargs: frozenset[str] = frozenset()

    def __init__(self, target: nn.Module):
        self.target = target
        self.language_model = target.model.language_model
        self.image_token_id = target.config.image_token_id

    # Looked up on first use: a call that the auto tree leaves to plain decoding needs none of them.
    @functools.cached_property
    def embed_tokens(self) -> nn.Embedding:
        return self.target.get_input_embeddings()

    @functools.cached_property
    def lm_head(self) -> nn.Linear:
        return self.target.get_output_embeddings()

    @functools.cached_property
    def text_config(self):
        return self.target.config.get_text_config()

    def decoder_shape(self) -> dict:
        """Llama config fields that give a decoder layer the shape of the target's text model's layers, and the
        vocabulary of its `lm_head` (for drafts and assistants that share the target's embedding and head)."""
        text = self.text_config
        return dict(
            hidden_size=text.hidden_size,
            intermediate_size=text.intermediate_size,
            num_attention_heads=text.num_attention_heads,
            num_key_value_heads=getattr(text, "num_key_value_heads", None),
            head_dim=getattr(text, "head_dim", None),
            vocab_size=self.lm_head.weight.shape[0],
            rms_norm_eps=text.rms_norm_eps,
            max_position_embeddings=text.max_position_embeddings,
            rope_parameters=dict(text.rope_parameters),
        )

    def patch_grid(self) -> tuple[int, int] | None:
        """`(H, W)` of one image's visual tokens in the prompt, or `None` when they do not form a grid (the CLS
        token kept by `vision_feature_select_strategy="full"`)."""
        if self.target.config.vision_feature_select_strategy != "default":
            return None
        vision = self.target.config.vision_config
        side = vision.image_size // vision.patch_size
        return side, side

    def check_attention(self) -> None:
        """Raises a `ValueError` unless the text model's attention can be verified with a tree mask: an SDPA or
        eager kernel, and full attention in every layer."""
        implementation = self.language_model.config._attn_implementation
        if implementation not in TREE_MASK_ATTENTION:
            raise ValueError(
                f"The target's text model uses attn_implementation={implementation!r}, which cannot apply a tree "
                f"attention mask. Load the target with attn_implementation in {TREE_MASK_ATTENTION} "
                f"(e.g. `from_pretrained(..., attn_implementation='sdpa')`)."
            )
        text = self.text_config
        layer_types = getattr(text, "layer_types", None)
        if layer_types is None:  # configs without layer_types (Mistral) window every layer when sliding_window is set
            window = getattr(text, "sliding_window", None)
            chunk = getattr(text, "attention_chunk_size", None)
            layer_types = ["sliding_attention" if window is not None else "chunked_attention" if chunk else ""]
        other = sorted(set(layer_types) - {"full_attention", ""})
        if other:
            raise ValueError(
                f"The target's text model has {', '.join(other)} layers (sliding_window="
                f"{getattr(text, 'sliding_window', None)}); tree verification applies full attention, so the output "
                "could differ from plain decoding. Decode this target without assistant_model, or load it with "
                "full attention in every layer (e.g. text_config.sliding_window=None) if its answers fit the window."
            )

    def sequence_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The target's position ids of right-padded sequences `input_ids` (`(batch, seq_len)`), each a prompt
        followed by its continuation, shaped as `forward` takes them: `(batch, seq_len)`, 0, 1, 2, ... per row."""
        return torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)

    def visual_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Where `input_ids` (any shape) hold the target's visual placeholder token."""
        return input_ids == self.image_token_id

    def batch_view(self, input_ids: torch.Tensor, visual_inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """
        The target's input embeddings and position ids of right-padded rows, each a prompt and its continuation (a
        training batch).

        Args:
            input_ids (`torch.LongTensor` of shape `(batch, seq_len)`)
            visual_inputs (`dict`): the processor's other outputs for the batch, images in row order.

        Returns:
            `(inputs_embeds, position_ids)`: `(batch, seq_len, hidden_size)`, and positions as `forward` takes them.
        """
        return self.embed(input_ids, self.image_features(visual_inputs)), self.sequence_positions(input_ids)

    def layout(self, input_ids: torch.Tensor, model_kwargs: dict) -> PromptLayout:
        """
        The prompts `input_ids` (`(rows, prompt_len)`, left-padded) with the arguments `generate()` hands the decoding
        method. Positions are `generate()`'s: 0, 1, 2, ... from each row's first token (`attention_mask`'s cumulative
        sum, padding at 0). A `position_ids` other than that numbering is refused: the loop continues it.
        """
        mask = model_kwargs.get("attention_mask")
        if mask is None:
            positions = self.sequence_positions(input_ids)
        else:
            positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0).to(input_ids.device)
        given = model_kwargs.get("position_ids")
        if given is not None and not torch.equal(given.to(positions.device), positions):
            raise ValueError(
                "Tree speculative decoding numbers the prompt's positions 0, 1, ... from each row's first token; "
                "custom position_ids are not supported (drop them, or drop assistant_model)."
            )
        return PromptLayout(
            positions=positions,
            offset=positions[:, -1:] - (input_ids.shape[1] - 1),
            visual_mask=self.visual_mask(input_ids),
            visual_features=self.image_features(model_kwargs),
        )

    def image_features(self, model_kwargs: dict) -> torch.Tensor | None:
        """Projected visual tokens, shape `(num_image_tokens, hidden_size)`, computed once by `generate()`."""
        encoded = (model_kwargs.get("mm_encoder_outputs") or {}).get("image")
        if encoded is None and model_kwargs.get("pixel_values") is not None:
            encoded = self.target.model.get_image_features(
                pixel_values=model_kwargs["pixel_values"],
                vision_feature_layer=self.target.config.vision_feature_layer,
                vision_feature_select_strategy=self.target.config.vision_feature_select_strategy,
                **self._encoder_inputs(model_kwargs),
            )
        if encoded is None:
            return None
        features = getattr(encoded, "pooler_output", None)
        if features is None:
            features = getattr(encoded, "image_hidden_states", encoded)
        if isinstance(features, (list, tuple)):
            features = torch.cat(list(features), dim=0)
        return features.reshape(-1, features.shape[-1])

    def _encoder_inputs(self, model_kwargs: dict) -> dict:
        """What `get_image_features` needs besides `pixel_values` and the config's feature choice: nothing here."""
        return {}

    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor | None = None) -> torch.Tensor:
        """
        The text model's input: token embeddings with the visual tokens scattered into the `<image>` slots.

        Args:
            input_ids (`torch.LongTensor` of shape `(rows, seq_len)`)
            image_features (`torch.FloatTensor` of shape `(num_image_tokens, hidden_size)`, *optional*): every
                row's visual tokens, row by row.

        Returns:
            `torch.FloatTensor` of shape `(rows, seq_len, hidden_size)`.
        """
        self.check_visual_features(input_ids, image_features)
        embeds = self.embed_tokens(input_ids)
        if image_features is None:
            return embeds
        image_slots = self.visual_mask(input_ids)
        image_features = image_features.to(embeds.device, embeds.dtype)
        return embeds.masked_scatter(image_slots[..., None].expand_as(embeds), image_features)

    def check_visual_features(self, input_ids: torch.Tensor, image_features: torch.Tensor | None) -> None:
        """Raises a `ValueError` unless `image_features` (`(num_image_tokens, hidden_size)` or `None`) fill the
        `<image>` slots of `input_ids` (`(rows, seq_len)`) exactly, as `embed` needs."""
        n_slots = int(self.visual_mask(input_ids).sum())
        if image_features is None:
            if n_slots:
                raise ValueError(f"The prompt has {n_slots} image tokens but no image (pixel_values) was given.")
            return
        if n_slots != image_features.shape[0]:
            raise ValueError(
                f"The prompt has {n_slots} image tokens but the image gives {image_features.shape[0]} features; "
                "build the prompt with the target's processor."
            )

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        cache=None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Runs the text model and returns its features, shape `(batch, q_len, hidden_size)`.

        Args:
            inputs_embeds (`torch.FloatTensor` of shape `(batch, q_len, hidden_size)`)
            position_ids (`torch.LongTensor` of shape `(batch, q_len)`)
            cache (`transformers.Cache`, *optional*): extended in place with the `q_len` new entries.
            attention_mask (`torch.FloatTensor` of shape `(batch or 1, 1, q_len, past_len + q_len)`, *optional*):
                additive mask (0 = attend, dtype min = blocked); or `(batch, past_len + q_len)` with 0 at padding,
                causal otherwise, as `generate()` passes it; `None` = causal.
        """
        return self._run(inputs_embeds, position_ids, cache, attention_mask).last_hidden_state

    def forward_with_layers(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        layers: tuple[int, ...],
        cache=None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        `forward`, also returning the hidden states entering the text model's decoder layers `layers` (layer `i`'s
        input, transformers' `hidden_states[i]` and vLLM's aux hidden state `i`), concatenated. The features are
        those of `forward`: recording the states changes nothing the model computes.

        Returns:
            `(features, states)`: `(batch, q_len, hidden_size)` and `(batch, q_len, len(layers) * hidden_size)`.
        """
        out = self._run(inputs_embeds, position_ids, cache, attention_mask, output_hidden_states=True)
        return out.last_hidden_state, torch.cat([out.hidden_states[i] for i in layers], dim=-1)

    def _run(self, inputs_embeds, position_ids, cache, attention_mask, **flags):
        return self.language_model(
            inputs_embeds=inputs_embeds,
            position_ids=position_ids,
            attention_mask=attention_mask,
            use_cache=cache is not None,
            **{CACHE_KWARG: cache},
            **flags,
        )

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """`lm_head(features)` in float32, shape `(..., vocab_size)`."""
        return self.lm_head(features).float()


class LlavaNextAdapter(LlavaAdapter):
    """
    Glue for `LlavaNextForConditionalGeneration` (AnyRes: each image is a base crop plus a tiling chosen from its
    `image_sizes`, with an `image_newline` token after each row of the tiling, so images have different numbers of
    visual tokens). Positions are 0, 1, 2, ... as for LLaVA-1.5.
    """

    model_types = ("llava_next",)

    def patch_grid(self) -> None:
        """`None`: an AnyRes image is no single patch grid, so no fixed-grid compressor fits."""
        return None

    def _encoder_inputs(self, model_kwargs: dict) -> dict:
        """`image_sizes`, which AnyRes tiling needs with `pixel_values`."""
        if model_kwargs.get("image_sizes") is None:
            raise ValueError(
                "LLaVA-NeXT needs image_sizes with pixel_values (its AnyRes tiling depends on them); pass the "
                "processor's image_sizes."
            )
        return {"image_sizes": model_kwargs["image_sizes"]}


class Qwen2VLAdapter(LlavaAdapter):
    """
    Glue for `Qwen2VLForConditionalGeneration` and `Qwen2_5_VLForConditionalGeneration`: images and videos, 3-axis
    rotary positions (M-RoPE).

    Positions: `generate()` computes the prompt's `(4, 1, L)` position ids once (a text row, then the temporal,
    height and width rows) and gives every later token the previous token's position + 1 on each axis. The loop
    follows that rule through `PromptLayout.offset` (per axis), never `rope_deltas`, which differs from it for
    Qwen2.5-VL videos with `second_per_grid_ts != 1`. The text model takes the three rotary rows, `(3, 1, q)`.
    """

    model_types = ("qwen2_vl", "qwen2_5_vl")
    model_kwargs = frozenset({"mm_token_type_ids", "second_per_grid_ts"})

    def __init__(self, target: nn.Module):
        super().__init__(target)
        self.video_token_id = target.config.video_token_id

    def decoder_shape(self) -> dict:
        shape = super().decoder_shape()  # the draft is a 1-D rotary Llama layer: no M-RoPE sections
        shape["rope_parameters"] = {k: v for k, v in shape["rope_parameters"].items() if k != "mrope_section"}
        return shape

    def patch_grid(self) -> None:
        """`None`: each image has its own grid (`image_grid_thw`), so no fixed-grid compressor fits."""
        return None

    def visual_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        return (input_ids == self.image_token_id) | (input_ids == self.video_token_id)

    def sequence_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Refused: M-RoPE positions depend on the visual grids (`layout`, `batch_view`)."""
        raise ValueError("Qwen2-VL's positions depend on its visual grids: use adapter.layout or adapter.batch_view.")

    def batch_view(self, input_ids: torch.Tensor, visual_inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """As `LlavaAdapter.batch_view`, positions `(3, batch, seq_len)` (`_rope_positions` over the whole rows: a
        prompt's continuation continues every axis by one per token, as generation does)."""
        mask = self.visual_mask(input_ids)
        features = self._visual_features(input_ids.flatten(), mask.flatten(), visual_inputs)
        positions = self._rope_positions(input_ids, visual_inputs, visual_inputs.get("attention_mask"))
        return self.embed(input_ids, features), positions

    def image_features(self, model_kwargs: dict) -> torch.Tensor | None:
        """Refused: Qwen2-VL's visual tokens come with their grids (`layout`, `batch_view`)."""
        raise ValueError("Qwen2-VL's visual tokens need their grids: use adapter.layout or adapter.batch_view.")

    def layout(self, input_ids: torch.Tensor, model_kwargs: dict) -> PromptLayout:
        """
        From what `generate()` hands the decoding method (`position_ids` of shape `(4, 1, L)`, `mm_encoder_outputs`),
        or from the processor's outputs (`mm_token_type_ids`, `pixel_values[_videos]`, `image_grid_thw`,
        `video_grid_thw`, `second_per_grid_ts`) as `generate()` would use them.
        """
        length = input_ids.shape[1]
        positions = model_kwargs.get("position_ids")
        if positions is None:
            positions = self._rope_positions(input_ids, model_kwargs, model_kwargs.get("attention_mask"))
        positions = positions.to(input_ids.device)
        positions = positions[-3:] if positions.dim() == 3 else positions[None].expand(3, -1, -1)
        visual_mask = self.visual_mask(input_ids)
        return PromptLayout(
            positions=positions,
            offset=positions[:, :, -1:] - (length - 1),
            visual_mask=visual_mask,
            visual_features=self._visual_features(input_ids.flatten(), visual_mask.flatten(), model_kwargs),
        )

    def _rope_positions(self, input_ids: torch.Tensor, inputs: dict, attention_mask=None) -> torch.Tensor:
        """`(3, batch, seq_len)` as `generate()` computes them: the model's `get_rope_index` when the rows come with
        `mm_token_type_ids` and a visual grid, else 0, 1, 2, ... on every axis (its default without them)."""
        grids = {key: inputs.get(key) for key in ("image_grid_thw", "video_grid_thw")}
        types = inputs.get("mm_token_type_ids")
        if types is None or all(grid is None for grid in grids.values()):
            return torch.arange(input_ids.shape[1], device=input_ids.device).expand(3, *input_ids.shape)
        seconds = inputs.get("second_per_grid_ts")
        extra = {} if seconds is None else {"second_per_grid_ts": seconds}
        positions, _ = self.target.model.get_rope_index(
            input_ids, types, attention_mask=attention_mask, **grids, **extra
        )
        return positions

    def _visual_features(self, input_ids, visual_mask, model_kwargs) -> torch.Tensor | None:
        """The image and video tokens in slot order, `(num_visual_tokens, hidden_size)`: images fill the image slots
        in order and videos the video slots, as the model's own forward scatters them."""
        encoded = model_kwargs.get("mm_encoder_outputs") or {}
        parts = {}
        for kind, pixels, grid, encode in (
            ("image", "pixel_values", "image_grid_thw", self.target.model.get_image_features),
            ("video", "pixel_values_videos", "video_grid_thw", self.target.model.get_video_features),
        ):
            out = encoded.get(kind)
            if out is None and model_kwargs.get(pixels) is not None:
                out = encode(model_kwargs[pixels], model_kwargs.get(grid))
            if out is not None:
                parts[kind] = torch.cat(list(out.pooler_output), dim=0)
        if not parts:
            return None
        slots = input_ids[visual_mask]
        hidden = next(iter(parts.values())).shape[-1]
        features = next(iter(parts.values())).new_zeros(slots.shape[0], hidden)
        for kind, token in (("image", self.image_token_id), ("video", self.video_token_id)):
            n_slots = int((slots == token).sum())
            found = parts[kind].shape[0] if kind in parts else 0
            if n_slots != found:
                raise ValueError(
                    f"The prompt has {n_slots} {kind} tokens but the {kind}s give {found} features; build the prompt "
                    "with the target's processor."
                )
            if found:
                features[slots == token] = parts[kind].to(features.dtype)
        return features


ADAPTERS = (LlavaAdapter, LlavaNextAdapter, Qwen2VLAdapter)
SUPPORTED_MODEL_TYPES = tuple(t for adapter in ADAPTERS for t in adapter.model_types)


def get_adapter(target: nn.Module) -> LlavaAdapter:
    """The adapter for `target` (or for the model inside its peft wrapper), or a `ValueError` naming the supported
    model types."""
    target = unwrap_peft(target)
    model_type = getattr(getattr(target, "config", None), "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter(target)
    raise ValueError(
        f"Unsupported target model_type {model_type!r} ({type(target).__name__}); "
        f"specvlm_hf supports: {', '.join(SUPPORTED_MODEL_TYPES)}."
    )
