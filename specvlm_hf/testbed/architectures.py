"""What differs between the testbed's two target architectures, stock LLaVA-1.5 and stock Qwen2-VL: the tokenizer's
special tokens and chat template, the processor and model, how a packed training conversation is laid out (its
image prefix, its positions, its vision inputs) and where the image features the recipe aligns come from.

Both are built from the same `BuildConfig` sizes: `patch_size` is the side in pixels of the square one image token
covers (LLaVA: one CLIP patch; Qwen2-VL: a 2x2 block of vision patches merged into one token), so both see
`(image_size / patch_size) ** 2` image tokens in the same row-major order.
"""

from __future__ import annotations

import math

import torch
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
)
from transformers.processing_utils import ProcessorMixin

from .tokenizer import CHAT_TEMPLATE, QWEN2_VL_CHAT_TEMPLATE, train_qwen2_vl_tokenizer, train_tokenizer


class ImageQwen2VLProcessor(Qwen2VLProcessor):
    """`Qwen2VLProcessor` for images only: the stock class also builds a video processor, which needs torchvision
    (not a dependency of this package). Prompts and outputs are the stock processor's for image inputs.

    Load a saved one with `ImageQwen2VLProcessor.from_pretrained(dir)`: `AutoProcessor` does not know this class.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token, self.video_token = tokenizer.image_token, tokenizer.video_token
        self.image_token_id, self.video_token_id = tokenizer.image_token_id, tokenizer.video_token_id
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)

    def __call__(self, images=None, text=None, videos=None, **kwargs):
        if videos is not None:
            raise ValueError("the Qwen2-VL testbed's processor takes images only (no video processor: no torchvision)")
        return super().__call__(images=images, text=text, **kwargs)


class LlavaTestbed:
    """LLaVA-1.5's layout: `<s>USER: <image>x N\\n{question} ASSISTANT: {answer}</s>`, 1-D positions."""

    name = "llava"
    model_type = "llava"
    model_class = LlavaForConditionalGeneration
    answer_prefix = " "  # an answer follows "ASSISTANT:" after a space

    @staticmethod
    def render_turn(question: str, answer: str) -> str:
        return f"USER: {question} ASSISTANT: {answer}</s>"

    @staticmethod
    def make_processor(cfg, texts) -> LlavaProcessor:
        tokenizer = train_tokenizer(texts, cfg.vocab_size)
        image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": cfg.image_size}, crop_size={"height": cfg.image_size, "width": cfg.image_size}
        )
        return LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=cfg.patch_size,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
            chat_template=CHAT_TEMPLATE,
        )

    @staticmethod
    def load_processor(directory):
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(directory)

    @staticmethod
    def make_model(cfg, tokenizer) -> LlavaForConditionalGeneration:
        """The vision tower is one CLIP layer whose *embedding output* (LayerNorm-bounded patch embeddings,
        `vision_feature_layer=-2`) feeds the projector: the unnormalised last-layer features of a freshly
        initialised CLIP are dominated by an image-independent constant, and the language model then learns to
        ignore the image."""
        vision = CLIPVisionConfig(
            hidden_size=cfg.vision_hidden_size,
            intermediate_size=4 * cfg.vision_hidden_size,
            num_hidden_layers=1,
            num_attention_heads=max(1, cfg.vision_hidden_size // 64),
            image_size=cfg.image_size,
            patch_size=cfg.patch_size,
            projection_dim=cfg.vision_hidden_size,
        )
        text = LlamaConfig(**_text_sizes(cfg, tokenizer), bos_token_id=tokenizer.bos_token_id)
        config = LlavaConfig(
            vision_config=vision,
            text_config=text,
            image_token_index=tokenizer.image_token_id,
            image_seq_length=(cfg.image_size // cfg.patch_size) ** 2,
            vision_feature_layer=-2,  # hidden_states[0]: the pre-layernormed patch embeddings
            vision_feature_select_strategy="default",
        )
        torch.manual_seed(cfg.seed)
        return _with_generation_config(LlavaForConditionalGeneration(config), tokenizer)

    @staticmethod
    def image_size(processor) -> int:
        return processor.image_processor.crop_size["height"]

    @staticmethod
    def prefix_ids(tokenizer, image_tokens: int) -> list[int]:
        """`<s>USER: <image>...<image>\\n`: the prompt up to the question."""
        text = f"USER: {tokenizer.image_token * image_tokens}\n"
        return [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False).input_ids

    @staticmethod
    def block_ids(tokenizer, question: str, answer: str) -> tuple[list[int], list[int]]:
        """(prompt ids, answer ids ending with the end-of-turn token) of one turn after the prefix."""
        prompt = tokenizer(f"{question} ASSISTANT:", add_special_tokens=False).input_ids
        return prompt, tokenizer(" " + answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]

    @staticmethod
    def prefix_positions(prefix_ids: list[int], tokenizer, side: int) -> torch.Tensor:
        """`(1, P)`: plain 1-D positions."""
        return torch.arange(len(prefix_ids))[None]

    @staticmethod
    def vision_inputs(images, processor) -> dict:
        return {"pixel_values": clip_pixel_values(images, processor.image_processor)}

    @staticmethod
    def feature_module(model):
        """The module whose output `(B, N, D)` holds the projected image-token features."""
        return model.model.multi_modal_projector


class Qwen2VLTestbed:
    """Qwen2-VL's layout: `<|im_start|>user\\n<|vision_start|><|image_pad|>x N<|vision_end|>{question}<|im_end|>\\n
    <|im_start|>assistant\\n{answer}<|im_end|>`, 3-axis M-RoPE positions (the image tokens at (t, row, column)
    offsets, the text after them continuing from the largest position + 1)."""

    name = "qwen2_vl"
    model_type = "qwen2_vl"
    model_class = Qwen2VLForConditionalGeneration
    answer_prefix = ""  # an answer starts a new line

    @staticmethod
    def render_turn(question: str, answer: str) -> str:
        return f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>\n"

    @staticmethod
    def make_processor(cfg, texts) -> ImageQwen2VLProcessor:
        tokenizer = train_qwen2_vl_tokenizer(texts, cfg.vocab_size)
        pixels = cfg.image_size**2  # min = max pixels: a testbed image keeps its size and token count
        image_processor = Qwen2VLImageProcessorPil(
            patch_size=cfg.patch_size // 2, merge_size=2, temporal_patch_size=2,
            size={"shortest_edge": pixels, "longest_edge": pixels},
        )  # fmt: skip
        return ImageQwen2VLProcessor(image_processor, tokenizer, chat_template=QWEN2_VL_CHAT_TEMPLATE)

    @staticmethod
    def load_processor(directory):
        return ImageQwen2VLProcessor.from_pretrained(directory)

    @staticmethod
    def make_model(cfg, tokenizer) -> Qwen2VLForConditionalGeneration:
        """One vision block over `patch_size / 2` pixel patches, 2x2 merged; the merger's LayerNorm bounds the
        features the language model sees."""
        head_dim = cfg.hidden_size // cfg.attention_heads
        sections = [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]  # (t, h, w) over head_dim / 2, as Qwen2-VL
        text = dict(
            **_text_sizes(cfg, tokenizer),
            bos_token_id=None,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": sections},
        )  # fmt: skip
        vision = dict(
            depth=1, embed_dim=cfg.vision_hidden_size, hidden_size=cfg.hidden_size,
            num_heads=max(1, cfg.vision_hidden_size // 64), mlp_ratio=4, patch_size=cfg.patch_size // 2,
            spatial_merge_size=2, temporal_patch_size=2,
        )  # fmt: skip
        ids = {k: tokenizer.convert_tokens_to_ids(v) for k, v in QWEN2_VL_VISION_TOKENS.items()}
        config = Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)
        torch.manual_seed(cfg.seed)
        return _with_generation_config(Qwen2VLForConditionalGeneration(config), tokenizer)

    @staticmethod
    def image_size(processor) -> int:
        return math.isqrt(processor.image_processor.size["longest_edge"])

    @staticmethod
    def prefix_ids(tokenizer, image_tokens: int) -> list[int]:
        text = f"<|im_start|>user\n<|vision_start|>{tokenizer.image_token * image_tokens}<|vision_end|>"
        return tokenizer(text, add_special_tokens=False).input_ids

    @staticmethod
    def block_ids(tokenizer, question: str, answer: str) -> tuple[list[int], list[int]]:
        prompt = tokenizer(f"{question}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False).input_ids
        return prompt, tokenizer(answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]

    @staticmethod
    def prefix_positions(prefix_ids: list[int], tokenizer, side: int) -> torch.Tensor:
        """`(3, P)`: (t, h, w) positions as `Qwen2VLModel.get_rope_index` gives them for one `side x side` image
        (in merged tokens): text before the image at `i` on every axis, image token (r, c) at `s + (0, r, c)` where
        `s` is the image's first index, and text after it from `s + side` on."""
        ids = torch.tensor(prefix_ids)
        first = int((ids == tokenizer.image_token_id).nonzero()[0])
        positions = torch.arange(len(ids)).repeat(3, 1)
        grid = torch.arange(side * side)
        rows = slice(first, first + side * side)
        positions[0, rows] = first
        positions[1, rows] = first + grid // side
        positions[2, rows] = first + grid % side
        after = first + side * side
        positions[:, after:] = first + side + torch.arange(len(ids) - after)
        return positions

    @staticmethod
    def vision_inputs(images, processor) -> dict:
        out = processor.image_processor(images=images, return_tensors="pt")
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}

    @staticmethod
    def feature_module(model):
        """The module whose output `(B * N, D)` holds the merged image-token features, image after image."""
        return model.model.visual.merger


QWEN2_VL_VISION_TOKENS = {
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
}
ARCHITECTURES = {a.name: a for a in (LlavaTestbed, Qwen2VLTestbed)}


def architecture(name: str):
    """The testbed architecture called `name` (a `BuildConfig.architecture` or a model's `model_type`)."""
    if name not in ARCHITECTURES:
        raise ValueError(f"no testbed architecture {name!r}; the testbed is built as one of {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def clip_pixel_values(images, image_processor) -> torch.Tensor:
    """`(B, 3, H, W)` float32: the CLIP normalisation of images already rendered at the processor's crop size
    (equal to what `image_processor` returns for them, without its per-image PIL round trips)."""
    import numpy as np

    mean = np.asarray(image_processor.image_mean, dtype=np.float32)
    std = np.asarray(image_processor.image_std, dtype=np.float32)
    arrays = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images]) * np.float32(1 / 255)
    return torch.from_numpy(((arrays - mean) / std).transpose(0, 3, 1, 2).copy())


def _text_sizes(cfg, tokenizer) -> dict:
    """The language model's config fields both architectures share (sizes from `cfg`, ids from `tokenizer`)."""
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.attention_heads,
        num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=2048,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def _with_generation_config(model, tokenizer):
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=256,
    )
    return model
