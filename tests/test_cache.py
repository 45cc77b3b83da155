"""Cache compaction after verification: `commit_accepted` keeps the accepted entries in path order, and `check_cache`
refuses caches it cannot compact. That it equals the cache rebuilt from scratch on the accepted tokens, for every
architecture: `test_conformance.py`."""

import pytest
import torch
from transformers import DynamicCache

from specvlm_hf.cache import check_cache, commit_accepted


def filled_cache(layers: int, length: int) -> DynamicCache:
    cache = DynamicCache()
    for layer in range(layers):
        values = torch.arange(length, dtype=torch.float32).view(1, 1, length, 1).expand(1, 2, length, 3) + 100 * layer
        cache.update(values.clone(), -values.clone(), layer)
    return cache


@pytest.mark.parametrize(("prefix", "path"), [(3, [0, 2, 5]), (0, [0, 1, 2]), (4, [0]), (2, [0, 3, 1]), (5, [])])
def test_commit_accepted_gathers_in_path_order(prefix, path):
    cache = filled_cache(layers=2, length=prefix + 7)
    commit_accepted(cache, prefix, path)
    expected = list(range(prefix)) + [prefix + p for p in path]
    for layer in range(2):
        keys = cache.layers[layer].keys[0, 0, :, 0].tolist()
        assert keys == [e + 100 * layer for e in expected]
        assert torch.equal(cache.layers[layer].values, -cache.layers[layer].keys)
    assert cache.get_seq_length() == len(expected)


def test_check_cache_refuses_other_layers(target):
    from transformers import StaticCache

    with pytest.raises(ValueError, match="StaticLayer"):
        check_cache(StaticCache(config=target.config, max_cache_len=16))
    with pytest.raises(ValueError, match="DynamicCache"):
        check_cache(object())
