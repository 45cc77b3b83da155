"""The steps of lossless tree decoding (SpecVLM §1.3), each a small function: `prefill` the prompt, `verify` a draft
tree in one target forward, `walk_tree` to emit the target's tokens along it (`Emitter`, one token at a time as plain
decoding does), commit them to the target's cache (`cache.commit_accepted`), and give the draft its view of what was
committed (`prompt_draft_state`, `step_draft_state`). `generation.tree_decoding` composes them into the loop; the
benchmark's calibration calls the same functions.

Draft position t pairs the target's input embedding at t+1 with its feature at t (see `modeling_draft.py`)."""

from __future__ import annotations

import torch
from transformers.generation.stopping_criteria import StoppingCriteriaList

from .adapters import PromptLayout
from .drafter import DraftState
from .tree import DraftTree, tree_attention_mask
from .verify import accept_greedy, accept_node, accept_sampling


def target_forward(adapter, embeds, positions, cache, mask=None, layers: tuple[int, ...] | None = None):
    """
    The target's text model over `embeds` (`(1, q_len, hidden_size)`), extending `cache`.

    Returns:
        `(features, draft_features)`: the target's features (`(1, q_len, hidden_size)`, the `lm_head` input), and
        what the draft reads of the target there: the same features when `layers` is `None`, else the hidden states
        entering those layers, concatenated (`(1, q_len, len(layers) * hidden_size)`, EAGLE-3).
    """
    if layers is None:
        features = adapter.forward(embeds, positions, cache, mask)
        return features, features
    return adapter.forward_with_layers(embeds, positions, layers, cache, mask)


def prefill(adapter, input_ids: torch.Tensor, layout: PromptLayout, cache, layers: tuple[int, ...] | None = None):
    """
    The target's forward over the prompt, its visual tokens scattered into their slots, at the layout's positions.

    Args:
        input_ids (`torch.LongTensor` of shape `(1, prompt_len)`)
        layout (`PromptLayout`): `adapter.layout(input_ids, ...)`.
        cache (`transformers.DynamicCache`): empty; holds the prompt afterwards.
        layers (`tuple[int, ...]`, *optional*): the draft's `feature_layers` (`target_forward`).

    Returns:
        `(embeds, features, draft_features)`: the text model's input embeddings and features, `(1, prompt_len,
        hidden_size)` each, and the draft's view of the target (`target_forward`).
    """
    embeds = adapter.embed(input_ids, layout.visual_features)
    return embeds, *target_forward(adapter, embeds, layout.positions, cache, layers=layers)


def verify(
    adapter, tree: DraftTree, cache, root_position: int, layout: PromptLayout, layers: tuple[int, ...] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    The target's forward over a tree whose root sits at sequence index `root_position` (= the cache's length): each
    node sees the cached prefix and its own ancestors, at the position plain decoding gives index
    `root_position + depth` (`layout.positions_at`). The cache is extended by every node; `commit_accepted` cuts it
    back to the emitted ones.

    Returns:
        `(draft_features, logits)`: the draft's view of the target at each node (`target_forward`; `(1, num_nodes,
        hidden_size)` without `layers`) and the target's logits, `(num_nodes, vocab_size)` in float32.
    """
    embeds = adapter.embed_tokens(tree.tokens)[None]
    mask = tree_attention_mask(tree.mask, root_position, embeds.dtype)
    positions = layout.positions_at(root_position + tree.depths)
    features, draft_features = target_forward(adapter, embeds, positions, cache, mask, layers)
    return draft_features, adapter.logits(features[0])


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


class Emitter:
    """
    Appends the target's tokens one at a time, exactly as plain decoding (`GenerationMixin._sample`) does per token:
    record scores and logits, append the token, call every stopping criterion with `(input_ids, scores)`, stream it.
    """

    def __init__(self, input_ids, stopping_criteria: StoppingCriteriaList, generation_config, streamer=None):
        self.input_ids = input_ids  # [1, seq_len], a new tensor per token as in plain decoding
        self.criteria = stopping_criteria
        keep = generation_config.return_dict_in_generate
        self.scores = () if keep and generation_config.output_scores else None
        self.logits = () if keep and generation_config.output_logits else None
        self.streamer = streamer
        self.finished = False

    def emit(self, token: int, scores: torch.Tensor, logits: torch.Tensor) -> bool:
        """Appends `token` (chosen from `scores`, both `[1, V]`); returns True once a stopping criterion fires."""
        if self.scores is not None:
            self.scores += (scores.clone(),)
        if self.logits is not None:
            self.logits += (logits.clone(),)
        new = self.input_ids.new_full((1, 1), token)
        self.input_ids = torch.cat([self.input_ids, new], dim=-1)
        self.finished = bool(self.criteria(self.input_ids, self.scores).all())
        if self.streamer is not None:
            self.streamer.put(new[0].cpu())
        return self.finished


def walk_tree(
    tree: DraftTree, logits: torch.Tensor, emitter: Emitter, logits_processor, do_sample: bool, batched: bool
) -> list[int]:
    """
    Emits the target's tokens along the tree: the accepted drafts, then the bonus token, until a stopping criterion
    fires. Returns the nodes whose processed scores chose the emitted tokens (root first): the accepted path, cut
    where generation stopped.

    Args:
        logits (`torch.FloatTensor` of shape `(num_nodes, vocab_size)`): the target's logits at each node.
        batched (`bool`): `is_history_free(logits_processor)`. Then all nodes are processed at once and accepted by
            `accept_greedy` / `accept_sampling`. Otherwise the processors are called once per emitted token on that
            token's history, as plain decoding calls them, and `accept_node` takes one node at a time.
    """
    nodes = []
    if batched:
        scores = logits_processor(emitter.input_ids, logits)  # [N, V]
        if do_sample:
            acceptance = accept_sampling(tree, torch.softmax(scores, dim=-1))
        else:
            acceptance = accept_greedy(tree, scores.argmax(dim=-1))
        tokens = [tree.token_list[node] for node in acceptance.path[1:]] + [acceptance.next_token]
        for node, token in zip(acceptance.path, tokens):
            nodes.append(node)
            if emitter.emit(token, scores[node : node + 1], logits[node : node + 1]):
                break
        return nodes
    node = 0
    while node is not None:
        scores = logits_processor(emitter.input_ids, logits[node : node + 1])  # [1, V]
        child, token = accept_node(tree, node, scores[0], do_sample)
        nodes.append(node)
        if emitter.emit(token, scores, logits[node : node + 1]):
            break
        node = child
    return nodes
