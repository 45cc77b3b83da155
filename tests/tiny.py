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
    return sharpened(model, logit_scale, pad_token_id=0)


def sharpened(model, logit_scale: float, pad_token_id: int):
    """`model` with `lm_head` scaled by `logit_scale` (so greedy text varies) and a generation config without an end
    token (so every run decodes its whole budget)."""
    with torch.no_grad():
        model.lm_head.weight.mul_(logit_scale)
    model.generation_config.pad_token_id = pad_token_id
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


# ------------------------------------------------------------------------------------------------ Qwen2-VL family
QWEN_IMAGE, QWEN_VIDEO, QWEN_START, QWEN_END = 4, 5, 3, 6
QWEN_PATCH = 3 * 14 * 14 * 2  # channels x patch x patch x temporal patch


def make_qwen_target(
    kind: str = "qwen2_vl",
    seed: int = 0,
    attn_implementation: str = "sdpa",
    logit_scale: float = 6.0,
    vocab: int = VOCAB,
):
    """A random tiny Qwen2-VL (`kind="qwen2_vl"`) or Qwen2.5-VL (`"qwen2_5_vl"`): 2 text layers 32 wide with M-RoPE
    sections (2, 1, 1), a one-block vision tower with 2x2 spatial merging; float32."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )

    qwen25 = kind == "qwen2_5_vl"
    config_class = Qwen2_5_VLConfig if qwen25 else Qwen2VLConfig
    vision = dict(depth=1, embed_dim=32, hidden_size=32, num_heads=4, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, **({"out_hidden_size": 32, "intermediate_size": 32} if qwen25 else {}))  # fmt: skip
    config = config_class(
        text_config=dict(
            hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=vocab, max_position_embeddings=512, bos_token_id=0, eos_token_id=1, pad_token_id=2,
            # theta 10, not 10000: with head size 8 the height and width axes get the two lowest frequencies,
            # which must turn far enough per position for a height or width off by one to change the output
            rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10.0},
        ),
        vision_config=vision, image_token_id=QWEN_IMAGE, video_token_id=QWEN_VIDEO,
        vision_start_token_id=QWEN_START, vision_end_token_id=QWEN_END, attn_implementation=attn_implementation,
    )  # fmt: skip
    torch.manual_seed(seed)
    model_class = Qwen2_5_VLForConditionalGeneration if qwen25 else Qwen2VLForConditionalGeneration
    model = model_class(config).eval()
    return sharpened(model, logit_scale, pad_token_id=2)


def make_qwen_inputs(
    segments, seed: int = 0, seconds_per_grid: float | None = None, vocab: int = VOCAB, merge: int = 2
) -> dict:
    """A Qwen2-VL prompt from `segments`: `("text", n)`, `("image", (t, h, w))` or `("video", (t, h, w))` in patches
    (a visual item becomes start + t*h*w/merge**2 placeholders + end, `merge` the vision tower's
    `spatial_merge_size`), with `mm_token_type_ids`, random pixels and grids."""
    g = torch.Generator().manual_seed(seed)
    ids, types, grids = [], [], {"image": [], "video": []}
    for kind, size in segments:
        if kind == "text":
            ids += torch.randint(7, vocab, (size,), generator=g).tolist()
            types += [0] * size
            continue
        n = size[0] * size[1] * size[2] // merge**2
        token, code = (QWEN_IMAGE, 1) if kind == "image" else (QWEN_VIDEO, 2)
        ids += [QWEN_START] + [token] * n + [QWEN_END]
        types += [0] + [code] * n + [0]
        grids[kind].append(list(size))
    inputs = {"input_ids": torch.tensor([ids]), "mm_token_type_ids": torch.tensor([types])}
    for kind, pixels in (("image", "pixel_values"), ("video", "pixel_values_videos")):
        if grids[kind]:
            grid = torch.tensor(grids[kind])
            inputs[f"{kind}_grid_thw"] = grid
            inputs[pixels] = torch.randn(int(grid.prod(-1).sum()), QWEN_PATCH, generator=g)
    if seconds_per_grid is not None:
        inputs["second_per_grid_ts"] = torch.tensor([seconds_per_grid] * len(grids["video"]))
    return inputs


# ------------------------------------------------------------------------------------------------ LLaVA-NeXT
def make_next_target(seed: int = 0, attn_implementation: str = "sdpa", logit_scale: float = 6.0, vocab: int = VOCAB):
    """A random tiny LLaVA-NeXT (transformers' tester sizes, 8 px crops of 4 px patches, AnyRes pinpoints 16x16,
    16x32 and 32x16, so images of different sizes get different numbers of visual tokens), image token `vocab - 1`;
    float32."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    config = LlavaNextConfig(
        text_config={"model_type": "llama", "vocab_size": vocab, "hidden_size": 32, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "intermediate_size": 37, "max_position_embeddings": 580,
                     "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
        vision_config={"model_type": "clip_vision_model", "image_size": 8, "patch_size": 4, "num_channels": 3,
                       "hidden_size": 32, "projection_dim": 32, "num_hidden_layers": 1, "num_attention_heads": 4,
                       "intermediate_size": 37},
        image_token_index=vocab - 1, vision_feature_select_strategy="default", vision_feature_layer=-1,
        image_grid_pinpoints=[[16, 16], [16, 32], [32, 16]], attn_implementation=attn_implementation,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    return sharpened(model, logit_scale, pad_token_id=0)


def make_next_inputs(model, image_sizes, seed: int = 0, text_len: int = 3) -> dict:
    """A prompt with one image per `(H, W)` in `image_sizes` (each as many placeholders as AnyRes gives it), text
    runs between them, random pixels for every crop, and `image_sizes`; text only (`input_ids`) without sizes. Ids
    and crop size come from `model`'s config; text ids are drawn from 3, ..., vocab - 2."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    config = model.config
    vocab, side = config.text_config.vocab_size, config.vision_config.image_size
    g = torch.Generator().manual_seed(seed)
    parts = [torch.tensor([config.text_config.bos_token_id])]
    if not image_sizes:
        parts.append(torch.randint(3, vocab - 1, (text_len,), generator=g))
        return {"input_ids": torch.cat(parts)[None]}
    sizes = torch.tensor(image_sizes)
    crops = [image_size_to_num_patches(s, config.image_grid_pinpoints, side) for s in sizes]
    pixels = torch.zeros(len(crops), max(crops), 3, side, side)
    for i, n in enumerate(crops):
        pixels[i, :n] = torch.randn(n, 3, side, side, generator=g)
    with torch.no_grad():
        tokens = [
            f.shape[0] for f in model.model.get_image_features(pixel_values=pixels, image_sizes=sizes).pooler_output
        ]
    for n in tokens:
        parts += [torch.randint(3, vocab - 1, (text_len,), generator=g), torch.full((n,), config.image_token_id)]
    parts.append(torch.randint(3, vocab - 1, (text_len,), generator=g))
    return {"input_ids": torch.cat(parts)[None], "pixel_values": pixels, "image_sizes": sizes}


def make_llava_prompt(model, images: int, seed: int = 0, text_len: int = 3) -> dict:
    """A LLaVA-1.5 prompt `[bos, text, <image> x n, text, <image> x n, ..., text]` with `images` images, random
    pixels and the attention mask a processor gives (all ones: without it generate() takes every pad id for padding,
    and transformers' LLaVA tester's pad id is Llama's bos id); ids and sizes from `model`'s config
    (`n = (image_size // patch_size) ** 2`); text ids avoid the special ones."""
    config, text = model.config, model.config.text_config
    vision = config.vision_config
    special = {config.image_token_id, text.bos_token_id, text.eos_token_id, text.pad_token_id}
    allowed = torch.tensor([t for t in range(text.vocab_size) if t not in special])
    g = torch.Generator().manual_seed(seed)

    def words():
        return allowed[torch.randint(len(allowed), (text_len,), generator=g)]

    parts = [torch.tensor([text.bos_token_id])]
    for _ in range(images):
        parts += [words(), torch.full(((vision.image_size // vision.patch_size) ** 2,), config.image_token_id)]
    parts.append(words())
    input_ids = torch.cat(parts)[None]
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if images:
        inputs["pixel_values"] = torch.randn(images, 3, vision.image_size, vision.image_size, generator=g)
    return inputs


# ------------------------------------------------------------------------------------------------ transformers' testers
# The configurations of transformers' own model testers (tests/models/<arch>/test_modeling_<arch>.py, not installed
# with the package; values reproduced, not code): odd vocabulary sizes, odd special ids, odd widths. Dropout values of
# the testers are left out: the targets run in eval mode.


def make_llava_tester_target(seed: int = 0, attn_implementation: str = "sdpa", logit_scale: float = 6.0):
    """LLaVA-1.5 as `LlavaVisionText2TextModelTester` configures it: vocabulary 99, image token id 0, pad id 1 (the
    bos id of Llama's defaults), a Llama text model 32 wide with 2 layers, 4 heads (no grouped keys) and gelu MLPs
    37 wide; an 8 px CLIP tower of 2 px patches (16 image tokens) with 2 layers of 4 heads, MLPs 37 wide; float32."""
    config = LlavaConfig(
        text_config={"model_type": "llama", "vocab_size": 99, "hidden_size": 32, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "intermediate_size": 37, "hidden_act": "gelu",
                     "max_position_embeddings": 512, "initializer_range": 0.02, "pad_token_id": 1},
        vision_config={"model_type": "clip_vision_model", "image_size": 8, "patch_size": 2, "num_channels": 3,
                       "hidden_size": 32, "projection_dim": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "intermediate_size": 37, "initializer_range": 0.02},
        image_token_index=0, projector_hidden_act="gelu", vision_feature_select_strategy="default",
        vision_feature_layer=-1, image_seq_length=16, attn_implementation=attn_implementation,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    return sharpened(model, logit_scale, pad_token_id=1)


def make_next_tester_target(seed: int = 0, attn_implementation: str = "sdpa", logit_scale: float = 6.0):
    """LLaVA-NeXT as `LlavaNextVisionText2TextModelTester` (on `VLMModelTester`'s defaults) configures it: vocabulary
    99, image token id 98 (vocab - 1), pad 0, bos 1, eos 2; a Llama text model 32 wide with 2 layers of 2 heads of 16
    (2 key-value heads) and gelu MLPs 37 wide; an 8 px CLIP tower of 4 px patches, 2 layers of 2 heads; the one AnyRes
    pinpoint 8x8 (so one tile, and the tile's 2x2 grid unpadded to nothing for a wide image); float32."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    shape = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 2,
             "hidden_act": "gelu", "initializer_range": 0.02}  # fmt: skip
    config = LlavaNextConfig(
        text_config={"model_type": "llama", "vocab_size": 99, "num_key_value_heads": 2, "head_dim": 16,
                     "max_position_embeddings": 512, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
                     **shape},
        vision_config={"model_type": "clip_vision_model", "image_size": 8, "patch_size": 4, "num_channels": 3,
                       "projection_dim": 32, **shape},
        image_token_index=98, projector_hidden_act="gelu", vision_feature_select_strategy="default",
        vision_feature_layer=-1, image_grid_pinpoints=[[8, 8]], attn_implementation=attn_implementation,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    return sharpened(model, logit_scale, pad_token_id=0)


def make_qwen_tester_target(
    kind: str = "qwen2_vl", seed: int = 0, attn_implementation: str = "sdpa", logit_scale: float = 6.0
):
    """Qwen2-VL (`kind="qwen2_vl"`) or Qwen2.5-VL (`"qwen2_5_vl"`) as `Qwen2VLVisionText2TextModelTester` and
    `Qwen2_5_VLVisionText2TextModelTester` configure them: vocabulary 99, bos 0, eos 1, pad 2, vision start 3, image
    4, video 5 (vision end keeps its default id, past the vocabulary: the testers' prompts have none); 4 text layers
    32 wide, 4 heads and 2 key-value heads, MLPs 37 wide, `max_window_layers` 3, M-RoPE sections (2, 1, 1), rope theta
    10000; a 2-block vision tower of 14 px patches with *no* spatial merging (one visual token per patch). Qwen2-VL's
    tower: 32 wide, quick-gelu, MLP ratio 4; Qwen2.5-VL's: 32 wide, silu MLPs 32 wide, windowed attention in every
    block; float32.

    One value differs: the testers tie the input and output embeddings. A random tiny model with tied embeddings
    repeats its last token for ever (its logits are that token's embedding against every embedding, largest against
    itself; rescaling the layers or the final norm does not break it), so every continuation would be one token and no
    drafted path would be tested. The embeddings are untied here."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )

    qwen25 = kind == "qwen2_5_vl"
    tower = dict(depth=2, hidden_size=32, num_heads=4, patch_size=14, spatial_merge_size=1, temporal_patch_size=2)
    if qwen25:
        tower.update(in_channels=3, hidden_act="silu", intermediate_size=32, out_hidden_size=32)
    else:
        tower.update(embed_dim=32, hidden_act="quick_gelu", mlp_ratio=4)
    config = (Qwen2_5_VLConfig if qwen25 else Qwen2VLConfig)(
        text_config=dict(
            hidden_size=32, intermediate_size=37, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            hidden_act="silu", vocab_size=99, max_position_embeddings=512, max_window_layers=3, bos_token_id=0,
            eos_token_id=1, pad_token_id=2,
            rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0},
        ),
        vision_config=tower, vision_start_token_id=3, image_token_id=4, video_token_id=5, tie_word_embeddings=False,
        attn_implementation=attn_implementation,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = (Qwen2_5_VLForConditionalGeneration if qwen25 else Qwen2VLForConditionalGeneration)(config).eval()
    return sharpened(model, logit_scale, pad_token_id=2)


def sharp_attention(model, scale: float = 4.0):
    """`model` with its text layers' queries and keys scaled by `scale` (attention logits by `scale ** 2`): a random
    tiny model attends almost uniformly, so it barely notices a token at a wrong position; with peaked attention every
    position counts."""
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                projection.weight.mul_(scale)
                if projection.bias is not None:
                    projection.bias.mul_(scale)
    return model


# ------------------------------------------------------------------------------------------------ batches
def left_pad(rows: list[dict], pad_id: int, attention_mask: bool = True) -> dict:
    """A left-padded batch of single-prompt inputs `rows` (each as `make_inputs`, `make_llava_prompt`,
    `make_next_inputs` or `make_qwen_inputs` builds it), as a processor with `padding_side="left"` builds it:
    `input_ids` padded with `pad_id`, the `attention_mask` (0 at padding; left out with `attention_mask=False`),
    `mm_token_type_ids` padded with 0, and every visual input of the rows that have one stacked in row order
    (LLaVA-NeXT's crops padded with zeros to the most crops of any image)."""
    length = max(row["input_ids"].shape[1] for row in rows)
    pads = [length - row["input_ids"].shape[1] for row in rows]
    batch = {"input_ids": torch.cat([torch.nn.functional.pad(row["input_ids"], (pad, 0), value=pad_id)
                                     for row, pad in zip(rows, pads)])}  # fmt: skip
    if attention_mask:
        batch["attention_mask"] = (torch.arange(length) >= torch.tensor(pads)[:, None]).long()
    if any("mm_token_type_ids" in row for row in rows):
        batch["mm_token_type_ids"] = torch.cat([
            torch.nn.functional.pad(row.get("mm_token_type_ids", torch.zeros_like(row["input_ids"])), (pad, 0))
            for row, pad in zip(rows, pads)
        ])  # fmt: skip
    keys = dict.fromkeys(key for row in rows for key in row)
    for key in keys.keys() - {"input_ids", "attention_mask", "mm_token_type_ids"}:
        values = [row[key] for row in rows if key in row]
        if key == "pixel_values" and values[0].dim() == 5:  # LLaVA-NeXT: (images, crops, 3, side, side)
            crops = max(value.shape[1] for value in values)
            values = [torch.nn.functional.pad(v, (0, 0) * 3 + (0, crops - v.shape[1])) for v in values]
        batch[key] = torch.cat(values)
    return batch
