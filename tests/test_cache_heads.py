"""Per-head KV caches (``heads="each"`` / ``"adaptive"``, AdaKV): eviction per KV head on hand-made
scores, AdaKV's allocation and floor, per-group quantised stores and slot state, exactness when
nothing is evicted, left-padded batches equal to each prompt alone, attention over per-group key
positions against a per-head masked softmax written out in float64, server rows stacked per head,
and explanations whose replay restricts each head to what it saw."""

import pytest
import torch

from lucidlm import GPT, Config
from lucidlm.cache import H2OLayerCache, KNormLayerCache, SnapKVLayerCache, build_cache, prefill, stream
from lucidlm.cache.quant import Int8Store
from lucidlm.cache.slots import adaptive_keep
from lucidlm.errors import CacheError
from lucidlm.model import attention
from lucidlm.model.attention import CausalSelfAttention

from cache_util import feed, keys_with_norms, padded_and_alone

HEADS = ["each", "adaptive"]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return GPT(Config.from_name("tiny-llama")).eval()  # 2 layers, 4 heads in 2 KV groups, head_size 16


# ---- eviction order, head by head ---------------------------------------------------------------
def test_h2o_each_head_keeps_its_own_heavy_hitters():
    scores = torch.tensor([[[0.5, 0.1, 0.3, 0.0, 0.0], [0.0, 0.4, 0.1, 0.2, 0.0]]])
    layer = H2OLayerCache(batch=1, groups=2, head_size=4, capacity=3, recent=1, heads="each")
    feed(layer, [[0, 1, 2, 3, 4]], scores)  # 4 is recent in both heads
    assert layer.pos.tolist() == [[[0, 2, 4], [1, 3, 4]]]
    # the state follows each head's slots
    torch.testing.assert_close(layer.score, torch.tensor([[[0.5, 0.3, 0.0], [0.4, 0.2, 0.0]]]))
    # the next step accumulates per head: head 0's 4 (0 + .6) overtakes 2 (.3 + .1); head 1 keeps 1
    # (.4 + 0) and 3 (.2 + .3) over 4 (0 + .35)
    feed(layer, [[5]], torch.tensor([[[0.0, 0.1, 0.6, 0.0], [0.0, 0.3, 0.35, 0.0]]]))
    assert layer.pos.tolist() == [[[0, 4, 5], [1, 3, 5]]]
    shared = H2OLayerCache(batch=1, groups=2, head_size=4, capacity=3, recent=1)
    feed(shared, [[0, 1, 2, 3, 4]], scores)  # group means .25 .25 .2 .1: one set for both heads
    assert shared.pos.tolist() == [[0, 1, 4]]


def test_snapkv_each_pools_and_ranks_within_each_head():
    s = torch.zeros(1, 2, 8)
    s[0, 0, :6] = torch.tensor([0.0, 0.6, 0.0, 0.0, 0.0, 0.3])
    s[0, 1, :6] = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.9, 0.0])
    layer = SnapKVLayerCache(batch=1, groups=2, head_size=4, capacity=3, window=2, kernel=1, heads="each")
    feed(layer, [list(range(8))], s)  # the window 6, 7 in both, then each head's best
    assert layer.pos.tolist() == [[[1, 6, 7], [4, 6, 7]]]


def test_knorm_each_keeps_each_heads_smallest_keys_never_padding():
    layer = KNormLayerCache(batch=2, groups=2, head_size=4, capacity=2, heads="each")
    k = torch.stack([keys_with_norms([[1, 6, 2, 4], [5, 0.5, 3, 4]]), keys_with_norms([[9, 3, 1, 2], [9, 1, 1, 4]])])
    feed(layer, [[0, 1, 2, 3], [-1, 0, 1, 2]], k=k)  # row 1 is left-padded: its padding never stays
    assert layer.pos.tolist() == [[[0, 2], [1, 2]], [[1, 2], [0, 1]]]


def test_adaptive_gives_the_slots_of_a_flat_head_to_a_peaked_one():
    # head 0 attends sharply to 0..3; head 1 spreads its attention evenly. Budget 2 heads x 3 slots:
    # the newest (5) is protected in both, the other 4 slots all go to head 0's peaks
    scores = torch.tensor([[[0.5, 0.4, 0.3, 0.2, 0.0, 0.0], [0.1, 0.1, 0.1, 0.1, 0.1, 0.1]]])
    layer = H2OLayerCache(batch=1, groups=2, head_size=4, capacity=3, recent=1, heads="adaptive", alpha=0)
    feed(layer, [list(range(6))], scores)
    assert layer.pos.tolist() == [[[0, 1, 2, 3, 5], [5, -1, -1, -1, -1]]]
    each = H2OLayerCache(batch=1, groups=2, head_size=4, capacity=3, recent=1, heads="each")
    feed(each, [list(range(6))], scores)  # the same budget split evenly: 3 slots per head
    assert [len([p for p in g if p >= 0]) for g in each.pos[0].tolist()] == [3, 3]


def test_adakv_floor_guarantees_each_head_its_best():
    # keys' norms: head 0's are all smaller (knorm keeps small norms), so without a floor head 0
    # takes the whole budget of 2 x 2 slots; alpha = .5 guarantees each head its best floor(.5 * 2) = 1
    k = keys_with_norms([[[1, 2, 3, 4], [5, 6, 7, 8]]])
    bare = KNormLayerCache(batch=1, groups=2, head_size=4, capacity=2, heads="adaptive", alpha=0)
    feed(bare, [[0, 1, 2, 3]], k=k)
    assert bare.pos.tolist() == [[[0, 1, 2, 3], [-1, -1, -1, -1]]]
    floored = KNormLayerCache(batch=1, groups=2, head_size=4, capacity=2, heads="adaptive", alpha=0.5)
    feed(floored, [[0, 1, 2, 3]], k=k)
    assert floored.pos.tolist() == [[[0, 1, 2], [0, -1, -1]]]
    keys = floored.store.decode(floored.k)
    assert keys[0, 1, 0, 0] == 5 and not keys[0, 1, 1:].any()  # padding slots hold zeros
    assert floored.k_norm.tolist() == [[[1, 2, 3], [5, 0, 0]]]


def test_adaptive_keep_by_hand():
    rank = torch.tensor([[[9.0, 8, 7, 6, 5], [4, 3, 2, 1, -torch.inf]],  # an empty slot never stays
                         [[1.0, 0.9, 0.8, 0.7, 0.6], [9, 8, 7, 6, 5]]])
    keep, pad = adaptive_keep(rank, capacity=2, floor=1)
    assert keep.masked_fill(pad, -1).tolist() == [[[0, 1, 2], [0, -1, -1]], [[0, -1, -1], [0, 1, 2]]]
    keep, pad = adaptive_keep(rank, capacity=5, floor=0)  # room for every real slot: all of them stay
    assert keep.masked_fill(pad, -1).tolist() == [[[0, 1, 2, 3, 4], [0, 1, 2, 3, -1]],
                                                  [[0, 1, 2, 3, 4], [0, 1, 2, 3, 4]]]


def test_quantised_store_and_state_follow_each_head():
    torch.manual_seed(5)
    layer = H2OLayerCache(batch=2, groups=2, head_size=32, capacity=4, recent=1, heads="adaptive",
                          store=Int8Store)
    k, v = torch.randn(2, 2, 9, 32), torch.randn(2, 2, 9, 32)
    scores = torch.rand(2, 2, 9)
    layer.extend(k, v, torch.arange(9).expand(2, 9))
    layer.settle(scores)
    store = Int8Store(32, torch.float32)
    keys, values = store.decode(store.encode(k)), store.decode(store.encode(v))
    got_k, got_v = layer.store.decode(layer.k), layer.value_store.decode(layer.v)
    for b in range(2):
        for g in range(2):
            for j, p in enumerate(layer.pos[b, g].tolist()):
                if p < 0:
                    assert not got_k[b, g, j].any() and layer.score[b, g, j] == 0
                else:
                    assert torch.equal(got_k[b, g, j], keys[b, g, p]) and torch.equal(got_v[b, g, j], values[b, g, p])
                    assert layer.score[b, g, j] == scores[b, g, p]
    assert (layer.pos >= 0).sum().item() == 2 * 2 * 4  # every row fills its 2 x 4 budget


def test_bad_heads_is_a_typed_error(tiny):
    with pytest.raises(CacheError, match="heads=everything is not one of: shared, each, adaptive"):
        build_cache(tiny.config, 1, "h2o(heads=everything)", 8)
    with pytest.raises(CacheError, match="unknown parameter 'heads'"):
        build_cache(tiny.config, 1, "window(heads=each)", 8)
    with pytest.raises(CacheError, match="alpha"):
        H2OLayerCache(1, 2, 4, 8, heads="adaptive", alpha=2.0)


# ---- the model through per-head caches ---------------------------------------------------------
PER_HEAD = [f"{p}(heads={h})" for p in ("h2o", "snapkv", "tova", "knorm", "h2o-vlen", "qh2o", "pyramidkv")
            for h in HEADS]


@pytest.mark.parametrize("policy", [*PER_HEAD, "snapkv(heads=adaptive)+int8", "h2o(heads=each)+int4"])
def test_a_budget_holding_everything_equals_dense(tiny, policy):
    ids = torch.randint(3, 256, (2, 30), generator=torch.Generator().manual_seed(4))
    quant = policy.partition("+")[2]
    cache = build_cache(tiny.config, 2, policy, 64)
    with torch.no_grad():  # chunks of 6: both take the explicit kernel on the CPU, so bits agree
        dense = torch.cat(list(stream(tiny, ids, build_cache(tiny.config, 2, "dense" + (f"+{quant}" if quant else ""),
                                                             64), 6)), 1)
        got = torch.cat(list(stream(tiny, ids, cache, 6)), 1)
    assert cache.layers[0].positions().shape[:2] == (2, 2)  # per head
    assert torch.equal(got, dense)


@pytest.mark.parametrize("policy", [*PER_HEAD, "snapkv(window=3,heads=adaptive)+int4", "knorm(heads=each)+int8"])
def test_left_padded_batch_equals_each_prompt_alone(tiny, policy):
    """Prompts of 20 and 13 tokens prefilled together, then 5 decode steps, through a budget of 8
    per head: each row's logits and each head's kept positions equal that prompt's run alone."""
    together, cache, alone_runs = padded_and_alone(tiny, policy, 8)
    for r, (alone, single) in enumerate(alone_runs):
        torch.testing.assert_close(together[r], alone[0], atol=1e-5, rtol=1e-5)
        assert cache.kept_by_head(r) == single.kept_by_head(0)
        assert cache.kept_positions(r) == single.kept_positions(0)
    share = 2 if "adaptive" in policy else 1  # adaptive: a head may hold its group's budget and the other's
    assert all(len(head) <= layer.capacity * share for layer, heads in zip(cache.layers, cache.kept_by_head(0))
               for head in heads)
    assert all(len(kept) < 25 for kept in cache.kept_positions(0))  # something was evicted


def test_heads_keep_different_tokens_and_kept_positions_is_their_union(tiny):
    ids = torch.randint(3, 256, (1, 40), generator=torch.Generator().manual_seed(8))
    cache = build_cache(tiny.config, 1, "knorm(heads=each)", 10)
    prefill(tiny, ids, cache, chunk_size=8)
    by_head = cache.kept_by_head()
    assert len(by_head) == 2 and all(len(layer) == 2 and all(len(h) == 10 for h in layer) for layer in by_head)
    assert any(layer[0] != layer[1] for layer in by_head)
    assert cache.kept_positions() == [layer[0] | layer[1] for layer in by_head]
    shared = build_cache(tiny.config, 1, "knorm", 10)
    prefill(tiny, ids, shared, chunk_size=8)
    assert all(layer[0] == layer[1] == kept for layer, kept in zip(shared.kept_by_head(), shared.kept_positions()))


# ---- attention over per-group key positions ----------------------------------------------------
def _reference(q, k, v, q_pos, k_pos, scale, window=None, visible=None):
    """Per query head, a softmax over the keys its group may see, in float64: a key is visible
    when filled, not in the future, inside the window and allowed by ``visible`` (batch, heads,
    queries, keys). Also returns the weights."""
    B, H, Q, _ = q.shape
    G = k.shape[1]
    out = torch.zeros(B, H, Q, v.shape[-1], dtype=torch.float64)
    weights = torch.zeros(B, H, Q, k.shape[2], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            g = h // (H // G)
            for i in range(Q):
                qp, kp = int(q_pos[b, i]), k_pos[b, g]
                allowed = (kp >= 0) & (kp <= qp)
                if window is not None:
                    allowed &= qp - kp < window
                if visible is not None:
                    allowed &= visible[b, h, i]
                logits = (q[b, h, i].double() @ k[b, g].double().T) * scale
                w = torch.softmax(logits.masked_fill(~allowed, -torch.inf), dim=-1)
                weights[b, h, i], out[b, h, i] = w, w @ v[b, g].double()
    return out, weights


def _attention_case(queries: int):
    """A tiny-llama attention layer in float64 and per-group key positions with gaps, empty
    slots (-1) and a different past per group, then the step's own queries."""
    torch.manual_seed(2)
    attn = CausalSelfAttention(Config.from_name("tiny-llama"), 0).double()
    B, H, G, D = 2, 4, 2, 16
    past = torch.tensor([[[0, 3, 7, 12, -1], [1, 2, 15, 18, 19]], [[4, -1, -1, 9, 11], [0, 5, 6, 8, 10]]])
    q_pos = torch.arange(20, 20 + queries).expand(B, queries)
    k_pos = torch.cat([past, q_pos[:, None, :].expand(B, G, queries)], dim=-1)
    q = torch.randn(B, H, queries, D, dtype=torch.float64)
    k, v = (torch.randn(B, G, k_pos.shape[-1], D, dtype=torch.float64) for _ in range(2))
    return attn, q, k, v, q_pos, k_pos


@pytest.mark.parametrize("kernel", ["explicit", "sdpa", "chunked-explicit", "chunked-sdpa"])
@pytest.mark.parametrize("window", [None, 9])
def test_attention_with_per_group_positions_equals_a_per_head_reference(monkeypatch, kernel, window):
    attn, q, k, v, q_pos, k_pos = _attention_case(12)  # 12 queries: past the CPU's few-queries path
    attn.window = window
    if kernel.startswith("chunked"):
        monkeypatch.setattr(attention, "QUERY_CHUNK", 5)
    want = kernel.endswith("explicit")
    out, scores = attn.attend(q, k, v, q_pos, k_pos, want_scores=want)
    expected, weights = _reference(q, k, v, q_pos, k_pos, attn.scale, window)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    if want:  # per group: the weight each key received, summed over queries, averaged over the group's heads
        torch.testing.assert_close(scores, weights.sum(2).unflatten(1, (2, 2)).mean(2).float())


@pytest.mark.parametrize("shape", ["groups", "heads"])
def test_attention_restricted_by_a_per_group_or_per_head_visibility(shape):
    attn, q, k, v, q_pos, k_pos = _attention_case(12)
    gen = torch.Generator().manual_seed(6)
    visible = torch.rand(2, 2 if shape == "groups" else 4, 12, k.shape[2], generator=gen) > 0.3
    visible[..., -12:] |= torch.eye(12, dtype=torch.bool)  # every query sees itself
    per_head = visible.repeat_interleave(2, dim=1) if shape == "groups" else visible
    expected, _ = _reference(q, k, v, q_pos, k_pos, attn.scale, visible=per_head)
    for want in (False, True):
        out, _ = attn.attend(q, k, v, q_pos, k_pos, want_scores=want, visible=visible)
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("fast", [True, False])
def test_one_token_decode_over_per_group_keys(monkeypatch, fast):
    """A decode step: with every slot filled SDPA runs without a mask (each group's keys are all
    in the past); with an empty slot it takes the per-group mask."""
    monkeypatch.setattr(attention, "_FEW_QUERIES", 0)  # SDPA, as on a GPU
    attn, q, k, v, q_pos, k_pos = _attention_case(1)
    if fast:
        k_pos = k_pos.clamp_min(0)
    out, _ = attn.attend(q, k, v, q_pos, k_pos)
    torch.testing.assert_close(out, _reference(q, k, v, q_pos, k_pos, attn.scale)[0], rtol=1e-10, atol=1e-12)


# ---- server rows: one-row per-head caches stacked into one batch --------------------------------
@pytest.mark.parametrize("policy", ["h2o(heads=adaptive)", "snapkv(window=2,heads=each)+int8"])
def test_stacked_per_head_rows_equal_each_row_alone(tiny, policy):
    from lucidlm.cache.rows import stacked

    gen = torch.Generator().manual_seed(9)
    prompts = [torch.randint(3, 256, (1, n), generator=gen) for n in (17, 11)]
    steps = torch.randint(3, 256, (2, 4), generator=gen)

    def rows():
        caches = [build_cache(tiny.config, 1, policy, 6) for _ in prompts]
        for cache, ids in zip(caches, prompts):
            prefill(tiny, ids, cache, chunk_size=5)
        return caches

    together, alone = rows(), rows()
    batch = stacked(together)
    with torch.no_grad():
        for t in range(steps.shape[1]):
            positions = torch.tensor([[p.shape[1] + t] for p in prompts])
            both = tiny(steps[:, t:t + 1], positions=positions, cache=batch)[:, -1]
            for r, cache in enumerate(alone):
                solo = tiny(steps[r:r + 1, t:t + 1], positions=positions[r:r + 1], cache=cache)[0, -1]
                torch.testing.assert_close(both[r], solo, atol=1e-5, rtol=1e-5)
    for row, solo in zip(together, alone):
        assert row.kept_by_head() == solo.kept_by_head()
    assert batch.layers[0].positions().shape[:2] == (2, 2)
    assert batch.kept_by_head(1) == alone[1].kept_by_head()


# ---- explanations: the replay restricts every head to what it saw -------------------------------
PROMPT = [5, 9, 17, 23, 4, 31, 40, 8, 12, 55, 61, 7, 3, 19, 27, 33]


def _hf_model(tmp_path_factory, family):
    import lucidlm
    from families import build_hf_model

    directory = tmp_path_factory.mktemp(f"{family}-heads")
    build_hf_model(family).save_pretrained(directory)
    return lucidlm.LLM.load(directory, dtype=torch.float64).model


@pytest.fixture(scope="module")
def llama64(tmp_path_factory):
    return _hf_model(tmp_path_factory, "llama3")  # 4 query heads in 2 KV groups, 3 layers


@pytest.mark.parametrize("policy", ["h2o(heads=each)", "snapkv(window=2,heads=adaptive)", "knorm(heads=each)+int8"])
@pytest.mark.parametrize("method", ["attnlrp", "cp-lrp"])
def test_nothing_evicted_equals_the_dense_explanation(llama64, policy, method):
    from lucidlm.explain.cached import explain_cached
    from lucidlm.explain.explainer import explain

    dense = explain(llama64, None, PROMPT, target=11, method=method)
    cached = explain_cached(llama64, None, PROMPT, target=11, method=method, kv_cache=policy,
                            cache_tokens=len(PROMPT), chunk_size=5)
    assert not cached.evicted.any() and cached.kept_heads.shape == (3, 2, len(PROMPT)) and cached.kept_heads.all()
    torch.testing.assert_close(cached.relevance, dense.relevance, rtol=1e-5, atol=1e-7)
    assert cached.target_logit == pytest.approx(dense.target_logit, rel=1e-9)
    assert dense.kept_heads is None


#: (family, policy, budget, chunk): mistral and gemma2 have sliding windows (gemma2 soft-caps too); left
#: out: where every head keeps the same tokens (llama3's h2o: the first tokens accumulate the most in
#: every head; mistral's snapkv: its last query sees only its window of 5)
REPLAYS = [(family, *case) for family in ("llama3", "mistral", "gemma2")
           for case in [("h2o(recent=1,heads=each)", 5, 3), ("knorm(heads=adaptive)", 4, 4),
                        ("snapkv(window=1,heads=adaptive)", 6, 16), ("tova(heads=each)", 4, 1)]
           if (family, case[0][:3]) not in {("llama3", "h2o"), ("mistral", "sna")}]


@pytest.mark.parametrize("family, policy, budget, chunk", REPLAYS)
def test_per_head_eviction_replayed_head_by_head(tmp_path_factory, llama64, family, policy, budget, chunk):
    """The replay (every head restricted to the keys its group was shown) predicts exactly as the
    cached run; ``kept_heads`` is what each head held for the last query, from an independent run
    of the cache; CP-LRP's decomposition stays exact."""
    from lucidlm.cache.base import KVCache, VisibleKeys
    from lucidlm.explain.cached import cached_run, explain_cached

    model = llama64 if family == "llama3" else _hf_model(tmp_path_factory, family)
    seen, logits = cached_run(model, PROMPT, policy, budget, chunk)
    assert all(s.shape == (2, len(PROMPT), len(PROMPT)) for s in seen)
    with torch.no_grad():
        replayed = model(torch.tensor([PROMPT]), positions=torch.arange(len(PROMPT))[None],
                         cache=KVCache([VisibleKeys(s) for s in seen]), last_only=True)[0, -1]
    torch.testing.assert_close(replayed, logits, rtol=1e-9, atol=1e-9)

    e = explain_cached(model, None, PROMPT, target=11, method="cp-lrp", kv_cache=policy, cache_tokens=budget,
                       chunk_size=chunk)
    assert e.target_logit == pytest.approx(float(logits[11]), rel=1e-9)
    # as exact as the dense explanation's (these models' biases and norm epsilons leak ~1e-8)
    assert e.relevance.double().sum().item() == pytest.approx(e.target_logit, rel=1e-6, abs=1e-6)
    cache = build_cache(model.config, 1, policy, budget, dtype=torch.float64)
    prefill(model, torch.tensor([PROMPT[:-1]]), cache, chunk_size=chunk)
    held = [[sorted(head | {len(PROMPT) - 1}) for head in layer] for layer in cache.kept_by_head()]
    assert [[torch.nonzero(h).flatten().tolist() for h in layer] for layer in e.kept_heads] == held
    assert any(not torch.equal(s[0], s[1]) for s in seen)  # the heads really were shown different keys
    assert e.evicted.tolist() == (~e.kept_heads.flatten(0, 1).any(0)).tolist() and e.evicted.any()


def test_kept_heads_is_validated_and_round_trips_through_json():
    from lucidlm.errors import ExplainError
    from lucidlm.explain.explanation import Explanation

    fields = dict(tokens=["a", "b", "c"], token_ids=[1, 2, 3], relevance=torch.tensor([0.5, 0.25, 1.0]),
                  target="d", target_ids=[4], target_logit=1.75, method="cp-lrp")
    kept = torch.tensor([[[True, False, True], [False, True, True]]])
    e = Explanation(**fields, evicted=torch.tensor([False, False, False]), kept_heads=kept)
    assert Explanation.from_json(e.to_json()) == e and torch.equal(Explanation.from_json(e.to_json()).kept_heads, kept)
    assert "kept_heads" not in Explanation(**fields).to_dict()  # only explanations under a policy carry it
    with pytest.raises(ExplainError, match=r"kept_heads: expected shape \(layers, groups, 3\)"):
        Explanation(**fields, kept_heads=kept[..., :2])
    with pytest.raises(ExplainError, match="kept_heads: expected a 3-D tensor"):
        Explanation(**fields, kept_heads=kept[0])
