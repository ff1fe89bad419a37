"""Compiled decoding (lucidlm.compiled) against the eager path: same tokens, fallbacks that warn."""

from __future__ import annotations

import warnings

import pytest
import torch

from lucidlm import GPT, LLM, Config
from lucidlm.compiled import CompileFallback, CompiledDecoder, missing_compiler
from lucidlm.generate import generate_ids

pytestmark = pytest.mark.skipif(missing_compiler(torch.device("cpu")) is not None,
                                reason="TorchInductor needs a C++ compiler (g++/clang++), none installed")

PROMPTS = [[5, 17, 3, 99, 42, 8], [7, 7, 120, 4]]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    # a random model would repeat one token; scaled-up logits make greedy decoding vary
    config = Config.from_name("tiny-llama", logit_scale=8.0)
    return GPT(config).eval()


def _tokens(model, prompts, decoder=None, **kw):
    return list(generate_ids(model, prompts, 24, decoder=decoder, **kw))


def test_compiled_greedy_equals_eager_single_and_left_padded_batch(model):
    decoder = CompiledDecoder(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileFallback)  # it really compiled
        assert _tokens(model, PROMPTS[:1], decoder) == _tokens(model, PROMPTS[:1])
        assert _tokens(model, PROMPTS, decoder) == _tokens(model, PROMPTS)
    assert len(set(t[0] for t in _tokens(model, PROMPTS[:1]))) > 3  # the check compares varied text


def test_compiled_logits_match_eager(model):
    from lucidlm.cache import dense_cache

    decoder = CompiledDecoder(model)
    ids = torch.tensor([PROMPTS[0]])
    caches = [dense_cache(model.config, 1, 256) for _ in range(2)]
    with torch.inference_mode():
        for cache in caches:
            model(ids, cache=cache)
        assert decoder.prepare(caches[1])
        token, pos = torch.tensor([[11]]), torch.tensor([[ids.shape[1]]])
        eager = model(token, positions=pos, cache=caches[0], last_only=True)[:, -1]
        compiled = decoder(token, pos, caches[1])
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    assert caches[1].kept_positions()[0] == set(range(ids.shape[1] + 1))


def test_weights_changed_after_compiling_are_used(model):
    import copy

    changed = copy.deepcopy(model)
    decoder = CompiledDecoder(changed)
    before = _tokens(changed, PROMPTS[:1], decoder)
    with torch.no_grad():
        for p in changed.parameters():
            p.mul_(-1.5)  # in place: the compiled graphs froze copies of the old values
    after_eager = _tokens(changed, PROMPTS[:1])
    assert after_eager != before
    assert _tokens(changed, PROMPTS[:1], decoder) == after_eager


def test_no_compiler_warns_and_decodes_eagerly(model, monkeypatch):
    monkeypatch.setattr("lucidlm.compiled.missing_compiler", lambda device: "no C++ compiler found")
    with pytest.warns(CompileFallback, match="no C\\+\\+ compiler"):
        tokens = _tokens(model, PROMPTS, CompiledDecoder(model))
    assert tokens == _tokens(model, PROMPTS)


def test_compiler_error_warns_and_decodes_eagerly(model, monkeypatch):
    def broken(*args, **kwargs):
        def fail(*a, **k):
            raise RuntimeError("InductorError: CppCompileError: simulated")
        return fail

    monkeypatch.setattr(torch, "compile", broken)
    decoder = CompiledDecoder(model)
    with pytest.warns(CompileFallback, match="simulated"):
        tokens = _tokens(model, PROMPTS[:1], decoder)
    assert tokens == _tokens(model, PROMPTS[:1])
    assert "RuntimeError" in decoder.fallback_reason


@pytest.mark.parametrize("policy, budget", [("window", 8), ("h2o", 8), ("dense+int8", 64), ("dense", 64)])
def test_other_policies_and_set_budgets_decode_eagerly_with_a_decoder(model, policy, budget):
    decoder = CompiledDecoder(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileFallback)
        tokens = _tokens(model, PROMPTS, decoder, kv_cache=policy, cache_tokens=budget)
    assert tokens == _tokens(model, PROMPTS, kv_cache=policy, cache_tokens=budget)
    assert decoder._compiled is None  # never compiled: a budget the caller set is not rounded up


def test_llm_compile_generates_the_eager_text(model):
    class Ids:  # a tokenizer of space-separated ids (no files needed)
        eos_ids = ()

        def encode(self, text):
            return [int(t) for t in text.split()]

        def decode(self, ids):
            return " ".join(map(str, ids))

    eager = LLM(model, Ids())
    compiled = LLM(model, Ids()).compile()
    prompt = " ".join(map(str, PROMPTS[0]))
    assert compiled.generate(prompt, max_new_tokens=12) == eager.generate(prompt, max_new_tokens=12)


def test_capacity_rounds_up_within_the_context():
    decoder = CompiledDecoder(GPT(Config.from_name("tiny-llama")))
    assert decoder.capacity(1, 2048) == 256
    assert decoder.capacity(257, 2048) == 512
    assert decoder.capacity(2000, 2048) == 2048
    assert decoder.capacity(300, 300) == 300
