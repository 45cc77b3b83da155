"""Export an EAGLE-3 draft for serving engines as a speculators `eagle3` checkpoint (the layout vLLM's
`Eagle3LlamaForCausalLM` loads, `vllm serve <export>`), check such a config, import an export back, and write a
target in the layout engines load (`export_target`).

`config.json`: `speculators_model_type: "eagle3"`, `speculators_config` (algorithm, greedy proposal, the target as
`verifier`), the decoder layer's `transformer_layer_config` and the EAGLE-3 fields vLLM reads
(`eagle_aux_hidden_state_layer_ids`, `draft_vocab_size`, `norm_before_residual`, `fc_norm`). `model.safetensors`:
`fc.*`, `fc_norm.*`, `midlayer.*` (our `layers.0.*`), `norm.*`, `lm_head.*` and `d2t` when the draft vocabulary is
smaller; the token embedding stays the target's, which vLLM shares with the draft when the checkpoint has none.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .modeling_draft import SpecVLMDraftModel

FORMATS = ("speculators",)
SPECULATORS_VERSION = "0.9.0"  # the speculators release whose `eagle3` config vLLM 0.32 reads
EXTENSION = "specvlm_hf"  # our block in config.json (speculators configs allow extra keys); engines ignore it
CONFIG_NAME, WEIGHTS_NAME, README_NAME = "config.json", "model.safetensors", "README.md"

# draft weight-name prefix -> speculators `eagle3` prefix (vLLM maps `midlayer.` to its first layer)
_RENAMES = (("layers.0.", "midlayer."),)
# `SpecVLMDraftConfig` fields that are `LlamaConfig` fields of the same meaning: the `transformer_layer_config`
_LAYER_FIELDS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "vocab_size", "rms_norm_eps", "hidden_act", "attention_bias", "attention_dropout", "mlp_bias",
    "max_position_embeddings", "rope_parameters", "initializer_range",
)  # fmt: skip
_EAGLE3_FIELDS = ("eagle_aux_hidden_state_layer_ids", "draft_vocab_size", "norm_before_residual", "fc_norm")

_EAGLE2_REFUSAL = (
    "This is an EAGLE-2-style draft (SpecVLMDraftModel: fc over the token embedding and the target's last features, "
    "with an input norm and fc bias). No serving engine runs that layout: vLLM and SGLang load EAGLE drafts as "
    "speculators `eagle3` checkpoints (their EAGLE-1 Llama head has no input norm, no fc bias and takes no "
    "multimodal input, and speculators dropped the `eagle` type). Train an EAGLE-3 draft for the engine: "
    "`specvlm-hf train --family eagle3 --ttt-steps 3 ...`, then export that."
)


# ----------------------------------------------------------------------------------------------- pure parts
def speculators_config(draft_config, target: dict, depth: int) -> dict:
    """
    The `config.json` of an EAGLE-3 draft in the speculators `eagle3` layout.

    Args:
        draft_config (`SpecVLMEagle3DraftConfig`): the draft's architecture.
        target (`dict`): `{"name_or_path", "architectures"}` of the target, the speculators `verifier`.
        depth (`int`): draft tokens per step, speculators' `speculative_tokens` (an engine drafts a chain).
    """
    from . import __version__

    layer = {"model_type": "llama", **{name: getattr(draft_config, name) for name in _LAYER_FIELDS}}
    return {
        "architectures": ["Eagle3Speculator"],
        "speculators_model_type": "eagle3",
        "speculators_version": SPECULATORS_VERSION,
        "speculators_config": {
            "algorithm": "eagle3",
            "proposal_methods": [
                {
                    "proposal_type": "greedy",
                    "speculative_tokens": depth,
                    "verifier_accept_k": 1,
                    "accept_tolerance": 0.0,
                }
            ],
            "default_proposal_method": "greedy",
            "verifier": {"name_or_path": target["name_or_path"], "architectures": list(target["architectures"])},
        },
        "transformer_layer_config": {**layer, "tie_word_embeddings": False},
        "eagle_aux_hidden_state_layer_ids": list(draft_config.aux_hidden_state_layer_ids),
        "draft_vocab_size": draft_config.draft_vocab_size,
        "norm_before_residual": bool(draft_config.norm_before_residual),
        "fc_norm": bool(draft_config.fc_norm),
        "norm_before_fc": False,
        EXTENSION: {
            "version": __version__,
            "target_model_type": draft_config.target_model_type,
            "image_token_id": draft_config.image_token_id,
        },
    }


def speculators_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The draft's weights under speculators `eagle3` names (`layers.0.*` -> `midlayer.*`; others unchanged)."""
    return {_rename(name, _RENAMES): tensor for name, tensor in state_dict.items()}


def draft_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `speculators_state_dict`."""
    return {_rename(name, [(new, old) for old, new in _RENAMES]): tensor for name, tensor in state_dict.items()}


def _rename(name: str, renames) -> str:
    for old, new in renames:
        if name.startswith(old):
            return new + name[len(old) :]
    return name


def _is_int(value, low: int = 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _is_strings(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


# (dotted key, what it must be, test): what vLLM's speculators loader (`SpeculatorsConfig`, `update_eagle3`) and
# `Eagle3LlamaForCausalLM` read of an `eagle3` config.
_SCHEMA = (
    ("speculators_model_type", "'eagle3'", lambda v: v == "eagle3"),
    ("speculators_version", "a string", lambda v: isinstance(v, str)),
    ("architectures", "a list of strings", _is_strings),
    ("transformer_layer_config", "a dict", lambda v: isinstance(v, dict)),
    ("transformer_layer_config.model_type", "'llama'", lambda v: v == "llama"),
    *((f"transformer_layer_config.{k}", "an integer >= 1", _is_int) for k in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "vocab_size")),
    ("eagle_aux_hidden_state_layer_ids", "a list of three integers >= 0",
     lambda v: isinstance(v, list) and len(v) == 3 and all(_is_int(i, 0) for i in v)),
    ("draft_vocab_size", "an integer >= 1", _is_int),
    ("norm_before_residual", "a bool", lambda v: isinstance(v, bool)),
    ("fc_norm", "a bool", lambda v: isinstance(v, bool)),
    ("speculators_config", "a dict", lambda v: isinstance(v, dict)),
    ("speculators_config.algorithm", "'eagle3'", lambda v: v == "eagle3"),
    ("speculators_config.proposal_methods", "a non-empty list of dicts",
     lambda v: isinstance(v, list) and v and all(isinstance(m, dict) for m in v)),
    ("speculators_config.proposal_methods.0.speculative_tokens", "an integer >= 1", _is_int),
    ("speculators_config.default_proposal_method", "a string", lambda v: isinstance(v, str)),
    ("speculators_config.verifier", "a dict", lambda v: isinstance(v, dict)),
    ("speculators_config.verifier.name_or_path", "a non-empty string", lambda v: isinstance(v, str) and v != ""),
    ("speculators_config.verifier.architectures", "a list of strings", _is_strings),
)  # fmt: skip
_MISSING = object()


def check_speculators_config(config: dict) -> None:
    """
    Checks a `config.json` dict against what vLLM reads of a speculators `eagle3` checkpoint: required keys, their
    types and allowed values, and the draft vocabulary within the target's. Raises `ValueError` listing every problem
    by dotted key.
    """
    problems = []
    for key, expected, test in _SCHEMA:
        value = _lookup(config, key)
        if value is _MISSING:
            problems.append(f"{key}: missing")
        elif not test(value):
            problems.append(f"{key}: expected {expected}, got {value!r}")
    vocab, draft_vocab = _lookup(config, "transformer_layer_config.vocab_size"), config.get("draft_vocab_size")
    if _is_int(vocab) and _is_int(draft_vocab) and draft_vocab > vocab:
        problems.append(f"draft_vocab_size: {draft_vocab} exceeds the target's vocab_size {vocab}")
    if problems:
        raise ValueError("Not a valid speculators `eagle3` config: " + "; ".join(problems) + ".")


def _lookup(config: dict, key: str):
    value = config
    for part in key.split("."):
        if isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        elif isinstance(value, dict) and part in value:
            value = value[part]
        else:
            return _MISSING
    return value


def export_readme(config: dict) -> str:
    """The export's README.md: how to serve it, and what a serving engine will and will not reproduce."""
    target = config["speculators_config"]["verifier"]
    extension = config[EXTENSION]
    depth = config["speculators_config"]["proposal_methods"][0]["speculative_tokens"]
    layers = config["eagle_aux_hidden_state_layer_ids"]
    return f"""# EAGLE-3 draft for `{target["name_or_path"]}` (speculators `eagle3` layout)

Written by `specvlm-hf export` (specvlm_hf {extension["version"]}) from a `SpecVLMEagle3DraftModel` for the
{extension["target_model_type"]} target `{target["name_or_path"]}` ({", ".join(target["architectures"])}).

```bash
vllm serve <this folder>          # loads the verifier named in config.json and drafts {depth} tokens per step
```

```python
from specvlm_hf.export import import_speculators
draft = import_speculators("<this folder>", target=target)   # the same draft in transformers, bit for bit
```

## What a serving engine will and will not reproduce

- **Inputs.** The draft fuses the target's hidden states entering its layers {layers} (vLLM's auxiliary hidden
  states) with the embedding of the next token; at image slots that is the image placeholder's embedding, as vLLM
  feeds it (specvlm_hf trains and decodes the draft the same way).
- **Tree.** specvlm_hf grows a dynamic tree per step (or a chain, as its auto tree chooses); an engine drafts a
  chain of `speculative_tokens` ({depth}) per step. Compare acceptance at the same chain depth.
- **Output.** The engine verifies every drafted token: greedy output equals the target's greedy output; sampled
  output follows the target's distribution (text differs run to run).
"""


# ----------------------------------------------------------------------------------------------- files
def export_draft(
    draft: SpecVLMDraftModel,
    out_dir: str | Path,
    format: str = "speculators",
    target: str | nn.Module | None = None,
    depth: int | None = None,
) -> Path:
    """
    Writes an EAGLE-3 `draft` to `out_dir` as `config.json`, `model.safetensors` and `README.md` in the speculators
    `eagle3` layout; the target's token embedding is not written (the engine shares the target's).

    Args:
        draft (`SpecVLMEagle3DraftModel`): bound or not. An EAGLE-2-style draft is refused, saying why.
        out_dir (`str` or `Path`): created if missing; these three files are overwritten.
        format (`str`): `"speculators"`, the only one.
        target (`str` or model, *optional*): the target the engine loads, by Hub id or directory in a layout the
            engine reads (`export_target` writes one), or a loaded model with a `name_or_path`. Defaults to the
            draft's bound target. Checked against the draft (model type, hidden size, vocabulary, layers).
        depth (`int`, *optional*): draft tokens per step for the engine; by default the depth of the draft's
            `speculative_config` (EAGLE-2's 5 when the tree is auto).

    Returns:
        `Path` of `out_dir`.
    """
    if format not in FORMATS:
        raise ValueError(f"Unknown export format {format!r}; valid: {', '.join(FORMATS)}.")
    config = draft.config
    check_exportable(draft)
    record, target_config = _target_record(draft, target)
    _check_fits(config, target_config)
    exported = speculators_config(config, record, draft.speculative_config.fixed().depth if depth is None else depth)
    check_speculators_config(exported)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in speculators_state_dict(draft.state_dict()).items()}
    save_file(tensors, out / WEIGHTS_NAME, metadata={"format": "pt"})
    (out / CONFIG_NAME).write_text(json.dumps(exported, indent=2) + "\n")
    (out / README_NAME).write_text(export_readme(exported))
    return out


def check_exportable(draft: SpecVLMDraftModel) -> None:
    """Raises a `ValueError` saying why and what to do unless `draft` is of a family engines run (EAGLE-3)."""
    if draft.feature_layers is None:
        raise ValueError(_EAGLE2_REFUSAL)


def _target_record(draft: SpecVLMDraftModel, target) -> tuple[dict, object]:
    """`({"name_or_path", "architectures"}, PretrainedConfig)` of the export's target: a name or path, a loaded
    model, or the draft's bound target. A local folder an engine could not load (`engine_layout_problem`) is
    refused, naming `export_target`."""
    from transformers import AutoConfig

    if isinstance(target, str):
        from .testbed.store import is_testbed

        if is_testbed(target):
            raise ValueError(
                f"The testbed {target!r} is saved in transformers' layout, which engines do not load; write it in "
                "the engines' layout first (`specvlm-hf export --target-output DIR`, or export_target) and name "
                "that folder as the target."
            )
        problem = engine_layout_problem(target) if Path(target).is_dir() else None
        if problem:
            raise ValueError(f"{target}: {problem}")
        config = AutoConfig.from_pretrained(target)
        return {"name_or_path": str(target), "architectures": list(config.architectures or [])}, config
    model = draft.target if target is None else target
    if not model.config.name_or_path:
        raise ValueError(
            "The target has no name or path (`config.name_or_path` is empty), so an engine could not load it: "
            "pass target= the Hub id or directory the engine loads it from."
        )
    architectures = list(model.config.architectures or [type(model).__name__])
    return {"name_or_path": model.config.name_or_path, "architectures": architectures}, model.config


def _check_fits(draft_config, target_config) -> None:
    text = target_config.get_text_config()
    problems = [
        f"{field} {theirs!r} != draft's {ours!r}"
        for field, theirs, ours in (
            ("model_type", target_config.model_type, draft_config.target_model_type),
            ("hidden_size", text.hidden_size, draft_config.hidden_size),
            ("vocab_size", text.vocab_size, draft_config.vocab_size),
        )
        if theirs != ours
    ]
    outside = [i for i in draft_config.aux_hidden_state_layer_ids if not 0 <= i < text.num_hidden_layers]
    if outside:
        problems.append(f"aux layers {outside} outside the target's layers 0..{text.num_hidden_layers - 1}")
    if problems:
        raise ValueError("This draft does not fit the export's target: " + "; ".join(problems) + ".")


def import_speculators(directory: str | Path, target: nn.Module | None = None) -> SpecVLMDraftModel:
    """
    The `SpecVLMEagle3DraftModel` of an export written by `export_draft`: same weights, same config, hence the same
    drafts. Bound to `target` when given. Raises `ValueError` for a checkpoint without the `specvlm_hf` block (written
    by other tools: its target and image-token conventions are unknown).
    """
    from .configuration import SpecVLMEagle3DraftConfig
    from .modeling_eagle3 import SpecVLMEagle3DraftModel

    directory = Path(directory)
    config = json.loads((directory / CONFIG_NAME).read_text())
    check_speculators_config(config)
    if EXTENSION not in config:
        raise ValueError(
            f"{directory} was not written by `specvlm-hf export` (no {EXTENSION!r} block in its {CONFIG_NAME}); "
            "only such exports can be imported."
        )
    layer = config["transformer_layer_config"]
    missing = [name for name in _LAYER_FIELDS if name not in layer]
    if missing:
        raise ValueError(f"transformer_layer_config of {directory} lacks {', '.join(missing)}.")
    extension = config[EXTENSION]
    draft_config = SpecVLMEagle3DraftConfig(
        **{name: layer[name] for name in _LAYER_FIELDS},
        aux_hidden_state_layer_ids=config["eagle_aux_hidden_state_layer_ids"],
        draft_vocab_size=config["draft_vocab_size"],
        norm_before_residual=config["norm_before_residual"],
        fc_norm=config["fc_norm"],
        target_model_type=extension["target_model_type"],
        image_token_id=extension["image_token_id"],
    )
    weights = draft_state_dict(load_file(directory / WEIGHTS_NAME))
    draft = SpecVLMEagle3DraftModel(draft_config).to(weights["fc.weight"].dtype)
    expected = set(draft.state_dict())
    if set(weights) != expected:
        raise ValueError(
            f"{directory / WEIGHTS_NAME} does not match its config: missing "
            f"{sorted(expected - set(weights))}, unexpected {sorted(set(weights) - expected)}."
        )
    draft.load_state_dict(weights)
    draft.eval()
    return draft.bind(target) if target is not None else draft


# ----------------------------------------------------------------------------------------------- target
# transformers 5 saves a LLaVA-family vision tower as `vision_tower.*`; the Hub's llava-hf checkpoints, which
# engines load, keep CLIP's `vision_tower.vision_model.*`
_HUB_VISION_PREFIX = ("vision_tower.", "vision_tower.vision_model.")
_ENGINE_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
    "chat_template.json", "processor_config.json", "preprocessor_config.json", "special_tokens_map.json",
)  # fmt: skip


def engine_layout_problem(directory: str | Path) -> str | None:
    """Why engines would not load the checkpoint in `directory` as saved (a LLaVA vision tower under transformers 5's
    `vision_tower.*` names, not the Hub's `vision_tower.vision_model.*`), or `None`."""
    weights = Path(directory) / WEIGHTS_NAME
    if not weights.is_file():
        return None
    with safe_open(weights, "pt") as f:
        names = list(f.keys())
    old, new = _HUB_VISION_PREFIX
    if any(n.startswith(old) and not n.startswith(new) for n in names):
        return (
            f"its vision tower is saved as `{old}*`, which engines do not load (they read the Hub's `{new}*`); "
            "write it in the engines' layout with `specvlm-hf export --target-output DIR` (export_target)."
        )
    return None


def export_target(source: str | Path, out_dir: str | Path) -> Path:
    """
    Writes the target saved at `source` (a directory or a testbed name) to `out_dir` in the layout serving engines
    load: the same tensors, a LLaVA-family vision tower under the Hub's `vision_tower.vision_model.*` names, and the
    config, tokenizer, processor and chat template files. transformers loads the result too.

    Returns:
        `Path` of `out_dir`.
    """
    from .testbed.store import is_testbed, resolve

    source = Path(resolve(str(source))[0]) if is_testbed(str(source)) else Path(source)
    if not (source / WEIGHTS_NAME).is_file():
        raise ValueError(f"{source} holds no single {WEIGHTS_NAME}; save the target with save_pretrained first.")
    out = Path(out_dir)
    if out.resolve() == source.resolve():
        raise ValueError("export_target writes a new folder; out_dir must differ from the source.")
    out.mkdir(parents=True, exist_ok=True)
    old, new = _HUB_VISION_PREFIX
    tensors = {
        (new + name[len(old) :] if name.startswith(old) and not name.startswith(new) else name): tensor
        for name, tensor in load_file(source / WEIGHTS_NAME).items()
    }
    save_file(tensors, out / WEIGHTS_NAME, metadata={"format": "pt"})
    for name in _ENGINE_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)
    return out
