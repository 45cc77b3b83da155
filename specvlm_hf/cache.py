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
