"""peft wrappers around targets and drafts: which ones the loop can decode through, and how to reach the model inside.

Tuner adapters (LoRA, IA3, LoHa, ...) are layers inside the wrapped model's modules and read the wrapper's active
adapters on every call, so the loop's direct module calls compute what the wrapper's `forward` computes. What acts
outside the modules, or only on some rows or tokens of a forward, is refused by name.
"""

from __future__ import annotations

import sys

from torch import nn


def is_peft_model(model) -> bool:
    """Whether `model` is a peft wrapper (`PeftModel`, `PeftMixedModel`)."""
    return hasattr(model, "peft_config") and callable(getattr(model, "get_base_model", None))


# (peft config attribute, why the loop cannot reproduce such an adapter)
REFUSED_ADAPTERS = (
    (
        "alora_invocation_tokens",
        "activated LoRA adapters ({names}), which act only on the tokens after their invocation in each forward; a "
        "tree forward covers several new tokens at once, so its output would differ from plain decoding.",
    ),
    (
        "is_prompt_learning",
        "prompt-learning adapters ({names}: prefix, prompt or p-tuning), which change the model's inputs and cache "
        "outside its modules; tree speculative decoding runs the modules directly and would skip them. Use a tuner "
        "adapter such as LoRA.",
    ),
)


def unwrap_peft(target: nn.Module) -> nn.Module:
    """
    The transformers model inside a peft wrapper (`PeftModel`, `PeftMixedModel`), or `target` itself.

    Tuner adapters (LoRA, IA3, LoHa, ...) are layers inside that model's modules and read the wrapper's active
    adapters on every call, so the loop's direct module calls compute what the wrapper's `forward` computes, for
    whichever adapters are active (one, several, or none inside `disable_adapter()`). Prompt-learning adapters
    (prefix, prompt and p-tuning) instead change the inputs and the cache the wrapper hands the model, which the loop
    would bypass, and activated LoRA adapters act on some tokens of a forward only: both are refused.
    """
    if not is_peft_model(target):
        return target
    for attribute, why in REFUSED_ADAPTERS:
        names = sorted(name for name, config in target.peft_config.items() if getattr(config, attribute, None))
        if names:
            raise ValueError(
                f"The target carries peft {why.format(names=', '.join(names))} Decode it without assistant_model."
            )
    return target.get_base_model()


# peft's pre-forward hooks that make an adapter act on some rows (mixed batches) or some tokens (activated LoRA) only
PEFT_ROUTING_HOOKS = ("_adapter_names_pre_forward_hook", "_alora_offsets_pre_forward_hook")


def check_no_adapter_routing(target: nn.Module) -> None:
    """
    Raises a `ValueError` if peft routes inputs to adapters by row (`generate(..., adapter_names=[...])`, its
    mixed-batch inference) or by token (activated LoRA): it does so with forward pre-hooks on its adapter layers that
    expect plain decoding's shapes (one name per row; the adapter on the last tokens of each forward only), which the
    loop's tree forwards do not have.

    peft removes those hooks after `generate()` returns but not when it raises, so they are removed here before
    raising: the model is left as it was before the call.
    """
    if "peft" not in sys.modules:  # no peft layer, hence no hook, without peft imported (skips a module walk)
        return
    routed = []
    for name, module in target.named_modules():
        if not hasattr(module, "base_layer"):
            continue
        for key, hook in list(module._forward_pre_hooks.items()):
            if getattr(getattr(hook, "func", None), "__name__", "") in PEFT_ROUTING_HOOKS:
                routed.append(name)
                del module._forward_pre_hooks[key]
                module._forward_pre_hooks_with_kwargs.pop(key, None)
    if routed:
        raise ValueError(
            f"peft routes tokens to adapters by hooks (e.g. on {routed[0]}): tree speculative decoding supports "
            "neither generate(adapter_names=...) (activate the adapter with `set_adapter(name)` instead) nor "
            "activated LoRA (alora_invocation_tokens)."
        )
