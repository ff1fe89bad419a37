"""``lucidlm.explain.check``: CP-LRP conservation module by module; and the rules' method is
per thread (a ContextVar), so explaining in one thread never changes another thread's forward."""

import threading

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import lucidlm
from conftest import ALL_FAMILIES
from lucidlm import GPT, Config, rules


class RawTanhMLP(nn.Module):
    """An MLP that calls torch.tanh directly: its relevance is not conserved."""

    def __init__(self, config):
        super().__init__()
        self.up = nn.Linear(config.n_embd, config.intermediate_size)
        self.down = nn.Linear(config.intermediate_size, config.n_embd)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


class RuledTanhMLP(RawTanhMLP):
    def forward(self, x):
        return self.down(rules.activation(torch.tanh, self.up(x)))


class RawGateMLP(RawTanhMLP):
    def forward(self, x):
        h = self.up(x)
        return self.down(F.silu(h) * h)  # a gate without rules.product (and a raw SiLU)


def test_a_raw_nonlinearity_is_named_with_its_missing_helper():
    report = lucidlm.explain.check(GPT(Config.from_name("tiny-llama", mlp_class=RawTanhMLP)))
    assert not report.ok
    assert [leak.name for leak in report.leaks] == ["layers.0.mlp", "layers.1.mlp"]
    assert report.leaks[0].kind == "RawTanhMLP" and report.leaks[0].hint.startswith("rules.activation")
    assert "layers.0.mlp (RawTanhMLP)" in str(report)


def test_the_same_component_with_the_rule_passes():
    report = lucidlm.explain.check(GPT(Config.from_name("tiny-llama", mlp_class=RuledTanhMLP)))
    assert report.ok, str(report)


def test_an_unruled_gate_is_named():
    report = lucidlm.explain.check(GPT(Config.from_name("tiny-llama", mlp_class=RawGateMLP)))
    assert [leak.name for leak in report.leaks] == ["layers.0.mlp", "layers.1.mlp"]


def test_bias_free_models_conserve_in_total():
    report = lucidlm.explain.check(GPT(Config.from_name("tiny-llama")))
    assert report.ok and report.total_relevance == pytest.approx(report.logit, rel=1e-6)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_every_shipped_family_passes(family, hf_checkpoint):
    _, directory = hf_checkpoint(family)
    report = lucidlm.explain.check(lucidlm.LLM.load(directory))
    assert report.ok, str(report)
    assert report.modules_checked > 10


def test_explaining_in_one_thread_leaves_another_threads_forward_plain():
    torch.manual_seed(0)
    model = GPT(Config.from_name("tiny-llama")).eval()
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    with torch.no_grad():
        expected = model(ids)
    inside, errors, go = threading.Event(), [], threading.Event()

    def explainer():
        with rules.explaining("cp-lrp"):
            inside.set()
            go.wait(timeout=10)
            if rules.current() != "cp-lrp":
                errors.append("explainer lost its method")

    thread = threading.Thread(target=explainer)
    thread.start()
    inside.wait(timeout=10)
    try:
        assert rules.current() is None  # this thread sees no method while the other explains
        with torch.no_grad():
            torch.testing.assert_close(model(ids), expected, rtol=0, atol=0)
    finally:
        go.set()
        thread.join()
    assert not errors


def test_check_stays_the_function_whatever_was_imported_first():
    """Importing every explain submodule first (as tests/test_doctests.py does) must not replace
    the public function lucidlm.explain.check with a module of the same name."""
    import importlib
    import pkgutil

    import lucidlm.explain

    for info in pkgutil.iter_modules(lucidlm.explain.__path__, "lucidlm.explain."):
        importlib.import_module(info.name)
    assert callable(lucidlm.explain.check) and lucidlm.explain.check.__name__ == "check"
