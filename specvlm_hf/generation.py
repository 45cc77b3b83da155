"""The lossless tree decoding loop (SpecVLM §1.3), composed from the steps in `loop.py`: prefill, then [draft a
tree, verify it in one target forward, emit the accepted tokens, commit them to the cache] until a stopping criterion
fires. `generate()` prepares the inputs (logits processors, stopping criteria, image encoding, cache) and calls
`tree_decoding` through the hook in `integration.py`; `speculative_generate` is the same call returning statistics."""

from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass

import torch
from transformers import DynamicCache, GenerationConfig
from transformers.generation.configuration_utils import GenerationMode
from transformers.generation.stopping_criteria import StoppingCriteriaList
from transformers.generation.utils import GenerateDecoderOnlyOutput

from ._compat import CACHE_KWARG
from .adapters import get_adapter
from .cache import check_cache, commit_accepted
from .drafter import DraftSource
from .loop import Emitter, prefill, prompt_draft_state, step_draft_state, verify, walk_tree
from .metrics import SpeculativeStats
from .peft_wrappers import check_no_adapter_routing
from .tree import build_tree
from .verify import is_history_free

# model_kwargs that generate() hands to a decoding method and that the loop understands. Anything else would change
# what the target computes in ways the loop does not reproduce, so it is refused by name.
_KNOWN_MODEL_KWARGS = {
    "attention_mask", "position_ids", "cache", "past_key_values", "mm_encoder_outputs", "pixel_values",
    "logits_to_keep", "use_cache", "return_dict", "image_sizes", "vision_feature_layer",
    "vision_feature_select_strategy",
}  # fmt: skip


@dataclass
class SpeculativeDecoderOutput(GenerateDecoderOnlyOutput):
    """`generate()`'s output with the loop's statistics (`return_dict_in_generate=True`)."""

    speculative_stats: SpeculativeStats | None = None


@dataclass(frozen=True)
class SpeculativeOutput:
    """
    Result of `speculative_generate`.

    Attributes:
        sequences (`torch.LongTensor` of shape `(1, seq_len)`): prompt and generated tokens.
        stats (`SpeculativeStats`): forwards, accepted length per step, mean accepted length, wall time.
    """

    sequences: torch.Tensor
    stats: SpeculativeStats

    @property
    def mean_accepted_length(self) -> float:
        return self.stats.mean_accepted_length


class _Clock:
    """Accumulates seconds per phase when profiling; synchronises CUDA so time lands in the phase that spent it."""

    def __init__(self, enabled: bool, device: torch.device):
        self.enabled = enabled
        self.cuda = enabled and device.type == "cuda"
        self.totals = {"step": 0.0, "verify": 0.0, "draft": 0.0}

    def now(self) -> float:
        if not self.enabled:
            return 0.0
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def add(self, phase: str, since: float) -> None:
        if self.enabled:
            self.totals[phase] += self.now() - since


# Speculative options of transformers' own assisted decoding, with the values that mean "unset". A specvlm draft
# drafts with its tree knobs instead, so a changed value would be ignored: it is refused by name.
_STOCK_SPECULATIVE_OPTIONS = {
    "prompt_lookup_num_tokens": None, "max_matching_ngram_size": None, "num_assistant_tokens": 20,
    "num_assistant_tokens_schedule": "constant", "assistant_confidence_threshold": 0.4, "assistant_lookbehind": 10,
    "target_lookbehind": 10, "assistant_early_exit": None, "assistant_ensemble_weight": None, "use_mtp": None,
    "speculation_type": None,
}  # fmt: skip


def check_decoding_options(generation_config: GenerationConfig) -> None:
    """Raises a `ValueError` naming the option unless `generation_config` asks for greedy search or sampling of one
    sequence, without options of transformers' own assisted decoding."""
    for name, unset in _STOCK_SPECULATIVE_OPTIONS.items():
        value = getattr(generation_config, name, unset)
        if value is not None and value != unset:
            raise ValueError(
                f"`{name}={value!r}` configures transformers' own assisted decoding, which a specvlm_hf draft "
                "replaces; drop it (size the tree with draft.with_tree(depth=, top_k=, total_tokens=), or "
                "speculative_generate(depth=, tree_top_k=, total_tokens=))."
            )
    mode = generation_config.get_generation_mode()
    if mode not in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE):
        raise ValueError(
            f"A specvlm_hf draft runs lossless tree decoding on top of greedy search or sampling only; this call asks "
            f"for {mode.value!r} (num_beams={generation_config.num_beams}). Use num_beams=1 without constraints, "
            "contrastive search or DoLa, or drop assistant_model."
        )
    if (generation_config.num_return_sequences or 1) != 1:
        raise ValueError("Tree speculative decoding returns one sequence per prompt; num_return_sequences must be 1.")


def _check_request(adapter, input_ids, generation_config: GenerationConfig, model_kwargs: dict) -> None:
    check_decoding_options(generation_config)
    if input_ids.shape[0] != 1:
        raise ValueError(f"Tree speculative decoding supports batch size 1, got a batch of {input_ids.shape[0]}.")
    unknown = sorted(set(model_kwargs) - _KNOWN_MODEL_KWARGS - adapter.model_kwargs)
    if unknown:
        raise ValueError(f"Tree speculative decoding does not support these generate() arguments: {unknown}.")
    mask = model_kwargs.get("attention_mask")
    if mask is not None and not bool((mask == 1).all()):
        raise ValueError("Tree speculative decoding does not support padded inputs (attention_mask with zeros).")
    for flag in ("output_attentions", "output_hidden_states"):
        if getattr(generation_config, flag, False):
            raise ValueError(f"Tree speculative decoding does not return {flag.split('_', 1)[1]}; unset `{flag}`.")
    if not generation_config.use_cache:
        raise ValueError(
            "Tree speculative decoding verifies against the target's KV cache; use_cache=False is not supported "
            "(drop it, or drop assistant_model to decode without a cache)."
        )
    if getattr(generation_config, "prefill_chunk_size", None) is not None:
        raise ValueError(
            "Tree speculative decoding prefills the prompt in one forward; prefill_chunk_size is not supported "
            "(drop it, or drop assistant_model for a chunked prefill)."
        )


def _target_cache(model_kwargs: dict):
    """The cache `generate()` prepared (or the caller passed, possibly empty), else a new `DynamicCache`."""
    for key in ("cache", "past_key_values"):
        if model_kwargs.get(key) is not None:
            cache = model_kwargs[key]
            break
    else:
        cache = DynamicCache()
    if cache.get_seq_length() > 0:
        raise ValueError("Tree speculative decoding starts from an empty cache; do not pass a pre-filled cache.")
    check_cache(cache)
    return cache


def tree_decoding(
    target,
    input_ids: torch.Tensor,
    logits_processor,
    stopping_criteria: StoppingCriteriaList,
    generation_config: GenerationConfig,
    draft_source: DraftSource,
    streamer=None,
    **model_kwargs,
):
    """
    Lossless tree speculative decoding of one sequence. Arguments are those `generate()` passes to a decoding method.

    Args:
        target (`PreTrainedModel`): the model being decoded (an architecture of `adapters.ADAPTERS`).
        input_ids (`torch.LongTensor` of shape `(1, prompt_len)`): the prompt.
        draft_source (`DraftSource`): makes the `Drafter` (a bound `SpecVLMDraftModel`, `draft.with_tree(...)`, ...).

    Returns:
        `torch.LongTensor` of shape `(1, seq_len)`, or `SpeculativeDecoderOutput` if `return_dict_in_generate`. The
        returned cache holds every position but the last, as plain decoding's does.
    """
    if "prepare_inputs_for_generation" in vars(target):  # peft's prompt learning swaps it in for generate()
        raise ValueError(
            "The target's prepare_inputs_for_generation is replaced on the instance (a peft prompt-learning adapter "
            "does this to inject its virtual tokens); tree speculative decoding does not call it, so it would skip "
            "what it adds. Use a tuner adapter such as LoRA, or decode without assistant_model."
        )
    check_no_adapter_routing(target)
    adapter = get_adapter(target)
    adapter.check_attention()
    _check_request(adapter, input_ids, generation_config, model_kwargs)
    cache = _target_cache(model_kwargs)
    drafter = draft_source.new_drafter(target)
    clock = _Clock(draft_source.speculative_config.profile, input_ids.device)
    do_sample = bool(generation_config.do_sample)
    batched = is_history_free(logits_processor)
    emitter = Emitter(input_ids, stopping_criteria, generation_config, streamer)
    stats = SpeculativeStats()
    prompt_len = input_ids.shape[1]

    layout = adapter.layout(input_ids, model_kwargs)
    layers = drafter.feature_layers
    embeds, features, draft_features = prefill(adapter, input_ids, layout, cache, layers)
    walk_tree(build_tree(input_ids[0, -1:], [-1]), adapter.logits(features[:, -1]), emitter, logits_processor,
              do_sample, batched)  # fmt: skip
    stats.target_forwards += 1
    state = prompt_draft_state(adapter, emitter.input_ids, embeds, draft_features, layout.visual_mask)
    if not emitter.finished:
        drafter.begin(adapter, do_sample, prompt_len, _end_tokens(generation_config))

    while not emitter.finished:
        step_start = clock.now()
        tree = drafter.propose(state)
        clock.add("draft", step_start)
        root_position = emitter.input_ids.shape[1] - 1  # = the cache's length; the root is not cached yet
        verify_start = clock.now()
        tree_features, tree_logits = verify(adapter, tree, cache, root_position, layout, layers)
        clock.add("verify", verify_start)
        nodes = walk_tree(tree, tree_logits, emitter, logits_processor, do_sample, batched)
        commit_accepted(cache, root_position, nodes)  # the emitted tokens' entries; the last one is the next root
        drafter.observe(tree, nodes, emitter.finished)
        stats.target_forwards += 1
        stats.accepted_lengths.append(len(nodes))
        if not emitter.finished:
            state = step_draft_state(adapter, emitter.input_ids, tree_features[:, nodes], root_position)
        clock.add("step", step_start)

    if streamer is not None:
        streamer.end()
    sequences = emitter.input_ids
    stats.new_tokens = sequences.shape[1] - prompt_len
    described = drafter.describe()
    stats.compressor_branch = described.get("compressor_branch")
    stats.draft_visual_tokens = described.get("draft_visual_tokens")
    if clock.enabled:
        stats.step_time, stats.verify_time, stats.draft_time = (clock.totals[k] for k in ("step", "verify", "draft"))
    if not generation_config.return_dict_in_generate:
        return sequences
    output = SpeculativeDecoderOutput(
        sequences=sequences, scores=emitter.scores, logits=emitter.logits, speculative_stats=stats
    )
    setattr(output, CACHE_KWARG, cache)
    return output


def _end_tokens(generation_config: GenerationConfig) -> tuple[int, ...]:
    """The ids that stop generation through `eos_token_id` (`generate()` installs their stopping criterion)."""
    eos = generation_config.eos_token_id
    if eos is None:
        return ()
    return tuple(
        int(t) for t in (eos.tolist() if isinstance(eos, torch.Tensor) else eos if isinstance(eos, list) else [eos])
    )


def speculative_generate(
    target,
    draft: DraftSource,
    *,
    depth: int | None = None,
    tree_top_k: int | None = None,
    total_tokens: int | None = None,
    profile: bool | None = None,
    **generate_kwargs,
) -> SpeculativeOutput:
    """
    `target.generate(**generate_kwargs, assistant_model=draft)` with tree knobs and statistics.

    Args:
        target (`PreTrainedModel`): the model to decode (a supported architecture, or a peft wrapper of one); its
            output is unchanged (lossless).
        draft (`SpecVLMDraftModel` bound to `target`, or any `DraftSource`).
        depth, tree_top_k, total_tokens (`int`, *optional*): EAGLE-2 tree knobs for this call (`SpeculativeConfig`'s
            `depth`, `top_k`, `total_tokens`); the draft's own `speculative_config` otherwise.
        profile (`bool`, *optional*): also time target and draft forwards apart.
        generate_kwargs: the processor's outputs (`input_ids`, `attention_mask`, `pixel_values`) and any generation
            argument `generate()` takes, with the same meaning (`max_new_tokens`, `do_sample`, `temperature`,
            `top_k`, `top_p`, `eos_token_id`, `generation_config`, `logits_processor`, `stopping_criteria`,
            `streamer`, ...). `top_k` is sampling's top-k filter, as in `generate()`.

    Returns:
        `SpeculativeOutput` with `sequences` and `stats` (`SpeculativeStats`: target forwards, tokens accepted per
        step, mean accepted length, wall time).
    """
    from .integration import route_error  # integration imports this module

    if not isinstance(draft, DraftSource):
        raise TypeError(f"draft must be a SpecVLMDraftModel (or another DraftSource), got {type(draft).__name__}")
    max_new_tokens = generate_kwargs.get("max_new_tokens")
    if max_new_tokens is not None and max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    _warn_if_top_k_meant_the_tree(target, generate_kwargs, tree_top_k)
    knobs = {"depth": depth, "top_k": tree_top_k, "total_tokens": total_tokens, "profile": profile}
    if any(v is not None for v in knobs.values()):
        draft = draft.with_tree(**knobs)
    _return_the_stats(generate_kwargs)
    fallback = route_error()
    if fallback is not None:
        for name in ("tokenizer", "assistant_tokenizer", "synced_gpus"):
            if generate_kwargs.get(name) is not None:
                raise ValueError(
                    f"On this transformers speculative_generate runs through generate()'s custom_generate hook, which "
                    f"does not pass `{name}` on; drop it ({fallback})."
                )
    device = target.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    if fallback is None:
        output = target.generate(assistant_model=draft, **generate_kwargs)
    else:  # generate()'s public custom_generate hook; it hands a custom method neither assistant nor streamer
        streamer = generate_kwargs.pop("streamer", None)
        output = target.generate(
            custom_generate=_tree_decoding_hook, draft_source=draft, draft_streamer=streamer, **generate_kwargs
        )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    stats = output.speculative_stats
    stats.wall_time = time.perf_counter() - start
    return SpeculativeOutput(sequences=output.sequences, stats=stats)


def _tree_decoding_hook(
    target, input_ids, logits_processor, stopping_criteria, generation_config, draft_source, draft_streamer=None,
    **model_kwargs,
):  # fmt: skip
    """`tree_decoding` as a `generate(custom_generate=...)` method, for transformers where the `assistant_model`
    route is not installed. The streamer arrives under its own name, so the prompt is streamed here."""
    if draft_streamer is not None:
        draft_streamer.put(input_ids.cpu())
    return tree_decoding(
        target, input_ids, logits_processor, stopping_criteria, generation_config, draft_source, draft_streamer,
        **model_kwargs,
    )  # fmt: skip


def _return_the_stats(generate_kwargs: dict) -> None:
    """Makes `generate()` return its output object (which carries the statistics). Where the caller did not ask for
    it, scores and logits are not kept either, so that stopping criteria still get `scores=None`, as in plain
    decoding."""
    config = generate_kwargs.get("generation_config")
    if config is not None:
        config = generate_kwargs["generation_config"] = copy.deepcopy(config)
    asked = generate_kwargs.get("return_dict_in_generate", getattr(config, "return_dict_in_generate", False))
    overrides = {"return_dict_in_generate": True}
    if not asked:
        overrides.update(output_scores=False, output_logits=False)
    for name, value in overrides.items():
        if config is not None and name not in generate_kwargs:
            setattr(config, name, value)
        else:
            generate_kwargs[name] = value


def _warn_if_top_k_meant_the_tree(target, generate_kwargs: dict, tree_top_k: int | None) -> None:
    """`speculative_generate(top_k=...)` is sampling's top-k, as in `generate()`. Where it cannot filter anything
    (greedy decoding) the caller most likely meant the tree's width, `tree_top_k`: say so."""
    if "top_k" not in generate_kwargs or tree_top_k is not None:
        return
    config = generate_kwargs.get("generation_config") or target.generation_config
    do_sample = generate_kwargs.get("do_sample", getattr(config, "do_sample", None))
    if not do_sample:
        warnings.warn(
            "speculative_generate(top_k=...) is sampling's top-k filter, as in generate(), and has no effect on "
            "greedy decoding; the tree's width is `tree_top_k`.",
            FutureWarning,
            stacklevel=3,
        )
