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
import torch.nn.functional as F
from transformers import DynamicCache, GenerationConfig
from transformers.generation.configuration_utils import GenerationMode
from transformers.generation.stopping_criteria import StoppingCriteriaList
from transformers.generation.utils import GenerateDecoderOnlyOutput

from ._compat import CACHE_KWARG
from .adapters import get_adapter
from .cache import check_cache, commit_accepted, commit_rows, keep_rows, row_entries
from .drafter import DraftSource, WithoutCache
from .loop import Emitter, prompt_draft_state, step_draft_state, target_forward, verify, walk_tree, without_inspection
from .metrics import SpeculativeStats
from .peft_wrappers import check_no_adapter_routing
from .tree import additive_mask, build_tree
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
                "replaces; drop it (size the tree with draft.with_tree(depth=, tree_top_k=, total_tokens=), or "
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
    unknown = sorted(set(model_kwargs) - _KNOWN_MODEL_KWARGS - adapter.model_kwargs)
    if unknown:
        raise ValueError(f"Tree speculative decoding does not support these generate() arguments: {unknown}.")
    mask = model_kwargs.get("attention_mask")
    if mask is not None:
        if mask.dim() != 2 or mask.shape != input_ids.shape or not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(
                f"attention_mask must be a 0/1 padding mask of the prompt's shape {tuple(input_ids.shape)}, got "
                f"shape {tuple(mask.shape)}."
            )
        if not bool(mask[:, -1].all()) or not bool((mask.diff(dim=1) >= 0).all()):
            raise ValueError(
                "Tree speculative decoding needs left-padded prompts (padding first, attention_mask 0...0 1...1 in "
                "every row); this batch has padding after a prompt token (right padding). Tokenize with "
                "padding_side='left' (e.g. processor.tokenizer.padding_side = 'left'), as plain generate() also "
                "expects for a decoder-only target."
            )
    rows = input_ids.shape[0]
    if rows > 1:
        for flag in ("output_scores", "output_logits"):
            if generation_config.return_dict_in_generate and getattr(generation_config, flag, False):
                raise ValueError(
                    f"Tree speculative decoding of a batch does not return per-step {flag.split('_', 1)[1]} (rows "
                    f"advance by different numbers of tokens per step); unset `{flag}` or decode one prompt at a time."
                )
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
    Lossless tree speculative decoding of a batch of prompts. Arguments are those `generate()` passes to a decoding
    method.

    Each row decodes as plain batched decoding decodes it: its own tree per step, verified with the other rows' in one
    target forward, the target's tokens emitted and the row's stopping criteria called per token. Rows accept
    different numbers of tokens per step; a row that has finished leaves the batch, and its output is padded as plain
    decoding pads it (`Emitter`).

    Args:
        target (`PreTrainedModel`): the model being decoded (an architecture of `adapters.ADAPTERS`).
        input_ids (`torch.LongTensor` of shape `(rows, prompt_len)`): the prompts, left-padded (`attention_mask`).
        draft_source (`DraftSource`): makes the `Drafter` (a bound `SpecVLMDraftModel`, `draft.with_tree(...)`, ...).

    Returns:
        `torch.LongTensor` of shape `(rows, seq_len)`, or `SpeculativeDecoderOutput` if `return_dict_in_generate`.
        The returned cache holds every position but the last, laid out as plain decoding's.
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
    rows, prompt_len = input_ids.shape
    if rows > 1 and not drafter.supports_batches:
        raise ValueError(f"{type(drafter).__name__} drafts for one prompt at a time; this call has {rows} rows.")
    if rows > 1 and streamer is not None:
        raise ValueError("A streamer streams one sequence; decode a batch without `streamer` (as plain generate()).")
    if rows > 1:
        _check_row_processors(logits_processor)
    do_sample = bool(generation_config.do_sample)
    # The prompt is checked before the call's way is chosen, so that either way refuses the same inputs; the visual
    # features are generate()'s own (`mm_encoder_outputs`), which plain decoding reuses too.
    layout = adapter.layout(input_ids, model_kwargs)
    adapter.check_visual_features(input_ids, layout.visual_features)
    visual = bool(layout.visual_mask.any())
    from .integration import route_error  # integration imports this module

    # A whole call can go to plain decoding's own method where its signature is the one checked (`HOOK_SIGNATURES`).
    if route_error() is None and not drafter.drafts_call(adapter, do_sample, prompt_len, rows, visual):
        generation = (logits_processor, stopping_criteria, generation_config, streamer)
        return _plain_call(target, drafter, input_ids, generation, model_kwargs)
    if rows > 1:
        row_processors = [without_inspection(_row_processors(logits_processor, row, rows)) for row in range(rows)]
    else:
        row_processors = [without_inspection(logits_processor)]
    embeds = adapter.embed(input_ids, layout.visual_features)
    clock = _Clock(draft_source.speculative_config.profile, input_ids.device)
    batched = is_history_free(logits_processor)
    stats = SpeculativeStats()
    mask = model_kwargs.get("attention_mask")
    padded = mask is not None and not bool(mask.all())
    pads = (prompt_len - mask.sum(dim=1)).tolist() if padded else [0] * rows  # left padding per row
    # Plain decoding pads a finished row when an end-token criterion is installed, and decodes it on otherwise.
    pads_finished = rows == 1 or any(hasattr(criterion, "eos_token_id") for criterion in stopping_criteria)
    emitters = [
        Emitter(input_ids[row : row + 1], stopping_criteria, generation_config, streamer, pads_finished)
        for row in range(rows)
    ]

    layers, padding = drafter.feature_layers, mask if padded else None
    features, draft_features = target_forward(adapter, embeds, layout.positions, cache, padding, layers)
    first_logits = adapter.logits(features[:, -1])
    for row, emitter in enumerate(emitters):
        walk_tree(build_tree(input_ids[row, -1:], [-1]), first_logits[row : row + 1], emitter, row_processors[row],
                  do_sample, batched)  # fmt: skip
    stats.target_forwards += 1
    decode_start = time.perf_counter()  # the call's rate counts the tokens after the prefill's, and their time
    rows_stats = [[] for _ in range(rows)]  # accepted lengths per row
    # Each row's draft state, as for the row decoded alone: its prompt without padding.
    states = [
        prompt_draft_state(
            adapter, emitters[row].input_ids[:, pads[row] :], embeds[row : row + 1, pads[row] :],
            draft_features[row : row + 1, pads[row] :], layout.visual_mask[row, pads[row] :],
        )
        for row in range(rows)
    ]  # fmt: skip
    live = None  # the cache slots of each row's committed positions; None: one unpadded row, every slot
    if rows > 1 or padded:
        live = mask.bool() if mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
    active = list(range(rows))  # rows still decoding, in batch order
    parked: dict[int, tuple] = {}  # finished rows: their cache layers' (keys, values) and live slots
    full_layout = layout
    _settle_limits(emitters)
    if not all(emitter.done for emitter in emitters):
        drafter.begin(adapter, do_sample, prompt_len, _end_tokens(generation_config), rows, visual)
    active, states, live, layout = _drop_done(emitters, active, states, live, layout, cache, drafter, parked)

    while active:
        step_start = clock.now()
        trees = drafter.propose_rows(states)
        clock.add("draft", step_start)
        roots = torch.tensor([emitters[row].input_ids.shape[1] - 1 for row in active], device=input_ids.device)
        verify_start = clock.now()
        tree_features, tree_logits = verify(adapter, trees, cache, roots, layout, layers, live)
        clock.add("verify", verify_start)
        paths = []
        for i, (row, tree) in enumerate(zip(active, trees)):
            paths.append(walk_tree(tree, tree_logits[i, : tree.num_nodes], emitters[row], row_processors[row],
                                   do_sample, batched))  # fmt: skip
            rows_stats[row].append(len(paths[-1]))
        if live is None:
            commit_accepted(cache, int(roots[0]), paths[0])  # the emitted tokens' entries; the last is the next root
        else:
            live = commit_rows(cache, live, paths)
        ends = [_cut_draft(tree, path, emitters[row]) for row, tree, path in zip(active, trees, paths)]
        drafter.observe_rows(trees, [path + [end] * (end is not None) for path, end in zip(paths, ends)],
                             [end is not None for end in ends])  # fmt: skip
        stats.target_forwards += 1
        states = [
            step_draft_state(adapter, emitters[row].input_ids[:, pads[row] :], tree_features[i : i + 1, path],
                             int(roots[i]) - pads[row])
            for i, (row, path) in enumerate(zip(active, paths))
        ]  # fmt: skip
        _settle_limits(emitters)
        active, states, live, layout = _drop_done(emitters, active, states, live, layout, cache, drafter, parked)
        clock.add("step", step_start)

    if streamer is not None:
        streamer.end()
    sequences = _sequences(emitters, generation_config)
    returns_cache = draft_source.returns_cache  # a cache the caller passed holds the output's too
    if rows > 1 and returns_cache:
        _assemble_cache(adapter, cache, parked, sequences, pads, full_layout)
    lengths = [emitter.input_ids.shape[1] - prompt_len for emitter in emitters]
    for steps, length in zip(rows_stats, lengths):
        _cut_steps(steps, length - 1)  # the prefill emitted each row's first token
    stats.new_tokens = sum(lengths)
    stats.target_forwards = sum(len(steps) + 1 for steps in rows_stats)
    stats.accepted_lengths = [n for steps in rows_stats for n in steps]
    if rows > 1:
        stats.row_new_tokens, stats.row_accepted_lengths = lengths, rows_stats
        stats.row_target_forwards = [len(steps) + 1 for steps in rows_stats]
    described = drafter.describe()
    stats.compressor_branch = described.get("compressor_branch")
    stats.draft_visual_tokens = described.get("draft_visual_tokens")
    if clock.enabled:
        stats.step_time, stats.verify_time, stats.draft_time = (clock.totals[k] for k in ("step", "verify", "draft"))
    if stats.new_tokens > rows:  # tokens after the prefill's
        drafter.observe_call(True, (stats.new_tokens - rows) / rows, time.perf_counter() - decode_start)
    if not generation_config.return_dict_in_generate:
        return sequences
    emitter = emitters[0]
    output = SpeculativeDecoderOutput(
        sequences=sequences, scores=emitter.scores, logits=emitter.logits, speculative_stats=stats
    )
    setattr(output, CACHE_KWARG, cache if returns_cache else None)
    return output


def _plain_call(target, drafter, input_ids: torch.Tensor, generation: tuple, model_kwargs: dict):
    """
    The call decoded by plain decoding's own method (`GenerationMixin._sample`, with what `generate()` prepared), as
    the auto tree chose (`Drafter.drafts_call`): plain `generate()`'s output, with statistics when it returns a dict.
    A forward hook on the target times its forwards, so that the call's rate, like a drafted call's, counts the
    tokens after the prefill's and the time after the prefill.

    Args:
        generation (`tuple`): `(logits_processor, stopping_criteria, generation_config, streamer)`.
    """
    logits_processor, stopping_criteria, generation_config, streamer = generation
    returned = []  # when each target forward returned
    hook = target.register_forward_hook(lambda *_: returned.append(time.perf_counter()))
    try:
        output = target._sample(
            input_ids, logits_processor=logits_processor, stopping_criteria=stopping_criteria,
            generation_config=generation_config, synced_gpus=False, streamer=streamer, **model_kwargs,
        )  # fmt: skip
    finally:
        hook.remove()
    sequences = output if isinstance(output, torch.Tensor) else output.sequences
    rows, prompt_len = input_ids.shape
    end_tokens = set(_end_tokens(generation_config))
    pad = generation_config._pad_token_tensor
    pad = None if pad is None else int(pad)
    lengths = []  # each row's new tokens: up to its first end token where only padding follows, else all
    for row in sequences[:, prompt_len:].tolist():
        ends = (i + 1 for i, token in enumerate(row) if token in end_tokens and all(t == pad for t in row[i + 1 :]))
        lengths.append(next(ends, len(row)))
    if len(returned) > 1 and sum(lengths) > rows:
        drafter.observe_call(False, (sum(lengths) - rows) / rows, returned[-1] - returned[0])
    if not generation_config.return_dict_in_generate:
        return sequences
    steps = [[1] * (length - 1) for length in lengths]  # one token per forward after the prefill's
    stats = SpeculativeStats(new_tokens=sum(lengths), target_forwards=sum(lengths), drafted=False)
    stats.accepted_lengths = [n for row in steps for n in row]
    if rows > 1:
        stats.row_new_tokens, stats.row_target_forwards, stats.row_accepted_lengths = lengths, lengths, steps
    return SpeculativeDecoderOutput(**dict(output), speculative_stats=stats)


# Processors whose output for a row depends on the row's index in the batch or on state kept across the whole batch:
# called one row at a time (a batch's rows advance by different numbers of tokens), they would compute otherwise.
_BATCH_BOUND_PROCESSORS = {
    "PrefixConstrainedLogitsProcessor": "prefix_allowed_tokens_fn (it receives the row's batch index)",
    "UnbatchedClassifierFreeGuidanceLogitsProcessor": "guidance_scale (classifier-free guidance: its unconditional cache spans the batch)",
    "SynthIDTextWatermarkLogitsProcessor": "a SynthID watermarking_config (its state spans the batch)",
}


def _check_row_processors(logits_processor) -> None:
    """In a batch every logits processor and stopping criterion is called on one row at a time, with that row's ids
    (plain decoding calls them on the whole batch at once): row-wise ones compute the same. Raises a `ValueError`
    naming the argument for the processors that depend on the batch as a whole."""
    for processor in logits_processor:
        name = type(processor).__name__
        if name in _BATCH_BOUND_PROCESSORS:
            raise ValueError(
                f"Tree speculative decoding of a batch calls logits processors one row at a time; "
                f"{_BATCH_BOUND_PROCESSORS[name]} depends on the whole batch. Decode these prompts one at a time, "
                "or drop it."
            )


def _row_processors(logits_processor, row: int, rows: int):
    """The processors of batch row `row`: those `generate()` built with one value per row (the prompt padding
    `RepetitionPenaltyLogitsProcessor` skips, the prompts `EncoderRepetitionPenaltyLogitsProcessor` reads) hold that
    row's value alone; the others are shared."""
    out = type(logits_processor)()
    for processor in logits_processor:
        for name in ("prompt_ignore_length", "encoder_input_ids"):
            value = getattr(processor, name, None)
            if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == rows:
                processor = copy.copy(processor)
                setattr(processor, name, value[row : row + 1])
        out.append(processor)
    return out


def _cut_steps(steps: list[int], total: int) -> None:
    """Trims a row's accepted lengths (`steps`, in place) to `total` tokens: a row that decoded on past where the last
    row finished (no end-token criterion) had its tokens beyond that cut (`_settle_limits`)."""
    while sum(steps) > total:
        excess = sum(steps) - total
        if steps[-1] > excess:
            steps[-1] -= excess
        else:
            steps.pop()


def _cut_draft(tree, path: list[int], emitter) -> int | None:
    """The accepted draft on which the row's output stopped inside this step, or `None`: its last token is a draft
    below `path`'s last node, accepted, so the target's verdict past it is unknown. A row that ends on the target's
    own token after `path` was not cut: every draft below `path` was rejected, as in a step that goes on."""
    if not emitter.done:
        return None
    last = int(emitter.input_ids[0, -1])
    return next((child for child in tree.children[path[-1]] if tree.token_list[child] == last), None)


def _settle_limits(emitters: list[Emitter]) -> None:
    """Once every row has finished, plain batched decoding stops at the length where the last one finished: rows that
    decode on after finishing (no end-token criterion) stop there too."""
    if emitters[0].stop_on_finish or emitters[0].limit is not None or not all(e.finished for e in emitters):
        return
    limit = max(emitter.finished_length for emitter in emitters)
    for emitter in emitters:
        emitter.limit = limit
        emitter.input_ids = emitter.input_ids[:, :limit]


def _drop_done(emitters, active, states, live, layout, cache, drafter, parked):
    """
    Takes the rows that are done out of the batch: their cache entries and live slots are parked (for
    `_assemble_cache`), and the cache, the live slots, the layout, the drafter and the draft states keep the others.

    Returns:
        `(active, states, live, layout)` for the rows that go on.
    """
    keep = [i for i, row in enumerate(active) if not emitters[row].done]
    if len(keep) == len(active) or live is None:
        return [active[i] for i in keep], [states[i] for i in keep], live, layout
    for i, row in enumerate(active):
        if i not in keep:
            parked[row] = (row_entries(cache, i), live[i])
    if keep:
        index = torch.tensor(keep, device=live.device)
        keep_rows(cache, index)
        live, layout = live[index], layout.keep_rows(index)
        drafter.keep_rows(keep)
    return [active[i] for i in keep], [states[i] for i in keep], live, layout


def _sequences(emitters: list[Emitter], generation_config: GenerationConfig) -> torch.Tensor:
    """The rows' sequences, `(rows, seq_len)`; a row that finished early is padded with the pad token, as plain
    decoding pads it."""
    length = max(emitter.input_ids.shape[1] for emitter in emitters)
    pad = generation_config._pad_token_tensor
    out = []
    for emitter in emitters:
        ids = emitter.input_ids
        if ids.shape[1] < length:
            if pad is None:
                raise ValueError("A row finished before the others and no pad_token_id is set to pad it.")
            ids = torch.cat([ids, ids.new_full((1, length - ids.shape[1]), int(pad))], dim=1)
        out.append(ids)
    return torch.cat(out)


@torch.no_grad()
def _assemble_cache(adapter, cache, parked: dict, sequences: torch.Tensor, pads: list[int], layout) -> None:
    """
    Lays the batch's cache out as plain batched decoding returns it: per row, the prompt's slots (padding
    included) and then one entry per sequence index, up to the last but one. Rows that finished early lack the
    entries of their last token and the padding after it, which plain decoding computed: one target forward over
    those rows adds them (`_complete_rows`).

    Args:
        parked (`dict[int, tuple]`): every row's `(per-layer (keys, values), live slots)` (`_drop_done`).
        sequences (`torch.LongTensor` of shape `(rows, seq_len)`): the output.
        pads (`list[int]`): left padding per row.
        layout (`PromptLayout`): the whole batch's.
    """
    length = sequences.shape[1] - 1
    prompt_len = layout.positions.shape[-1]
    rows = []
    for row in range(sequences.shape[0]):
        entries, live = parked[row]
        slots = torch.cat([
            torch.arange(prompt_len, device=live.device), prompt_len + live[prompt_len:].nonzero()[:, 0]
        ])[:length]  # fmt: skip
        rows.append([(keys[:, :, slots], values[:, :, slots]) for keys, values in entries])
    missing = [(row, entries[0][0].shape[2]) for row, entries in enumerate(rows) if entries[0][0].shape[2] < length]
    if missing:
        _complete_rows(adapter, rows, missing, sequences, pads, layout)
    for index, layer in enumerate(cache.layers):
        layer.keys = torch.cat([entries[index][0] for entries in rows])
        layer.values = torch.cat([entries[index][1] for entries in rows])


def _complete_rows(adapter, rows: list, missing: list[tuple[int, int]], sequences: torch.Tensor, pads: list[int],
                   layout) -> None:  # fmt: skip
    """
    The entries of sequence indices `[have, seq_len - 1)` for each `(row, have)` in `missing`, in one target forward,
    appended to `rows[row]` in place. The rows' entries are laid side by side, right-padded to the longest (`width`),
    and their missing tokens follow at slots `[width, width + n)`, `n` the most any row lacks (a row that lacks fewer
    gets padding queries, whose entries are dropped). A row's queries see its own entries but its left padding, as
    `generate()` masks it, and its new tokens causally.

    Args:
        rows (`list`): per row of the batch, per layer `(keys, values)` of shape `(1, kv_heads, have, head_dim)`.
        missing (`list[tuple[int, int]]`): `(row, have)`, `have < seq_len - 1`.
        sequences (`torch.LongTensor` of shape `(rows, seq_len)`), pads (`list[int]`), layout (`PromptLayout`): as in
            `_assemble_cache`.
    """
    device, length = sequences.device, sequences.shape[1] - 1
    width, n = max(have for _, have in missing), max(length - have for _, have in missing)
    tokens = sequences.new_zeros(len(missing), n)
    indices = torch.empty(len(missing), n, dtype=torch.long, device=device)
    allowed = torch.zeros(len(missing), n, width + n, dtype=torch.bool, device=device)
    causal = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    for i, (row, have) in enumerate(missing):
        tokens[i, : length - have] = sequences[row, have:length]
        indices[i] = torch.arange(have, have + n, device=device)
        allowed[i, :, pads[row] : have] = True
        allowed[i, :, width:] = causal
    partial = DynamicCache()
    for layer in range(len(rows[0])):
        padded = [[F.pad(rows[row][layer][part], (0, 0, 0, width - have)) for row, have in missing] for part in (0, 1)]
        partial.update(torch.cat(padded[0]), torch.cat(padded[1]), layer)
    embeds = adapter.embed_tokens(tokens)
    positions = layout.keep_rows(torch.tensor([row for row, _ in missing], device=device)).positions_at(indices)
    adapter.forward(embeds, positions, partial, additive_mask(allowed, embeds.dtype))
    for i, (row, have) in enumerate(missing):
        new = slice(width, width + length - have)
        rows[row] = [(torch.cat([keys, layer.keys[i : i + 1, :, new]], dim=2),
                      torch.cat([values, layer.values[i : i + 1, :, new]], dim=2))
                     for (keys, values), layer in zip(rows[row], partial.layers)]  # fmt: skip


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
    draft_numerics: str | None = None,
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
        draft_numerics (`str`, *optional*): the draft's kernels for this call (`SpeculativeConfig.draft_numerics`:
            `"auto"`, `"reference"`, `"onednn"`, `"onednn-bf16"`, `"int8"`); they change what the draft proposes and
            its speed, never the output.
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
    knobs = {"depth": depth, "tree_top_k": tree_top_k, "total_tokens": total_tokens, "profile": profile,
             "draft_numerics": draft_numerics}  # fmt: skip
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
    if all(generate_kwargs.get(name) is None for name in ("past_key_values", CACHE_KWARG)):
        draft = WithoutCache(draft)  # the output holds no cache, and the caller passed none to read
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
    if config is not None:  # only top-level flags are set below, so a shallow copy keeps the caller's config intact
        config = generate_kwargs["generation_config"] = copy.copy(config)
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
