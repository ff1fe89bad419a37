"""Perplexity streamed through a KV cache: exact with a dense cache, bounded memory with a policy."""

import math

import pytest
import torch
from torch.nn import functional as F

import lucidlm
from lucidlm import GPT, Config
from lucidlm.errors import CacheError
from lucidlm.perplexity import PerplexityResult, perplexity


def reference(model, ids: torch.Tensor) -> float:
    """Perplexity from one full forward pass, no cache."""
    with torch.no_grad():
        logits = model(ids[None])[0]
    return math.exp(F.cross_entropy(logits[:-1], ids[1:]).item())


@pytest.mark.parametrize("family", ["llama3", "gemma2", "gpt2"])
def test_dense_equals_one_full_forward(family, hf_checkpoint):
    llm = lucidlm.LLM.load(hf_checkpoint(family)[1])
    ids = torch.randint(3, llm.config.vocab_size, (60,), generator=torch.Generator().manual_seed(0))
    expected = reference(llm.model, ids)
    for chunk in (1000, 7):
        result = perplexity(llm, ids.tolist(), chunk_size=chunk)  # an LLM or its model, a list or a tensor
        assert isinstance(result, PerplexityResult) and result.n_tokens == 59
        assert result.perplexity == pytest.approx(expected, rel=1e-5)
        assert result.nll == pytest.approx(math.log(expected), rel=1e-5)
    with_room = perplexity(llm.model, ids, kv_cache="h2o", cache_tokens=60, chunk_size=16)
    assert with_room.perplexity == pytest.approx(expected, rel=1e-5)


def test_cache_memory_follows_the_budget_not_the_text():
    model = GPT(Config.from_name("tiny-llama")).eval()
    ids = torch.randint(0, 256, (250,))
    for policy in ("window", "sink", "h2o", "h2o+int8", "window+int4"):
        short = perplexity(model, ids[:100], kv_cache=policy, cache_tokens=32, chunk_size=16)
        long = perplexity(model, ids, kv_cache=policy, cache_tokens=32, chunk_size=16)
        assert short.cache_memory_bytes == long.cache_memory_bytes > 0, policy
        assert math.isfinite(long.perplexity) and long.tokens_per_second > 0
    dense = perplexity(model, ids, chunk_size=16).cache_memory_bytes
    assert perplexity(model, ids, "window", 32, 16).cache_memory_bytes < dense / 7  # 32 of 250 slots


def test_text_longer_than_context_fails_clearly():
    model = GPT(Config.from_name("tiny-llama")).eval()  # block_size 256
    with pytest.raises(CacheError, match="beyond the context length block_size=256"):
        perplexity(model, list(range(257)), kv_cache="window", cache_tokens=32)
    perplexity(model, [t % 256 for t in range(256)], kv_cache="window", cache_tokens=32)  # exactly fits


def test_bad_requests():
    model = GPT(Config.from_name("tiny-llama")).eval()
    with pytest.raises(CacheError, match="at least 2"):
        perplexity(model, [5])
    with pytest.raises(CacheError, match="policy='lru'"):
        perplexity(model, [5, 6, 7], kv_cache="lru")
