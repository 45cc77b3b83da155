"""Routes `target.generate(..., assistant_model=draft)` to the tree loop when `draft` is a `DraftSource`.

transformers picks the decoding method with `getattr(type(model), "_assisted_decoding")` and has no hook for custom
candidate trees, so two private `GenerationMixin` methods are wrapped (signatures checked for 5.20-5.x): every other
assistant keeps the stock behaviour. Installed on `import specvlm_hf`.
"""

from __future__ import annotations

import functools

from transformers.generation.configuration_utils import GenerationMode
from transformers.generation.utils import GenerationMixin

from ._compat import transformers_in_tested_range
from .drafter import DraftSource
from .generation import tree_decoding

_STOCK_ASSISTED = "_specvlm_stock_assisted_decoding"
_STOCK_VALIDATE = "_specvlm_stock_validate_generation_mode"


def _validate_generation_mode(self, generation_mode, generation_config, generation_mode_kwargs):
    draft = generation_mode_kwargs.get("assistant_model")
    if not isinstance(draft, DraftSource):
        return getattr(GenerationMixin, _STOCK_VALIDATE)(
            self, generation_mode, generation_config, generation_mode_kwargs
        )
    if generation_mode != GenerationMode.ASSISTED_GENERATION:
        raise ValueError(
            f"A specvlm_hf draft runs lossless tree decoding on top of greedy search or sampling only; this call asks "
            f"for {generation_mode.value!r} (num_beams={generation_config.num_beams}). Use num_beams=1 without "
            "constraints or contrastive search, or drop assistant_model."
        )
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


def install() -> bool:
    """Wraps the two hooks once. Returns False (and changes nothing) outside the tested transformers range."""
    if not transformers_in_tested_range():
        return False
    if not hasattr(GenerationMixin, _STOCK_ASSISTED):
        setattr(GenerationMixin, _STOCK_ASSISTED, GenerationMixin._assisted_decoding)
        setattr(GenerationMixin, _STOCK_VALIDATE, GenerationMixin._validate_generation_mode)
        GenerationMixin._assisted_decoding = functools.wraps(GenerationMixin._assisted_decoding)(_assisted_decoding)
        GenerationMixin._validate_generation_mode = functools.wraps(GenerationMixin._validate_generation_mode)(
            _validate_generation_mode
        )
    return True
