"""Cache compaction after verification equals the cache rebuilt from scratch on the accepted tokens."""

import random

import pytest
import torch
from tiny import make_inputs
from transformers import DynamicCache

from specvlm_hf.adapters import get_adapter
from specvlm_hf.cache import check_cache, commit_accepted
from specvlm_hf.tree import build_tree, tree_attention_mask


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


@pytest.mark.parametrize("seed", range(6))
def test_commit_equals_rebuilt_cache(target, seed):
    rng = random.Random(seed)
    adapter = get_adapter(target)
    inputs = make_inputs(seed, text_len=rng.randint(1, 8), image=seed % 2 == 0)
    with torch.no_grad():
        embeds = adapter.embed(inputs["input_ids"], adapter.image_features(inputs))
        prompt_len = embeds.shape[1]
        cache = DynamicCache()
        adapter.forward(embeds, torch.arange(prompt_len)[None], cache)
        n = rng.randint(2, 12)
        parents = [-1] + [rng.randrange(i) for i in range(1, n)]
        tree = build_tree(torch.randint(3, 90, (n,)), parents)
        mask = tree_attention_mask(tree.mask, prompt_len, embeds.dtype)
        tree_features = adapter.forward(
            adapter.embed_tokens(tree.tokens)[None], (prompt_len + tree.depths)[None], cache, mask
        )
        leaf = rng.randrange(n)
        path = [p for p in tree.paths.tolist() if leaf in p][0]
        path = [p for p in path[: path.index(leaf) + 1]]
        commit_accepted(cache, prompt_len, path)

        rebuilt = DynamicCache()
        full = torch.cat([embeds, adapter.embed_tokens(tree.tokens[path])[None]], dim=1)
        reference = adapter.forward(full, torch.arange(full.shape[1])[None], rebuilt)
    assert cache.get_seq_length() == rebuilt.get_seq_length() == prompt_len + len(path)
    for ours, theirs in zip(cache.layers, rebuilt.layers):
        torch.testing.assert_close(ours.keys, theirs.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.values, theirs.values, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tree_features[0, path], reference[0, prompt_len:], atol=1e-5, rtol=1e-5)


def test_check_cache_refuses_other_layers(target):
    from transformers import StaticCache

    with pytest.raises(ValueError, match="StaticLayer"):
        check_cache(StaticCache(config=target.config, max_cache_len=16))
    with pytest.raises(ValueError, match="DynamicCache"):
        check_cache(object())
