"""Bad arguments to the LLM API raise clear, typed errors."""

import pytest
import torch

import lucidlm
from lucidlm.errors import CacheError, ExplainError, TokenizerError
from lucidlm.generate import generate_ids, left_pad


@pytest.fixture(scope="module")
def tiny(hf_checkpoint):
    _, directory = hf_checkpoint("llama3")
    return lucidlm.LLM.load(directory)  # a directory without tokenizer files


def test_text_api_without_tokenizer_names_the_checkpoint(tiny):
    assert tiny.tokenizer is None
    for call in (lambda: tiny.generate("hi"), lambda: tiny.chat("hi"), lambda: tiny.perplexity("hi")):
        with pytest.raises(TokenizerError, match="no tokenizer.json"):
            call()


def test_bad_dtype_names_the_argument(hf_checkpoint):
    _, directory = hf_checkpoint("llama3")
    with pytest.raises(ValueError, match="dtype='float8'"):
        lucidlm.LLM.load(directory, dtype="float8")


def test_negative_max_new_tokens(tiny):
    with pytest.raises(ValueError, match="max_new_tokens=-1"):
        next(generate_ids(tiny.model, [[1, 2]], max_new_tokens=-1))


def test_prompt_longer_than_context(tiny):
    with pytest.raises(CacheError, match="context length"):
        next(generate_ids(tiny.model, [list(range(3, 3 + tiny.config.block_size))], max_new_tokens=1))


def test_empty_prompt_is_rejected(tiny):
    with pytest.raises(ValueError, match="at least one token"):
        left_pad([[1, 2], []])
    with pytest.raises(ExplainError, match="no tokens"):
        tiny.explain([])


def test_unknown_cache_policy(tiny):
    with pytest.raises(CacheError, match="policy='lru'"):
        next(generate_ids(tiny.model, [[1, 2]], max_new_tokens=1, kv_cache="lru"))


def test_explain_method_and_target_errors(tiny):
    with pytest.raises(ExplainError, match="method='shap'"):
        tiny.explain([1, 2, 3], method="shap")
    with pytest.raises(ExplainError, match="out of range"):
        tiny.explain([1, 2, 3], target=10_000)


def test_forward_without_tokens(tiny):
    with pytest.raises(ValueError, match="no tokens"):
        tiny.model(torch.zeros(1, 0, dtype=torch.long))
