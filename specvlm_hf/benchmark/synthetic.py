"""Random-weight LLaVA targets of a given architecture, built in-process: LLaVA-1.5-7B's (CLIP ViT-L/336 + Llama-2-7B,
576 image tokens) for cost measurements at scale, and a tiny one for checks that must run in seconds. Their outputs
mean nothing; only their costs and the exactness of decoding do."""

from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

SCALES = ("7b", "tiny")


def llava_config(scale: str) -> LlavaConfig:
    """`"7b"`: LLaVA-1.5-7B's architecture (vocabulary 32064, image token 32000, 576 image tokens from CLIP's
    penultimate layer); `"tiny"`: hidden 64, 2 text layers, 16 image tokens, vocabulary 96."""
    if scale == "7b":
        vision = CLIPVisionConfig(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=336,
            patch_size=14,
            projection_dim=768,
        )
        text = LlamaConfig(
            vocab_size=32064,
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
        image_token = 32000
    elif scale == "tiny":
        vision = CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        )
        text = LlamaConfig(
            vocab_size=96,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
        image_token = 95
    else:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )


def num_image_tokens(config: LlavaConfig) -> int:
    """Visual tokens per image with the "default" strategy (CLS dropped)."""
    return (config.vision_config.image_size // config.vision_config.patch_size) ** 2


def random_llava(
    config: LlavaConfig, device: torch.device, dtype: torch.dtype, seed: int = 0, logit_scale: float = 1.0
) -> LlavaForConditionalGeneration:
    """A randomly initialised LLaVA created directly on `device` in `dtype` (no CPU copy, no checkpoint), in eval
    mode, without EOS (it decodes to `max_new_tokens`). `logit_scale` sharpens `lm_head` so greedy text varies."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")
    if logit_scale != 1.0:
        with torch.no_grad():
            model.lm_head.weight.mul_(logit_scale)
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    model.generation_config.eos_token_id = None
    return model.eval()


def random_inputs(config: LlavaConfig, text_len: int, device: torch.device, dtype: torch.dtype, seed: int = 0) -> dict:
    """`[bos, <image> x num_image_tokens, text_len random tokens]` and random pixels."""
    g = torch.Generator().manual_seed(seed)
    vocab, image_token = config.text_config.vocab_size, config.image_token_id
    text = torch.randint(3, min(vocab, image_token), (text_len,), generator=g)
    ids = torch.cat([torch.tensor([1]), torch.full((num_image_tokens(config),), image_token), text])[None]
    side = config.vision_config.image_size
    pixels = torch.randn(1, 3, side, side, generator=g)
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "pixel_values": pixels.to(device=device, dtype=dtype),
    }
