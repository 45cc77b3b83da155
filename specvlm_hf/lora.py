"""LoRA adaptation of a trained draft to a fine-tuned target: a small peft adapter on the draft's fusion layer and
decoder layer, trained by the same online distillation (`specvlm-hf train --init-draft DIR --lora`), saved alone.

A draft decodes with plain weights (the lean draft step reads them directly, `draft_step.check_plain_modules`), so an
adapter is merged into a copy of its base draft before drafting: `load_lora_draft` (what
`SpecVLMDraftModel.from_pretrained(adapter_dir, target=...)` calls) and `merged_draft` (a `PeftModel` in training).
The adapter folder records which base draft it was trained on (`specvlm_lora.json`, with the SHA-256 of the base's
weights), so it is never merged into another draft.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from .peft_wrappers import is_peft_model

LORA_RECORD = "specvlm_lora.json"
# The draft's linear layers: the fusion `fc` and each decoder layer's projections. The compressor is never adapted.
DEFAULT_LORA_MODULES = ("fc", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def draft_fingerprint(draft: nn.Module) -> str:
    """SHA-256 over the draft's own saved tensors (names, shapes and float32 values, in name order); the borrowed
    embedding and `lm_head` are not among them. A draft carrying LoRA layers hashes as its base weights."""
    digest = hashlib.sha256()
    state = {
        name.replace(".base_layer.", "."): tensor for name, tensor in draft.state_dict().items() if "lora_" not in name
    }
    for name, tensor in sorted(state.items()):
        digest.update(f"{name}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def add_lora(draft, r: int = 16, alpha: int = 32, modules=DEFAULT_LORA_MODULES, dropout: float = 0.0):
    """
    Wraps a trained `SpecVLMDraftModel` in a peft `PeftModel` with a fresh LoRA adapter on `modules` (names of the
    draft's linear layers; the compressor's are excluded). Only the adapter trains; the draft stays bound.
    """
    from peft import LoraConfig, get_peft_model

    if r < 1 or alpha <= 0:
        raise ValueError(f"LoRA needs r >= 1 and alpha > 0, got r={r}, alpha={alpha}")
    known = {name.rsplit(".", 1)[-1] for name, m in draft.named_modules() if isinstance(m, nn.Linear)}
    unknown = sorted(set(modules) - known)
    if unknown:
        raise ValueError(f"The draft has no linear layers named {unknown}; its linear layers: {sorted(known)}.")
    exclude = r"compressor\..*" if any(n.startswith("compressor.") for n, _ in draft.named_modules()) else None
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(modules), exclude_modules=exclude
    )
    return get_peft_model(draft, config)


def write_record(peft_draft, output_dir: str | Path, base_draft: str | None) -> dict:
    """Writes `specvlm_lora.json` beside a saved adapter: the base draft (as given and its fingerprint) and the
    target's shape, which `load_lora_draft` checks."""
    base = peft_draft.get_base_model()
    config = peft_draft.peft_config[peft_draft.active_adapter]
    record = {
        "base_draft": base_draft,
        "base_draft_sha256": draft_fingerprint(base),
        "target_model_type": base.config.target_model_type,
        "hidden_size": base.config.hidden_size,
        "vocab_size": base.config.vocab_size,
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "target_modules": sorted(config.target_modules),
    }
    Path(output_dir, LORA_RECORD).write_text(json.dumps(record, indent=2))
    return record


def merged_draft(draft):
    """A plain `SpecVLMDraftModel` copy of `draft` with its active LoRA adapter (if it is peft-wrapped) merged into
    the weights, bound to the same target; `draft` is unchanged (it may still be training)."""
    base = draft.get_base_model() if is_peft_model(draft) else draft
    borrowed, base._borrowed = base._borrowed, None  # copy the draft, never the target it borrows from
    try:
        plain = copy.deepcopy(draft)
    finally:
        base._borrowed = borrowed
    if is_peft_model(plain):
        plain = plain.merge_and_unload()
    return plain.bind(borrowed[0]) if borrowed else plain


def as_draft(model):
    """`model` ready to draft: merged when it is a peft-wrapped draft, else itself."""
    return merged_draft(model) if is_peft_model(model) else model


def load_lora_draft(adapter_dir: str | Path, target: nn.Module | None = None, base_draft=None, **load_kwargs):
    """
    The base draft with the adapter in `adapter_dir` merged, bound to `target` when given.

    Args:
        adapter_dir: a folder written by `specvlm-hf train --lora` (`adapter_config.json`, the adapter's weights and
            `specvlm_lora.json`).
        base_draft (path, Hub id or `SpecVLMDraftModel`, *optional*): the draft the adapter was trained on (a model
            passed here is left unchanged); by default the one the adapter names. Refused when its weights are not
            those the adapter was trained on.
        load_kwargs: passed to the base draft's `from_pretrained` (`revision`, `token`, ...).
    """
    from peft import PeftModel

    from .modeling_draft import SpecVLMDraftModel

    adapter_dir = Path(adapter_dir)
    record_path = adapter_dir / LORA_RECORD
    if not record_path.exists():
        raise FileNotFoundError(
            f"{adapter_dir} has no {LORA_RECORD}: it was not written by `specvlm-hf train --lora`."
        )
    record = json.loads(record_path.read_text())
    if base_draft is None:
        base_draft = record["base_draft"]
        if not base_draft:
            raise FileNotFoundError(
                f"The adapter in {adapter_dir} does not name its base draft (it was trained on one never saved); pass "
                "base_draft= (the draft it was trained on)."
            )
    if isinstance(base_draft, SpecVLMDraftModel):
        base_draft = merged_draft(base_draft)  # a copy: the caller's draft keeps its weights
    else:
        base_draft = SpecVLMDraftModel.from_pretrained(base_draft, **load_kwargs)
    found = draft_fingerprint(base_draft)
    if found != record["base_draft_sha256"]:
        raise ValueError(
            f"The adapter in {adapter_dir} was trained on another draft (weights sha256 {record['base_draft_sha256'][:12]}"
            f"..., named {record['base_draft']!r}); this base draft's weights hash to {found[:12]}.... Merging it "
            "would give a draft nobody trained."
        )
    merged = PeftModel.from_pretrained(base_draft, str(adapter_dir)).merge_and_unload()
    return merged.bind(target) if target is not None else merged


def write_adapter_card(output_dir: str | Path, record: dict, summary: dict, target_name: str, command: str | None):
    """A short README for an adapter folder: what it adapts, how it was trained, how to load it."""
    curve = summary.get("curve") or []
    lines = [
        "---",
        "library_name: peft",
        "tags: [specvlm_hf, speculative-decoding, draft-model, lora]",
        "---",
        "# LoRA adapter of a specvlm_hf draft",
        "",
        f"Adapts the draft `{record['base_draft']}` (weights sha256 `{record['base_draft_sha256'][:16]}...`) to the "
        f"target `{target_name}` by online-logit distillation: LoRA r={record['r']}, alpha={record['lora_alpha']} on "
        f"{', '.join(record['target_modules'])}; {summary['steps']} steps in {summary['wall_seconds']} s.",
        "",
    ]
    if curve:
        lines += ["Mean accepted length on held-out prompts (greedy), by epoch: "
                  + ", ".join(f"{p['epoch']}: {p['mean_accepted_length']:.2f}" for p in curve) + ".", ""]  # fmt: skip
    if command:
        lines += ["Trained with:", "", "```bash", command, "```", ""]
    lines += [
        "Load (the adapter is merged into its base draft, which must be the draft above):",
        "",
        "```python",
        "from specvlm_hf import SpecVLMDraftModel",
        "draft = SpecVLMDraftModel.from_pretrained(ADAPTER_DIR, target=target)",
        "out = target.generate(**inputs, assistant_model=draft)",
        "```",
    ]
    Path(output_dir, "README.md").write_text("\n".join(lines) + "\n")
