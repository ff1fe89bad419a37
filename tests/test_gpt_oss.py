"""gpt-oss against transformers (the oracle): the sink softmax in both attention kernels, logits,
greedy tokens through every KV-cache policy (across the sliding window), the clamped SwiGLU's LRP
rule, and the catalogue's published config.

The tiny config is ``tests/families.py``'s "gpt-oss" (so the shared parity, check and explanation
tests cover it too): head size 24, a window of 4 on layers 0 and 2, YaRN, 4 experts top-2, and a
SwiGLU limit small enough that random weights are clamped on both sides.
"""

import copy
import json
import types

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers.integrations.mxfp4 import convert_moe_packed_tensors
from transformers.models.gpt_oss import modeling_gpt_oss

import lucidlm
from lucidlm import Config
from lucidlm.cache import POLICIES
from lucidlm.checkpoints.mxfp4 import dequantize_mxfp4
from lucidlm.errors import CheckpointError
from lucidlm.generate import generate_ids
from lucidlm.model import rules
from lucidlm.model.attention import CausalSelfAttention, recording_weights
from lucidlm.model.kernels import explicit_attention, position_mask
from lucidlm.model.mlp import clamped_swiglu

TOL = dict(atol=1e-5, rtol=1e-5)


def _ids(vocab: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, vocab, (2, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def pair(hf_checkpoint):
    hf_model, directory = hf_checkpoint("gpt-oss")
    return hf_model, lucidlm.LLM.load(directory)


# ---- the sink softmax -----------------------------------------------------------------------
def _qkv_sinks(seed: int = 0, queries: int = 9, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, queries, 24, generator=g, dtype=dtype)
    k, v = (torch.randn(2, 2, queries, 24, generator=g, dtype=dtype) for _ in range(2))
    sinks = torch.randn(4, generator=g, dtype=dtype) * 2
    return q, k, v, sinks


def _transformers_attention(q, k, v, mask, sinks, scale):
    """transformers' own gpt-oss eager attention (the oracle), on our bool mask."""
    module = types.SimpleNamespace(num_key_value_groups=q.shape[1] // k.shape[1], sinks=sinks, training=False)
    additive = torch.zeros(mask.shape, dtype=q.dtype).masked_fill(~mask, torch.finfo(q.dtype).min)
    out, weights = modeling_gpt_oss.eager_attention_forward(module, q, k, v, additive, scaling=scale)
    return out.transpose(1, 2), weights


@pytest.mark.parametrize("window", [None, 3])
def test_both_kernels_equal_transformers_sink_softmax(window):
    q, k, v, sinks = _qkv_sinks()
    pos = torch.arange(q.shape[2])[None].expand(2, -1)
    mask = position_mask(pos, pos, window)
    scale = 24 ** -0.5
    expected, expected_weights = _transformers_attention(q, k, v, mask, sinks, scale)
    out, weights = explicit_attention(q, k, v, mask, scale, sinks=sinks)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(weights.flatten(1, 2), expected_weights)
    assert (weights.sum(-1) < 1).all()  # the sink took some mass in every row
    config = Config(n_layer=1, n_embd=96, n_head=4, n_query_groups=2, head_size=24, vocab_size=8,
                    attn_sinks=True, sliding_window=window)
    attention = CausalSelfAttention(config, 0).double()
    with torch.no_grad():
        attention.sinks.copy_(sinks)
    fused = attention._fused(q, k, v, pos, pos, causal_prefill=True)
    torch.testing.assert_close(fused, expected)


@pytest.mark.parametrize("method", [None, "attnlrp", "cp-lrp"])
def test_kernels_have_equal_gradients(method):
    """Training (method None) and both LRP methods see the same backward through either kernel,
    the sink logits included; CP-LRP treats the whole sink softmax as a constant."""
    config = Config(n_layer=1, n_embd=96, n_head=4, n_query_groups=2, head_size=24, vocab_size=8, attn_sinks=True)
    attention = CausalSelfAttention(config, 0).double()
    with torch.no_grad():
        attention.sinks.normal_()
    grads = []
    for explicit in (False, True):
        q, k, v, _ = (t.requires_grad_() if t.dim() > 1 else t for t in _qkv_sinks(seed=3, queries=12))
        pos = torch.arange(12)[None].expand(2, -1)
        attention.sinks.grad = None
        with rules.explaining(method) if method else torch.enable_grad(), \
                recording_weights() if explicit else torch.enable_grad():
            out, _ = attention.attend(q, k, v, pos, pos, causal_prefill=True)
            out.pow(2).sum().backward()
        grads.append([torch.zeros_like(t) if t.grad is None else t.grad for t in (q, k, v, attention.sinks)])
    for fused, explicit in zip(*grads):
        torch.testing.assert_close(fused, explicit)
    if method == "cp-lrp":
        assert not grads[0][3].any() and not grads[0][0].any()  # q, k and the sinks reach out only through A
    else:
        assert grads[0][3].abs().sum() > 0


# ---- the model against transformers ----------------------------------------------------------
@pytest.mark.parametrize("length", [5, 11, 21])  # decode-sized (explicit kernel), fused, past YaRN's 16
def test_logits_equal_transformers_with_either_kernel(pair, length):
    hf_model, llm = pair
    ids = _ids(llm.config.vocab_size, length)
    with torch.no_grad():
        expected = hf_model(ids).logits
        torch.testing.assert_close(llm.model(ids), expected, atol=1e-4, rtol=1e-4)
        with recording_weights():  # forces the explicit kernel at every length
            torch.testing.assert_close(llm.model(ids), expected, atol=1e-4, rtol=1e-4)


def test_config_reads_what_transformers_builds(pair):
    hf_model, llm = pair
    c, hf = llm.config, hf_model.config
    assert (c.mlp, c.attn_sinks, c.attn_bias, c.attn_out_bias) == ("clamped_moe", True, True, True)
    assert [c.is_sliding(i) for i in range(c.n_layer)] == [t == "sliding_attention" for t in hf.layer_types]
    assert (c.n_expert, c.n_expert_per_token, c.swiglu_limit, c.swiglu_alpha) == (4, 2, hf.swiglu_limit, 1.702)
    assert c.rope_scaling["rope_type"] == "yarn" and c.rope_theta == 150000.0


def _hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    # no end-of-text token: generate_ids has no stop ids here, and min_new_tokens would instead
    # suppress the token's logit, which changes the argmax
    config = copy.deepcopy(model.generation_config)
    config.update(max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    saved, model.generation_config = model.generation_config, config
    try:
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    finally:
        model.generation_config = saved
    return out[0, len(prompt):].tolist()


_EXACT = [p for p in POLICIES if "int" not in p]  # quantised buffers round the keys: not exact


@pytest.mark.parametrize("policy", _EXACT)
def test_greedy_tokens_through_every_cache_equal_transformers_generate(pair, policy):
    """18 new tokens after 6: far past the window of 4 (the sliding layers' cache drops keys, the
    full layer keeps them) and past YaRN's original 16 positions; every policy with room for all."""
    hf_model, llm = pair
    prompt = _ids(llm.config.vocab_size, 6, seed=5)[0].tolist()
    expected = _hf_greedy(hf_model, prompt, 18)
    got = [step[0] for step in generate_ids(llm.model, [prompt], 18, kv_cache=policy, cache_tokens=64)]
    assert got == expected


@pytest.mark.parametrize("policy", [p for p in POLICIES if not p.startswith(("dense", "int"))])
def test_every_policy_evicting_runs(pair, policy):
    """With 8 slots per layer the policies evict, quantise, or both; the sinks are per head and never
    evicted, so decoding keeps going with finite logits."""
    _, llm = pair
    prompts = [_ids(llm.config.vocab_size, 12, seed=6)[0].tolist(), [5, 6, 7]]
    steps = list(generate_ids(llm.model, prompts, 10, kv_cache=policy, cache_tokens=8))
    assert len(steps) == 10 and all(0 <= t < llm.config.vocab_size for step in steps for t in step)


# ---- MXFP4 experts (the published checkpoints) ----------------------------------------------
def _mxfp4(shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random MXFP4 blocks and scales for an (experts, rows, cols) matrix (every nibble code, small
    exponents so the weights stay near the trained range)."""
    g = torch.Generator().manual_seed(seed)
    experts, rows, cols = shape
    blocks = torch.randint(0, 256, (experts, rows, cols // 32, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(118, 123, (experts, rows, cols // 32), generator=g, dtype=torch.uint8)
    return blocks, scales


def test_dequantize_equals_transformers():
    blocks, scales = _mxfp4((3, 8, 64), seed=0)
    expected = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
    got = dequantize_mxfp4({"x.down_proj_blocks": blocks, "x.down_proj_scales": scales}, torch.float32)
    assert torch.equal(got["x.down_proj"], expected)


def test_mxfp4_checkpoint_loads_dequantized(hf_checkpoint, tmp_path):
    """A checkpoint with MXFP4 experts (as openai/gpt-oss-20b ships them) loads; its logits equal
    transformers' model holding the experts transformers' dequantizer makes of the same bytes."""
    hf_model, directory = hf_checkpoint("gpt-oss")
    hf_model = copy.deepcopy(hf_model)
    state = load_file(directory / "model.safetensors")
    c = hf_model.config
    for i, layer in enumerate(hf_model.model.layers):
        for j, (name, rows, cols) in enumerate((("gate_up_proj", 2 * c.intermediate_size, c.hidden_size),
                                                ("down_proj", c.hidden_size, c.intermediate_size))):
            blocks, scales = _mxfp4((c.num_local_experts, rows, cols), seed=10 * i + j)
            with torch.no_grad():
                getattr(layer.mlp.experts, name).copy_(convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
            key = f"model.layers.{i}.mlp.experts.{name}"
            del state[key]
            state[key + "_blocks"], state[key + "_scales"] = blocks, scales
    save_file(state, tmp_path / "model.safetensors")
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    ids = _ids(c.vocab_size, 11)
    with torch.no_grad():
        torch.testing.assert_close(lucidlm.LLM.load(tmp_path).model(ids), hf_model(ids).logits, atol=1e-4, rtol=1e-4)


def test_mxfp4_blocks_without_scales_are_named():
    blocks, _ = _mxfp4((1, 2, 32), seed=0)
    with pytest.raises(CheckpointError, match="down_proj_blocks.*down_proj_scales"):
        dequantize_mxfp4({"x.down_proj_blocks": blocks})


# ---- LRP ------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["attnlrp", "cp-lrp"])
def test_clamped_swiglu_rule_conserves(method):
    """Identity rule on the clamps (and the + 1), uniform rule on the product (AttnLRP) or a constant
    gate (CP-LRP): the relevance of gate and up together is the output's, exactly."""
    g = torch.Generator().manual_seed(0)
    gate, up = (torch.randn(64, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2))
    with rules.explaining(method):
        out = clamped_swiglu(gate, up, alpha=1.702, limit=0.7)
    out.sum().backward()
    relevance_in = sum((t * t.grad).sum() for t in (gate, up) if t.grad is not None)
    torch.testing.assert_close(relevance_in, out.detach().sum())
    assert ((gate.detach() > 0.7) | (up.detach().abs() > 0.7)).any()  # the clamps were in play
    if method == "cp-lrp":
        assert gate.grad is None


def test_explain_check_passes_and_both_methods_explain(pair):
    _, llm = pair
    report = lucidlm.explain.check(llm.model)
    assert report.ok, str(report)
    for method in ("attnlrp", "cp-lrp"):
        explanation = llm.explain([4, 9, 17, 33, 50, 61, 70], target=7, method=method)
        assert torch.isfinite(explanation.relevance).all()


def test_litgpt_adapter_export_names_what_litgpt_lacks(pair):
    from lucidlm.train.adapter_files import litgpt_config

    _, llm = pair
    missing = litgpt_config(llm.config)[1]
    assert "attn_sinks" in missing and any("clamped_moe" in m for m in missing)
