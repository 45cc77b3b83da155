"""Routes `target.generate(..., assistant_model=draft)` to the tree loop when `draft` is a `DraftSource`.

transformers picks the decoding method with `getattr(type(model), "_assisted_decoding")` and has no hook for custom
candidate trees, so two private `GenerationMixin` methods are wrapped: every other assistant keeps the stock behaviour.
Installed on `import specvlm_hf`, only inside the tested transformers range and only if both methods still have the
parameters the wrappers rely on. Otherwise the public `generate()` is guarded instead: a draft passed to it raises an
error naming the reason, never falls into transformers' own assisted decoding.
"""

from __future__ import annotations

import functools
import inspect

import transformers
from transformers.generation.utils import GenerationMixin

from ._compat import MAX_TRANSFORMERS, MIN_TRANSFORMERS, transformers_in_tested_range
from .drafter import DraftSource
from .generation import check_decoding_options, tree_decoding
from .peft_wrappers import is_peft_model

_STOCK_ASSISTED = "_specvlm_stock_assisted_decoding"
_STOCK_VALIDATE = "_specvlm_stock_validate_generation_mode"
_STOCK_GENERATE = "_specvlm_stock_generate"

# The parameters each wrapped hook must have, in order, for the wrappers below to forward them unchanged.
HOOK_SIGNATURES = {
    "_assisted_decoding": (
        "self", "input_ids", "logits_processor", "stopping_criteria", "generation_config", "synced_gpus",
        "streamer", "inputs_tensor", "assistant_model", "assistant_tokenizer", "tokenizer", "model_kwargs",
    ),
    "_validate_generation_mode": ("self", "generation_mode", "generation_config", "generation_mode_kwargs"),
    # Called, not wrapped: the auto tree leaves a whole call to it (`generation._plain_call`).
    "_sample": (
        "self", "input_ids", "logits_processor", "stopping_criteria", "generation_config", "synced_gpus", "streamer",
        "model_kwargs",
    ),
}  # fmt: skip

_route_error: str | None = "specvlm_hf.integration.install() has not run"


def _validate_generation_mode(self, generation_mode, generation_config, generation_mode_kwargs):
    draft = generation_mode_kwargs.get("assistant_model")
    if is_peft_model(draft) and isinstance(draft.get_base_model(), DraftSource):
        raise ValueError(
            "assistant_model is a peft-wrapped specvlm_hf draft; a draft drafts with plain weights. Merge the adapter "
            "first: `draft = specvlm_hf.lora.merged_draft(peft_draft)` (or `peft_draft.merge_and_unload()`), or load "
            "the adapter folder with `SpecVLMDraftModel.from_pretrained(adapter_dir, target=target)`."
        )
    if not isinstance(draft, DraftSource):
        return getattr(GenerationMixin, _STOCK_VALIDATE)(
            self, generation_mode, generation_config, generation_mode_kwargs
        )
    check_decoding_options(generation_config)
    if "assistant_tokenizer" in generation_mode_kwargs:
        raise ValueError("A specvlm_hf draft shares the target's tokenizer; do not pass `assistant_tokenizer`.")
    stock_kwargs = {k: v for k, v in generation_mode_kwargs.items() if k != "assistant_model"}
    return getattr(GenerationMixin, _STOCK_VALIDATE)(self, generation_mode, generation_config, stock_kwargs)


def _assisted_decoding(
    self,
    input_ids,
    logits_processor,
    stopping_criteria,
    generation_config,
    synced_gpus=False,
    streamer=None,
    inputs_tensor=None,
    assistant_model=None,
    assistant_tokenizer=None,
    tokenizer=None,
    **model_kwargs,
):
    if not isinstance(assistant_model, DraftSource):
        return getattr(GenerationMixin, _STOCK_ASSISTED)(
            self,
            input_ids,
            logits_processor,
            stopping_criteria,
            generation_config,
            synced_gpus=synced_gpus,
            streamer=streamer,
            inputs_tensor=inputs_tensor,
            assistant_model=assistant_model,
            assistant_tokenizer=assistant_tokenizer,
            tokenizer=tokenizer,
            **model_kwargs,
        )
    if synced_gpus:
        raise ValueError(
            "Tree speculative decoding does not support synced_gpus (DeepSpeed ZeRO-3 / FSDP generation)."
        )
    return tree_decoding(
        self,
        input_ids,
        logits_processor,
        stopping_criteria,
        generation_config,
        draft_source=assistant_model,
        streamer=streamer,
        **model_kwargs,
    )


def hook_mismatch(mixin=GenerationMixin) -> str | None:
    """Why the `generate()` route cannot be installed on this transformers, or `None` if it can."""
    if not transformers_in_tested_range():
        return (
            f"transformers {transformers.__version__} is outside the range specvlm_hf's generate() route is tested "
            f"with (>={MIN_TRANSFORMERS},<{MAX_TRANSFORMERS})"
        )
    for name, expected in HOOK_SIGNATURES.items():
        method = getattr(mixin, name, None)
        found = tuple(inspect.signature(method).parameters) if callable(method) else None
        if found != expected:
            return f"transformers {transformers.__version__} changed GenerationMixin.{name} (parameters {found})"
    return None


def route_error() -> str | None:
    """Why `generate(assistant_model=draft)` cannot run the tree loop here, or `None` where it can."""
    return _route_error


def require_generate_route() -> None:
    """Raises a `RuntimeError` naming the reason if `generate(assistant_model=draft)` cannot run the tree loop."""
    if _route_error is not None:
        raise RuntimeError(
            f"specvlm_hf cannot run tree decoding through generate(): {_route_error}. Install a tested version: "
            f"pip install 'transformers>={MIN_TRANSFORMERS},<{MAX_TRANSFORMERS}'."
        )


def install(mixin=GenerationMixin) -> bool:
    """Wraps the two hooks of `mixin` once and returns True. Where `hook_mismatch` names a reason, wraps the public
    `generate()` instead, so that a specvlm_hf draft passed to it raises that reason, and returns False."""
    global _route_error
    if _STOCK_ASSISTED in vars(mixin) or _STOCK_GENERATE in vars(mixin):
        return _route_error is None
    _route_error = hook_mismatch(mixin)
    if _route_error is not None:
        stock_generate = mixin.generate
        signature = inspect.signature(stock_generate)

        @functools.wraps(stock_generate)
        def guarded_generate(self, *args, **kwargs):
            assistant = signature.bind_partial(self, *args, **kwargs).arguments.get("assistant_model")
            if isinstance(assistant, DraftSource):
                require_generate_route()
            return stock_generate(self, *args, **kwargs)

        setattr(mixin, _STOCK_GENERATE, stock_generate)
        mixin.generate = guarded_generate
        return False
    setattr(mixin, _STOCK_ASSISTED, mixin._assisted_decoding)
    setattr(mixin, _STOCK_VALIDATE, mixin._validate_generation_mode)
    mixin._assisted_decoding = functools.wraps(mixin._assisted_decoding)(_assisted_decoding)
    mixin._validate_generation_mode = functools.wraps(mixin._validate_generation_mode)(_validate_generation_mode)
    return True
