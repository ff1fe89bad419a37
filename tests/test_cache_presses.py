"""Presses that compress once at the prompt's end (expected-attention, kvzip, snapkv-q): exactly
dense when nothing is evicted, batches equal prompts alone, the scores against independent
float64 / recorded-attention references, the prompt-end hooks and the question's path."""

import math

import pytest
import torch

from lucidlm import GPT, LLM, Config
from lucidlm.cache import KVCache, build_cache, parse_policy, prefill, stream
from lucidlm.cache.base import PromptEnd
from lucidlm.cache.kvzip import KVzipLayerCache
from lucidlm.cache.presses import ExpectedAttentionLayerCache, QuestionSnapKVLayerCache
from lucidlm.errors import CacheError
from lucidlm.generate import decode_step, generate_ids
from lucidlm.model.attention import recording_weights

PRESSES = ["expected-attention", "kvzip", "snapkv-q"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(Config.from_name("tiny-llama")).eval()


def ids_for(length: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("policy", PRESSES)
def test_room_for_everything_equals_dense_logits_and_tokens(model, policy):
    ids = ids_for(30, batch=2)
    dense, press = build_cache(model.config, 2, "dense", 40), build_cache(model.config, 2, policy, 40)
    assert press.holds_prompt and not dense.holds_prompt
    with torch.no_grad():
        a, b = prefill(model, ids, dense, chunk_size=64), prefill(model, ids, press, chunk_size=8)
        assert torch.equal(a, b)
        for step in range(6):
            token = a.argmax(-1, keepdim=True)
            assert torch.equal(token, b.argmax(-1, keepdim=True))
            pos = torch.full((2, 1), 30 + step)
            a, b = decode_step(token, pos, dense, model), decode_step(token, pos, press, model)
            assert torch.equal(a, b), step
    greedy = [list(generate_ids(model, ids.tolist(), 8, kv_cache=p, cache_tokens=40)) for p in ("dense", policy)]
    assert greedy[0] == greedy[1]


@pytest.mark.parametrize("policy", PRESSES)
def test_left_padded_batch_equals_each_prompt_alone(model, policy):
    long, short = ids_for(36, seed=1)[0].tolist(), ids_for(22, seed=2)[0].tolist()
    spec = parse_policy(policy if policy != "kvzip" else "kvzip(chunk=8)")  # chunked: per row, not per column
    batch = list(generate_ids(model, [long, short], 6, kv_cache=spec, cache_tokens=12, question_tokens=[4, 5]))
    alone = [list(generate_ids(model, [p], 6, kv_cache=spec, cache_tokens=12, question_tokens=q))
             for p, q in ((long, 4), (short, 5))]
    assert [[step[row] for step in batch] for row in range(2)] == [[s[0] for s in a] for a in alone]
    ids = torch.zeros(2, 36, dtype=torch.long)
    ids[0], ids[1, 14:] = torch.tensor(long), torch.tensor(short)
    pos = torch.cat([torch.arange(36)[None], torch.cat([torch.full((14,), -1), torch.arange(22)])[None]])
    both = build_cache(model.config, 2, spec, 12)
    with torch.no_grad():
        last = prefill(model, ids, both, positions=pos, question=[4, 5])
        one = build_cache(model.config, 1, spec, 12)
        solo = prefill(model, torch.tensor([short]), one, question=5)
    torch.testing.assert_close(last[1:], solo, atol=1e-5, rtol=1e-5)
    assert both.kept_positions(1) == one.kept_positions(0)


@pytest.mark.parametrize("policy", [f"{p}+{q}" for p in PRESSES for q in ("int8", "int4")])
def test_quantised_presses_compress_to_the_budget(model, policy):
    cache = build_cache(model.config, 1, policy, 10)
    with torch.no_grad():
        logits = prefill(model, ids_for(40), cache, chunk_size=16)
        assert all(layer.positions().shape[-1] == 10 for layer in cache.layers)
        decode_step(logits.argmax(-1, keepdim=True), torch.tensor([[40]]), cache, model)
    assert all(layer.positions().shape[-1] == 10 for layer in cache.layers)  # budget + 1, then evicted
    assert all(40 in kept for kept in cache.kept_positions())  # the generated token stays


def test_streaming_compresses_at_each_chunk_end(model):
    cache = build_cache(model.config, 1, "expected-attention", 8)
    sizes = []
    with torch.no_grad():
        for _ in stream(model, ids_for(40), cache, chunk_size=16):
            sizes.append(cache.layers[0].positions().shape[-1])
    assert sizes == [8, 8, 8]


# ---- the scores against independent references ------------------------------------------------
def _rotation_matrix(inv_freq: torch.Tensor, position: float, d: int) -> torch.Tensor:
    """RoPE (half-split layout) as a d x d float64 matrix: x at ``position`` is R @ x."""
    r = torch.eye(d, dtype=torch.float64)
    half = len(inv_freq)
    for i, f in enumerate(inv_freq.double().tolist()):
        c, s = math.cos(position * f), math.sin(position * f)
        r[i, i], r[i, i + half], r[i + half, i], r[i + half, i + half] = c, -s, s, c
    return r


def test_expected_attention_scores_equal_the_formula_in_float64(model):
    attn = model.layers[0].attn
    d, heads, groups, n_future = attn.head_size, attn.n_head, attn.n_groups, 8
    layer = ExpectedAttentionLayerCache(batch=1, groups=groups, head_size=d, capacity=100, n_sink=2,
                                        n_future_positions=n_future)
    gen = torch.Generator().manual_seed(3)
    keys, values = torch.randn(1, groups, 12, d, generator=gen), torch.randn(1, groups, 12, d, generator=gen)
    pos = torch.arange(12)[None]
    layer.extend(keys, values, pos)
    q = torch.randn(1, heads, 12, d, generator=gen)
    layer.see_queries(q, pos)
    layer.settle(None)
    got = layer.prompt_scores(PromptEnd(model, ids_for(12), pos, None, 0))
    inv_freq = attn.rotary.initial
    pre = [torch.stack([_rotation_matrix(inv_freq, p, d).T @ q[0, h, p].double() for p in range(2, 12)])
           for h in range(heads)]  # queries back at position 0 (sinks 0, 1 left out)
    mean_r = sum(_rotation_matrix(inv_freq, 12 + t, d) for t in range(n_future)) / n_future
    scale = attn.scale
    want = torch.zeros(groups, 12, dtype=torch.float64)
    for h in range(heads):
        mu = mean_r @ pre[h].mean(0)
        centred = pre[h] - pre[h].mean(0)
        sigma = mean_r @ (centred.T @ centred / len(centred)) @ mean_r.T
        k = keys[0, h // (heads // groups)].double()
        exponent = k @ mu * scale + torch.einsum("si,ij,sj->s", k, sigma, k) * scale ** 2 / 2
        want[h // (heads // groups)] += exponent.softmax(0) / (heads // groups)
    want = want * values[0].double().norm(dim=-1)
    assert torch.isinf(got[0, :, :2]).all()  # sinks kept
    torch.testing.assert_close(got[0, :, 2:].double(), want[:, 2:], rtol=1e-4, atol=1e-7)


def test_kvzip_score_is_the_max_attention_from_repeating_the_prompt(model):
    ids = ids_for(14)
    cache = build_cache(model.config, 1, "kvzip", 40)
    captured = []
    original = KVzipLayerCache.prompt_scores
    KVzipLayerCache.prompt_scores = lambda self, end: captured.append(original(self, end)) or captured[-1]
    try:
        with torch.no_grad():
            prefill(model, ids, cache)
    finally:
        KVzipLayerCache.prompt_scores = original
    with torch.no_grad(), recording_weights() as weights:  # the oracle: the prompt read twice in a row
        model(torch.cat([ids, ids], dim=1))
    for layer, recorded in enumerate(weights):
        want = recorded[0, :, :, 14:, :14].amax(dim=(1, 2))  # over the group's heads and the repeat queries
        torch.testing.assert_close(captured[layer][0], want, atol=1e-6, rtol=1e-5)


def test_snapkv_q_observes_exactly_the_question(model):
    attn = model.layers[0].attn
    d, heads, groups = attn.head_size, attn.n_head, attn.n_groups
    layer = QuestionSnapKVLayerCache(batch=1, groups=groups, head_size=d, capacity=6, kernel=1, window=2)
    gen = torch.Generator().manual_seed(4)
    keys = torch.randn(1, groups, 16, d, generator=gen)
    q = torch.randn(1, heads, 16, d, generator=gen)
    pos = torch.arange(16)[None]
    layer.extend(keys, keys, pos)
    layer.see_queries(q, pos)
    layer.settle(None)
    for question in (None, 5):
        got = layer.prompt_scores(PromptEnd(model, ids_for(16), pos, question, 0))
        window = 2 if question is None else question
        logits = torch.einsum("hqd,hkd->hqk", q[0].double(), keys[0].repeat_interleave(2, 0).double()) * attn.scale
        causal = torch.arange(16)[None, :] <= torch.arange(16)[:, None]
        w = logits.masked_fill(~causal, -torch.inf).softmax(-1)[:, 16 - window:].sum(1)  # (heads, keys)
        want = w.unflatten(0, (groups, -1)).mean(1)
        assert torch.isinf(got[0, :, 16 - window:]).all()
        torch.testing.assert_close(got[0, :, :16 - window].double(), want[:, :16 - window], rtol=1e-5, atol=1e-7)


def test_evicts_the_lowest_scores_and_keeps_generated_tokens():
    layer = QuestionSnapKVLayerCache(batch=1, groups=1, head_size=2, capacity=3, kernel=1, window=1)
    kv = torch.zeros(1, 1, 6, 2)
    layer.extend(kv, kv, torch.arange(6)[None])
    layer.settle(None)
    assert layer.pos.shape[-1] == 6  # held until the prompt ends
    layer.prompt_scores = lambda end: torch.tensor([[[0.1, 0.9, 0.2, 0.8, 0.0, 0.3]]])
    layer.end_prompt(None)
    assert layer.pos.tolist() == [[[1, 3, 5]]]
    layer.extend(torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2), torch.tensor([[6]]))
    layer.settle(None)
    assert layer.pos.tolist() == [[[1, 3, 6]]]


# ---- the question's path and bad input ---------------------------------------------------------
class _Tokenizer:
    eos_ids = (1,)

    def encode(self, text, add_special_tokens=True):
        return ([2] if add_special_tokens else []) + [3 + ord(c) % 200 for c in text]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(65 + i % 26) for i in ids)


def test_question_reaches_the_cache(model, monkeypatch):
    seen = []
    original = KVCache.end_prompt
    monkeypatch.setattr(KVCache, "end_prompt", lambda self, m, i, p, question=None: seen.append(question)
                        or original(self, m, i, p, question))
    list(generate_ids(model, [[5, 6, 7, 8]], 2, kv_cache="snapkv-q", cache_tokens=3, question_tokens=2))
    LLM(model, _Tokenizer()).generate("a long context", max_new_tokens=2, kv_cache="snapkv-q", cache_tokens=4,
                                      question="who?")
    assert seen == [2, 4]


@pytest.mark.parametrize("text, fragment", [
    ("expected-attention(n_futur=3)", "unknown parameter 'n_futur'"),
    ("expected-attention(use_covariance=2)", "use_covariance=2 is not an integer in [0, 1]"),
    ("kvzip(chunk=0)", "chunk=0"),
    ("snapkv-q(kernel=2)", "kernel=2"),
])
def test_bad_parameters_are_typed_errors(text, fragment):
    with pytest.raises(CacheError, match=fragment.replace("[", r"\[").replace("(", r"\(")):
        parse_policy(text)


def test_bad_question_and_too_long_kvzip_are_typed_errors(model):
    with pytest.raises(CacheError, match="question"):
        prefill(model, ids_for(10), build_cache(model.config, 1, "snapkv-q", 4), question=[1, 2])
    long = ids_for(model.config.block_size // 2 + 1)
    with pytest.raises(CacheError, match="kvzip"):
        prefill(model, long, build_cache(model.config, 1, "kvzip", 8))


# ---- per head (helper A's slots): each head its own slots, duo's split, explanations ------------------
def test_presses_decide_per_head_by_default_and_pick_each_heads_best():
    assert all(build_cache(Config.from_name("tiny-llama"), 1, p, 8).layers[0].heads == "each" for p in PRESSES)
    layer = QuestionSnapKVLayerCache(batch=1, groups=2, head_size=2, capacity=2, kernel=1, window=1, heads="each")
    kv = torch.zeros(1, 2, 5, 2)
    layer.extend(kv, kv, torch.arange(5)[None])
    layer.settle(None)
    layer.prompt_scores = lambda end: torch.tensor([[[0.9, 0.1, 0.8, 0.2, 0.0], [0.0, 0.7, 0.1, 0.9, 0.2]]])
    layer.end_prompt(None)
    assert layer.pos.tolist() == [[[0, 2], [1, 3]]]  # head 0: its two best, head 1: its own two
    adaptive = QuestionSnapKVLayerCache(batch=1, groups=2, head_size=2, capacity=2, heads="adaptive", alpha=0.5)
    adaptive.extend(kv, kv, torch.arange(5)[None])
    adaptive.settle(None)
    adaptive.prompt_scores = lambda end: torch.tensor([[[0.9, 0.8, 0.7, 0.2, 0.0], [0.0, 0.1, 0.1, 0.3, 0.2]]])
    adaptive.end_prompt(None)
    # 4 slots for the layer, each head at least 1: the peaked head takes 3
    assert adaptive.pos.tolist() == [[[0, 1, 2], [3, -1, -1]]]


@pytest.fixture
def heads_file(tmp_path, model):
    from lucidlm.cache.heads import HeadScores, model_identity, write_head_scores

    return write_head_scores(tmp_path / "heads.json", HeadScores(model_identity(model.config), [[0.9, 0.1], [0.2, 0.8]]))


def test_duo_keeps_the_prompt_in_retrieval_heads_and_sinks_plus_window_in_streaming_heads(model, heads_file):
    # 40 tokens, sinks 2 + window 6 = 8, 24 slots per head on average: 2 (24 - 8) // (40 - 8) = 1 retrieval head
    cache = build_cache(model.config, 1, f"duo(heads_file={heads_file},n_sink=2,window=6)", 24)
    with torch.no_grad():
        prefill(model, ids_for(40), cache)
    streaming = {0, 1, *range(34, 40)}
    assert cache.kept_by_head(0) == [[set(range(40)), streaming], [streaming, set(range(40))]]
    assert all(layer.positions().shape[-1] == 40 for layer in cache.layers)  # width: the retrieval head's


def test_duo_without_a_file_ranks_heads_on_the_prompt_and_refuses_another_models_file(model, heads_file):
    cache = build_cache(model.config, 1, "duo(n_sink=2,window=6)", 24)
    with torch.no_grad():
        prefill(model, ids_for(40), cache)
    for kept in cache.kept_by_head(0):
        assert sorted(map(len, kept)) == [8, 40]
    other = Config.from_name("tiny-llama")
    other.n_layer = 3
    with pytest.raises(CacheError, match="heads.json: head scores of model 'tiny-llama'"):
        build_cache(other, 1, f"duo(heads_file={heads_file})", 24)
    with pytest.raises(CacheError, match="missing.json: no such file"):
        build_cache(model.config, 1, f"duo(heads_file={heads_file.parent / 'missing.json'})", 24)


@pytest.mark.parametrize("policy", [*PRESSES, "duo"])
def test_explanations_equal_dense_when_nothing_is_evicted_and_mark_heads_when_something_is(model, policy):
    from lucidlm.explain.cached import explain_cached

    ids = ids_for(30)[0].tolist()
    dense = explain_cached(model, None, ids, kv_cache="dense")
    roomy = explain_cached(model, None, ids, kv_cache=policy, cache_tokens=40)
    torch.testing.assert_close(roomy.relevance, dense.relevance, atol=1e-6, rtol=1e-5)
    assert roomy.kept_heads.all() and not roomy.evicted.any()
    # duo: sinks 4 + window 4 = 8 of 20 slots per head on average: one of the 2 heads keeps all 29
    tight = explain_cached(model, None, ids, kv_cache=f"{policy}(window=4)" if policy == "duo" else policy,
                           cache_tokens=20 if policy == "duo" else 10)
    held = tight.kept_heads  # (layers, groups, tokens): what each head held for the last prediction
    assert held.shape == (model.config.n_layer, model.config.n_query_groups, 30) and held[..., -1].all()
    if policy == "duo":
        assert sorted(held.sum(-1).flatten().tolist()) == [12, 12, 30, 30]  # 8 + 3 left over, + the last token
    else:
        assert (held.sum(-1) == 11).all()  # 10 slots per head, plus the last token itself
    assert not torch.equal(held[:, 0], held[:, 1])  # the heads keep different tokens
    assert torch.equal(tight.evicted, ~held.flatten(0, 1).any(0))
