"""The native decoder (lucidlm.model.native, lucidlm.compiled.NativeDecoder): one C++ call per decode step.

Oracles: ``transformers``' own forward over the whole sequence (tiny random checkpoints of the Llama
family), and, for GGUF blocks, the float model ``LLM.load(file)`` dequantised by ``gguf.quants`` (llama.cpp's
Python dequantiser); the eager step for settings whose eager path is proven against transformers elsewhere
(tests/test_rope_scaling.py). Every native test also proves the op ran: the model's Python forward raises.
"""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch

import lucidlm
from lucidlm import GPT, Config
from lucidlm.cache import build_cache
from lucidlm.cli import main
from lucidlm.compiled import NativeDecoder
from lucidlm.errors import ConfigError
from lucidlm.generate import generate_ids
from lucidlm.kernels.build import kernel_ready
from lucidlm.model import native
from lucidlm.model.quant import quantize_linears
from test_gguf import _write_tiny
from test_keep_quantized import requantized

pytestmark = pytest.mark.skipif(not kernel_ready(), reason="lucidlm's CPU kernels need a C++ compiler (g++), none")

TOL = dict(rtol=1e-4, atol=1e-4)


@contextlib.contextmanager
def no_python_forward(model):
    """The model's Python forward raises inside the block: decode steps must run in the native op."""
    def refuse(*args, **kwargs):
        raise AssertionError("the decode step ran the Python forward, not the native op")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(model, "forward", refuse)
        yield


def native_logits(model, ids: torch.Tensor, prompt: int) -> torch.Tensor:
    """Logits (batch, steps, vocab) of the native steps over ids[:, prompt:], after an eager prefill."""
    decoder = NativeDecoder(model)
    with torch.inference_mode():
        cache = build_cache(model.config, ids.shape[0], "dense", ids.shape[1] + 4)
        model(ids[:, :prompt], cache=cache)
        assert decoder.prepare(cache), decoder.reason
        out = []
        with no_python_forward(model):
            for t in range(prompt, ids.shape[1]):
                positions = torch.full((ids.shape[0], 1), t)
                out.append(decoder(ids[:, t:t + 1], positions, cache))
    return torch.stack(out, dim=1)


def eager_logits(model, ids: torch.Tensor, prompt: int) -> torch.Tensor:
    with torch.inference_mode():
        cache = build_cache(model.config, ids.shape[0], "dense", ids.shape[1] + 4)
        model(ids[:, :prompt], cache=cache)
        return torch.cat([model(ids[:, t:t + 1], cache=cache) for t in range(prompt, ids.shape[1])], dim=1)


def _ids(vocab: int, batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- against transformers
@pytest.mark.parametrize("family", ["llama2", "llama3", "smollm2", "qwen2"])
def test_native_steps_equal_transformers_forward(family, hf_checkpoint):
    """MHA (llama2, untied), Llama-3 RoPE scaling, GQA 4:1 (smollm2, tied), q/k/v biases (qwen2)."""
    hf_model, directory = hf_checkpoint(family)
    model = lucidlm.LLM.load(directory).model.eval()
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        expected = hf_model(ids).logits[:, 5:]
    torch.testing.assert_close(native_logits(model, ids, 5), expected, **TOL)


@pytest.mark.parametrize("family", ["mistral", "gemma", "phi2", "gpt2", "olmo"])
def test_other_families_decode_eagerly_with_the_same_tokens(family, hf_checkpoint):
    """Sliding window, unit-offset norms and GELU, LayerNorm and parallel residual, learned positions, clip_qkv."""
    model = lucidlm.LLM.load(hf_checkpoint(family)[1]).model.eval()
    assert native.plan(model).reason
    decoder = NativeDecoder(model)
    prompts = [[5, 9, 2, 7, 11], [8, 3]]
    ours = list(generate_ids(model, prompts, max_new_tokens=6, decoder=decoder))
    assert decoder.reason == native.plan(model).reason
    assert ours == list(generate_ids(model, prompts, max_new_tokens=6))


# ---------------------------------------------------------------- RoPE variants, int8, tying (the eager step)
def _tiny(**changes) -> GPT:
    torch.manual_seed(0)
    return GPT(dataclasses.replace(Config.from_name("tiny-llama"), **changes)).eval()


ROPES = {
    "linear": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "yarn": dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8}),
    "longrope": dict(rope_scaling={"rope_type": "longrope", "original_max_position_embeddings": 8, "factor": 2.0,
                                   "short_factor": [1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5],
                                   "long_factor": [2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]}),
    "partial": dict(rotary_fraction=0.5),
    "interleaved": dict(rope_interleaved=True, rotary_fraction=0.75),
    "tied": dict(tie_embeddings=True),
    "biases": dict(attn_bias=True, attn_out_bias=True, mlp_bias=True),
    "mha": dict(n_query_groups=4),
    "mqa": dict(n_query_groups=1),
}


@pytest.mark.parametrize("variant", sorted(ROPES))
def test_native_steps_equal_eager_steps(variant):
    model = _tiny(**ROPES[variant])
    if variant == "biases":  # nn.Linear's biases start at random values; the norms' weights too
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
    ids = _ids(model.config.vocab_size, length=14)  # past longrope's original length: its long factors
    torch.testing.assert_close(native_logits(model, ids, 4), eager_logits(model, ids, 4), **TOL)


@pytest.mark.parametrize("lm_head", [False, True], ids=["float-head", "int8-head"])
def test_int8_weights(lm_head):
    model = _tiny()
    quantize_linears(model, lm_head=lm_head)
    ids = _ids(model.config.vocab_size)
    torch.testing.assert_close(native_logits(model, ids, 5), eager_logits(model, ids, 5), **TOL)


@pytest.mark.parametrize("portable", [False, True], ids=["avx512", "portable"])
def test_int8_odd_widths_and_the_portable_kernels(portable, monkeypatch):
    """k = 48 and 72 (not multiples of 32): per-channel int8 takes the any-block-size path; the portable
    C++ path (forced) takes every product on CPUs without AVX-512."""
    if portable:
        monkeypatch.setenv("LUCIDLM_KERNEL_PORTABLE", "1")
        assert torch.ops.lucidlm_kernels.q8_path() == "portable"
    model = _tiny(n_embd=48, intermediate_size=72)
    quantize_linears(model, lm_head=True)
    ids = _ids(model.config.vocab_size)
    torch.testing.assert_close(native_logits(model, ids, 5), eager_logits(model, ids, 5), **TOL)


# ---------------------------------------------------------------- GGUF blocks kept as they are
@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    root = tmp_path_factory.mktemp("native-gguf")
    sources = {False: _write_tiny(root / "untied.gguf"), True: _write_tiny(root / "tied.gguf", untied=False)}

    def make(kind: str, tied: bool) -> tuple:
        target = root / f"{tied}-{kind}.gguf"
        path = target if target.is_file() else requantized(sources[tied], target, kind)
        return (lucidlm.LLM.load(path, keep_quantized=True, cache_dir=root / "cache"),
                lucidlm.LLM.load(path, cache_dir=root / "cache"))

    return make


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_1"])
def test_kept_blocks_equal_the_dequantised_model(tiny_gguf, kind, tied, monkeypatch):
    kept, dense = tiny_gguf(kind, tied)
    if tied:  # the portable path on these blocks too (CPUs without AVX-512)
        monkeypatch.setenv("LUCIDLM_KERNEL_PORTABLE", "1")
    ids = _ids(kept.config.vocab_size)
    with torch.no_grad():
        expected = dense.model(ids)[:, 5:]
    # 4-bit: the kernel adds Q4's offset as Σ offset·Σx per block, in float32 (rounding of a difference)
    tolerance = TOL if kind == "Q8_0" else dict(rtol=1e-3, atol=1e-3)
    eager = eager_logits(kept.model, ids, 5)
    torch.testing.assert_close(eager, expected, **tolerance)  # the eager steps' own rounding: the same bound
    torch.testing.assert_close(native_logits(kept.model, ids, 5), expected, **tolerance)
    prompt = "he th"
    assert kept.compile(backend="native").generate(prompt, max_new_tokens=8) == dense.generate(prompt, max_new_tokens=8)


def test_cli_native_flag_generates_the_eager_text(tiny_gguf, capsys):
    kept, _ = tiny_gguf("Q8_0", True)
    args = ["generate", "he th", "--model", str(kept.source), "--keep-quantized", "--max-new-tokens", "6"]
    assert main(args) == 0
    eager = capsys.readouterr().out
    assert main([*args, "--native"]) == 0
    assert capsys.readouterr().out == eager


# ---------------------------------------------------------------- generation, fallbacks
def test_left_padded_batch_generates_the_eager_tokens():
    model = _tiny()
    prompts = [[5, 9, 2, 7, 11, 40, 41], [8, 3], [100, 101, 102]]
    decoder = NativeDecoder(model)
    ours = list(generate_ids(model, prompts, max_new_tokens=10, decoder=decoder))
    assert decoder.reason == ""
    assert ours == list(generate_ids(model, prompts, max_new_tokens=10))


def test_changed_weights_are_planned_again():
    model = _tiny()
    decoder = NativeDecoder(model)
    list(generate_ids(model, [[5, 9, 2]], max_new_tokens=3, decoder=decoder))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-1.5)  # in place: the plan holds the same tensors, but the fingerprint changes
    ours = list(generate_ids(model, [[5, 9, 2]], max_new_tokens=6, decoder=decoder))
    assert ours == list(generate_ids(model, [[5, 9, 2]], max_new_tokens=6))


@pytest.mark.parametrize("case", ["bfloat16", "hooks"])
def test_unsupported_settings_decode_eagerly(case):
    model = _tiny()
    if case == "bfloat16":
        model.to(torch.bfloat16)
    else:
        model.layers[0].mlp.register_forward_hook(lambda module, args, out: out * 2)
    decoder = NativeDecoder(model)
    ours = list(generate_ids(model, [[5, 9, 2, 7]], max_new_tokens=12, decoder=decoder))
    assert ours == list(generate_ids(model, [[5, 9, 2, 7]], max_new_tokens=12))
    assert decoder.reason == native.plan(model).reason != ""


@pytest.mark.parametrize("policy", ["window", "dense+int8"])
def test_other_caches_decode_eagerly(policy):
    model = _tiny()
    decoder = NativeDecoder(model)
    with torch.inference_mode():
        caches = [build_cache(model.config, 1, policy, 16) for _ in range(2)]
        for cache in caches:
            model(torch.tensor([[5, 9, 2, 7]]), cache=cache)
        assert not decoder.prepare(caches[0]) and "cache" in decoder.reason
        token, positions = torch.tensor([[11]]), torch.tensor([[4]])
        ours = decoder(token, positions, caches[0])
        torch.testing.assert_close(ours, model(token, positions=positions, cache=caches[1])[:, -1], rtol=0, atol=0)


def test_without_the_kernels_it_decodes_eagerly(monkeypatch):
    """No C++ compiler (or LUCIDLM_KERNELS=0): the plan says so and the steps are the eager ones."""
    monkeypatch.setattr(native, "kernel_ready", lambda: False)
    model = _tiny()
    decoder = NativeDecoder(model)
    ours = list(generate_ids(model, [[5, 9, 2, 7]], max_new_tokens=8, decoder=decoder))
    assert decoder.reason == "lucidlm's CPU kernels are unavailable"
    assert ours == list(generate_ids(model, [[5, 9, 2, 7]], max_new_tokens=8))


def test_compile_refuses_an_unknown_backend():
    llm = lucidlm.LLM(_tiny())
    with pytest.raises(ConfigError, match="backend='tvm'"):
        llm.compile(backend="tvm")


# ---------------------------------------------------------------- the embedded model
@pytest.mark.slow
def test_embedded_model_greedy_text_is_the_eager_text(smollm2):
    prompt = "The capital of France is"
    eager = smollm2.generate(prompt, max_new_tokens=24)
    fast = lucidlm.LLM(smollm2.model, smollm2.tokenizer).compile(backend="native")
    assert fast.generate(prompt, max_new_tokens=24) == eager
    assert fast._decoder.reason == ""


@pytest.mark.slow
def test_embedded_q4_1_blocks_greedy_text_is_the_eager_text():
    kept = lucidlm.LLM.load(keep_quantized=True)
    prompt = "Gravity is"
    eager = kept.generate(prompt, max_new_tokens=24)
    assert kept.compile(backend="native").generate(prompt, max_new_tokens=24) == eager
    assert kept._decoder.reason == ""
