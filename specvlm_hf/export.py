"""Export a draft for serving engines in the speculators `eagle` layout, check such a config against that layout's
schema, and import an export back into this package.

The layout is the EAGLE-1 one of speculators 0.1-0.6 (`EagleSpeculatorConfig`, removed in 0.7): `config.json` with
`speculators_model_type: "eagle"`, `speculators_config` (algorithm, greedy proposal, target as `verifier`) and the
decoder layer's `transformer_layer_config`; `model.safetensors` with `fusion_fc.*` (our `fc`) and `transformer.*`
(our `layers.0`). Where the engines' EAGLE-1 computes another function than this draft, `export_readme` says so.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .modeling_draft import SpecVLMDraftModel

FORMATS = ("speculators",)
SPECULATORS_VERSION = "0.6.0.2"  # the last speculators release with the `eagle` config, whose schema we follow
EXTENSION = "specvlm_hf"  # our block in config.json (speculators configs allow extra keys); engines ignore it
CONFIG_NAME, WEIGHTS_NAME, README_NAME = "config.json", "model.safetensors", "README.md"

# draft weight-name prefix -> speculators `eagle` prefix; the layout holds exactly one decoder layer
_RENAMES = (("fc.", "fusion_fc."), ("layers.0.", "transformer."))
# `SpecVLMDraftConfig` fields that are `LlamaConfig` fields of the same meaning: the `transformer_layer_config`
_LAYER_FIELDS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "vocab_size", "rms_norm_eps", "hidden_act", "attention_bias", "attention_dropout", "mlp_bias",
    "max_position_embeddings", "rope_parameters", "initializer_range",
)  # fmt: skip


# ----------------------------------------------------------------------------------------------- pure parts
def speculators_config(draft_config, target: dict, depth: int, dropped: dict | None = None) -> dict:
    """
    The `config.json` of a draft in the speculators `eagle` layout.

    Args:
        draft_config (`SpecVLMDraftConfig`): the draft's architecture (one decoder layer, no compressor).
        target (`dict`): `{"name_or_path", "architectures"}` of the target, the speculators `verifier`.
        depth (`int`): draft tokens per step, speculators' `speculative_tokens` (an engine drafts a chain).
        dropped (`dict`, *optional*): parts of the draft left out of the export by name (`{"compressor": record}`).
    """
    from . import __version__

    layer = {"model_type": "llama", **{name: getattr(draft_config, name) for name in _LAYER_FIELDS}}
    return {
        "architectures": ["EagleSpeculator", "LlamaDecoderLayer"],
        "speculators_model_type": "eagle",
        "speculators_version": SPECULATORS_VERSION,
        "speculators_config": {
            "algorithm": "eagle",
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
        "transformer_layer_architecture": "LlamaDecoderLayer",
        "transformer_layer_config": {**layer, "tie_word_embeddings": False},
        "layernorms": False,  # no HASS norms (embedding, pre-lm_head); layer 0's input norm: see export_readme
        "fusion_bias": bool(draft_config.fc_bias),
        EXTENSION: {
            "version": __version__,
            "target_model_type": draft_config.target_model_type,
            "image_token_id": draft_config.image_token_id,
            "dropped": dict(dropped or {}),
        },
    }


def speculators_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The draft's weights under speculators `eagle` names (`fc.*` -> `fusion_fc.*`, `layers.0.*` -> `transformer.*`).
    Raises `ValueError` on any other weight (a second layer, a compressor): the layout has no place for it."""
    return {_rename(name, _RENAMES): tensor for name, tensor in state_dict.items()}


def draft_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `speculators_state_dict`."""
    return {_rename(name, [(new, old) for old, new in _RENAMES]): tensor for name, tensor in state_dict.items()}


def _rename(name: str, renames) -> str:
    for old, new in renames:
        if name.startswith(old):
            return new + name[len(old) :]
    prefixes = ", ".join(f"{old}*" for old, _ in renames)
    raise ValueError(f"Weight {name!r} has no counterpart in the other layout (only {prefixes} weights map).")


def _is_int(value, low: int = 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _is_strings(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


# (dotted key, what it must be, test): the speculators `eagle` schema (pydantic models `EagleSpeculatorConfig`,
# `SpeculatorsConfig`, `VerifierConfig` of speculators 0.6) plus what vLLM's speculators loader reads.
_SCHEMA = (
    ("speculators_model_type", "'eagle'", lambda v: v == "eagle"),
    ("speculators_version", "a string", lambda v: isinstance(v, str)),
    ("architectures", "a list of strings", _is_strings),
    ("transformer_layer_architecture", "a string", lambda v: isinstance(v, str)),
    ("transformer_layer_config", "a dict", lambda v: isinstance(v, dict)),
    ("transformer_layer_config.model_type", "'llama'", lambda v: v == "llama"),
    *((f"transformer_layer_config.{k}", "an integer >= 1", _is_int) for k in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "vocab_size")),
    ("layernorms", "a bool", lambda v: isinstance(v, bool)),
    ("fusion_bias", "a bool", lambda v: isinstance(v, bool)),
    ("speculators_config", "a dict", lambda v: isinstance(v, dict)),
    ("speculators_config.algorithm", "'eagle'", lambda v: v == "eagle"),
    ("speculators_config.proposal_methods", "a non-empty list of dicts",
     lambda v: isinstance(v, list) and v and all(isinstance(m, dict) for m in v)),
    ("speculators_config.default_proposal_method", "a string", lambda v: isinstance(v, str)),
    ("speculators_config.verifier", "a dict", lambda v: isinstance(v, dict)),
    ("speculators_config.verifier.name_or_path", "a non-empty string", lambda v: isinstance(v, str) and v != ""),
    ("speculators_config.verifier.architectures", "a list of strings", _is_strings),
)  # fmt: skip
_GREEDY = (
    ("speculative_tokens", "an integer >= 1", _is_int),
    ("verifier_accept_k", "an integer >= 1", _is_int),
    ("accept_tolerance", "a number >= 0", lambda v: isinstance(v, int | float) and not isinstance(v, bool) and v >= 0),
)
_MISSING = object()


def check_speculators_config(config: dict) -> None:
    """
    Checks a `config.json` dict against the speculators `eagle` schema: required keys, their types and allowed
    values, each proposal method (only `greedy` exists), and `default_proposal_method` naming one of them. Raises
    `ValueError` listing every problem by dotted key.
    """
    problems = []
    for key, expected, test in _SCHEMA:
        value = _lookup(config, key)
        if value is _MISSING:
            problems.append(f"{key}: missing")
        elif not test(value):
            problems.append(f"{key}: expected {expected}, got {value!r}")
    methods = _lookup(config, "speculators_config.proposal_methods")
    for i, method in enumerate(methods if isinstance(methods, list) else []):
        if not isinstance(method, dict):
            continue
        if method.get("proposal_type") != "greedy":
            problems.append(
                f"speculators_config.proposal_methods.{i}.proposal_type: expected 'greedy', got "
                f"{method.get('proposal_type')!r}"
            )
        for key, expected, test in _GREEDY:
            if key in method and not test(method[key]):  # absent keys take speculators' defaults (5, 1, 0.0)
                problems.append(
                    f"speculators_config.proposal_methods.{i}.{key}: expected {expected}, got {method[key]!r}"
                )
        if i == 0 and "speculative_tokens" not in method:  # vLLM reads it from the first method
            problems.append("speculators_config.proposal_methods.0.speculative_tokens: missing")
    default = _lookup(config, "speculators_config.default_proposal_method")
    types = [m.get("proposal_type") for m in methods if isinstance(m, dict)] if isinstance(methods, list) else []
    if isinstance(default, str) and default not in types:
        problems.append(
            f"speculators_config.default_proposal_method: {default!r} is not one of the proposal methods {types}"
        )
    if problems:
        raise ValueError("Not a valid speculators `eagle` config: " + "; ".join(problems) + ".")


def _lookup(config: dict, key: str):
    value = config
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


def export_readme(config: dict) -> str:
    """The export's README.md: how to load it, and what a serving engine will and will not reproduce."""
    target = config["speculators_config"]["verifier"]
    extension = config[EXTENSION]
    depth = config["speculators_config"]["proposal_methods"][0]["speculative_tokens"]
    dropped = "".join(
        f"- **Dropped: `{name}`** ({json.dumps(record, sort_keys=True)}). The exported draft sees every visual "
        "token of the target, not the compressed input it was trained on; expect lower acceptance.\n"
        for name, record in extension["dropped"].items()
    )
    return f"""# EAGLE draft for `{target["name_or_path"]}` (speculators `eagle` layout)

Written by `specvlm-hf export` (specvlm_hf {extension["version"]}) from a `SpecVLMDraftModel` for the
{extension["target_model_type"]} target `{target["name_or_path"]}` ({", ".join(target["architectures"])}).
Load it back, bit for bit:

```python
from specvlm_hf.export import import_speculators
draft = import_speculators("<this folder>", target=target)
```

## What a serving engine will and will not reproduce

- **Loading.** This is the EAGLE-1 layout of speculators 0.1-0.6 (`speculators_model_type: eagle`). speculators
  0.7+ and vLLM's speculators loader have no `eagle` type (only `eagle3` and newer ones), so
  `vllm serve <this folder>` refuses it.
- **Layer 0's input RMSNorm.** This draft normalises the fused input of its decoder layer
  (`transformer.input_layernorm.weight`). EAGLE-1 in speculators (`layernorms: false`), vLLM and SGLang runs
  layer 0 without that norm and ignores the weight: another function, so fewer drafts are accepted (the shipped
  testbed draft's first token matches the target's 85% of the time instead of 95%). Output stays the target's
  (the engine verifies every token); part of the speed-up is lost.
- **Fusion bias.** `fusion_fc.bias` is part of this draft (`fusion_bias: {str(config["fusion_bias"]).lower()}`); the
  `fc` of vLLM's EAGLE-1 Llama head has no bias.
- **Images.** The draft pairs the target's input embedding at position t+1 (the projected visual token at an image
  slot) with the target's post-norm last hidden state at t (the `lm_head` input) as `fc(cat(embedding, feature))`:
  EAGLE-1's order and feature, and what vLLM feeds a draft that accepts multimodal input. vLLM's EAGLE-1 Llama head
  does not (it raises on multimodal input); vLLM's EAGLE for LLaVA and Qwen-VL targets is EAGLE-3, another
  architecture.
- **Tree.** specvlm_hf grows an EAGLE-2 dynamic tree per step; engines draft a chain of `speculative_tokens`
  ({depth}) or a static tree of their own settings.
- **Sampling.** Engines sample the target's distribution with their own rejection sampler; greedy output equals
  the target's greedy output in both, sampled text differs run to run.
{dropped}"""


# ----------------------------------------------------------------------------------------------- files
def export_draft(
    draft: SpecVLMDraftModel,
    out_dir: str | Path,
    format: str = "speculators",
    target: str | nn.Module | None = None,
    depth: int | None = None,
    drop_compressor: bool = False,
) -> Path:
    """
    Writes `draft` to `out_dir` as `config.json`, `model.safetensors` and `README.md` in the speculators `eagle`
    layout; the target's embedding and `lm_head` are not written (the engine borrows the target's).

    Args:
        draft (`SpecVLMDraftModel`): one decoder layer; bound or not.
        out_dir (`str` or `Path`): created if missing; these three files are overwritten.
        format (`str`): `"speculators"`, the only one.
        target (`str` or model, *optional*): the target the engine loads, by Hub id or directory (`"testbed"`:
            the testbed's), or a loaded model with a `name_or_path`. Defaults to the draft's bound target. Checked
            against the draft (model type, hidden size, vocabulary).
        depth (`int`, *optional*): draft tokens per step for the engine; by default the depth of the draft's
            `speculative_config` (EAGLE-2's 5 when the tree is auto).
        drop_compressor (`bool`): write a draft with a visual compressor without it (recorded under `dropped`);
            without this such a draft is refused, as the layout cannot hold the compressor.

    Returns:
        `Path` of `out_dir`.
    """
    if format not in FORMATS:
        raise ValueError(f"Unknown export format {format!r}; valid: {', '.join(FORMATS)}.")
    config = draft.config
    if config.num_hidden_layers != 1:
        raise ValueError(
            f"The speculators `eagle` layout holds one decoder layer; this draft has {config.num_hidden_layers}."
        )
    dropped = {}
    if config.compressor:
        if not drop_compressor:
            raise ValueError(
                f"This draft has a visual compressor (`compressor`: branches {', '.join(config.compressor['branches'])}"
                f"; mode {config.compressor['mode']}) that the speculators format cannot hold and no engine runs. "
                "Export with drop_compressor=True (`--drop-compressor`) to write the draft without it."
            )
        dropped["compressor"] = dict(config.compressor)
    record, target_config = _target_record(draft, target)
    _check_fits(config, target_config)
    exported = speculators_config(
        config, record, draft.speculative_config.fixed().depth if depth is None else depth, dropped
    )
    check_speculators_config(exported)
    weights = {k: v for k, v in draft.state_dict().items() if not k.startswith("compressor.")}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in speculators_state_dict(weights).items()}
    save_file(tensors, out / WEIGHTS_NAME, metadata={"format": "pt"})
    (out / CONFIG_NAME).write_text(json.dumps(exported, indent=2) + "\n")
    (out / README_NAME).write_text(export_readme(exported))
    return out


def _target_record(draft: SpecVLMDraftModel, target) -> tuple[dict, object]:
    """`({"name_or_path", "architectures"}, PretrainedConfig)` of the export's target: a name or path
    (`"testbed"` resolved), a loaded model, or the draft's bound target."""
    from transformers import AutoConfig

    if isinstance(target, str):
        from .testbed.store import is_testbed, resolve

        if is_testbed(target):
            target = str(resolve(target)[0])
        config = AutoConfig.from_pretrained(target)
        return {"name_or_path": target, "architectures": list(config.architectures or [])}, config
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
    if problems:
        raise ValueError("This draft does not fit the export's target: " + "; ".join(problems) + ".")


def import_speculators(directory: str | Path, target: nn.Module | None = None) -> SpecVLMDraftModel:
    """
    The `SpecVLMDraftModel` of an export written by `export_draft`: same weights, same config, hence the same
    drafts. Bound to `target` when given. Raises `ValueError` for a speculators `eagle` checkpoint written by other
    tools (no `specvlm_hf` block: its layer 0 has no input norm, which this draft cannot express).
    """
    from .configuration import SpecVLMDraftConfig

    directory = Path(directory)
    config = json.loads((directory / CONFIG_NAME).read_text())
    check_speculators_config(config)
    if EXTENSION not in config:
        raise ValueError(
            f"{directory} was not written by `specvlm-hf export` (no {EXTENSION!r} block in its "
            f"{CONFIG_NAME}); only such exports can be imported."
        )
    layer = config["transformer_layer_config"]
    missing = [name for name in _LAYER_FIELDS if name not in layer]
    if missing:
        raise ValueError(f"transformer_layer_config of {directory} lacks {', '.join(missing)}.")
    extension = config[EXTENSION]
    draft_config = SpecVLMDraftConfig(
        **{name: layer[name] for name in _LAYER_FIELDS},
        fc_bias=config["fusion_bias"],
        target_model_type=extension["target_model_type"],
        image_token_id=extension["image_token_id"],
    )
    weights = draft_state_dict(load_file(directory / WEIGHTS_NAME))
    draft = SpecVLMDraftModel(draft_config).to(next(iter(weights.values())).dtype)
    expected = set(draft.state_dict())
    if set(weights) != expected:
        raise ValueError(
            f"{directory / WEIGHTS_NAME} does not match its config: missing "
            f"{sorted(expected - set(weights))}, unexpected {sorted(set(weights) - expected)}."
        )
    draft.load_state_dict(weights)
    draft.eval()
    return draft.bind(target) if target is not None else draft
