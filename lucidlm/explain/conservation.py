"""Is a model explainable? A CP-LRP conservation check, module by module.

Under CP-LRP (Ali et al., ICML 2022) every module of a correctly ruled transformer is locally
linear: the relevance entering it from above equals the relevance it hands to its input, up to
what its bias terms absorb. For a module with input ``x``, output ``y`` and bias parameters ``b``:

    Σ x·∂s/∂x  =  Σ y·∂s/∂y  −  Σ b·∂s/∂b        (s: the explained logit)

:func:`check` runs one CP-LRP forward/backward (the explainers' own
:class:`~lucidlm.explain.core.Pass`) on random tokens in float64 and reports every module where
that balance fails — the deepest ones, since a broken child breaks its parents too — with the
rule helper the module's code most likely forgot (a non-linearity called directly instead of
through :func:`lucidlm.rules.activation`, a raw softmax or normaliser ...).

>>> import torch
>>> from lucidlm import Config, GPT
>>> check(GPT(Config.from_name("tiny-llama"))).ok
True
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import re

import torch
from torch import nn

from .core import Pass, explain_mode

#: what a module's source calls -> the helper that call should go through
_HINTS = (
    (r"\b(tanh|sigmoid|silu|gelu|relu|elu|softplus|mish|exp|erf|sin|cos)\s*\(", "rules.activation(fn, x)"),
    (r"\bsoftmax\s*\(", "rules.attention_weights(softmax(...)) (or the built-in attention)"),
    (r"\b(rsqrt|sqrt|std|var|norm)\s*\(", "rules.normalizer(1 / rms) (or the built-in norms)"),
    (r"[\w\)\]]\s*\*\s*[\w\(]", "rules.product(a, b) for a product of two activations"),
)


@dataclasses.dataclass
class Leak:
    """One module whose relevance is not conserved."""

    name: str
    kind: str
    relevance_in: float
    relevance_out: float
    absorbed: float
    hint: str

    def __str__(self) -> str:
        return (f"{self.name} ({self.kind}): relevance in {self.relevance_in:.6g}, out {self.relevance_out:.6g}, "
                f"biases absorb {self.absorbed:.6g}; likely missing: {self.hint}")


@dataclasses.dataclass
class CheckReport:
    """``ok`` when every module conserves relevance; ``leaks`` names the ones that do not."""

    logit: float
    total_relevance: float
    leaks: list[Leak]
    modules_checked: int

    @property
    def ok(self) -> bool:
        return not self.leaks

    def __str__(self) -> str:
        head = (f"CP-LRP conservation: {self.modules_checked} modules checked, relevance sum "
                f"{self.total_relevance:.6g} for logit {self.logit:.6g}")
        if self.ok:
            return head + ": every module conserves relevance"
        return "\n".join([head + f": {len(self.leaks)} module(s) leak relevance"] + [f"  {leak}" for leak in self.leaks])


def check(model: nn.Module, tokens: int = 8, seed: int = 0, tolerance: float = 1e-6) -> CheckReport:
    """Run the check on a copy of ``model`` (a :class:`~lucidlm.GPT` or an ``LLM``) in float64.

    ``tolerance`` is relative to the explained logit's magnitude (at least 1).
    """
    model = getattr(model, "model", model)  # an LLM
    model = copy.deepcopy(model).to(torch.float64).eval()
    biases = []
    for name, p in model.named_parameters():
        p.requires_grad_(_is_bias(name))
        if _is_bias(name):
            biases.append(p)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=g)
    positions = torch.arange(tokens)[None]
    probe = _Probe(model)
    try:
        with explain_mode("cp-lrp"):  # the top next token's logit, as explain(method="cp-lrp") takes it
            # every position's logits, as the check has always taken them (lm_head on the last row
            # alone rounds the logit differently, and a report must not change with the refactor)
            run = Pass.forward(model, positions, ids=ids, all_positions=True)
            logit = run.logits[0, -1, int(run.logits[0, -1].argmax())]
            grad, bias_grads = run.gradients(logit, biases)
    finally:
        probe.remove()
    grad_of = {id(p): bias_grad for p, bias_grad in zip(biases, bias_grads)}
    scale = tolerance * max(1.0, abs(float(logit.detach())))
    leaking = {}
    for name, module in model.named_modules():
        if name in probe.relevance_in and name in probe.relevance_out:
            r_in, r_out = probe.relevance_in[name], probe.relevance_out[name]
            absorbed = sum(float((p.detach() * grad_of[id(p)]).sum()) for n, p in module.named_parameters()
                           if _is_bias(n) and grad_of[id(p)] is not None)
            if abs(r_out - absorbed - r_in) > scale:
                leaking[name] = Leak(name, type(module).__name__, r_in, r_out, absorbed, _hint(module))
    deepest = [leak for name, leak in leaking.items()
               if not any(other != name and other.startswith(name + ".") for other in leaking)]
    total = float((run.h0.detach() * grad).sum())
    return CheckReport(float(logit.detach()), total, deepest, len(probe.relevance_in))


#: parameters that add to what a module computes whatever its input, and so absorb relevance as a
#: bias does: biases, and LLaMA-Adapter's learned prefix and AdapterV2's bias (lucidlm.train.adapter)
_ABSORBING = ("bias", "adapter_bias", "adapter_wte.weight")


def _is_bias(name: str) -> bool:
    return any(name == leaf or name.endswith("." + leaf) for leaf in _ABSORBING)


class _Probe:
    """Hooks that give each module a private alias of its first input and of its output, so that
    the gradient reaching the alias is exactly this module's share."""

    def __init__(self, model: nn.Module) -> None:
        self.relevance_in: dict[str, float] = {}
        self.relevance_out: dict[str, float] = {}
        self.handles = []
        for name, module in model.named_modules():
            if name and not isinstance(module, (nn.Embedding, nn.Dropout, nn.Identity)):
                self.handles.append(module.register_forward_pre_hook(self._enter(name)))
                self.handles.append(module.register_forward_hook(self._leave(name)))

    def _enter(self, name: str):
        def hook(module, args):
            if not args or not _floating(args[0]):
                return None
            x = args[0].view_as(args[0])  # an alias only this module consumes
            x.register_hook(lambda grad: self._add(self.relevance_in, name, x, grad))
            return (x, *args[1:])
        return hook

    def _leave(self, name: str):
        def hook(module, args, output):
            if not _floating(output):
                return None
            y = output.view_as(output)
            y.register_hook(lambda grad: self._add(self.relevance_out, name, y, grad))
            return y
        return hook

    @staticmethod
    def _add(table: dict[str, float], name: str, x: torch.Tensor, grad: torch.Tensor) -> None:
        table[name] = table.get(name, 0.0) + float((x.detach() * grad).sum())

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _floating(x) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point() and x.requires_grad


def _hint(module: nn.Module) -> str:
    try:
        source = inspect.getsource(type(module).forward)
    except (OSError, TypeError):  # defined in a notebook or exec'd code: read the names it uses
        code = getattr(type(module).forward, "__code__", None)
        source = "def forward():\n" + " ".join(f"{n}(" for n in (code.co_names if code else ()))
    body = "\n".join(line.split("#")[0] for line in source.splitlines()[1:])  # code, not comments
    if "rules." in body:
        calls = [helper for pattern, helper in _HINTS if re.search(pattern, _without_ruled(body))]
    else:
        calls = [helper for pattern, helper in _HINTS if re.search(pattern, body)]
    return calls[0] if calls else "a rule helper from lucidlm.rules (no direct non-linearity found in forward)"


def _without_ruled(body: str) -> str:
    """Drop the arguments of calls already wrapped in a rule helper (``rules.activation(torch.tanh, x)``)."""
    return re.sub(r"rules\.\w+\([^\n]*", "", body)
