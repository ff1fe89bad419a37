"""lucidlm's quantised-weight kernels (lucidlm/kernels/qgemv.cpp: q8_gemv, q4_gemv) and their entry points
(lucidlm.model.qlinear): the dequantisers equal gguf's reference ``gguf.quants.dequantize`` on blocks made by
``gguf.quants.quantize``; the kernels equal F.linear on those weights (odd shapes, every block type, float32
and bfloat16 activations) and really run; the fallbacks warn; bad input is refused by name."""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from lucidlm.errors import ConfigError
from lucidlm.kernels import build
from lucidlm.model import qlinear, quant
from lucidlm.model.qlinear import KernelUnavailable, dequantize_q4, dequantize_q8, q4_linear, q8_linear

gguf = pytest.importorskip("gguf", reason="the gguf package (the reference quantiser) is not installed")
Q = gguf.GGMLQuantizationType
BLOCK_BYTES = {Q.Q8_0: 34, Q.Q4_0: 18, Q.Q4_1: 20}

needs_kernel = pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")),
                                  reason="no C++ compiler (g++) to build the kernel")


def gguf_blocks(weight: np.ndarray, kind):
    """(qs, scales, mins) in lucidlm's storage from gguf's own quantiser, and gguf's dequantised weight."""
    raw = gguf.quants.quantize(weight, kind)
    reference = torch.from_numpy(gguf.quants.dequantize(raw, kind).reshape(weight.shape))
    blocks = torch.from_numpy(raw.reshape(weight.shape[0], -1, BLOCK_BYTES[kind]))
    half = lambda cols: blocks[..., cols].contiguous().view(torch.float16)[..., 0]  # noqa: E731
    if kind == Q.Q8_0:
        return (blocks[..., 2:].contiguous().view(torch.int8).flatten(1), half(slice(0, 2)), None), reference
    if kind == Q.Q4_1:
        return (blocks[..., 4:].flatten(1).contiguous(), half(slice(0, 2)), half(slice(2, 4))), reference
    return (blocks[..., 2:].flatten(1).contiguous(), half(slice(0, 2)), None), reference


def product(kind, x, stored, bias):
    qs, scales, mins = stored
    return q8_linear(x, qs, scales, bias) if kind == Q.Q8_0 else q4_linear(x, qs, scales, mins, bias)


@pytest.fixture
def no_f_linear(monkeypatch):
    """F.linear raises (torch's own, which qlinear and quant call): a product that still succeeds ran in the kernel."""
    def refuse(*args, **kwargs):
        raise AssertionError("F.linear called")
    monkeypatch.setattr(qlinear.F, "linear", refuse)
    monkeypatch.setattr(quant.F, "linear", refuse)


@pytest.fixture
def kernel_env(monkeypatch):
    """The default path: no VNNI, no forced portable path."""
    monkeypatch.delenv(qlinear.VNNI_VAR, raising=False)
    monkeypatch.delenv("LUCIDLM_KERNEL_PORTABLE", raising=False)


def assert_matches(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Equal to the float64 product on the dequantised weight: float32 summation tolerance, or one
    bfloat16 rounding of the result for bfloat16 activations."""
    exact = x.double() @ weight.double().T + (0 if bias is None else bias.double())  # not F.linear: it may raise
    assert out.dtype == x.dtype and out.shape == exact.shape
    if x.dtype == torch.bfloat16:
        torch.testing.assert_close(out.double(), exact, rtol=2 ** -7, atol=1e-2)
    else:
        torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kind", [Q.Q8_0, Q.Q4_0, Q.Q4_1], ids=lambda k: k.name)
@pytest.mark.parametrize("n,k", [(5, 32), (37, 96), (100, 224)])
def test_dequantisers_equal_gguf(kind, n, k):
    weight = np.random.default_rng(n).standard_normal((n, k)).astype(np.float32)
    (qs, scales, mins), reference = gguf_blocks(weight, kind)
    ours = dequantize_q8(qs, scales) if kind == Q.Q8_0 else dequantize_q4(qs, scales, mins)
    assert torch.equal(ours, reference)


@needs_kernel
@pytest.mark.parametrize("kind", [Q.Q8_0, Q.Q4_0, Q.Q4_1], ids=lambda k: k.name)
@pytest.mark.parametrize("n,k", [(37, 96), (1, 32), (100, 224), (17, 576)])
@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_block_kernels_equal_the_dequantised_f_linear(kind, n, k, m, dtype, no_f_linear, kernel_env):
    rng = np.random.default_rng(n * k + m)
    (stored, reference) = gguf_blocks(rng.standard_normal((n, k)).astype(np.float32), kind)
    x = torch.from_numpy(rng.standard_normal((m, k)).astype(np.float32)).to(dtype)
    bias = torch.randn(n) if m % 2 else None
    with torch.no_grad():
        out = product(kind, x, stored, bias)  # F.linear raises: this ran in the kernel
    assert_matches(out, x, reference, bias)


@needs_kernel
@pytest.mark.parametrize("k", [37, 576, 96, 1536])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_per_channel_int8_kernel_equals_the_dequantised_f_linear(k, scale_dtype, dtype, no_f_linear, kernel_env):
    torch.manual_seed(k)
    layer = torch.nn.Linear(k, 19)
    int8 = quant.Int8Linear.quantize(layer)  # Int8Linear's storage: one scale per channel (B = k)
    scales = int8.scale.to(scale_dtype)[:, None]
    x = torch.randn(3, k).to(dtype)
    with torch.no_grad():
        out = q8_linear(x, int8.qweight, scales, layer.bias)
    assert_matches(out, x, dequantize_q8(int8.qweight, scales), layer.bias)


@needs_kernel
def test_one_row_runs_in_the_kernel_eagerly_and_compiled(no_f_linear, kernel_env):
    (qs, scales, _), reference = gguf_blocks(np.random.default_rng(0).standard_normal((48, 64)).astype(np.float32),
                                             Q.Q8_0)
    x = torch.randn(1, 64)
    with torch.no_grad():
        assert_matches(q8_linear(x[0], qs, scales)[None], x, reference, None)  # an unbatched row too
        compiled = torch.compile(lambda row: q8_linear(row, qs, scales), backend="eager", fullgraph=True)
        assert_matches(compiled(x), x, reference, None)  # fullgraph: the op is in the graph, no break


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_int8_linear_decodes_in_the_kernel(dtype, no_f_linear, kernel_env):
    torch.manual_seed(0)
    layer = quant.Int8Linear.quantize(torch.nn.Linear(64, 24).to(dtype))
    x = torch.randn(1, 1, 64).to(dtype)
    with torch.no_grad():
        out = layer(x)
    assert_matches(out[0], x[0], layer.weight.float(), layer.bias.float())


def test_prompts_and_gradients_use_f_linear_on_the_dequantised_weight():
    torch.manual_seed(0)
    layer = quant.Int8Linear.quantize(torch.nn.Linear(64, 24))
    x = torch.randn(2, 9, 64)
    with torch.no_grad():
        assert_matches(layer(x).reshape(-1, 24), x.reshape(-1, 64), layer.weight, layer.bias)  # a prompt
    grad_x = x.requires_grad_()
    F.linear(grad_x, layer.weight, layer.bias).sum().backward()
    expected, grad_x.grad = grad_x.grad, None
    layer(grad_x).sum().backward()
    torch.testing.assert_close(grad_x.grad, expected)


@needs_kernel
@pytest.mark.parametrize("kind", [Q.Q8_0, Q.Q4_0, Q.Q4_1], ids=lambda k: k.name)
def test_portable_path_equals_the_avx512_path(kind, monkeypatch, kernel_env):
    (stored, _) = gguf_blocks(np.random.default_rng(1).standard_normal((33, 160)).astype(np.float32), kind)
    x = torch.randn(2, 160)
    with torch.no_grad():
        wide = product(kind, x, stored, None)
        monkeypatch.setenv("LUCIDLM_KERNEL_PORTABLE", "1")  # what a CPU without AVX-512 runs
        assert torch.ops.lucidlm_kernels.q8_path() == "portable"
        portable = product(kind, x, stored, None)
    torch.testing.assert_close(portable, wide, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_vnni_path_is_the_int8_activation_dot(monkeypatch, kernel_env):
    """LUCIDLM_VNNI=1 quantises x per 32-block (llama.cpp's Q8_0 dot): it equals that product exactly (up to
    float32 sums) and the float path up to x's quantisation error."""
    (stored, reference) = gguf_blocks(np.random.default_rng(2).standard_normal((40, 192)).astype(np.float32), Q.Q8_0)
    x = torch.randn(3, 192)
    monkeypatch.setenv(qlinear.VNNI_VAR, "1")
    if torch.ops.lucidlm_kernels.q8_path() != "vnni":
        pytest.skip("this CPU has no AVX-512 VNNI")
    with torch.no_grad():
        vnni = q8_linear(x, *stored[:2])
    blocks = x.unflatten(1, (-1, 32))
    dx = blocks.abs().amax(-1, keepdim=True) / 127
    x_int8 = (torch.round(blocks / dx) * dx).flatten(1)  # what the VNNI dot multiplies
    torch.testing.assert_close(vnni.double(), x_int8.double() @ reference.double().T, rtol=1e-5, atol=1e-4)
    assert not torch.allclose(vnni, x @ reference.T, atol=1e-5)  # it really took the int8-activation path


@needs_kernel
def test_vnni_asked_on_a_cpu_without_it_warns(monkeypatch):
    monkeypatch.setenv(qlinear.VNNI_VAR, "1")
    monkeypatch.setenv("LUCIDLM_KERNEL_PORTABLE", "1")  # a CPU without AVX-512 (so without VNNI)
    with pytest.warns(KernelUnavailable, match="no AVX-512 VNNI"):
        assert qlinear.check_kernel() == "portable"


def test_no_compiler_falls_back_with_a_warning(monkeypatch, tmp_path, no_f_linear):
    monkeypatch.setenv("LUCIDLM_CACHE", str(tmp_path))  # nothing built there
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.delenv(build.ENV_VAR, raising=False)
    monkeypatch.setattr(build.shutil, "which", lambda name: None)
    monkeypatch.setattr(build, "_KERNEL", build._Kernel())
    with pytest.warns(KernelUnavailable, match=r"no C\+\+ compiler"):
        assert qlinear.check_kernel() is None
    with torch.no_grad(), pytest.raises(AssertionError, match="F.linear called"):  # the fallback is F.linear
        q8_linear(torch.randn(1, 32), torch.ones(4, 32, dtype=torch.int8), torch.ones(4, 1))


def test_kernels_off_by_the_environment_run_f_linear_silently(monkeypatch):
    monkeypatch.setenv(build.ENV_VAR, "0")
    monkeypatch.setattr(build, "_KERNEL", build._Kernel())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert qlinear.check_kernel() is None
        (stored, reference) = gguf_blocks(np.random.default_rng(3).standard_normal((8, 64)).astype(np.float32),
                                          Q.Q4_1)
        x = torch.randn(1, 64)
        with torch.no_grad():
            assert_matches(q4_linear(x, *stored), x, reference, None)


@pytest.mark.parametrize("call,match", [
    (lambda: q8_linear(torch.randn(1, 64), torch.ones(4, 64), torch.ones(4, 2)), "qs must be int8"),
    (lambda: q8_linear(torch.randn(1, 64), torch.ones(4, 64, dtype=torch.int8), torch.ones(4, 3)), "scales"),
    (lambda: q8_linear(torch.randn(1, 64), torch.ones(4, 64, dtype=torch.int8),
                       torch.ones(4, 2, dtype=torch.float64)), "float64"),
    (lambda: q8_linear(torch.randn(1, 63), torch.ones(4, 64, dtype=torch.int8), torch.ones(4, 2)), r"\(\.\.\., 64\)"),
    (lambda: q4_linear(torch.randn(1, 48), torch.ones(4, 24, dtype=torch.uint8), torch.ones(4, 1).half()),
     "multiple of 32"),
    (lambda: q4_linear(torch.randn(1, 64), torch.ones(4, 32, dtype=torch.uint8), torch.ones(4, 2)), "scales must be float16"),
    (lambda: q4_linear(torch.randn(1, 64), torch.ones(4, 32, dtype=torch.uint8), torch.ones(4, 2).half(),
                       torch.ones(4, 1).half()), "mins must be float16"),
    (lambda: q8_linear(torch.ones(1, 64, dtype=torch.int32), torch.ones(4, 64, dtype=torch.int8), torch.ones(4, 2)),
     "int32"),
])
def test_bad_input_is_refused_by_name(call, match):
    with torch.no_grad(), pytest.raises(ConfigError, match=match):
        call()


@needs_kernel
def test_the_op_itself_refuses_what_it_cannot_read(kernel_env):
    assert build.kernel_ready()
    ops = torch.ops.lucidlm_kernels
    with pytest.raises(RuntimeError, match="float32 or bfloat16 activations"):
        ops.q8_gemv(torch.randn(1, 64, dtype=torch.float64), torch.ones(4, 64, dtype=torch.int8), torch.ones(4, 2), None)
    with pytest.raises(RuntimeError, match="scales float16"):
        ops.q4_gemv(torch.randn(1, 64), torch.ones(4, 32, dtype=torch.uint8), torch.ones(4, 2), None, None)
