"""Tiny in-process LLaVA targets and prompts for the offline test suite (no hub access)."""

from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

VOCAB = 96
IMAGE_TOKEN = VOCAB - 1
IMAGE_SIZE, PATCH = 32, 8
NUM_IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2


def make_target(
    seed: int = 0,
    attn_implementation: str = "sdpa",
    hidden: int = 64,
    layers: int = 2,
    logit_scale: float = 6.0,
    vocab: int = VOCAB,
    heads: int = 4,
    kv_heads: int = 2,
    image_size: int = IMAGE_SIZE,
) -> LlavaForConditionalGeneration:
    """A random tiny LLaVA (Llama text + CLIP vision), float32, image token `vocab - 1`, `(image_size // PATCH) ** 2`
    image tokens. `logit_scale` sharpens lm_head so greedy text varies."""
    text = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=PATCH,
        projection_dim=32,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=vocab - 1,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration._from_config(config, attn_implementation=attn_implementation).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(logit_scale)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model


def make_inputs(seed: int = 0, text_len: int = 6, image: bool = True, vocab: int = VOCAB) -> dict:
    """A prompt `[bos, <image> x 16, text...]` (or text only) with random pixels."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(3, vocab - 1, (text_len,), generator=g)
    parts = [torch.tensor([1])]
    if image:
        parts.append(torch.full((NUM_IMAGE_TOKENS,), vocab - 1))
    parts.append(text)
    inputs = {"input_ids": torch.cat(parts)[None]}
    if image:
        inputs["pixel_values"] = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    return inputs
