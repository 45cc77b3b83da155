"""The testbed's quality report: held-out visual-question accuracy against chance and an image-swap control,
long-answer lengths and fact recall, and a loop detector calibrated on the grammar's own reference texts.
"""

from __future__ import annotations

import re
import statistics
import time
from collections import Counter
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .architectures import architecture
from .dataset import TestbedPrompt, heldout_prompts
from .grammar import OPTIONS
from .scenes import COLOURS, DIGITS, SHAPES, WORDS, Scene

MIN_ACCURACY = 0.85
MAX_DEGENERATE = 0.10
LOOP_NGRAM = 8  # tokens; the grammar repeats shorter phrases legitimately
LOOP_REPEATS = 3  # an n-gram said this often is a loop (twice is a repeated sentence, which the report counts apart)


@dataclass(frozen=True)
class Generation:
    """A greedy answer: decoded text, new token ids (with `</s>` if emitted) and whether it ended with `</s>`."""

    text: str
    tokens: tuple[int, ...]
    ended: bool

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)


def words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def options_mentioned(text: str, options) -> set[str]:
    """The options (single words or phrases such as "top left") that occur in `text` as whole words."""
    padded = " " + " ".join(words(text)) + " "
    return {o for o in options if f" {o} " in padded}


def is_correct(text: str, key: str, options) -> bool:
    """An answer is correct when it names the key and no other option."""
    return options_mentioned(text, options) == {key}


def chance_level(keys: list[str]) -> float:
    """Accuracy of the best image-blind constant answer: the share of the most frequent key."""
    return Counter(keys).most_common(1)[0][1] / len(keys) if keys else 0.0


def max_ngram_repeat(tokens, n: int = LOOP_NGRAM) -> int:
    """How often the most frequent n-gram of the sequence `tokens` occurs (0 when it is shorter than `n`)."""
    tokens = list(tokens)
    grams = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    return max(grams.values(), default=0)


def loop_flags(outputs: list, references: list, n: int = LOOP_NGRAM, repeats: int = LOOP_REPEATS) -> list[bool]:
    """Flags outputs caught in a loop: their most repeated token n-gram occurs at least `repeats` times and more
    often than in any reference (token sequences of the same tokenizer), since the grammar itself repeats phrases.
    With `repeats=2`, any n-gram said twice more often than the references allow is flagged (a stricter count)."""
    threshold = max(repeats - 1, max((max_ngram_repeat(r, n) for r in references), default=1))
    return [max_ngram_repeat(o, n) > threshold for o in outputs]


def object_recall(text: str, scene: Scene) -> tuple[float, float]:
    """(recall, precision) of the "colour shape" pairs that a description names, against the scene's objects
    (a scene of shapes)."""
    w = words(text)
    named = {(a, b) for a, b in zip(w, w[1:]) if a in COLOURS and b in SHAPES}
    truth = {(o.colour, o.shape) for o in scene.objects}
    return len(named & truth) / len(truth), (len(named & truth) / len(named) if named else 0.0)


def reads_text(text: str, scene: Scene) -> bool:
    """Whether a description of a card names its digit or word before any other digit or word."""
    named = [w for w in words(text) if w in DIGITS or w in WORDS]
    return bool(named) and named[0] == scene.text.content


@torch.inference_mode()
def generate(model, processor, prompts: list[TestbedPrompt], *, max_new_tokens: int, batch_size: int = 32,
             images=None, progress: bool = False, desc: str = "generating") -> list[Generation]:  # fmt: skip
    """Greedy answers to `prompts`, batched with left padding; `images` replaces the prompts' own images."""
    tokenizer = processor.tokenizer
    images = images or [p.image for p in prompts]
    out = []
    for i in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=not progress, leave=False):
        chunk = prompts[i : i + batch_size]
        texts = [processor.apply_chat_template(p.messages(), add_generation_prompt=True) for p in chunk]
        inputs = processor(images=images[i : i + batch_size], text=texts, padding=True, return_tensors="pt")
        inputs = inputs.to(model.device)
        sequences = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        for row in sequences[:, inputs["input_ids"].shape[1] :].tolist():
            ended = tokenizer.eos_token_id in row
            row = row[: row.index(tokenizer.eos_token_id) + 1] if ended else row
            out.append(Generation(tokenizer.decode(row, skip_special_tokens=True).strip(), tuple(row), ended))
    return out


def vqa_scores(prompts: list[TestbedPrompt], answers: list[Generation]) -> dict:
    """Per-category and overall accuracy with the chance level beside it."""
    by_category: dict[str, list[tuple[bool, str]]] = {}
    for p, a in zip(prompts, answers):
        by_category.setdefault(p.category, []).append((is_correct(a.text, p.key, OPTIONS[p.category]), p.key))
    result = {}
    for category, rows in sorted(by_category.items()):
        result[category] = {
            "n": len(rows),
            "accuracy": sum(ok for ok, _ in rows) / len(rows),
            "chance": chance_level([k for _, k in rows]),
        }
    n = sum(r["n"] for r in result.values())
    result["overall"] = {
        "n": n,
        "accuracy": sum(r["accuracy"] * r["n"] for r in result.values()) / max(n, 1),
        "chance": sum(r["chance"] * r["n"] for r in result.values()) / max(n, 1),
    }
    return result


def length_stats(generations: list[Generation]) -> dict:
    lengths = [g.num_tokens for g in generations]
    return {
        "n": len(lengths),
        "min": min(lengths),
        "median": statistics.median(lengths),
        "mean": round(statistics.fmean(lengths), 1),
        "max": max(lengths),
        "ended_with_eos": sum(g.ended for g in generations) / len(generations),
    }


def quality_report(
    model, processor, *, cards: bool = False, max_long_tokens: int = 300, progress: bool = True
) -> dict:
    """Runs the held-out evaluation (greedy, in the model's dtype) and returns the report with its gates; `cards`
    adds the digit and word cards (for a testbed built with them)."""
    start = time.perf_counter()
    arch = architecture(model.config.model_type)
    image_size = arch.image_size(processor)
    vqa = [p for p in heldout_prompts("short", image_size=image_size, cards=cards) if p.key is not None]
    long = heldout_prompts("long", image_size=image_size, cards=cards)
    answers = generate(model, processor, vqa, max_new_tokens=20, progress=progress, desc="held-out VQA")
    images = {p.scene: p.image for p in vqa}  # held-out scenes in order
    scenes = list(images)
    following = {s: images[scenes[(i + 1) % len(scenes)]] for i, s in enumerate(scenes)}
    swapped = [following[p.scene] for p in vqa]  # the next scene's image: answers should fall to chance
    swap_answers = generate(model, processor, vqa, max_new_tokens=20, images=swapped, progress=progress,
                            desc="image-swap control")  # fmt: skip
    descriptions = generate(model, processor, long, max_new_tokens=max_long_tokens, progress=progress,
                            desc="long answers")  # fmt: skip
    scores, swap = vqa_scores(vqa, answers), vqa_scores(vqa, swap_answers)
    references = [
        processor.tokenizer(arch.answer_prefix + p.reference, add_special_tokens=False).input_ids for p in long
    ]
    tokens = [d.tokens for d in descriptions]
    flags = [loop or not d.ended for loop, d in zip(loop_flags(tokens, references), descriptions)]
    repeated = loop_flags(tokens, references, repeats=2)
    recall = [object_recall(d.text, p.scene) for d, p in zip(descriptions, long) if p.scene.text is None]
    read = [reads_text(d.text, p.scene) for d, p in zip(descriptions, long) if p.scene.text is not None]
    ref_lengths = [len(r) + 1 for r in references]  # + </s>
    first_card = next((i for i, p in enumerate(long) if p.scene.text is not None), None)
    overall, swap_overall = scores["overall"], swap["overall"]
    degenerate = sum(flags) / len(flags)
    return {
        "vqa": scores,
        "image_swap": {k: {"accuracy": v["accuracy"], "chance": v["chance"]} for k, v in swap.items()},
        "long": {
            "generated_tokens": length_stats(descriptions),
            "reference_tokens": {
                "min": min(ref_lengths),
                "median": statistics.median(ref_lengths),
                "max": max(ref_lengths),
            },
            "degenerate_share": degenerate,
            "loop_detector": f"no </s> within the budget, or a {LOOP_NGRAM}-token n-gram said {LOOP_REPEATS}+ times "
            "(more often than in any reference)",
            "repeated_sentence_share": sum(repeated) / len(repeated),
            "object_recall": statistics.fmean(r for r, _ in recall),
            "object_precision": statistics.fmean(p for _, p in recall),
            "text_read": sum(read) / len(read) if read else None,
            "examples": [
                {"question": p.question, "answer": d.text, "reference": p.reference}
                for i, (p, d) in enumerate(zip(long, descriptions))
                if i < 2 or i == first_card  # two of shapes, one of a card
            ],
        },
        "gates": {
            f"vqa_accuracy >= {MIN_ACCURACY}": overall["accuracy"] >= MIN_ACCURACY,
            f"degenerate_share <= {MAX_DEGENERATE}": degenerate <= MAX_DEGENERATE,
            "image_swap falls at least halfway to chance": swap_overall["accuracy"]
            <= (overall["accuracy"] + overall["chance"]) / 2,
        },
        "eval_seconds": round(time.perf_counter() - start, 1),
    }


def format_report(report: dict) -> str:
    """A short human-readable summary of a quality report."""
    lines = ["held-out VQA (accuracy / image swapped / chance):"]
    for category, row in report["vqa"].items():
        swap = report["image_swap"][category]["accuracy"]
        lines.append(f"  {category:<11} {row['accuracy']:6.1%} / {swap:6.1%} / {row['chance']:6.1%}  (n={row['n']})")
    long = report["long"]
    g = long["generated_tokens"]
    lines.append(
        f"long answers: tokens min {g['min']} median {g['median']} mean {g['mean']} max {g['max']}, "
        f"ended with </s> {g['ended_with_eos']:.0%}; in a loop {long['degenerate_share']:.1%} "
        f"(a sentence repeated {long.get('repeated_sentence_share', 0):.1%}); "
        f"objects named {long['object_recall']:.1%} (precision {long['object_precision']:.1%})"
        + (f"; cards read {long['text_read']:.1%}" if long.get("text_read") is not None else "")
    )
    if "build" in report:
        b = report["build"]
        lines.append(
            f"build: seed {b['config']['seed']}, {b['train_steps']} steps, {b['tokens_seen']:,} tokens, "
            f"{b['total_seconds']:.0f} s, {b['params']['total'] / 1e6:.1f}M params"
        )
    lines += [f"gate {'PASS' if ok else 'FAIL'}: {name}" for name, ok in report["gates"].items()]
    return "\n".join(lines)
