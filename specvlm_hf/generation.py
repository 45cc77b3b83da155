"""The lossless tree decoding loop (SpecVLM §1.3): prefill, then [draft a tree, verify it in one target forward,
accept, compact the cache] until a stopping criterion fires. `generate()` prepares the inputs (logits processors,
stopping criteria, image encoding, cache) and calls `tree_decoding` through the hook in `integration.py`;
`speculative_generate` is the same call returning statistics."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache, GenerationConfig
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria, StoppingCriteriaList
from transformers.generation.utils import GenerateDecoderOnlyOutput

from ._compat import CACHE_KWARG, require_tested_transformers
from .adapters import get_adapter
from .cache import check_cache, commit_accepted
from .drafter import DraftSource, DraftState
from .metrics import SpeculativeStats
from .tree import tree_attention_mask
from .verify import accept_greedy, accept_sampling, process_tree_logits

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


def _check_request(target, input_ids, generation_config: GenerationConfig, model_kwargs: dict) -> None:
    if input_ids.shape[0] != 1:
        raise ValueError(f"Tree speculative decoding supports batch size 1, got a batch of {input_ids.shape[0]}.")
    unknown = sorted(set(model_kwargs) - _KNOWN_MODEL_KWARGS)
    if unknown:
        raise ValueError(f"Tree speculative decoding does not support these generate() arguments: {unknown}.")
    mask = model_kwargs.get("attention_mask")
    if mask is not None and not bool((mask == 1).all()):
        raise ValueError("Tree speculative decoding does not support padded inputs (attention_mask with zeros).")
    for flag in ("output_attentions", "output_hidden_states"):
        if getattr(generation_config, flag, False):
            raise ValueError(f"Tree speculative decoding does not return {flag.split('_', 1)[1]}; unset `{flag}`.")
    if generation_config.max_length <= input_ids.shape[1]:
        raise ValueError(
            f"Nothing to generate: max_length={generation_config.max_length} but the prompt has "
            f"{input_ids.shape[1]} tokens (set max_new_tokens >= 1)."
        )


class _Emitter:
    """Appends accepted tokens one by one and stops exactly where plain decoding would (EOS, max_length, criteria)."""

    def __init__(self, input_ids, generation_config: GenerationConfig, stopping_criteria: StoppingCriteriaList):
        eos = generation_config.eos_token_id
        self.eos = set([eos] if isinstance(eos, int) else (eos or []))
        self.max_length = generation_config.max_length
        self.criteria = StoppingCriteriaList(
            c for c in stopping_criteria if not isinstance(c, (MaxLengthCriteria, EosTokenCriteria))
        )
        self.tokens = input_ids[0].tolist()
        self.finished = False

    def emit(self, candidates: list[int], scores: torch.Tensor) -> list[int]:
        """Appends a prefix of `candidates` (scores row i produced token i) and returns it."""
        emitted = []
        for i, token in enumerate(candidates):
            emitted.append(token)
            self.tokens.append(token)
            if token in self.eos or len(self.tokens) >= self.max_length:
                self.finished = True
            elif self.criteria:
                ids = torch.tensor([self.tokens], device=scores.device)
                self.finished = bool(self.criteria(ids, scores[i : i + 1]).any())
            if self.finished:
                break
        return emitted


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
        target (`LlavaForConditionalGeneration`): the model being decoded.
        input_ids (`torch.LongTensor` of shape `(1, prompt_len)`): the prompt.
        draft_source (`DraftSource`): makes the `Drafter` (a bound `SpecVLMDraftModel`, `draft.with_tree(...)`, ...).

    Returns:
        `torch.LongTensor` of shape `(1, seq_len)`, or `SpeculativeDecoderOutput` if `return_dict_in_generate`.
    """
    _check_request(target, input_ids, generation_config, model_kwargs)
    adapter = get_adapter(target)
    adapter.check_attention()
    cache = model_kwargs.get(CACHE_KWARG) or model_kwargs.get("cache") or model_kwargs.get("past_key_values")
    cache = cache if cache is not None else DynamicCache()
    if cache.get_seq_length() > 0:
        raise ValueError("Tree speculative decoding starts from an empty cache; do not pass a pre-filled cache.")
    drafter = draft_source.new_drafter(target)
    clock = _Clock(draft_source.speculative_config.profile, input_ids.device)
    do_sample = bool(generation_config.do_sample)
    keep_scores, keep_logits = generation_config.output_scores, generation_config.output_logits
    all_scores, all_logits = [], []
    stats = SpeculativeStats()
    emitter = _Emitter(input_ids, generation_config, stopping_criteria)

    def choose(scores: torch.Tensor) -> int:  # scores [1, V] -> the target's own next token
        if do_sample:
            return int(torch.multinomial(torch.softmax(scores, dim=-1), 1))
        return int(scores.argmax(dim=-1))

    # Prefill: the target encodes the prompt (visual tokens scattered in) and picks the first token.
    embeds = adapter.embed(input_ids, adapter.image_features(model_kwargs))  # [1, prompt_len, h]
    prompt_len = input_ids.shape[1]
    positions = torch.arange(prompt_len, device=input_ids.device)[None]
    features = adapter.forward(embeds, positions, cache)  # [1, prompt_len, h]
    check_cache(cache)
    logits = adapter.logits(features[:, -1])  # [1, V]
    scores = logits_processor(input_ids, logits)
    emitted = emitter.emit([choose(scores)], scores)
    stats.target_forwards += 1
    if keep_scores:
        all_scores.append(scores)
    if keep_logits:
        all_logits.append(logits)
    if streamer is not None:
        streamer.put(torch.tensor(emitted))

    # Draft position t pairs the target's input embedding at t+1 with its feature at t.
    first = adapter.embed_tokens(torch.tensor([emitted], device=input_ids.device))
    image_slots = input_ids[0] == adapter.image_token_id
    state = DraftState(
        input_ids=torch.tensor([emitter.tokens], device=input_ids.device),
        inputs_embeds=torch.cat([embeds[:, 1:], first], dim=1),
        features=features,
        position_ids=positions,
        image_mask=torch.cat([image_slots[1:], image_slots.new_zeros(1)]),
    )

    while not emitter.finished:
        step_start = clock.now()
        tree = drafter.propose(state)
        clock.add("draft", step_start)
        root_position = len(emitter.tokens) - 1  # = target cache length; the root is not cached yet

        verify_start = clock.now()
        tree_embeds = adapter.embed_tokens(tree.tokens)[None]  # [1, N, h]
        mask = tree_attention_mask(tree.mask, root_position, tree_embeds.dtype)
        tree_features = adapter.forward(tree_embeds, (root_position + tree.depths)[None], cache, mask)  # [1, N, h]
        tree_logits = adapter.logits(tree_features[0])  # [N, V]
        clock.add("verify", verify_start)

        history = torch.tensor([emitter.tokens], device=input_ids.device)
        tree_scores = process_tree_logits(logits_processor, history, tree, tree_logits)
        if do_sample:
            acceptance = accept_sampling(tree, torch.softmax(tree_scores, dim=-1))
        else:
            acceptance = accept_greedy(tree, tree_scores.argmax(dim=-1))
        path = acceptance.path
        commit_accepted(cache, root_position, path)
        # Row path[i] of the scores produced the i-th new token (the accepted drafts, then the bonus token).
        candidates = tree.tokens[path[1:]].tolist() + [acceptance.next_token]
        emitted = emitter.emit(candidates, tree_scores[path])
        stats.target_forwards += 1
        stats.accepted_lengths.append(len(emitted))
        if keep_scores:
            all_scores.extend(tree_scores[path[i]][None] for i in range(len(emitted)))
        if keep_logits:
            all_logits.extend(tree_logits[path[i]][None] for i in range(len(emitted)))
        if streamer is not None:
            streamer.put(torch.tensor(emitted))
        if not emitter.finished:
            state = DraftState(
                input_ids=torch.tensor([emitter.tokens], device=input_ids.device),
                inputs_embeds=adapter.embed_tokens(torch.tensor([candidates], device=input_ids.device)),
                features=tree_features[:, path],
                position_ids=(root_position + torch.arange(len(path), device=input_ids.device))[None],
            )
        clock.add("step", step_start)

    if streamer is not None:
        streamer.end()
    sequences = torch.tensor([emitter.tokens], device=input_ids.device)
    stats.new_tokens = sequences.shape[1] - prompt_len
    if clock.enabled:
        stats.step_time, stats.verify_time, stats.draft_time = (clock.totals[k] for k in ("step", "verify", "draft"))
    if not generation_config.return_dict_in_generate:
        return sequences
    output = SpeculativeDecoderOutput(
        sequences=sequences,
        scores=tuple(all_scores) if keep_scores else None,
        logits=tuple(all_logits) if keep_logits else None,
        speculative_stats=stats,
    )
    setattr(output, CACHE_KWARG, cache)
    return output


def speculative_generate(
    target,
    draft: DraftSource,
    *,
    depth: int | None = None,
    top_k: int | None = None,
    total_tokens: int | None = None,
    profile: bool | None = None,
    **generate_kwargs,
) -> SpeculativeOutput:
    """
    `target.generate(**generate_kwargs, assistant_model=draft)` with tree knobs and statistics.

    Args:
        target (`LlavaForConditionalGeneration`): the model to decode; its output is unchanged (lossless).
        draft (`SpecVLMDraftModel` bound to `target`, or any `DraftSource`).
        depth, top_k, total_tokens (`int`, *optional*): EAGLE-2 tree knobs for this call (`SpeculativeConfig`); the
            draft's own `speculative_config` otherwise. `top_k` here is the tree's: sampling's top-k filter goes in
            `generation_config`.
        profile (`bool`, *optional*): also time target and draft forwards apart.
        generate_kwargs: the processor's outputs (`input_ids`, `attention_mask`, `pixel_values`) and the usual
            generation arguments (`max_new_tokens`, `do_sample`, `temperature`, `top_p`, `eos_token_id`,
            `pad_token_id`, `generation_config`, `logits_processor`, `stopping_criteria`, `streamer`, ...).

    Returns:
        `SpeculativeOutput` with `sequences` and `stats` (`SpeculativeStats`: target forwards, tokens accepted per
        step, mean accepted length, wall time).
    """
    require_tested_transformers()
    if not isinstance(draft, DraftSource):
        raise TypeError(f"draft must be a SpecVLMDraftModel (or another DraftSource), got {type(draft).__name__}")
    max_new_tokens = generate_kwargs.get("max_new_tokens")
    if max_new_tokens is not None and max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    knobs = {"depth": depth, "top_k": top_k, "total_tokens": total_tokens, "profile": profile}
    if any(v is not None for v in knobs.values()):
        draft = draft.with_tree(**knobs)
    if generate_kwargs.get("generation_config") is not None:
        generate_kwargs["generation_config"] = copy.deepcopy(generate_kwargs["generation_config"])
        generate_kwargs["generation_config"].return_dict_in_generate = True
    else:
        generate_kwargs["return_dict_in_generate"] = True
    device = target.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    output = target.generate(assistant_model=draft, **generate_kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    stats = output.speculative_stats
    stats.wall_time = time.perf_counter() - start
    return SpeculativeOutput(sequences=output.sequences, stats=stats)
