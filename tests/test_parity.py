"""Logits of every family equal transformers' (the independent oracle), fp32, tight tolerance."""

import pytest
import torch
import transformers

import lucidlm
from conftest import ALL_FAMILIES
from lucidlm.cache.base import dense_cache
from lucidlm.checkpoints.hf import save_hf_dir

TOL = dict(atol=1e-4, rtol=1e-4)


def batch(vocab: int, seed: int = 1, length: int = 11) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (2, length), generator=g)


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_logits_match_transformers(family, hf_checkpoint):
    hf_model, directory = hf_checkpoint(family)
    llm = lucidlm.LLM.load(directory)
    ids = batch(llm.config.vocab_size)
    with torch.no_grad():
        expected = hf_model(ids).logits
        got = llm.model(ids)
    assert got.shape == expected.shape == (2, ids.shape[1], llm.config.vocab_size)
    torch.testing.assert_close(got, expected, **TOL)
    print(f"{family}: max |logit diff| = {max_diff(got, expected):.2e}")


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_saved_checkpoint_loads_in_transformers(family, hf_checkpoint, tmp_path):
    hf_model, directory = hf_checkpoint(family)
    llm = lucidlm.LLM.load(directory)
    save_hf_dir(llm.model, tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids = batch(llm.config.vocab_size, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, hf_model(ids).logits, atol=0, rtol=0)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_prefill_then_decode_matches_full_forward(family, hf_checkpoint):
    _, directory = hf_checkpoint(family)
    llm = lucidlm.LLM.load(directory)
    ids = batch(llm.config.vocab_size, seed=3, length=14)  # longer than every sliding window
    with torch.no_grad():
        full = llm.model(ids)
        cache = dense_cache(llm.config, batch=2, capacity=32)
        steps = [llm.model(ids[:, :6], cache=cache)]
        steps += [llm.model(ids[:, t:t + 1], cache=cache) for t in range(6, ids.shape[1])]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, **TOL)
