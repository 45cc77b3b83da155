"""KV-cache compaction after verification: keep the committed prefix and the accepted tree nodes, in path order, as
if the target had decoded them one by one. Works on transformers `DynamicCache` layers (EAGLE's `KVCache.copy`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers.cache_utils import DynamicLayer


def check_cache(cache) -> None:
    """Raises a `ValueError` unless every layer of `cache` is a full-attention `DynamicLayer`."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise ValueError(f"Tree verification needs a transformers DynamicCache, got {type(cache).__name__}.")
    if getattr(cache, "offloading", False):
        raise ValueError(
            "Tree verification compacts the cache in place on the target's device; an offloaded cache is not "
            "supported (drop `cache_implementation`)."
        )
    for layer in layers:
        if type(layer) is not DynamicLayer:
            raise ValueError(
                f"Tree verification supports DynamicCache with full-attention layers only, got a "
                f"{type(layer).__name__} layer (static, sliding-window, quantized and offloaded caches are not "
                "supported: drop `cache_implementation`)."
            )


def commit_accepted(cache, prefix_len: int, path: Sequence[int]) -> None:
    """
    Compacts `cache` in place to `prefix_len + len(path)` entries along the sequence axis.

    Args:
        cache (`transformers.DynamicCache`): holds `prefix_len` committed entries followed by the tree's entries.
        prefix_len (`int`): committed entries to keep as they are.
        path (`Sequence[int]`): accepted tree nodes, root first; entry `prefix_len + path[i]` moves to
            `prefix_len + i`. Empty: truncate to the prefix.
    """
    keep = len(path)
    contiguous = list(path) == list(range(keep))
    for layer in cache.layers:
        if layer.keys is None or layer.keys.numel() == 0:
            continue
        if not contiguous:
            source = torch.as_tensor(path, device=layer.keys.device) + prefix_len
            # Advanced indexing copies the sources before the write, so overlapping ranges are safe.
            layer.keys[..., prefix_len : prefix_len + keep, :] = layer.keys[..., source, :]
            layer.values[..., prefix_len : prefix_len + keep, :] = layer.values[..., source, :]
        layer.keys = layer.keys[..., : prefix_len + keep, :]
        layer.values = layer.values[..., : prefix_len + keep, :]


def commit_rows(cache, live: torch.Tensor, paths: Sequence[Sequence[int]]) -> torch.Tensor:
    """
    `commit_accepted` for a batch whose rows accepted paths of different lengths. Row `b`'s accepted entries move to
    slots `prefix_len, ..., prefix_len + len(paths[b]) - 1` of the tree's block, which is cut to the longest path;
    the slots a shorter path leaves behind stay in the cache as holes that no row attends to.

    Args:
        cache (`transformers.DynamicCache`): `(rows, heads, prefix_len + num_nodes, head_dim)` per layer.
        live (`torch.BoolTensor` of shape `(rows, prefix_len)`): the slots holding each row's committed positions.
        paths (`Sequence[Sequence[int]]`): per row, its accepted tree nodes, root first.

    Returns:
        `torch.BoolTensor` of shape `(rows, prefix_len + max_b len(paths[b]))`: the live slots afterwards.
    """
    prefix_len, width = live.shape[1], max(len(path) for path in paths)
    device = live.device
    lengths = torch.tensor([len(path) for path in paths], device=device)
    source = torch.tensor([list(path) + [0] * (width - len(path)) for path in paths], device=device) + prefix_len
    for layer in cache.layers:
        if layer.keys is None or layer.keys.numel() == 0:
            continue
        index = source[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3])
        # gather copies the sources before the write, so overlapping ranges are safe.
        layer.keys[..., prefix_len : prefix_len + width, :] = layer.keys.gather(2, index)
        layer.values[..., prefix_len : prefix_len + width, :] = layer.values.gather(2, index)
        layer.keys = layer.keys[..., : prefix_len + width, :]
        layer.values = layer.values[..., : prefix_len + width, :]
    block = torch.arange(width, device=device) < lengths[:, None]
    return torch.cat([live, block], dim=1)


def keep_rows(cache, rows: torch.Tensor) -> None:
    """Keeps the batch rows `rows` (`(n,)` indices, in that order) of every layer of `cache`."""
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys.index_select(0, rows), layer.values.index_select(0, rows)


def row_entries(cache, row: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A copy of batch row `row`'s `(keys, values)` per layer of `cache`, each `(1, heads, length, head_dim)`."""
    return [(layer.keys[row : row + 1].clone(), layer.values[row : row + 1].clone()) for layer in cache.layers]
