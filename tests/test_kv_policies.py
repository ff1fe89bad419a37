"""The KV-cache policy specs (one parser, one table) and the policies snapkv, tova, knorm,
pyramidkv, h2o-vlen and qh2o: eviction order on hand-made attention patterns, left-padded batches
equal to each prompt alone, exactness when nothing is evicted, and the parser's errors."""

import itertools
import math
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lucidlm import GPT, Config
from lucidlm.cache import (KNormLayerCache, QuantH2OLayerCache, SnapKVLayerCache, TOVALayerCache,
                           VLengthH2OLayerCache, build_cache, prefill, pyramid_budgets, stream)
from lucidlm.cache.policies import H2OLayerCache
from lucidlm.cache.quant import Int8Store
from lucidlm.cache.spec import EVICTIONS, TABLE, PolicySpec, parse_policy, split_policies
from lucidlm.errors import CacheError
from lucidlm.model.attention import CausalSelfAttention

from cache_util import feed, keys_with_norms, padded_and_alone


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return GPT(Config.from_name("tiny-llama")).eval()  # 2 layers, 4 heads in 2 KV groups, head_size 16


# ---- eviction order on hand-made inputs ---------------------------------------------------------
def test_snapkv_pools_the_window_scores_and_protects_the_window():
    # 8 tokens into 4 slots; the window (the 2 newest, 6 and 7) is protected. Avg pooling over 3
    # slots (zero padding at the ends) gives 0..5: .1, .4, .4333, .3333, .1667, .2333: 2 and its
    # neighbour 1 stay, although 5 alone scores more than 1
    s = torch.tensor([[[0.0, 0.3, 0.9, 0.1, 0.0, 0.5, 0.2, 0.2]]])
    layer = SnapKVLayerCache(batch=1, groups=1, head_size=4, capacity=4, window=2, kernel=3, pool="avg")
    feed(layer, [list(range(8))], s)
    assert layer.pos.tolist() == [[1, 2, 6, 7]]
    layer = SnapKVLayerCache(batch=1, groups=1, head_size=4, capacity=4, window=2, kernel=1, pool="max")
    feed(layer, [list(range(8))], s)  # kernel 1: the raw scores
    assert layer.pos.tolist() == [[2, 5, 6, 7]]
    # two groups are averaged: g0 = [0, .6, 0, 0, 0, .3], g1 = [0, 0, 0, 0, .9, 0]
    s = torch.zeros(1, 2, 8)
    s[0, 0, :6] = torch.tensor([0.0, 0.6, 0.0, 0.0, 0.0, 0.3])
    s[0, 1, :6] = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.9, 0.0])
    layer = SnapKVLayerCache(batch=1, groups=2, head_size=4, capacity=3, window=2, kernel=1)
    feed(layer, [list(range(8))], s)  # group means .3 (1), .45 (4), .15 (5): 4 stays
    assert layer.pos.tolist() == [[4, 6, 7]]


def _snapkv_reference(scores, pos, capacity, window, kernel, pool):
    """Kept positions, in plain Python: per group, pool the scores of the real slots along the
    slots (zero padding for avg, none for max), average the groups, protect the newest
    ``window`` positions, keep the ``capacity`` best."""
    slots = len(pos)
    pooled = [0.0] * slots
    for group in scores:
        vals = [s if p >= 0 else 0.0 for s, p in zip(group, pos)]
        for i in range(slots):
            near = [vals[j] for j in range(i - kernel // 2, i + kernel // 2 + 1) if 0 <= j < slots]
            pooled[i] += (sum(near) / kernel if pool == "avg" else max(near)) / len(scores)
    newest = sorted(p for p in pos if p >= 0)[-window:]
    rank = [math.inf if p in newest else (-math.inf if p < 0 else pooled[i]) for i, p in enumerate(pos)]
    best = sorted(range(slots), key=lambda i: rank[i], reverse=True)[:capacity]
    return sorted(pos[i] for i in best)


@pytest.mark.parametrize("pool", ["avg", "max"])
def test_snapkv_matches_a_plain_python_reference_and_does_not_accumulate(pool):
    gen = torch.Generator().manual_seed(1)
    layer = SnapKVLayerCache(batch=2, groups=2, head_size=4, capacity=6, window=2, kernel=3, pool=pool)
    first = [list(range(10)), [-1, -1, -1] + list(range(7))]  # the second row is left-padded
    s = torch.rand(2, 2, 10, generator=gen)
    feed(layer, first, s)
    for row in range(2):
        assert sorted(layer.pos[row].tolist()) == _snapkv_reference(s[row].tolist(), first[row], 6, 2, 3, pool)
    # a decode step: only its own scores count (the slots kept so far, then the new token)
    before = layer.pos.tolist()
    s = torch.rand(2, 2, 7, generator=gen)
    feed(layer, [[10], [7]], s)
    for row in range(2):
        slots = before[row] + [[10], [7]][row]
        assert sorted(layer.pos[row].tolist()) == _snapkv_reference(s[row].tolist(), slots, 6, 2, 3, pool)


def test_tova_keeps_what_the_newest_query_attends_to_and_forgets_the_past():
    layer = TOVALayerCache(batch=1, groups=2, head_size=4, capacity=3)
    # group means of the newest query's weights: 0: .45, 1: .05, 2: .2, 3: (newest, kept)
    feed(layer, [[0, 1, 2, 3]], torch.tensor([[[0.8, 0.0, 0.1, 0.1], [0.1, 0.1, 0.3, 0.5]]]))
    assert layer.pos.tolist() == [[0, 2, 3]]
    # next step: the new query ignores 0 although it was heavy before (no accumulation): 0 goes
    feed(layer, [[4]], torch.tensor([[[0.0, 0.3, 0.3, 0.4], [0.1, 0.2, 0.2, 0.5]]]))
    assert layer.pos.tolist() == [[2, 3, 4]]


def test_knorm_evicts_the_largest_key_norms_never_keeps_padding():
    layer = KNormLayerCache(batch=2, groups=2, head_size=4, capacity=2)
    # row 0 mean norms over the groups: .5, 3, 2.5, 3.5 -> keep 0 and 2. Row 1: padding (norm 0
    # once zeroed) must not win; real means 2, 1, 3 -> keep positions 0 and 1
    k = torch.stack([keys_with_norms([[1, 6, 2, 4], [0, 0, 3, 3]]), keys_with_norms([[9, 3, 1, 2], [9, 1, 1, 4]])])
    feed(layer, [[0, 1, 2, 3], [-1, 0, 1, 2]], k=k)
    assert layer.pos.tolist() == [[0, 2], [0, 1]]
    assert not layer.wants_scores


def test_h2o_vlen_weighs_attention_by_value_norm_and_accumulates():
    layer = VLengthH2OLayerCache(batch=1, groups=1, head_size=4, capacity=3, recent=1)
    v = keys_with_norms([[[4, 1, 1, 1]]])
    # step 1, 4 queries: m·|v| = .8, .5, .3, 0 (sum 1.6) -> S = 4·(.5, .3125, .1875, 0) = 2, 1.25, .75, 0
    feed(layer, [[0, 1, 2, 3]], torch.tensor([[[0.2, 0.5, 0.3, 0.0]]]), v=v)
    assert layer.pos.tolist() == [[0, 1, 3]]  # plain H2O would keep 1 and 2
    torch.testing.assert_close(layer.score, torch.tensor([[2.0, 1.25, 0.0]]))
    # step 2, one query, |v| of slots 0, 1, 3, new: 4, 1, 1, 2; m = .1, .6, .3, 0 -> m|v| = .4, .6, .3, 0
    # (sum 1.3): S = .3077, .4615, .2308, 0 -> totals 2.3077, 1.7115, .2308 (3 no longer protected)
    feed(layer, [[4]], torch.tensor([[[0.1, 0.6, 0.3, 0.0]]]), v=keys_with_norms([[[2]]]))
    assert layer.pos.tolist() == [[0, 1, 4]]
    torch.testing.assert_close(layer.score, torch.tensor([[2.0 + 0.4 / 1.3, 1.25 + 0.6 / 1.3, 0.0]]))


def test_qh2o_trades_attention_against_quantisation_error():
    # int8 with scale exactly 1 (|max| = 127 in each 4-channel group): the error of a key
    # [127, e, 0, 0] is exactly |e| (|e| < .5), values [127, 0, 0, 0] lose nothing
    errors = [0.0, 0.45, 0.0, 0.1, 0.0]
    k = torch.zeros(1, 1, 5, 4)
    k[..., 0], k[0, 0, :, 1] = 127.0, torch.tensor(errors)
    v = torch.zeros(1, 1, 5, 4)
    v[..., 0] = 127.0
    s = torch.tensor([[[0.1, 0.5, 0.4, 0.2, 0.0]]])
    # among slots 0..3 (4 is recent): mm(score) = 0, 1, .75, .25; mm(error) = 0, 1, 0, .2222;
    # weight .2: .2·mm(score) - .4·mm(error) = 0, -.2, .15, -.0389 -> keep 2 and 0
    layer = QuantH2OLayerCache(batch=1, groups=1, head_size=4, capacity=3, recent=1, weight=0.2, store=Int8Store)
    feed(layer, [[0, 1, 2, 3, 4]], s, k=k, v=v)
    assert layer.pos.tolist() == [[0, 2, 4]]
    torch.testing.assert_close(layer.q_error, torch.tensor([[0.0, 0.0, 0.0]]))
    # unquantised, every error is 0: the heavy hitters 1 and 2 stay, as with h2o
    for cls, kwargs in ((QuantH2OLayerCache, {"weight": 0.2}), (H2OLayerCache, {})):
        layer = cls(batch=1, groups=1, head_size=4, capacity=3, recent=1, **kwargs)
        feed(layer, [[0, 1, 2, 3, 4]], s, k=k, v=v)
        assert layer.pos.tolist() == [[1, 2, 4]]


def test_scores_of_the_last_queries_only():
    """``_scores(weights, q_pos, last)`` against a loop: each row's ``last`` newest real queries."""
    w = torch.rand(2, 2, 3, 5, 7)  # (batch, groups, heads per group, queries, keys)
    q_pos = torch.tensor([[3, 4, 5, 6, 7], [-1, -1, 0, 1, 2]])
    got = CausalSelfAttention._scores(w, q_pos, 2)
    for b, queries in ((0, [3, 4]), (1, [3, 4])):
        torch.testing.assert_close(got[b], w[b, :, :, queries].sum(2).mean(1))
    got = CausalSelfAttention._scores(w, q_pos, 4)
    torch.testing.assert_close(got[1], w[1, :, :, [2, 3, 4]].sum(2).mean(1))  # only 3 real queries


@pytest.mark.parametrize("policy, queries", [("snapkv(window=3)", 3), ("tova", 1), ("h2o", 8)])
def test_attention_hands_over_the_weight_of_the_asked_queries(tiny, policy, queries):
    """Each query's weights sum to 1, so the scores of a step sum to its number of scoring queries."""
    cache = build_cache(tiny.config, 1, policy, cache_tokens=16)
    seen = []
    settle = type(cache.layers[0]).settle
    cache.layers[0].settle = lambda scores, layer=cache.layers[0]: (seen.append(scores), settle(layer, scores))
    with torch.no_grad():
        tiny(torch.arange(3, 11)[None], cache=cache)
    torch.testing.assert_close(seen[0].sum(-1), torch.full((1, 2), float(queries)))


def test_parameters_reach_the_policies(tiny):
    cache = build_cache(tiny.config, 1, "sink(n_sink=2)", cache_tokens=8)
    prefill(tiny, torch.randint(3, 256, (1, 20)), cache, chunk_size=6)
    assert cache.kept_positions() == [{0, 1} | set(range(14, 20))] * tiny.config.n_layer
    layer = build_cache(tiny.config, 1, "h2o(recent=3,n_sink=2)+int4", 16).layers[0]
    assert (layer.recent, layer.n_sink, type(layer.store).__name__) == (3, 2, "Int4Store")
    layer = build_cache(tiny.config, 1, PolicySpec("qh2o", "int8", {"weight": 0.25}), 16).layers[0]
    assert (layer.weight, layer.recent) == (0.25, 8)
    layer = build_cache(tiny.config, 1, "snapkv(window=4,kernel=7,pool=max)", 16).layers[0]
    assert (layer.window, layer.kernel, layer.pool, layer.score_queries) == (4, 7, "max", 4)
    with pytest.raises(CacheError, match="cache_tokens=4 must exceed the observation window"):
        build_cache(tiny.config, 1, "snapkv(window=4)", 4)


# ---- pyramid budgets ------------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(st.integers(2, 4096), st.integers(1, 80), st.integers(1, 64), st.integers(1, 64))
def test_pyramid_budgets_sum_to_the_total_and_shrink_with_depth(cache_tokens, n_layer, window, beta):
    window = min(window, cache_tokens - 1)
    budgets = pyramid_budgets(cache_tokens, n_layer, window, beta)
    assert sum(budgets) == cache_tokens * n_layer and len(budgets) == n_layer
    assert all(a >= b for a, b in itertools.pairwise(budgets)) and budgets[-1] > window
    # kvpress / KVCache-Factory: max_num = 2(C - w) - min_num, min_num = (C - w) / beta, linear
    spare = cache_tokens - window
    low = max(1, spare / beta)
    high = 2 * spare - low
    for i, b in enumerate(budgets):
        ideal = window + high - i * (high - low) / max(1, n_layer - 1) if n_layer > 1 else cache_tokens
        assert abs(b - ideal) <= 1 + 1e-9


def test_pyramidkv_layers_get_the_pyramid(tiny):
    cache = build_cache(tiny.config, 1, "pyramidkv(window=4,beta=2)", cache_tokens=20)
    # spare 16: min 8, max 24 over 2 layers -> 28 and 12
    assert [layer.capacity for layer in cache.layers] == [28, 12] and cache.capacity == 28
    prefill(tiny, torch.randint(3, 256, (1, 60)), cache, chunk_size=16)
    assert [len(kept) for kept in cache.kept_positions()] == [28, 12]
    assert all(set(range(56, 60)) <= kept for kept in cache.kept_positions())  # each keeps its window


# ---- whole-model properties -----------------------------------------------------------------------
SPECS = [*EVICTIONS, "snapkv(window=3,pool=max)+int4", "qh2o(weight=0.3)+int8", "knorm+int8", "tova+int4"]


@pytest.mark.parametrize("policy", SPECS)
def test_left_padded_batch_equals_each_prompt_alone(tiny, policy):
    """Prompts of 20 and 13 tokens prefilled together (one chunk), then 5 decode steps, through a
    budget of 8 that forces eviction: each row's logits equal that prompt's run alone."""
    budget = None if policy.startswith("dense") else 8
    together, cache, alone_runs = padded_and_alone(tiny, policy, budget)
    for r, (alone, single) in enumerate(alone_runs):
        torch.testing.assert_close(together[r], alone[0], atol=1e-5, rtol=1e-5)
        assert cache.kept_positions(r) == single.kept_positions(0)
    if budget:
        assert all(len(kept) < 25 for kept in cache.kept_positions(0))  # something was evicted


@pytest.mark.parametrize("policy", [*EVICTIONS, "snapkv+int8", "tova+int4", "qh2o+int8", "pyramidkv+int4"])
def test_a_budget_holding_everything_equals_dense(tiny, policy):
    ids = torch.randint(3, 256, (2, 30), generator=torch.Generator().manual_seed(4))
    quant = policy.partition("+")[2]
    # 64 tokens: pyramidkv's smallest layer (window 32, pyramid 62 / 2 over 2 layers) holds 34
    cache = build_cache(tiny.config, 2, policy, 64)
    assert min(layer.capacity for layer in cache.layers) >= ids.shape[1]
    with torch.no_grad():  # chunks of 6: both take the explicit kernel on the CPU, so bits agree
        dense = torch.cat(list(stream(tiny, ids, build_cache(tiny.config, 2, "dense" + (f"+{quant}" if quant else ""),
                                                             64), 6)), 1)
        got = torch.cat(list(stream(tiny, ids, cache, 6)), 1)
    assert torch.equal(got, dense)


# ---- the parser -----------------------------------------------------------------------------------
@pytest.mark.parametrize("text, message", [
    ("lru", (r"policy='lru' is not a KV-cache policy; valid: dense, window, sink, h2o, snapkv, tova, knorm, "
             r"pyramidkv, h2o-vlen, qh2o")),
    ("SnapKV", "policy='SnapKV' is not a KV-cache policy; valid: dense"),
    ("sink(nsink=2)", "policy 'sink': unknown parameter 'nsink'; sink takes n_sink"),
    ("window(size=3)", "policy 'window': unknown parameter 'size'; window takes no parameters"),
    ("snapkv(kernel=4)", r"policy 'snapkv': kernel=4 is not an odd integer >= 1"),
    ("snapkv(window=2.5)", r"window=2.5 is not an integer >= 1"),
    ("snapkv(pool=mean)", "pool=mean is not one of: avg, max"),
    ("qh2o(weight=1.5)", r"weight=1.5 is not a number in \[0, 1\]"),
    ("qh2o(weight=nan)", r"weight=nan is not a number in \[0, 1\]"),
    ("h2o(recent=0)", "recent=0 is not an integer >= 1"),
    ("h2o(recent=2", r"policy='h2o\(recent=2' is malformed: expected NAME\[\(key=value, ...\)\]\[\+int8\|\+int4\]"),
    ("h2o+", "is malformed"), ("h2o(recent 2)", "is malformed"), ("h2o(recent=2,)", "is malformed"),
    ("int8+int4", "is malformed"), ("", "is malformed"),
    ("h2o+int3", "unknown quantisation 'int3'; valid: int8, int4"),
    ("h2o(recent=2,recent=3)", "parameter 'recent' given twice"),
])
def test_parser_errors_say_what_is_valid(text, message):
    with pytest.raises(CacheError, match=message):
        parse_policy(text)


def test_parser_accepts_the_old_names_unchanged():
    assert parse_policy("h2o+int8") == PolicySpec("h2o", "int8", {})
    assert parse_policy("int4") == PolicySpec("dense", "int4", {})
    assert parse_policy("sink(n_sink=8)+int8") == PolicySpec("sink", "int8", {"n_sink": 8})
    assert parse_policy("h2o()") == PolicySpec("h2o")
    assert parse_policy(PolicySpec("qh2o", None, {"weight": 1})) == PolicySpec("qh2o", None, {"weight": 1.0})
    with pytest.raises(CacheError, match="unknown parameter 'windw'; snapkv takes window, kernel, pool"):
        parse_policy(PolicySpec("snapkv", None, {"windw": 3}))
    assert split_policies("sink,snapkv(window=8, kernel=3)+int8") == ["sink", "snapkv(window=8, kernel=3)+int8"]


def _value(param):
    if param.choices:
        return st.sampled_from(param.choices)
    if param.kind is str:  # a free text such as duo's heads_file: a path without spaces, commas or '='
        return st.from_regex(r"[A-Za-z0-9_./-]{1,24}", fullmatch=True)
    if param.kind is float:
        return st.floats(param.low, param.high, allow_nan=False)
    values = st.integers(int(param.low), 10_000 if param.high is None else int(param.high))
    return values.map(lambda n: n | 1) if param.odd else values


@st.composite
def specs(draw):
    """A spec drawn from the table, and its text with random spacing and parameter order."""
    policy = draw(st.sampled_from(list(TABLE.values())))
    chosen = draw(st.lists(st.sampled_from(policy.params), unique=True)) if policy.params else []
    params = {p.name: draw(_value(p)) for p in chosen}
    quant = draw(st.sampled_from([None, "int8", "int4"]))
    space = st.sampled_from(["", " ", "  "])
    args = ",".join(f"{draw(space)}{k}{draw(space)}={draw(space)}{v!r}".replace("'", "") + draw(space)
                    for k, v in params.items())
    text = policy.name + (f"({args})" if params or draw(st.booleans()) else "")
    text += f"{draw(space)}+{quant}" if quant else ""
    return PolicySpec(policy.name, quant, params), text


@settings(max_examples=300, deadline=None)
@given(specs())
def test_parse_and_canonical_string_round_trip(case):
    spec, text = case
    parsed = parse_policy(text)
    assert parsed == spec
    assert parse_policy(str(parsed)) == spec and str(parse_policy(str(parsed))) == str(parsed)
    assert " " not in str(parsed)
    order = [p.name for p in TABLE[spec.eviction].params]
    assert list(parse_policy(str(parsed)).params) == [k for k in order if k in spec.params]


def test_the_parser_does_not_import_torch():
    code = ("import sys, lucidlm.cache.spec, lucidlm.cache; "
            "lucidlm.cache.spec.parse_policy('pyramidkv(beta=4)+int8'); "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)[:5]")
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
