"""lucidlm's CPU decode kernel (lucidlm/kernels/gemv.cpp, built by lucidlm.kernels.build, called by lucidlm.model.linear): same products as
F.linear, used exactly where it is a drop-in, and a clean fallback where it cannot be built."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch
from torch.nn import functional as F

from lucidlm import GPT, Config
from lucidlm.generate import generate_ids
from lucidlm.kernels import build
from lucidlm.model import linear
from lucidlm.model.linear import KernelUnavailable, Linear, kernel_ready

needs_compiler = pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")),
                                    reason="no C++ compiler (g++) to build the kernel")


@pytest.fixture
def no_f_linear(monkeypatch):
    """F.linear raises: a product that still succeeds ran in the kernel."""
    def refuse(*args, **kwargs):
        raise AssertionError("F.linear called")
    monkeypatch.setattr(linear.F, "linear", refuse)


@needs_compiler
@pytest.mark.parametrize("in_features,out_features,bias", [(576, 192, False), (37, 5, True), (100, 1536, True),
                                                           (1536, 576, False), (64, 1, True)])
def test_kernel_equals_f_linear_in_float32(in_features, out_features, bias):
    torch.manual_seed(0)
    layer = Linear(in_features, out_features, bias=bias)
    x = torch.randn(1, 1, in_features)
    with torch.no_grad():
        assert linear.uses_kernel(x, layer.weight)
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)


@needs_compiler
def test_kernel_equals_f_linear_in_bfloat16():
    torch.manual_seed(0)
    layer = Linear(576, 1536, bias=True).to(torch.bfloat16)
    x = torch.randn(1, 576, dtype=torch.bfloat16)
    with torch.inference_mode():
        ours = layer(x)
    exact = F.linear(x.double(), layer.weight.double(), layer.bias.double())  # rounded once to bfloat16
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours.double(), exact, rtol=2 ** -7, atol=1e-2)


@needs_compiler
def test_one_row_without_gradient_runs_in_the_kernel(no_f_linear):
    layer = Linear(16, 8)
    with torch.no_grad():
        assert layer(torch.randn(1, 16)).shape == (1, 8)
        assert layer(torch.randn(16)).shape == (8,)  # an unbatched row too


@pytest.mark.parametrize("case", ["grad", "rows", "float64", "empty"])
def test_everything_else_runs_in_f_linear(case, no_f_linear):
    layer = Linear(16, 8)
    x = {"grad": torch.randn(1, 16), "rows": torch.randn(2, 16), "float64": torch.randn(1, 16, dtype=torch.float64),
         "empty": torch.randn(0, 16)}[case]
    if case == "float64":
        layer = layer.double()
    with torch.no_grad() if case != "grad" else torch.enable_grad():
        with pytest.raises(AssertionError, match="F.linear called"):
            layer(x)


def test_gradients_are_those_of_nn_linear():
    torch.manual_seed(0)
    ours, reference = Linear(12, 7), torch.nn.Linear(12, 7)
    reference.load_state_dict(ours.state_dict())
    x = torch.randn(1, 12, requires_grad=True)
    ours(x).sum().backward()
    g_ours = (x.grad.clone(), ours.weight.grad)
    x.grad = None
    reference(x).sum().backward()
    torch.testing.assert_close(g_ours, (x.grad, reference.weight.grad), rtol=0, atol=0)


@needs_compiler
def test_generation_gives_the_same_tokens_with_and_without_the_kernel(monkeypatch):
    torch.manual_seed(0)
    model = GPT(Config.from_name("tiny-llama")).eval()
    prompts = [[5, 9, 2, 7], [3, 1]]
    assert kernel_ready()
    with_kernel = [list(generate_ids(model, [p], 12)) for p in prompts]  # one prompt: one-row decode steps
    monkeypatch.setattr(build._KERNEL, "ready", False)
    without = [list(generate_ids(model, [p], 12)) for p in prompts]
    assert with_kernel == without


def test_turned_off_by_the_environment(monkeypatch):
    monkeypatch.setenv(build.ENV_VAR, "0")
    assert build._Kernel().load() is False


def test_no_compiler_falls_back_silently(monkeypatch, tmp_path):
    monkeypatch.setenv("LUCIDLM_CACHE", str(tmp_path))  # nothing built there
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(build.shutil, "which", lambda name: None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert build._Kernel().load() is False
    assert not (tmp_path / "kernels").exists() or not any((tmp_path / "kernels").iterdir())


@needs_compiler
def test_a_failed_build_warns_and_leaves_no_file(monkeypatch, tmp_path):
    broken = tmp_path / "gemv.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setenv("LUCIDLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(build, "SOURCE", broken)
    with pytest.warns(KernelUnavailable, match="failed"):
        assert build._Kernel().load() is False
    assert list((tmp_path / "cache" / "kernels").iterdir()) == []  # the temporary .so is gone
