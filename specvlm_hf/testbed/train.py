"""Training batches and the training loop of the testbed target (plain PyTorch, AdamW, bf16 autocast on CPU).

Batch `b` holds conversations `b * batch_size ...` of the build seed, so a build is a pure function of its seed;
a batch either has a long description in every conversation or in none, which keeps padding small.

The batches follow the layout of `cfg.architecture` (`architectures.py`). Three choices make a randomly initialised
target ground within the budget:
- each conversation is packed as independent single-turn prompts sharing the image prefix (a block attention mask),
  so no answer can be copied from an earlier turn, and the loss up-weights the words that name visual facts;
- an alignment loss pulls each image token's projected feature towards the sum of the input embeddings of the words
  that describe it ("large red circle top left"): a stand-in for the pretrained CLIP of a real LLaVA, after which
  question words and image tokens share directions that attention can match;
- a feature curriculum: for the first `word_features_until` of the steps the language model sees those word
  embedding sums *instead of* the projector's output at the image positions (a symbolic scene it learns to look
  up, like text), then over `word_features_ramp` of the steps the input moves linearly to the real features,
  which the alignment loss has meanwhile trained towards the same targets. The saved model is the stock
  architecture: the curriculum exists only in training. Without it, 5-minute probes stayed near chance on
  every question that needs a lookup (which object, where); with it, shape and size questions reached 80-90%.
"""

from __future__ import annotations

import dataclasses
import math
import random
import string
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .architectures import architecture
from .dataset import Conversation, sample_conversation
from .grammar import OPTIONS, POSITIONS
from .scenes import COLOURS, DIGITS, GRID, RADIUS, SHAPES, SIZES, TEXT_CELLS, Scene

CHARACTERS = "0123456789" + string.ascii_lowercase  # what a card's text is drawn with

IGNORE = -100


@dataclass(frozen=True)
class Batch:
    """`input_ids`, `labels` of shape `(B, L)` (right-padded); `position_ids` `(B, L)`, or `(3, B, L)` for M-RoPE;
    `attention_mask` `(B, 1, L, L)` bool (each question block sees the image prefix and itself, see
    `encode_conversation`); `vision` the target's vision inputs (`pixel_values`, and `image_grid_thw` for Qwen2-VL);
    `patch_words` `(B, N, 5)` for the N image tokens (see `patch_words`); `weights` `(B, L)` loss weight of
    each label (`key_weight` on words that name what the image shows, 1 on other answer tokens, 0 elsewhere)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    vision: dict
    patch_words: torch.Tensor
    weights: torch.Tensor

    def to(self, device) -> Batch:
        moved = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        moved = {
            k: {n: t.to(device) for n, t in v.items()} if k == "vision" else v.to(device) for k, v in moved.items()
        }
        return Batch(**moved)


def patch_labels(scene: Scene, tokens_per_side: int) -> torch.Tensor:
    """`(tokens_per_side ** 2, 4)` long: per image token (row-major) the colour, shape and size of the object that
    covers it (index + 1, 0 for none) and the grid cell it lies in. A token is covered when its centre lies
    within the object's radius plus a quarter token. On a card, the token under each character's centre carries
    the text's colour, no size, and in place of a shape `len(SHAPES) + 1 + CHARACTERS.index(character)`."""
    g = tokens_per_side
    labels = torch.zeros((g, g, 4), dtype=torch.long)
    centres = (torch.arange(g) + 0.5) * GRID / g  # [g]: token centres in cell units
    cells = torch.arange(g) * GRID // g  # [g]: grid row (or column) of each token row (or column)
    labels[..., 3] = cells[:, None] * GRID + cells[None, :]
    if scene.text is not None:
        text = scene.text
        for i, character in enumerate(text.characters):  # the token under each character's centre
            r, c = int((text.row + 0.5) * g / TEXT_CELLS), int((text.col + i + 0.5) * g / TEXT_CELLS)
            labels[r, c, :2] = torch.tensor(
                [list(COLOURS).index(text.colour) + 1, len(SHAPES) + 1 + CHARACTERS.index(character)]
            )
    for o in scene.objects:
        dist = ((centres[:, None] - o.row - 0.5) ** 2 + (centres[None, :] - o.col - 0.5) ** 2).sqrt()  # [g, g]
        covered = dist <= RADIUS[o.size] + 0.25 * GRID / g
        labels[covered, :3] = torch.tensor(
            [list(COLOURS).index(o.colour) + 1, SHAPES.index(o.shape) + 1, SIZES.index(o.size) + 1]
        )
    return labels.flatten(0, 1)


def encode_conversation(
    conv: Conversation, tokenizer, image_seq_length: int, architecture_name: str = "llava"
) -> tuple[list[int], list[int], list[int]]:
    """Token ids, labels and block ids of one conversation packed as independent single-turn prompts.

    Block 0 is the shared prefix up to the question (LLaVA: `<s>USER: <image>...<image>\n`); block k is question k's
    prompt and answer (`{question} ASSISTANT: {answer}</s>`), so prefix + block k is exactly what the chat template
    and processor give for a one-question conversation up to the end of the answer. Labels are `IGNORE` except on
    answer tokens and their end-of-turn token.
    """
    arch = architecture(architecture_name)
    prefix = arch.prefix_ids(tokenizer, image_seq_length)
    ids, labels, blocks = list(prefix), [IGNORE] * len(prefix), [0] * len(prefix)
    for k, turn in enumerate(conv.turns, start=1):
        question, answer = arch.block_ids(tokenizer, turn.question, turn.answer)
        ids += question + answer
        labels += [IGNORE] * len(question) + answer
        blocks += [k] * (len(question) + len(answer))
    return ids, labels, blocks


def key_token_ids(tokenizer) -> torch.Tensor:
    """Ids of the single-token words that carry visual facts (colours, shapes, sizes, numbers, cells, yes/no)."""
    words = {w for options in OPTIONS.values() for option in options for w in option.split()}
    ids = set()
    for w in words:
        for form in (f" {w}", f" {w.capitalize()}"):
            tokens = tokenizer(form, add_special_tokens=False).input_ids
            if len(tokens) == 1:
                ids.add(tokens[0])
    return torch.tensor(sorted(ids))


def make_batch(cfg, step: int, processor, image_seq_length: int) -> Batch:
    """The `step`-th training batch of the `BuildConfig` `cfg` (deterministic)."""
    with_long = random.Random(f"specvlm-testbed-batch-{cfg.seed}-{step}").random() < cfg.long_fraction
    convs = [
        sample_conversation(
            cfg.seed,
            step * cfg.batch_size + i,
            with_long=with_long,
            image_size=cfg.image_size,
            max_short=cfg.max_short,
            card_share=cfg.card_share,
        )
        for i in range(cfg.batch_size)
    ]
    arch = architecture(cfg.architecture)
    encoded = [encode_conversation(c, processor.tokenizer, image_seq_length, cfg.architecture) for c in convs]
    length = -(-max(len(ids) for ids, _, _ in encoded) // 16) * 16  # few distinct shapes: CPU kernels are reused
    pad = processor.tokenizer.pad_token_id
    input_ids = torch.full((len(convs), length), pad, dtype=torch.long)  # [B, L]
    labels = torch.full((len(convs), length), IGNORE, dtype=torch.long)
    blocks = torch.full((len(convs), length), -1, dtype=torch.long)  # -1: padding
    side = cfg.image_size // cfg.patch_size
    prefix_ids = encoded[0][0][: encoded[0][2].count(0)]  # the same in every conversation
    prefix = arch.prefix_positions(prefix_ids, processor.tokenizer, side)  # [A, P]: A = 1 (1-D) or 3 (M-RoPE)
    positions = torch.zeros((len(prefix), len(convs), length), dtype=torch.long)  # [A, B, L]
    for i, (ids, lab, blk) in enumerate(encoded):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        blocks[i, : len(blk)] = torch.tensor(blk)
        for k in range(1, max(blk) + 1):  # every block continues the prefix, as if it were the only question
            in_block = blocks[i] == k
            positions[:, i, in_block] = int(prefix.max()) + 1 + torch.arange(int(in_block.sum()))
        positions[:, i, : prefix.shape[1]] = prefix
    causal = torch.ones((length, length), dtype=torch.bool).tril()
    visible = (blocks[:, :, None] == blocks[:, None, :]) | (blocks[:, None, :] == 0)  # [B, L, L]: own block or prefix
    mask = (causal & visible & (blocks[:, None, :] >= 0)) | torch.eye(length, dtype=torch.bool)  # padding sees itself
    weights = (labels != IGNORE).float() * (
        1 + (cfg.key_weight - 1) * torch.isin(labels, key_token_ids(processor.tokenizer))
    )
    return Batch(
        input_ids,
        labels,
        mask[:, None],
        positions[0] if len(prefix) == 1 else positions,
        arch.vision_inputs([c.image for c in convs], processor),
        torch.stack([patch_words(c.scene, side, processor.tokenizer) for c in convs]),
        weights,
    )


def _lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class TrainStats:
    steps: int
    tokens: int
    answer_tokens: int
    seconds: float
    final_loss: float


def patch_words(scene: Scene, tokens_per_side: int, tokenizer) -> torch.Tensor:
    """`(tokens_per_side ** 2, 5)` long: per image token the ids of the words naming the object that covers it
    (size, colour, shape; -1 if none) or the character of a card's text (-1, colour, the digit's name or the
    letter) and its grid cell ("top left": two ids; "center": one and -1)."""

    def word_id(word: str) -> int:
        return tokenizer(" " + word, add_special_tokens=False).input_ids[0]

    characters = tuple(DIGITS[int(c)] if c.isdigit() else c for c in CHARACTERS)  # a digit by its name
    sizes, colours, shapes = ([-1] + [word_id(w) for w in ws] for ws in (SIZES, COLOURS, SHAPES + characters))
    cells = [([word_id(w) for w in p.split()] + [-1])[:2] for row in POSITIONS for p in row]
    return torch.tensor(
        [
            [sizes[sz], colours[c], shapes[sh], *cells[cell]]
            for c, sh, sz, cell in patch_labels(scene, tokens_per_side).tolist()
        ]
    )


def align_loss(embed: torch.Tensor, features: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """Squared distance of image-token features `(B, N, D)` to the sum of the (detached) input embeddings of their
    words `(B, N, 5)` (id -1 adds nothing), relative to the targets' mean squared norm."""
    target = word_targets(embed.detach().float(), words)  # [B, N, D]
    return ((features.float() - target) ** 2).sum(-1).mean() / (target**2).sum(-1).mean()


def real_feature_share(step: int, steps: int, until: float, ramp: float) -> float:
    """Weight of the projector's output in the image features the language model sees at `step` (0 before
    `until * steps`, then linear up to 1 at `(until + ramp) * steps`)."""
    progress = step / steps
    if ramp <= 0:
        return float(progress >= until)
    return min(1.0, max(0.0, (progress - until) / ramp))


def word_targets(embed: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """`(B, N, D)`: per image token the sum of the input embeddings `(V, D)` of its words `(B, N, 5)` (-1: none)."""
    table = torch.cat([embed, embed.new_zeros(1, embed.shape[1])])  # row -1: zeros
    return table[words].sum(-2)


def train(model, processor, cfg, *, progress: bool = True) -> TrainStats:
    """Trains `model` in place for `cfg.steps` AdamW steps on batches of `cfg.seed`: the weighted language-model
    loss on answer tokens plus `cfg.align_weight` times the image-token alignment loss, with the feature
    curriculum of the module docstring.

    `cfg` is a `BuildConfig`; the forward runs under bf16 autocast (fp32 master weights).
    """
    device = torch.device(cfg.device)
    model.to(device).train()
    features = []
    mix = {"share": 1.0, "words": None}

    def image_features(_module, _inputs, out):
        shaped = out.view(len(mix["words"]), -1, out.shape[-1])  # [B, N, D]
        features.append(shaped)
        if mix["share"] >= 1.0:
            return out
        words = word_targets(model.get_input_embeddings().weight, mix["words"]).to(out.dtype)
        return (mix["share"] * shaped + (1.0 - mix["share"]) * words).view_as(out)

    hook = architecture(cfg.architecture).feature_module(model).register_forward_hook(image_features)
    named = list(model.named_parameters())
    decay = [p for n, p in named if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in named if p.ndim < 2 or "embed" in n]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, cfg.steps, cfg.warmup_steps))
    image_seq_length = (cfg.image_size // cfg.patch_size) ** 2
    tokens = answer_tokens = 0
    ema = None
    start = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc="training testbed", disable=not progress, dynamic_ncols=True)
    try:
        for step in bar:
            batch = make_batch(cfg, step, processor, image_seq_length).to(device)
            mix["share"] = real_feature_share(step, cfg.steps, cfg.word_features_until, cfg.word_features_ramp)
            mix["words"] = batch.patch_words
            features.clear()
            with torch.autocast(device.type, dtype=torch.bfloat16):
                logits = model(
                    input_ids=batch.input_ids,
                    attention_mask=batch.attention_mask,
                    position_ids=batch.position_ids,
                    **batch.vision,
                ).logits
            token_loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(),
                batch.labels[:, 1:].flatten(),
                ignore_index=IGNORE,
                reduction="none",
            )
            weights = batch.weights[:, 1:].flatten()
            lm_loss = (token_loss * weights).sum() / weights.sum()
            embed = model.get_input_embeddings().weight
            loss = lm_loss + cfg.align_weight * align_loss(embed, features[0], batch.patch_words)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            tokens += int((batch.input_ids != processor.tokenizer.pad_token_id).sum())
            answer_tokens += int((batch.labels != IGNORE).sum())
            ema = lm_loss.item() if ema is None else 0.95 * ema + 0.05 * lm_loss.item()
            bar.set_postfix(loss=f"{ema:.3f}", real_features=f"{mix['share']:.2f}")
    finally:
        hook.remove()
    model.eval()
    return TrainStats(cfg.steps, tokens, answer_tokens, time.perf_counter() - start, float(ema or 0.0))
