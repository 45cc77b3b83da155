"""What the tree loop costs on this CPU at LLaVA-1.5-7B scale, from checkpoints on disk in the Hub's llava-hf layout.

Random bf16 weights (costs need no training): LLaVA-1.5-7B's architecture (`synthetic.llava_config("7b")`: vocabulary
32064, image token 32000, 576 image tokens from CLIP ViT-L/14 at 336 px, text width 4096/11008) with `--layers` text
layers and `--vision-layers` CLIP layers, saved with `save_pretrained` and a `LlavaProcessor` (CLIP's image processor
and a word-level tokenizer built here, `<image>` = 32000), written in the Hub's layout (`export.export_target`:
`language_model.model.*`, `language_model.lm_head.*`, `vision_tower.vision_model.*`, `multi_modal_projector.*`), and
a random draft of matching shape (`SpecVLMDraftModel.from_target`). Then, in float32 and in bfloat16, each part
time-boxed and recorded (a failing part is a result, not the end of the run):

1. load: `LlavaForConditionalGeneration.from_pretrained`, `AutoProcessor.from_pretrained`,
   `SpecVLMDraftModel.from_pretrained(dir, target=target)`; the loaded weights equal the saved ones.
2. decode: greedy through `target.generate(..., assistant_model=draft)` and `speculative_generate` against plain
   greedy `generate()` (float32: must be equal; bfloat16: a match rate, near-ties round differently).
3. costs (`--dtype`): T(q)/T(1), the draft's level per width in every draft numerics this CPU runs, plain decoding, the
   loop's overhead share, and what the auto tree picks with these costs.

Writes `scale_costs.json` and `README.md` under `--out`; deletes the checkpoints unless `--keep`.

    python -m specvlm_hf.benchmark.scale_costs --out scale_costs         # 4 text layers, 24 CLIP layers: ~10 GB RAM
    python -m specvlm_hf.benchmark.scale_costs --out /tmp/sc --tiny      # the same path in seconds
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import resource
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    AutoProcessor,
    CLIPImageProcessorPil,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from ..configuration import SpeculativeConfig
from ..draft_step import available_numerics
from ..export import export_target
from ..generation import speculative_generate
from ..modeling_draft import SpecVLMDraftModel
from ..testbed.tokenizer import CHAT_TEMPLATE
from ..tuning import DeviceCosts, choose_numerics, measure_draft_levels
from .calibration import measure_cost_curve, measure_plain_decoding, profile_loop, replay_context
from .gpu_check import TREES, _part, auto_tree_choices, loop_split
from .prompts import Sample
from .report import environment
from .stats import first_mismatch
from .synthetic import llava_config, num_image_tokens, random_llava

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
COST_SIZES = (1, 2, 4, 8, 16, 32, 64)
DECODE_TREE = TREES["tree"]  # depth 5, top-k 4, 24 tokens: a random draft's drafts are rejected, every step verified
PROFILED_TREES = ("chain", "tree")
PART_SECONDS = 900.0  # a part starts no further prompt or tree shape after this
QUESTIONS = (
    "Describe this image in detail.",
    "What objects are in the picture, and what colors are they?",
    "Is there any text in the image? If so, what does it say?",
)
# The Hub's llava-hf name prefixes (llava-hf/llava-1.5-7b-hf) -> `LlavaForConditionalGeneration`'s parameter name
# prefixes in transformers 5 (its `save_pretrained` writes the Hub's names, but `vision_tower.*` for the vision tower)
HUB_TO_PARAMETER = {
    "language_model.model.": "model.language_model.",
    "language_model.lm_head.": "lm_head.",
    "vision_tower.vision_model.": "model.vision_tower.",
    "multi_modal_projector.": "model.multi_modal_projector.",
}
UNK, BOS, EOS, IMAGE = "<unk>", "<s>", "</s>", "<image>"  # Llama's ids 0, 1, 2; <image> at the config's image token


# ----------------------------------------------------------------------------------------------- the checkpoints
def scale_config(tiny: bool, layers: int | None, vision_layers: int | None) -> LlavaConfig:
    """LLaVA-1.5-7B's config (`tiny`: the tiny one) with `layers` text and `vision_layers` CLIP layers (`None`: the
    scale's own count for CLIP; 4 text layers at 7B scale)."""
    config = llava_config("tiny" if tiny else "7b")
    default_layers = config.text_config.num_hidden_layers if tiny else 4
    config.text_config.num_hidden_layers = layers or default_layers
    config.vision_config.num_hidden_layers = vision_layers or config.vision_config.num_hidden_layers
    config.image_seq_length = num_image_tokens(config)
    return config


def build_tokenizer(config: LlavaConfig, texts: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with LLaVA-1.5's special ids (`<unk>` 0, `<s>` 1, `</s>` 2, `<image>` at
    `config.image_token_id`, the last id): the words of `texts` and of the chat template, then filler words up to the
    image token. `<s>` is prepended; `<unk>` pads (the config's `pad_token_id` 0)."""
    image_token = config.image_token_id
    split = pre_tokenizers.Whitespace().pre_tokenize_str
    words = list(dict.fromkeys([UNK, BOS, EOS, *(w for text in ["USER: ASSISTANT:", *texts] for w, _ in split(text))]))
    if len(words) > image_token:
        raise ValueError(f"{len(words)} words do not fit below the image token {image_token}")
    words += [f"w{i}" for i in range(len(words), image_token)]
    vocab = {word: i for i, word in enumerate([*words, IMAGE])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([UNK, BOS, EOS, IMAGE])  # already in the vocabulary: they keep their ids
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=UNK,
        extra_special_tokens={"image_token": IMAGE},
        chat_template=CHAT_TEMPLATE,
        model_max_length=config.text_config.max_position_embeddings,
        clean_up_tokenization_spaces=False,
    )


def build_processor(config: LlavaConfig) -> LlavaProcessor:
    """LLaVA-1.5's processor at `config`'s image size: CLIP's image processor (resize the short side, center crop,
    CLIP's mean/std) and `build_tokenizer`; `<image>` expands to `num_image_tokens(config)` tokens."""
    side = config.vision_config.image_size
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": side},
        crop_size={"height": side, "width": side},
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
        do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(config, list(QUESTIONS)),
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
        chat_template=CHAT_TEMPLATE,
    )


def probe_names(config: LlavaConfig) -> list[str]:
    """Hub-layout names of a few tensors, one per part of the model (the last text and vision layers)."""
    text, vision = config.text_config.num_hidden_layers - 1, config.vision_config.num_hidden_layers - 1
    return [
        "language_model.model.embed_tokens.weight",
        f"language_model.model.layers.{text}.mlp.down_proj.weight",
        "language_model.lm_head.weight",
        "multi_modal_projector.linear_1.weight",
        "vision_tower.vision_model.embeddings.patch_embedding.weight",
        f"vision_tower.vision_model.encoder.layers.{vision}.self_attn.q_proj.weight",
    ]


def parameter_name(hub_name: str) -> str:
    """The `LlavaForConditionalGeneration` parameter stored under `hub_name` (`HUB_TO_PARAMETER`)."""
    prefix = next(p for p in HUB_TO_PARAMETER if hub_name.startswith(p))
    return HUB_TO_PARAMETER[prefix] + hub_name[len(prefix) :]


def weight_files(directory: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (the index's map when the checkpoint is sharded)."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        return {name: directory / file for name, file in json.loads(index.read_text())["weight_map"].items()}
    files = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            files.update(dict.fromkeys(f.keys(), path))
    return files


def disk_tensors(directory: Path, names) -> dict[str, torch.Tensor]:
    """The tensors `names` as stored in `directory`."""
    files, found = weight_files(directory), {}
    for name in names:
        with safe_open(files[name], "pt") as f:
            found[name] = f.get_tensor(name)
    return found


def key_layout(directory: Path) -> dict:
    """Tensor names on disk counted by Hub prefix (`other`: none of them); `hub_layout` when every name has one and
    every prefix occurs."""
    names = sorted(weight_files(directory))
    counts = {prefix: sum(n.startswith(prefix) for n in names) for prefix in HUB_TO_PARAMETER}
    counts["other"] = len(names) - sum(counts.values())
    return {
        "files": sorted({p.name for p in weight_files(directory).values()}),
        "tensors": len(names),
        "prefix_counts": counts,
        "hub_layout": counts["other"] == 0 and all(counts[p] for p in HUB_TO_PARAMETER),
        "examples": names[:3] + names[-3:],
    }


def weights_equal(model, directory: Path, names: list[str]) -> dict[str, bool]:
    """Whether each tensor stored under a Hub name in `names` equals `model`'s parameter (`parameter_name`) in the
    model's dtype."""
    found = {}
    for name, stored in disk_tensors(directory, names).items():
        weight = model.get_parameter(parameter_name(name)).detach()
        found[name] = torch.equal(weight, stored.to(weight.dtype))
    return found


def build_checkpoints(config: LlavaConfig, work: Path, logit_scale: float, seed: int = 0) -> dict:
    """Writes a random bf16 target with its processor to `work/target` in the Hub's layout (saved by
    `save_pretrained`, renamed by `export.export_target`) and a random draft of its shape to `work/draft`; checks
    that the stored probe tensors equal the built model's."""
    start = time.monotonic()
    target = random_llava(config, torch.device("cpu"), torch.bfloat16, seed=seed, logit_scale=logit_scale)
    torch.manual_seed(seed + 1)
    draft = SpecVLMDraftModel.from_target(target)
    built = time.monotonic()
    staging = work / "saved"
    target.save_pretrained(staging)
    build_processor(config).save_pretrained(staging)
    draft.save_pretrained(work / "draft")
    saved = time.monotonic()
    export_target(staging, work / "target")
    shutil.rmtree(staging)
    found = {
        "init_seconds": round(built - start, 1),
        "save_seconds": round(saved - built, 1),
        "export_seconds": round(time.monotonic() - saved, 1),
        "target_files": sorted(p.name for p in (work / "target").iterdir()),
        "target_layout": key_layout(work / "target"),
        "draft_tensors": sorted(weight_files(work / "draft")),
        "stored_equal_built": weights_equal(target, work / "target", probe_names(config)),
        "checkpoint_bytes": {
            name: sum(p.stat().st_size for p in (work / name).iterdir()) for name in ("target", "draft")
        },
    }
    return found


# ----------------------------------------------------------------------------------------------- loading
def load_checkpoints(work: Path, dtype: torch.dtype) -> tuple:
    """`(target, processor, draft, loading_info)` from `work` in `dtype`; the draft is bound to the target."""
    target, info = LlavaForConditionalGeneration.from_pretrained(
        work / "target", dtype=dtype, output_loading_info=True
    )
    target.eval()
    processor = AutoProcessor.from_pretrained(work / "target")
    draft = SpecVLMDraftModel.from_pretrained(work / "draft", target=target)
    return target, processor, draft, info


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of `module`'s own parameters and buffers (a draft's borrowed embedding and `lm_head` are not its own)."""
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def prompt_samples(processor, config: LlavaConfig, n: int, dtype: torch.dtype) -> list[Sample]:
    """`n` prompts: a random RGB image (4:3, larger than the crop) and one of `QUESTIONS` through the chat template;
    pixel values in `dtype`."""
    side = config.vision_config.image_size
    samples = []
    for i in range(n):
        pixels = np.random.default_rng(i).integers(0, 256, (side + side // 3, side + side // 2, 3), dtype=np.uint8)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTIONS[i]}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = dict(processor(images=Image.fromarray(pixels), text=text, return_tensors="pt"))
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        samples.append(Sample(f"prompt-{i}", "scale", inputs))
    return samples


def check_loaded(target, draft, info: dict, work: Path, config: LlavaConfig, sample: Sample) -> dict:
    """The loaded models against the stored tensors (`info`: `from_pretrained`'s loading info), the image tokens in
    a processed prompt (`sample`), and the models' sizes."""
    stored_draft = disk_tensors(work / "draft", weight_files(work / "draft"))
    own = draft.state_dict()
    return {
        "missing_keys": sorted(info["missing_keys"]),
        "unexpected_keys": sorted(info["unexpected_keys"]),
        "target_weights_equal": weights_equal(target, work / "target", probe_names(config)),
        "draft_weights_equal": all(torch.equal(own[n], t.to(own[n].dtype)) for n, t in stored_draft.items()),
        "image_tokens_in_prompt": int((sample.inputs["input_ids"] == config.image_token_id).sum()),
        "target_weight_bytes": weight_bytes(target),
        "draft_weight_bytes": weight_bytes(draft),
        "attn_implementation": target.config._attn_implementation,
    }


# ----------------------------------------------------------------------------------------------- decoding
def use_tree(draft: SpecVLMDraftModel, tree: SpeculativeConfig, numerics: str) -> None:
    """Fixes the tree and the draft numerics `assistant_model=draft` decodes with: no auto tree, so no cost
    measurement (`tuning.device_costs`) and nothing written to the costs cache."""
    draft.speculative_config = tree.with_overrides(draft_numerics=numerics)


def route_result(tokens: list[int], reference: list[int], plain_logits, start: float, sigma: float) -> dict:
    """One route's output against plain greedy (`reference`): equality, first divergence and plain's top-1/top-2
    logit margin there (`plain_logits`: one `(1, vocab)` tensor per generated token), its seconds since `start`
    (`time.monotonic()`) and its mean accepted length `sigma`."""
    seconds = time.monotonic() - start
    position = first_mismatch(tokens, reference)
    found = {"equal": position is None, "first_divergence": position, "sigma": sigma, "seconds": round(seconds, 2)}
    if position is not None and position < len(plain_logits):
        top = plain_logits[position][0].float().topk(2).values.tolist()
        found["margin"] = top[0] - top[1]
    return found


@torch.no_grad()
def decode_routes(target, draft, samples: list[Sample], new_tokens: int, deadline) -> dict:
    """Greedy on each prompt: plain `generate()`, `generate(assistant_model=draft)` and `speculative_generate`, the
    last two with `DECODE_TREE`; exact matches over (prompt, route) pairs and tokens before the first divergence."""
    use_tree(draft, DECODE_TREE, "reference")
    runs = []
    for sample in samples:
        if deadline.left() <= 0:
            break
        n = sample.prompt_len
        start = time.monotonic()
        plain = target.generate(
            **sample.inputs,
            max_new_tokens=new_tokens,
            do_sample=False,
            return_dict_in_generate=True,
            output_logits=True,
        )
        run = {"prompt": sample.id, "prompt_len": n, "plain_seconds": round(time.monotonic() - start, 2)}
        reference = plain.sequences[0, n:].tolist()
        start = time.monotonic()
        out = target.generate(
            **sample.inputs,
            assistant_model=draft,
            max_new_tokens=new_tokens,
            do_sample=False,
            return_dict_in_generate=True,
        )
        sigma = out.speculative_stats.mean_accepted_length
        run["generate"] = route_result(out.sequences[0, n:].tolist(), reference, plain.logits, start, sigma)
        start = time.monotonic()
        out = speculative_generate(target, draft, **sample.inputs, max_new_tokens=new_tokens, do_sample=False)
        sigma = out.mean_accepted_length
        run["speculative_generate"] = route_result(
            out.sequences[0, n:].tolist(), reference, plain.logits, start, sigma
        )
        run["plain_tokens"] = reference
        runs.append(run)
    pairs = [run[route] for run in runs for route in ("generate", "speculative_generate")]
    matched = sum(new_tokens if p["equal"] else p["first_divergence"] for p in pairs)
    return {
        "tree": {"depth": DECODE_TREE.depth, "top_k": DECODE_TREE.top_k, "total_tokens": DECODE_TREE.total_tokens},
        "new_tokens": new_tokens,
        "exact": sum(p["equal"] for p in pairs),
        "compared": len(pairs),
        "token_match_rate": matched / (new_tokens * len(pairs)) if pairs else None,
        "runs": runs,
    }


# ----------------------------------------------------------------------------------------------- costs
def measure_costs(target, draft, sample: Sample, new_tokens: int, deadline) -> dict:
    """On `sample`: plain decoding, T(q) for `COST_SIZES` over the prompt and half the continuation, one draft level
    per width in every numerics this device runs for the draft's dtype, the auto tree's picks with these costs, and
    the loop's per-step verify / draft / other seconds for `PROFILED_TREES` in the numerics `choose_numerics` picks."""
    plain = measure_plain_decoding(target, sample, 0.0, new_tokens, seed=0)
    context = replay_context(target, sample, plain.sequence)
    curve = measure_cost_curve(target, context, COST_SIZES)
    runs_here = available_numerics(draft.fc.weight.device, draft.fc.weight.dtype)
    levels = {numerics: measure_draft_levels(draft, curve.prefix_len, numerics=numerics) for numerics in runs_here}
    numerics = choose_numerics(levels)
    costs = DeviceCosts(curve, levels[numerics], numerics, levels)
    t1 = curve.seconds[0]
    found = {
        "prompt_len": sample.prompt_len,
        "plain_step_seconds": plain.seconds_per_token,
        "first_token_seconds": plain.first_token_seconds,
        "cost_curve_prefix_len": curve.prefix_len,
        "cost_curve_seconds": dict(zip(curve.sizes, curve.seconds)),
        "cost_curve_relative": curve.relative(),
        "draft_level_seconds": levels,
        "draft_level_share_of_t1": {n: {k: t / t1 for k, t in level.items()} for n, level in levels.items()},
        "chosen_numerics": numerics,
        "auto_tree": {n: auto_tree_choices(costs.with_numerics(n)) for n in levels},
        "loop": {},
    }
    use_tree(draft, SpeculativeConfig(), numerics)  # profile_loop's trees take the numerics from the draft's config
    for name in PROFILED_TREES:
        if deadline.left() <= 0:
            break
        found["loop"][name] = loop_split(profile_loop(target, draft, sample, TREES[name], 0.0, new_tokens, seed=0))
    return found


# ----------------------------------------------------------------------------------------------- the run
def peak_rss_gib() -> float:
    """This process's resident set high-water mark (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _recorded(name: str, fn) -> dict:
    """`gpu_check._part` with `PART_SECONDS`, the peak RSS so far added and a failure logged."""
    result = _part(name, PART_SECONDS, fn)
    result["peak_rss_gib"] = round(peak_rss_gib(), 2)
    if "error" in result:
        logger.error("part %s failed: %s", name, result["error"])
    return result


def run_dtype(
    work: Path, config: LlavaConfig, dtype: torch.dtype, *, prompts: int, new_tokens: int, costs: bool
) -> dict:
    """Load, decode and (with `costs`) measure in `dtype`; the models are freed afterwards."""
    name = str(dtype).removeprefix("torch.")
    loaded = {}

    def load(_deadline) -> dict:
        target, processor, draft, info = load_checkpoints(work, dtype)
        samples = prompt_samples(processor, config, prompts, dtype)
        found = {"processor": type(processor).__name__, **check_loaded(target, draft, info, work, config, samples[0])}
        loaded.update(target=target, draft=draft, samples=samples)
        return found

    found = {"load": _recorded(f"load {name}", load)}
    if loaded:
        target, draft, samples = loaded.pop("target"), loaded.pop("draft"), loaded.pop("samples")
        found["decode"] = _recorded(f"decode {name}", lambda d: decode_routes(target, draft, samples, new_tokens, d))
        if costs:
            found["costs"] = _recorded(
                f"costs {name}", lambda d: measure_costs(target, draft, samples[0], new_tokens, d)
            )
        del target, draft, samples
    gc.collect()  # the next dtype's models load into the memory these held
    return found


def run(
    out: str | Path,
    *,
    tiny: bool = False,
    layers: int | None = None,
    vision_layers: int | None = None,
    cost_dtypes: tuple[str, ...] = ("float32", "bfloat16"),
    prompts: int = 2,
    new_tokens: int = 16,
    work_dir: str | Path | None = None,
    keep: bool = False,
    command: str = "",
) -> dict:
    """Builds the checkpoints under a new folder in `work_dir` (default: `out`), runs every part in float32 and
    bfloat16, writes `scale_costs.json` and `README.md` to `out` and deletes the checkpoints unless `keep`."""
    start = time.monotonic()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    Path(work_dir or out).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="checkpoints-", dir=work_dir or out))
    config = scale_config(tiny, layers, vision_layers)
    report = {
        "command": command,
        "environment": environment(torch.device("cpu"), torch.float32),
        "tiny": tiny,
        "config": {
            "text_layers": config.text_config.num_hidden_layers,
            "vision_layers": config.vision_config.num_hidden_layers,
            "hidden_size": config.text_config.hidden_size,
            "intermediate_size": config.text_config.intermediate_size,
            "vocab_size": config.text_config.vocab_size,
            "image_token_id": config.image_token_id,
            "image_tokens": num_image_tokens(config),
            "saved_dtype": "bfloat16",
            "prompts": prompts,
            "new_tokens": new_tokens,
            "cost_dtypes": list(cost_dtypes),
        },
        "checkpoints": str(work) if keep else None,
    }
    logit_scale = 6.0 if tiny else 1.0  # tiny: sharpened so that greedy text varies (tests/tiny.py)
    try:
        report["build"] = _recorded("build", lambda _d: build_checkpoints(config, work, logit_scale))
        if "error" not in report["build"]:
            for name, dtype in DTYPES.items():
                report[name] = run_dtype(
                    work, config, dtype, prompts=prompts, new_tokens=new_tokens, costs=name in cost_dtypes
                )
    finally:  # multi-GB checkpoints never outlive the run unless asked for
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    report["load_average_end"] = list(os.getloadavg())
    report["peak_rss_gib"] = round(peak_rss_gib(), 2)
    report["seconds"] = round(time.monotonic() - start, 1)
    (out / "scale_costs.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "README.md").write_text(markdown_report(report))
    return report


def failures(report: dict) -> list[str]:
    """The parts that failed, and float32 routes unequal to plain greedy."""
    failed = ["build"] if "error" in report["build"] else []
    for name in DTYPES:
        for part, found in report.get(name, {}).items():
            if "error" in found:
                failed.append(f"{part} {name}")
    decode = report.get("float32", {}).get("decode", {})
    if "exact" in decode and decode["exact"] != decode["compared"]:
        failed.append("float32 decoding not equal to plain greedy")
    return failed


# ----------------------------------------------------------------------------------------------- README
def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def _error(found: dict) -> str:
    return f"failed: {found['error']}"


def _loaded_lines(name: str, load: dict) -> list[str]:
    if "error" in load:
        return [f"- load {name}: {_error(load)}"]
    return [
        f"- load {name} ({load['seconds']} s): missing keys {len(load['missing_keys'])}, unexpected keys "
        f"{len(load['unexpected_keys'])}; probe tensors equal to the saved ones: "
        f"{all(load['target_weights_equal'].values())}; draft equal: {load['draft_weights_equal']}; weights "
        f"{_size(load['target_weight_bytes'])} target + {_size(load['draft_weight_bytes'])} draft; "
        f"{load['image_tokens_in_prompt']} image tokens per prompt"
    ]


def _decode_lines(name: str, decode: dict) -> list[str]:
    if "error" in decode:
        return [f"- decode {name}: {_error(decode)}"]
    margins = [
        f"{run[route]['margin']:.3g}"
        for run in decode["runs"]
        for route in ("generate", "speculative_generate")
        if "margin" in run[route]
    ]
    line = (
        f"- decode {name}: {decode['exact']}/{decode['compared']} (prompt, route) pairs equal to plain greedy, "
        f"{decode['token_match_rate']:.0%} of tokens before the first divergence ({decode['new_tokens']} new tokens)"
    )
    return [line + (f"; top-1/top-2 logit margins at divergences: {', '.join(margins)}" if margins else "")]


def _cost_lines(name: str, costs: dict) -> list[str]:
    if "error" in costs:
        return [f"### Costs in {name}", "", _error(costs), ""]
    sizes = list(costs["cost_curve_relative"])
    lines = [
        f"### Costs in {name} ({costs['seconds']} s)",
        "",
        f"Prefix {costs['cost_curve_prefix_len']} tokens; T(1) = {costs['cost_curve_seconds'][1] * 1e3:.1f} ms; "
        f"plain decoding {costs['plain_step_seconds'] * 1e3:.1f} ms/token, first token "
        f"{costs['first_token_seconds']:.2f} s.",
        "",
        "| q | " + " | ".join(map(str, sizes)) + " |",
        "|---|" + "---|" * len(sizes),
        "| T(q)/T(1) | " + " | ".join(f"{costs['cost_curve_relative'][q]:.2f}" for q in sizes) + " |",
        "",
        f"One draft level as a share of T(1), per width k (chosen numerics: `{costs['chosen_numerics']}`):",
        "",
        "| numerics | k=1 | k=2 | k=4 | k=8 | auto tree picks |",
        "|---|---|---|---|---|---|",
    ]
    for numerics, shares in costs["draft_level_share_of_t1"].items():
        picks = "; ".join(f"{a}: {t}" for a, t in costs["auto_tree"][numerics].items())
        lines.append(f"| {numerics} | " + " | ".join(f"{shares[k]:.3f}" for k in (1, 2, 4, 8)) + f" | {picks} |")
    lines += [
        "",
        "| tree | verify ms/step | draft ms/step | other ms/step | overhead share |",
        "|---|---|---|---|---|",
    ]
    for tree, loop in costs["loop"].items():
        lines.append(
            f"| {tree} | {loop['verify_seconds'] * 1e3:.1f} | {loop['draft_seconds'] * 1e3:.1f} | "
            f"{loop['overhead_seconds'] * 1e3:.1f} | {loop['overhead_share']:.1%} |"
        )
    return [*lines, ""]


def markdown_report(report: dict) -> str:
    """`README.md`: the command, the machine, the checkpoints, equality, costs and memory."""
    env, config, build = report["environment"], report["config"], report["build"]
    lines = [
        f"# Tree-loop costs at {'tiny' if report['tiny'] else 'LLaVA-1.5-7B'} scale on {env['device_name']}",
        "",
        f"    {report['command']}",
        "",
        f"{env['cpu_count']} CPUs, {env['torch_threads']} torch threads, load average "
        f"{', '.join(f'{x:.2f}' for x in env['load_average'] or [])} at the start, "
        f"{', '.join(f'{x:.2f}' for x in report['load_average_end'])} at the end; torch {env['torch']}, "
        f"transformers {env['transformers']}, specvlm_hf {env['specvlm_hf']}. Total {report['seconds']} s, peak "
        f"resident memory {report['peak_rss_gib']:.2f} GiB.",
        "",
        f"Random bf16 weights: text layers {config['text_layers']} (hidden {config['hidden_size']}, MLP "
        f"{config['intermediate_size']}), CLIP layers {config['vision_layers']}, vocabulary {config['vocab_size']}, "
        f"image token {config['image_token_id']}, {config['image_tokens']} image tokens; a random draft (one decoder "
        "layer), so the costs mean something and the acceptance does not.",
        "",
        "## Checkpoints",
        "",
    ]
    if "error" in build:
        lines.append(_error(build))
    else:
        layout = build["target_layout"]
        lines += [
            f"- target in the Hub layout: {layout['hub_layout']} ({layout['tensors']} tensors: "
            + ", ".join(f"`{p}*` {c}" for p, c in layout["prefix_counts"].items())
            + f"); stored probes equal the built model: {all(build['stored_equal_built'].values())}",
            f"- on disk: target {_size(build['checkpoint_bytes']['target'])}, draft "
            f"{_size(build['checkpoint_bytes']['draft'])}; built in {build['seconds']} s",
        ]
    for name in DTYPES:
        found = report.get(name, {})
        if "load" in found:
            lines += _loaded_lines(name, found["load"])
        if "decode" in found:
            lines += _decode_lines(name, found["decode"])
    lines += ["", "## Costs", ""]
    for name in DTYPES:
        if "costs" in report.get(name, {}):
            lines += _cost_lines(name, report[name]["costs"])
    lines += [
        "Auto tree picks assume a per-depth acceptance alpha (a random draft has none) and the testbed draft's top-k "
        "mass (`gpu_check.auto_tree_choices`). Peak memory is the resident set high-water mark after each part: "
        + ", ".join(
            f"{part} {name} {report[name][part]['peak_rss_gib']:.2f} GiB"
            for name in DTYPES
            for part in report.get(name, {})
        ),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="Directory for scale_costs.json and README.md.")
    parser.add_argument("--layers", type=int, help="Text layers (default: 4; --tiny: 2).")
    parser.add_argument("--vision-layers", type=int, help="CLIP layers (default: all 24; --tiny: 1).")
    parser.add_argument(
        "--dtype", nargs="+", choices=list(DTYPES), default=list(DTYPES),
        help="Dtypes to measure costs in (default: both); equality is checked in both regardless.",
    )  # fmt: skip
    parser.add_argument("--prompts", type=int, default=2, help="Prompts decoded per dtype (default: 2, at most 3).")
    parser.add_argument("--new-tokens", type=int, default=16, help="Tokens per decode (default: 16).")
    parser.add_argument("--work-dir", help="Where the checkpoints are written (default: a folder inside --out).")
    parser.add_argument("--keep", action="store_true", help="Keep the checkpoints (their path is in the JSON).")
    parser.add_argument("--tiny", action="store_true", help="A tiny LLaVA: the same path in seconds.")
    args = parser.parse_args(argv)
    if not 1 <= args.prompts <= len(QUESTIONS):
        parser.error(f"--prompts must be between 1 and {len(QUESTIONS)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    command = shlex.join(["python", "-m", "specvlm_hf.benchmark.scale_costs", *argv])
    report = run(
        args.out,
        tiny=args.tiny,
        layers=args.layers,
        vision_layers=args.vision_layers,
        cost_dtypes=tuple(args.dtype),
        prompts=args.prompts,
        new_tokens=args.new_tokens,
        work_dir=args.work_dir,
        keep=args.keep,
        command=command,
    )
    failed = failures(report)
    logger.info("wrote %s/{scale_costs.json,README.md} in %.0f s%s", args.out, report["seconds"],
                f"; failed: {failed}" if failed else "")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
