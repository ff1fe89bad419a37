"""Training through a bounded KV cache (``finetune(kv_cache=..., cache_tokens=..., chunk_size=...)``):
the chunked forward's loss and LoRA gradients against the ordinary full-sequence forward (no
eviction) and against a full forward masked to exactly what the policy kept (window, sink), a
short H2O run that learns, and typed errors."""

import json
import re

import pytest
import torch
from torch.nn import functional as F

import lucidlm
from lucidlm import GPT, Config
from lucidlm.cache.base import KVCache, VisibleKeys
from lucidlm.cli import main
from lucidlm.errors import CacheError, TrainError
from lucidlm.train.chunked import ChunkedCache
from lucidlm.train.data import IGNORE, Example
from lucidlm.train.distributed import World
from lucidlm.train.lora import attach_lora
from lucidlm.train.loop import Trainer, TrainConfig, batch_indices, mean_loss

EXACT = dict(precision="fp32", progress=False)
# long enough answers that a 16-slot cache must evict inside them
RECORDS = [{"messages": [{"role": "user", "content": f"Count from {a} to {a + 9}."},
                         {"role": "assistant", "content": " ".join(str(n) for n in range(a, a + 10)) + "."}]}
           for a in range(8)]


def lora_model(seed: int = 0) -> GPT:
    """tiny-llama (GQA: 4 heads, 2 groups) with LoRA on every linear layer, B non-zero so that
    every adapter weight gets a gradient."""
    torch.manual_seed(seed)
    model = GPT(Config.from_name("tiny-llama"))
    attach_lora(model, r=4, alpha=8)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model.train()


def batch(seed: int = 1, tokens: int = 30):
    """Two rows; the second is shorter (right padding) and only its second half is a target."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (2, tokens), generator=g)
    labels = ids.roll(-1, 1)
    labels[:, -1] = IGNORE
    labels[1, : tokens // 2] = IGNORE
    labels[1, tokens - 6:] = IGNORE
    ids[1, tokens - 5:] = 0
    return ids, labels


def loss_and_grads(model, compute):
    model.zero_grad(set_to_none=True)
    loss = compute()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def full_loss(model, ids, labels, cache=None):
    """The reference: one forward over the whole sequence, summed cross-entropy of the targets."""
    logits = model(ids, cache=cache)
    select = labels != IGNORE
    return F.cross_entropy(logits[select], labels[select], reduction="sum")


def assert_same(got, want):
    (loss, grads), (ref_loss, ref_grads) = got, want
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys() and len(grads) == 2 * 7 * 2  # A and B of 7 linears, 2 layers
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert any(g.abs().max() > 0 for n, g in grads.items() if "lora_A" in n)


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("policy", ["dense", "window", "sink", "h2o", "snapkv(window=4)", "knorm", "tova"])
@pytest.mark.parametrize("chunk_size", [1, 7, 30])
def test_without_eviction_the_chunked_run_is_the_full_forward(policy, chunk_size):
    model = lora_model()
    ids, labels = batch()
    plan = ChunkedCache(policy, cache_tokens=32, chunk_size=chunk_size)  # 32 >= 30 tokens: nothing evicted
    assert_same(loss_and_grads(model, lambda: plan.loss(model, ids, labels)),
                loss_and_grads(model, lambda: full_loss(model, ids, labels)))


def kept_by(policy: str, budget: int, chunk: int, n_sink: int, tokens: int) -> torch.Tensor:
    """visible[i, j]: what query i sees through a window (or sink) cache of ``budget`` slots fed in
    chunks of ``chunk``: its own chunk causally, and what was kept after the previous chunk, namely
    the ``budget`` (minus sinks) newest tokens before the chunk, plus the sinks."""
    i = torch.arange(tokens)[:, None]
    j = torch.arange(tokens)[None, :]
    start = i // chunk * chunk
    recent = budget - (n_sink if policy == "sink" else 0)
    visible = j >= start - recent
    if policy == "sink":
        visible |= j < n_sink
    return visible & (j <= i)


@pytest.mark.parametrize("policy", ["window", "sink"])
@pytest.mark.parametrize("budget, chunk_size", [(8, 5), (6, 8), (3, 1)])
def test_with_eviction_the_gradients_are_those_of_the_masked_full_forward(policy, budget, chunk_size):
    model = lora_model()
    ids, labels = batch(seed=2)
    spec = "sink(n_sink=2)" if policy == "sink" else policy
    plan = ChunkedCache(spec, cache_tokens=budget, chunk_size=chunk_size)
    visible = kept_by(policy, budget, chunk_size, 2, ids.shape[1])
    assert (~visible).tril().any()  # tokens were evicted

    def masked():
        return full_loss(model, ids, labels, KVCache([VisibleKeys(visible) for _ in model.layers]))

    # equal gradients: an evicted token still counts, through the chunks that saw it before it went
    assert_same(loss_and_grads(model, lambda: plan.loss(model, ids, labels)), loss_and_grads(model, masked))
    with torch.no_grad():
        ordinary = full_loss(model, ids, labels)
    # and eviction changed the loss (a random model attends almost uniformly: by little, far
    # above float32 rounding of a sum of ~40 terms)
    assert (plan.loss(model, ids, labels).detach() - ordinary).abs() > 1e-3


def test_a_batch_evicts_per_sequence():
    """H2O decides per row: a batch of two through one cache equals each row through its own."""
    model = lora_model(seed=3)
    ids, labels = batch(seed=4, tokens=40)
    plan = ChunkedCache("h2o(recent=4)", cache_tokens=10, chunk_size=6)
    with torch.no_grad():
        together = plan.loss(model, ids, labels)
        alone = sum(plan.loss(model, ids[r:r + 1], labels[r:r + 1]) for r in range(2))
        ordinary = full_loss(model, ids, labels)
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    assert (together - ordinary).abs() > 1e-3


def test_the_dense_inference_cache_cannot_be_trained_through():
    """Why training serves 'dense' with concatenating slots: the inference cache writes chunks into
    its buffers in place, and autograd refuses the overwritten tensors."""
    from lucidlm.cache import dense_cache

    model = lora_model()
    ids, labels = batch()
    cache = dense_cache(model.config, 2, 32)
    loss = sum(full_loss(model, ids[:, s:s + 10], labels[:, s:s + 10], cache) for s in range(0, 30, 10))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


# ----------------------------------------------------------------------------- the loop
def run(directory, out=None, **options):
    llm = lucidlm.LLM.load(directory)
    kwargs = dict(method="lora", steps=3, batch_size=4, lr=1e-2, val_split=0.25, eval_every=3) | EXACT | options
    return llm, llm.finetune(RECORDS, out=out, **kwargs)


def test_finetune_without_eviction_follows_the_ordinary_run(tiny_lm_dir):
    _, ordinary = run(tiny_lm_dir)
    _, cached = run(tiny_lm_dir, kv_cache="window", cache_tokens=256, chunk_size=7)
    assert cached.losses == pytest.approx(ordinary.losses, rel=1e-5)
    assert cached.val_losses[0][1] == pytest.approx(ordinary.val_losses[0][1], rel=1e-5)


def test_h2o_with_a_small_budget_trains_and_logs_the_chunked_loss():
    """Four 48-token sequences to memorise through a 16-slot H2O cache in 8-token chunks; each
    step's logged loss is the no-grad chunked loss of its batch under the weights before it."""
    g = torch.Generator().manual_seed(5)
    examples = []
    for n in range(4):
        ids = torch.randint(0, 256, (48,), generator=g).tolist()
        examples.append(Example(tuple(ids), tuple(ids[1:]) + (IGNORE,), f"sequence {n}"))
    model = lora_model()
    cfg = TrainConfig.make(steps=8, batch_size=4, micro_batch_size=2, lr=5e-2, kv_cache="h2o(recent=4)",
                           cache_tokens=16, chunk_size=8, **EXACT)
    trainer = Trainer(model, cfg, World(), None, {})
    losses = []
    for step in range(cfg.steps):
        chosen = [examples[i] for i in batch_indices(step, len(examples), cfg.batch_size, cfg.seed)]
        before = mean_loss(model, chosen, 4, chunked=cfg.chunked())  # no grad, same weights
        losses.append(trainer.step(step, examples)["loss"])
        assert losses[-1] == pytest.approx(before, rel=1e-5)
    assert losses[-1] < 0.8 * losses[0]
    # and H2O did evict: the trained model's loss through the cache is not its full-attention loss
    assert abs(mean_loss(model, examples, 4, chunked=cfg.chunked()) - mean_loss(model, examples, 4)) > 1e-3


def test_cli_finetune_through_a_kv_cache(tiny_lm_dir, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    args = ["finetune", str(data), "--model", str(tiny_lm_dir), "--steps", "2", "--batch-size", "2",
            "--precision", "fp32", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "run"), "--kv-cache", "sink(n_sink=2)", "--cache-tokens", "16",
                 "--chunk-size", "8"]) == 0
    assert "trained 2 steps" in capsys.readouterr().err
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert all(e["loss"] > 0 for e in log if "loss" in e)
    with pytest.raises(SystemExit):
        main([*args, "--out", str(tmp_path / "x"), "--kv-cache", "lru"])
    assert "valid: dense, window, sink, h2o" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "y"), "--chunk-size", "8"]) == 2
    assert "chunk_size=8 applies only with kv_cache" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("options, error, message", [
    (dict(kv_cache="lru"), CacheError, "policy='lru' is not a KV-cache policy; valid: dense, window, sink, h2o"),
    (dict(kv_cache="h2o", chunk_size=0), TrainError, "chunk_size=0: expected a positive integer"),
    (dict(kv_cache="h2o", cache_tokens=-4), TrainError, "cache_tokens=-4: expected a positive integer"),
    (dict(kv_cache="h2o+int8"), TrainError, "quantised buffers hold integer codes, which carry no gradient"),
    (dict(cache_tokens=64), TrainError, "cache_tokens=64 applies only with kv_cache=POLICY"),
    (dict(kv_cache="dense", cache_tokens=8), TrainError, "the longest example has"),
    (dict(kv_cache="h2o(recent=8)", cache_tokens=8), CacheError, "must exceed the protected recent window"),
])
def test_bad_cache_options_are_typed_errors_and_write_nothing(tiny_lm_dir, tmp_path, options, error, message):
    with pytest.raises(error, match=re.escape(message)):
        run(tiny_lm_dir, tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("policy", ["h2o", "h2o-vlen", "qh2o+int8", "knorm"])
def test_eviction_state_holds_no_graph(policy):
    """Scores and norms only decide what to evict: kept in the cache with gradients, they would
    keep every earlier chunk's graph alive (memory) for nothing."""
    import torch

    from lucidlm import GPT, Config
    from lucidlm.cache import build_cache

    torch.manual_seed(0)
    model = GPT(Config.from_name("tiny-llama"))
    cache = build_cache(model.config, 1, policy, 8)
    ids = torch.randint(0, 200, (1, 24))
    for chunk in ids.split(6, dim=1):
        model(chunk, cache=cache).sum()
    for layer in cache.layers:
        for name in ("score", "v_norm", "k_norm", "q_error"):
            state = getattr(layer, name, None)
            assert state is None or not state.requires_grad, (policy, name)
