"""bf16 and int8 models through every path: no dtype errors with any cache policy, int8 close to
float (text and perplexity on real prompts), explanations exact for the quantised model."""

import pytest
import torch

from lucidlm import GPT, LLM, Config
from lucidlm.cache import POLICIES, build_cache, prefill
from lucidlm.explain.explainer import explain
from lucidlm.generate import generate_ids
from lucidlm.model.quant import Int8Linear
from lucidlm.perplexity import perplexity

PROMPT = [5, 9, 17, 23, 4, 31, 40, 8, 12, 55, 61, 7, 3, 19, 27, 33]


@pytest.fixture(scope="module")
def bf16():
    torch.manual_seed(0)
    return GPT(Config.from_name("tiny-llama")).eval().to(torch.bfloat16)


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_bf16_model_runs_every_cache_policy(bf16, policy):
    budget = None if policy.split("+")[0] in ("dense", "int8", "int4") else 8  # dense ones keep everything
    steps = list(generate_ids(bf16, [PROMPT, PROMPT[:9]], 4, kv_cache=policy, cache_tokens=budget))
    assert len(steps) == 4
    cache = build_cache(bf16.config, 1, policy, budget or 64, dtype=torch.bfloat16)
    logits = prefill(bf16, torch.tensor([PROMPT[:6]]), cache, chunk_size=4)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    assert perplexity(bf16, PROMPT, kv_cache=policy, cache_tokens=budget).perplexity > 1
    e = explain(bf16, None, PROMPT, method="attnlrp", kv_cache=policy, cache_tokens=budget)
    assert torch.isfinite(e.relevance).all()


def test_cache_follows_the_model_dtype_by_default(bf16):
    cache = build_cache(bf16.config, 1, "window", 8, dtype=next(bf16.parameters()).dtype)
    prefill(bf16, torch.tensor([PROMPT]), cache, chunk_size=5)
    floats = [b for b in cache.layers[0].buffers() if b.is_floating_point()]
    assert floats and all(b.dtype == torch.bfloat16 for b in floats)


@pytest.fixture(scope="module")
def int8_tiny(tiny_lm_dir):
    return LLM.load(tiny_lm_dir, dtype="bfloat16").quantize("int8"), LLM.load(tiny_lm_dir, dtype="bfloat16")


def test_quantize_replaces_every_linear_including_the_head(int8_tiny):
    q, _ = int8_tiny
    assert all(not isinstance(m, torch.nn.Linear) for m in q.model.modules())
    assert isinstance(q.model.lm_head, Int8Linear) and q.model.embed.weight.dtype == torch.bfloat16
    with pytest.raises(Exception, match="quantised in memory"):
        q.save("/nonexistent-never-written")


def test_quantize_names_the_methods_it_has(tiny_lm_dir):
    from lucidlm.errors import ConfigError

    with pytest.raises(ConfigError, match="quantize='int4': expected 'int8'"):
        LLM.load(tiny_lm_dir, quantize="int4")


def test_int8_kernel_path_equals_the_dequantised_path(int8_tiny):
    q, _ = int8_tiny
    x = torch.tensor([PROMPT])
    with torch.no_grad():
        fast = q.model(x)  # the int8 kernel
    with torch.enable_grad():
        slow = q.model(inputs_embeds=q.model.embed_tokens(x, torch.arange(len(PROMPT))[None]).requires_grad_())
    torch.testing.assert_close(fast.float(), slow.detach().float(), rtol=2e-2, atol=2e-2)


def test_explaining_an_int8_model_conserves_for_that_model(tiny_lm_dir):
    q = LLM.load(tiny_lm_dir, dtype="float64").quantize("int8")
    e = q.explain(PROMPT, target=11, method="cp-lrp")
    with torch.no_grad():
        logit = q.model(torch.tensor([PROMPT]))[0, -1, 11].item()
    assert e.target_logit == pytest.approx(logit, rel=1e-6)  # the forward the rules see is the model's
    assert e.relevance.double().sum().item() == pytest.approx(e.target_logit, rel=1e-4)


@pytest.fixture(scope="module")
def real():
    return LLM.load(), LLM.load(dtype="bfloat16").quantize("int8"), LLM.load(dtype="bfloat16")


PROMPTS = ["The capital of France is", "Water boils at", "def fibonacci(n):"]


def _first_divergence(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


@pytest.mark.parametrize("which", ["int8", "bfloat16"])
def test_int8_and_bf16_greedy_text_on_real_prompts(real, which, capsys):
    base, int8, bf16 = real
    other = int8 if which == "int8" else bf16
    for prompt in PROMPTS:
        ref = base.tokenizer.encode(base.generate(prompt, max_new_tokens=12), add_special_tokens=False)
        got = other.tokenizer.encode(other.generate(prompt, max_new_tokens=12), add_special_tokens=False)
        first = _first_divergence(ref, got)
        with capsys.disabled():
            print(f"\n{which} vs float32 on {prompt!r}: " + ("same 12 tokens" if first is None else
                                                             f"first divergence at token {first}"))
        assert first is None or first >= 4  # the opening tokens of a greedy answer hold


def test_int8_perplexity_within_one_percent_of_float32(real):
    base, int8, _ = real
    text = open("/usr/share/common-licenses/GPL-3").read()[:3000]
    p32, p8 = base.perplexity(text).perplexity, int8.perplexity(text).perplexity
    assert abs(p8 - p32) / p32 < 0.01, (p32, p8)


def test_packed_prefill_equals_the_padded_one():
    """Batched generation prefills prompts packed into one sequence; the cache and logits it
    leaves equal a padded prefill's."""
    from lucidlm.generate import left_pad, prefill_packed

    torch.manual_seed(0)
    model = GPT(Config.from_name("tiny-llama")).eval().double()
    prompts = [PROMPT[:3], PROMPT, PROMPT[4:11]]
    with torch.no_grad():
        packed, logits = prefill_packed(model, prompts, 32, dtype=torch.float64)
        ids, pos = left_pad(prompts)
        padded = build_cache(model.config, 3, "dense", 32, dtype=torch.float64)
        expected = prefill(model, ids, padded, positions=pos)
    torch.testing.assert_close(logits, expected)
    for a, b in zip(packed.layers, padded.layers):
        assert a.filled == b.filled and torch.equal(a.pos, b.pos)
        torch.testing.assert_close(a.k, b.k)
        torch.testing.assert_close(a.v, b.v)
    assert packed.next_position.tolist() == [3, len(PROMPT), 7]


def test_loading_a_bf16_checkpoint_as_bf16_makes_no_float32_copy(tmp_path):
    """Peak memory of the load stays near the checkpoint's size (each tensor goes to its dtype
    once and becomes the parameter): before, a float32 model was filled and then cast."""
    import subprocess
    import sys

    import transformers as T

    config = T.LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                           num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False)
    T.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path)
    size_mb = sum(f.stat().st_size for f in tmp_path.glob("*.safetensors")) / 2 ** 20
    # the peak resident size of the load alone: "5" in clear_refs resets the high-water mark (an
    # import's transient would otherwise hide the load's own peak)
    script = ("import torch, lucidlm; from lucidlm.checkpoints.hf import load_hf_dir\n"
              "def kb(field):\n"
              "    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(field))\n"
              "before = kb('VmRSS:'); open('/proc/self/clear_refs', 'w').write('5')\n"
              f"m = load_hf_dir({str(tmp_path)!r}, dtype=torch.bfloat16)\n"
              "assert all(p.dtype == torch.bfloat16 and p.requires_grad for p in m.parameters())\n"
              "print((kb('VmHWM:') - before) / 1024)")
    grown = float(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout)
    assert grown < 1.6 * size_mb, f"loading {size_mb:.0f} MB of bf16 weights grew the peak RSS by {grown:.0f} MB"
