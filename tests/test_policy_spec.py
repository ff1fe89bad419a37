"""A KV-cache policy is parsed once, where a user's value enters, into a PolicySpec that is passed
down; decisions read the spec (never the text), and the model talks to a cache only through the
contract of lucidlm.cache.base.LayerCache."""

from __future__ import annotations

import pytest
import torch

import lucidlm.cache.spec as spec_module
import lucidlm.generate as generate_module
from lucidlm import GPT, LLM, Config
from lucidlm.cache import POLICIES, LayerCache, build_cache
from lucidlm.cache.base import KVCache, VisibleKeys
from lucidlm.cache.spec import PolicySpec, parse_policy
from lucidlm.errors import CacheError
from lucidlm.generate import generate_ids
from lucidlm.perplexity import perplexity
from lucidlm.train.chunked import ChunkedCache

PROMPTS = [[5, 17, 3, 99, 42, 8], [7, 7, 120, 4]]
#: spellings of the plain dense policy that the grammar accepts (blanks and empty parentheses)
DENSE_SPELLINGS = ["dense", "dense()", " dense ", " dense ( ) ", PolicySpec("dense")]
#: what attention may read of a layer cache (lucidlm.cache.base's contract)
CONTRACT = {"extend", "settle", "visibility", "wants_scores", "score_queries", "wants_queries", "see_queries"}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(Config.from_name("tiny-llama", logit_scale=8.0)).eval()


class Ids:
    """A tokenizer of space-separated ids (no files needed)."""

    eos_ids = ()

    def encode(self, text):
        return [int(t) for t in text.split()]

    def decode(self, ids, **_):
        return " ".join(map(str, ids))


class SpyDecoder:
    """Stands in for a CompiledDecoder: records that generation chose the compiled path, then
    declines it (``prepare`` False), so decoding runs eagerly and needs no compiler."""

    def __init__(self):
        self.prepared = 0

    def capacity(self, needed, block_size):
        return needed

    def prepare(self, cache):
        self.prepared += 1
        return False


@pytest.fixture
def packed_calls(monkeypatch):
    calls = []
    real = generate_module.prefill_packed

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(generate_module, "prefill_packed", spy)
    return calls


@pytest.fixture
def parses(monkeypatch):
    """How many texts were parsed (a spec passed down is not parsed again)."""
    calls = []
    real = spec_module._parse_args

    def spy(*args):
        calls.append(args[-1])
        return real(*args)

    monkeypatch.setattr(spec_module, "_parse_args", spy)
    return calls


@pytest.mark.parametrize("policy", DENSE_SPELLINGS, ids=repr)
def test_every_spelling_of_dense_takes_the_compiled_decoder_and_the_packed_prefill(model, packed_calls, policy):
    decoder = SpyDecoder()
    tokens = list(generate_ids(model, PROMPTS, 6, kv_cache=policy, decoder=decoder))
    assert decoder.prepared == 1 and len(packed_calls) == 1
    assert tokens == list(generate_ids(model, PROMPTS, 6))


@pytest.mark.parametrize("policy, budget", [("dense+int8", None), ("int8", None), ("window", 8), ("dense", 64)])
def test_other_policies_and_set_budgets_take_neither(model, packed_calls, policy, budget):
    decoder = SpyDecoder()
    list(generate_ids(model, PROMPTS, 6, kv_cache=policy, cache_tokens=budget, decoder=decoder))
    assert decoder.prepared == 0
    assert len(packed_calls) == (policy == "dense")  # a set dense budget still packs the prompts


def test_a_spec_is_checked_when_built_and_never_parsed_again():
    with pytest.raises(CacheError, match="policy='lru' is not a KV-cache policy"):
        PolicySpec("lru")
    with pytest.raises(CacheError, match="unknown quantisation 'int3'"):
        PolicySpec("h2o", "int3")
    with pytest.raises(CacheError, match="n_sink=0 is not an integer >= 1"):
        PolicySpec("sink", None, {"n_sink": 0})
    assert PolicySpec("qh2o", None, {"weight": 1}).params == {"weight": 1.0}  # the table's type
    spec = PolicySpec("snapkv", "int8", {"window": 8})
    assert parse_policy(spec) is spec
    assert parse_policy(" dense ( ) ") == PolicySpec("dense") and parse_policy("int4").is_dense
    assert not parse_policy("int4").is_plain_dense and not parse_policy("h2o").is_dense


def test_llm_generation_and_perplexity_parse_the_text_once(model, parses):
    llm = LLM(model, Ids())
    llm.generate("5 17 3", max_new_tokens=3, kv_cache="h2o(recent=4)", cache_tokens=8)
    assert len(parses) == 1
    llm.perplexity([5, 17, 3, 99, 42], kv_cache="dense()")
    assert len(parses) == 2
    list(generate_ids(model, PROMPTS, 3, kv_cache=parse_policy("sink(n_sink=2)"), cache_tokens=8))
    assert len(parses) == 3  # the spec, not generation, parsed it


def test_chunked_training_parses_its_policy_once(model, parses):
    plan = ChunkedCache("window()", cache_tokens=16, chunk_size=8)
    ids = torch.randint(0, 256, (1, 24))
    plan.check(model.config, 24)
    plan.loss(model, ids, ids.roll(-1, 1))
    assert len(parses) == 1 and plan.spec == PolicySpec("window")


def test_the_server_passes_its_parsed_policy_to_every_generation(model, monkeypatch, parses):
    from fastapi.testclient import TestClient

    import lucidlm.cache as cache_module
    import lucidlm.serve.app as app_module

    given = []
    real = cache_module.build_cache

    def spy(config, batch, policy, *args, **kwargs):  # each sequence's own cache, built by the engine
        given.append(policy)
        return real(config, batch, policy, *args, **kwargs)

    monkeypatch.setattr(cache_module, "build_cache", spy)
    app = app_module.create_app(LLM(model, Ids()), model_name="tiny", kv_cache=" h2o ", cache_tokens=8)
    given.clear()  # create_app's own check of the budget
    with TestClient(app) as client:
        assert client.get("/health").json()["kv_cache"] == " h2o "  # as the operator gave it
        for _ in range(2):
            reply = client.post("/v1/completions", json={"model": "tiny", "prompt": "5 17 3", "max_tokens": 2})
            assert reply.status_code == 200, reply.text
    assert given == [PolicySpec("h2o")] * 2 and all(isinstance(g, PolicySpec) for g in given)
    assert len(parses) == 1  # by create_app, not per request


def test_every_layer_cache_has_the_contract_members(model):
    for name, factory in POLICIES.items():
        for layer in factory(model.config, 1, 16).layers:
            assert isinstance(layer, LayerCache), name
            assert layer.score_queries is None or layer.score_queries >= 1, name
            assert layer.capacity is not None, name
    snapkv = build_cache(model.config, 1, "snapkv(window=4)", 16).layers[0]
    assert snapkv.score_queries == 4 and snapkv.wants_scores
    replay = VisibleKeys(torch.ones(3, 3, dtype=torch.bool))
    assert replay.score_queries is None and replay.capacity is None and KVCache([replay]).capacity is None
    assert LayerCache.score_queries is None and LayerCache.capacity is None and not LayerCache.wants_scores


class Watched:
    """A layer cache seen through a window that records every member the model reads."""

    def __init__(self, inner, read):
        self._inner, self._read = inner, read

    def __getattr__(self, name):
        self._read.add(name)
        return getattr(self._inner, name)


@pytest.mark.parametrize("policy", ["dense", "window+int8", "h2o", "snapkv(window=2)", "pyramidkv", "knorm"])
def test_the_model_reads_a_cache_only_through_the_contract(model, policy):
    read: set[str] = set()
    cache = build_cache(model.config, 1, policy, 32 if policy == "dense" else 8)  # the others evict
    watched = KVCache([Watched(layer, read) for layer in cache.layers])
    with torch.no_grad():
        model(torch.randint(0, 256, (1, 12)), cache=watched)
        model(torch.tensor([[3]]), cache=watched, last_only=True)
    assert read <= CONTRACT, read - CONTRACT
    assert {"extend", "settle"} <= read
