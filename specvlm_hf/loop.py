"""The steps of lossless tree decoding (SpecVLM §1.3), each a small function: `prefill` the prompt, `verify` a draft
tree in one target forward, `walk_tree` to emit the target's tokens along it (`Emitter`, one token at a time as plain
decoding does), commit them to the target's cache (`cache.commit_accepted`), and give the draft its view of what was
committed (`prompt_draft_state`, `step_draft_state`). `generation.tree_decoding` composes them into the loop; the
benchmark's calibration calls the same functions.

Draft position t pairs the target's input embedding at t+1 with its feature at t (see `modeling_draft.py`)."""

from __future__ import annotations

import functools
import inspect

import torch
from transformers.generation.logits_process import LogitsProcessorList
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria, StoppingCriteriaList

from .adapters import PromptLayout
from .drafter import DraftState
from .tree import DraftTree, additive_mask, tree_attention_mask
from .verify import accept_greedy, accept_node, accept_sampling


def target_forward(adapter, embeds, positions, cache, mask=None, layers: tuple[int, ...] | None = None):
    """
    The target's text model over `embeds` (`(rows, q_len, hidden_size)`), extending `cache`.

    Returns:
        `(features, draft_features)`: the target's features (`(rows, q_len, hidden_size)`, the `lm_head` input), and
        what the draft reads of the target there: the same features when `layers` is `None`, else the hidden states
        entering those layers, concatenated (`(rows, q_len, len(layers) * hidden_size)`, EAGLE-3).
    """
    if layers is None:
        features = adapter.forward(embeds, positions, cache, mask)
        return features, features
    return adapter.forward_with_layers(embeds, positions, layers, cache, mask)


def prefill(
    adapter, input_ids: torch.Tensor, layout: PromptLayout, cache, layers: tuple[int, ...] | None = None, padding=None
):
    """
    The target's forward over the prompts, their visual tokens scattered into their slots, at the layout's positions.

    Args:
        input_ids (`torch.LongTensor` of shape `(rows, prompt_len)`)
        layout (`PromptLayout`): `adapter.layout(input_ids, ...)`.
        cache (`transformers.DynamicCache`): empty; holds the prompts afterwards.
        layers (`tuple[int, ...]`, *optional*): the draft's `feature_layers` (`target_forward`).
        padding (`torch.LongTensor` of shape `(rows, prompt_len)`, *optional*): the `attention_mask` of left-padded
            prompts (0 at padding), applied as `generate()` applies it.

    Returns:
        `(embeds, features, draft_features)`: the text model's input embeddings and features, `(rows, prompt_len,
        hidden_size)` each, and the draft's view of the target (`target_forward`).
    """
    embeds = adapter.embed(input_ids, layout.visual_features)
    return embeds, *target_forward(adapter, embeds, layout.positions, cache, padding, layers)


def verify(
    adapter,
    trees: list[DraftTree],
    cache,
    roots: torch.Tensor,
    layout: PromptLayout,
    layers: tuple[int, ...] | None = None,
    live: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    The target's forward over one tree per row, each node at the position plain decoding gives its row's sequence
    index `roots[row] + depth` (`layout.positions_at`), seeing its row's committed entries and its own ancestors.
    Trees are padded to the largest with nodes that see only themselves. The cache is extended by every node;
    `commit_accepted` / `commit_rows` cut it back to the emitted ones.

    Args:
        trees (`list[DraftTree]`): one per row; node 0 is the row's root (its last emitted token, not yet cached).
        roots (`torch.LongTensor` of shape `(rows,)`): each root's sequence index (prompt padding included).
        live (`torch.BoolTensor` of shape `(rows, cache_len)`, *optional*): the cache slots holding each row's
            committed positions; `None`: every slot, and the cache's length is `roots[0]` (one unpadded row).

    Returns:
        `(draft_features, logits)`: the draft's view of the target at each node (`target_forward`; `(rows,
        num_nodes, hidden_size)` without `layers`) and the target's logits, `(rows, num_nodes, vocab_size)` in
        float32, `num_nodes` the largest tree's.
    """
    if live is None:
        (tree,) = trees
        embeds = adapter.embed_tokens(tree.tokens)[None]
        mask = tree_attention_mask(tree.mask, int(roots[0]), embeds.dtype)
        positions = layout.positions_at(roots[0] + tree.depths)
    else:
        width = max(tree.num_nodes for tree in trees)
        tokens = torch.stack([pad_to(tree.tokens, width, tree.token_list[0]) for tree in trees])
        depths = torch.stack([pad_to(tree.depths, width, 0) for tree in trees])
        own = torch.eye(width, dtype=torch.bool, device=tokens.device)
        allowed = [torch.cat([live[row, None].expand(width, -1), pad_mask(tree.mask, own)], dim=1)
                   for row, tree in enumerate(trees)]  # fmt: skip
        embeds = adapter.embed_tokens(tokens)
        mask = additive_mask(torch.stack(allowed), embeds.dtype)
        positions = layout.positions_at(roots[:, None] + depths)
    features, draft_features = target_forward(adapter, embeds, positions, cache, mask, layers)
    return draft_features, adapter.logits(features)


def pad_to(values: torch.Tensor, width: int, fill) -> torch.Tensor:
    """`values` (`(n,)`) padded with `fill` to `(width,)`."""
    return torch.cat([values, values.new_full((width - values.shape[0],), fill)])


def pad_mask(tree_mask: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """A tree's ancestor mask (`(n, n)`) in the top-left corner of `own` (`(width, width)`, the identity): padding
    nodes see only themselves."""
    n = tree_mask.shape[0]
    out = own.clone()
    out[:n, :n] = tree_mask
    return out


def prompt_draft_state(
    adapter, input_ids: torch.Tensor, embeds: torch.Tensor, features: torch.Tensor, visual_mask: torch.Tensor
) -> DraftState:
    """
    The draft's view after prefill. The draft numbers its own positions 0, 1, 2, ... whatever the target's scheme.

    Args:
        input_ids (`torch.LongTensor` of shape `(1, prompt_len + 1)`): the prompt and the first emitted token.
        embeds (`torch.FloatTensor` of shape `(1, prompt_len, hidden_size)`): from `prefill`.
        features (`torch.FloatTensor` of shape `(1, prompt_len, feature_size)`): the draft's view of the target,
            from `prefill`.
        visual_mask (`torch.BoolTensor` of shape `(prompt_len,)`): the prompt's visual slots (`PromptLayout`).
    """
    return DraftState(
        input_ids=input_ids,
        inputs_embeds=torch.cat([embeds[:, 1:], adapter.embed_tokens(input_ids[:, -1:])], dim=1),
        features=features,
        position_ids=torch.arange(features.shape[1], device=features.device)[None],
        image_mask=torch.cat([visual_mask[1:], visual_mask.new_zeros(1)]),
    )


def step_draft_state(adapter, input_ids: torch.Tensor, features: torch.Tensor, root_position: int) -> DraftState:
    """
    The draft's view after a verification step committed `n` positions from the old root on.

    Args:
        input_ids (`torch.LongTensor` of shape `(1, root_position + n + 1)`): every token so far.
        features (`torch.FloatTensor` of shape `(1, n, feature_size)`): the draft's view of the target at the
            committed positions `root_position, ..., root_position + n - 1` (`verify`).
    """
    n = features.shape[1]
    return DraftState(
        input_ids=input_ids,
        inputs_embeds=adapter.embed_tokens(input_ids[:, -n:]),
        features=features,
        position_ids=(root_position + torch.arange(n, device=features.device))[None],
    )


class Processors(LogitsProcessorList):
    """`generate()`'s logits processors applied as `LogitsProcessorList` applies them without keyword arguments, less
    its signature inspection on every call (the loop calls them per row, and per token where history matters)."""

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for processor in self:
            scores = processor(input_ids, scores)
        return scores


def without_inspection(logits_processor: LogitsProcessorList) -> LogitsProcessorList:
    """`logits_processor` as `Processors`, unless one of them takes more than `(input_ids, scores)`: the list then
    stays as it is, and raises as it does."""
    if any(_takes_more(processor) for processor in logits_processor):
        return logits_processor
    return Processors(logits_processor)


def _takes_more(processor) -> bool:
    """Whether `processor.__call__` takes more than `(input_ids, scores)`, as `LogitsProcessorList` inspects it. A
    class's own `__call__` is inspected once per class (`generate()` makes new processor instances every call)."""
    call = inspect.getattr_static(type(processor), "__call__", None)
    if inspect.isfunction(call) and "__call__" not in getattr(processor, "__dict__", {}):
        return _class_takes_more(type(processor))
    return len(inspect.signature(processor.__call__).parameters) > 2


@functools.lru_cache(maxsize=256)
def _class_takes_more(cls: type) -> bool:
    return len(inspect.signature(cls.__call__).parameters) > 3  # `self` is the first


class Emitter:
    """
    Appends the target's tokens to one sequence (a row of the batch) one at a time, exactly as plain decoding
    (`GenerationMixin._sample`) does per token: record scores and logits, append the token, call every stopping
    criterion with `(input_ids, scores)`, stream it.

    The row is `done` once a stopping criterion fires, unless `stop_on_finish` is False: plain batched decoding goes on
    decoding a finished row as long as another row runs, when no criterion is an end-token criterion (otherwise it
    pads it). Such a row is done when it reaches `limit` tokens, set once every row has finished, or the criteria's
    `max_length`, which no row outgrows.
    """

    def __init__(
        self, input_ids, stopping_criteria: StoppingCriteriaList, generation_config, streamer=None, stop_on_finish=True
    ):
        self.input_ids = input_ids  # [1, seq_len], a new tensor per token as in plain decoding
        self.criteria = stopping_criteria
        keep = generation_config.return_dict_in_generate
        self.scores = () if keep and generation_config.output_scores else None
        self.logits = () if keep and generation_config.output_logits else None
        self.streamer = streamer
        self.stop_on_finish = stop_on_finish
        self.finished = False
        self.finished_length: int | None = None  # the sequence's length when a criterion first fired
        self.limit: int | None = None
        self.max_length = stopping_criteria.max_length  # no row of plain decoding grows past it
        # With only transformers' length and end-token criteria, and nothing kept or streamed per token, which token
        # stops the row is known from the tokens alone: `emit_path` appends a step's tokens at once.
        self._stops = _known_stops(stopping_criteria)
        kept = self.scores is not None or self.logits is not None or streamer is not None
        self._per_token = self._stops is None or kept

    @property
    def done(self) -> bool:
        """No token is to be appended any more."""
        if self.max_length is not None and self.input_ids.shape[1] >= self.max_length:
            return True
        if self.limit is not None:
            return self.input_ids.shape[1] >= self.limit
        return self.finished and self.stop_on_finish

    def emit(self, token: int, scores: torch.Tensor, logits: torch.Tensor) -> bool:
        """Appends `token` (chosen from `scores`, both `[1, V]`); returns `done`."""
        if self.scores is not None:
            self.scores += (scores.clone(),)
        if self.logits is not None:
            self.logits += (logits.clone(),)
        new = self.input_ids.new_full((1, 1), token)
        self.input_ids = torch.cat([self.input_ids, new], dim=-1)
        if not self.finished and bool(self.criteria(self.input_ids, self.scores).all()):
            self.finished, self.finished_length = True, self.input_ids.shape[1]
        if self.streamer is not None:
            self.streamer.put(new[0].cpu())
        return self.done

    def emit_path(self, tokens: list[int], nodes: list[int], scores: torch.Tensor, logits: torch.Tensor) -> int:
        """
        `emit` for each of `tokens` in turn until the emitter is done; returns how many were appended.

        Args:
            tokens (`list[int]`): the tokens to append, in order.
            nodes (`list[int]`): the tree node whose scores chose each token.
            scores, logits (`torch.FloatTensor` of shape `(num_nodes, vocab_size)`): per tree node.
        """
        if self._per_token:
            for n, (token, node) in enumerate(zip(tokens, nodes), start=1):
                if self.emit(token, scores[node : node + 1], logits[node : node + 1]):
                    return n
            return len(tokens)
        # Invariant: the same tokens, `finished` and `finished_length` as `emit` one token at a time, since an
        # end-token criterion fires on the token itself and a length criterion on the length.
        length = self.input_ids.shape[1]
        end_tokens, max_length = self._stops
        stop = next((i + 1 for i, token in enumerate(tokens) if token in end_tokens), None)
        for cap in (max_length, self.limit):
            if cap is not None:
                stop = min(stop, cap - length) if stop is not None else cap - length
        n = len(tokens) if stop is None else max(1, min(stop, len(tokens)))  # `emit` appends before it checks
        self.input_ids = torch.cat([self.input_ids, self.input_ids.new_tensor([tokens[:n]])], dim=-1)
        if not self.finished and stop is not None and n >= stop:
            # The criteria themselves on the last token (they fire unless `limit` cut; their warnings included).
            self.finished = bool(self.criteria(self.input_ids, None).all())
            self.finished_length = self.input_ids.shape[1] if self.finished else None
        return n


def _known_stops(criteria: StoppingCriteriaList) -> tuple[frozenset[int], int | None] | None:
    """`(end-token ids, the smallest max_length)` if `criteria` holds only transformers' `EosTokenCriteria` and
    `MaxLengthCriteria` (exact types: a subclass may decide otherwise), else `None`."""
    end_tokens: set[int] = set()
    lengths = []
    for criterion in criteria:
        if type(criterion) is EosTokenCriteria:
            end_tokens.update(criterion.eos_token_id.flatten().tolist())
        elif type(criterion) is MaxLengthCriteria:
            lengths.append(criterion.max_length)
        else:
            return None
    return frozenset(end_tokens), min(lengths, default=None)


def walk_tree(
    tree: DraftTree, logits: torch.Tensor, emitter: Emitter, logits_processor, do_sample: bool, batched: bool
) -> list[int]:
    """
    Emits the target's tokens along the tree: the accepted drafts, then the bonus token, until the emitter is done.
    Returns the nodes whose processed scores chose the emitted tokens (root first): the accepted path, cut where
    generation stopped.

    Args:
        logits (`torch.FloatTensor` of shape `(num_nodes, vocab_size)`): the target's logits at each node.
        batched (`bool`): `is_history_free(logits_processor)`. Then all nodes are processed at once and accepted by
            `accept_greedy` / `accept_sampling`. Otherwise the processors are called once per emitted token on that
            token's history, as plain decoding calls them, and `accept_node` takes one node at a time.
    """
    if batched:
        scores = logits_processor(emitter.input_ids, logits)  # [N, V]
        if do_sample:
            acceptance = accept_sampling(tree, torch.softmax(scores, dim=-1))
        else:
            acceptance = accept_greedy(tree, scores.argmax(dim=-1))
        tokens = [tree.token_list[node] for node in acceptance.path[1:]] + [acceptance.next_token]
        return acceptance.path[: emitter.emit_path(tokens, acceptance.path, scores, logits)]
    nodes, node = [], 0
    while node is not None:
        scores = logits_processor(emitter.input_ids, logits[node : node + 1])  # [1, V]
        child, token = accept_node(tree, node, scores[0], do_sample)
        nodes.append(node)
        if emitter.emit(token, scores, logits[node : node + 1]):
            break
        node = child
    return nodes
