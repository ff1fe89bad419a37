"""LRP rules for transformers as tiny autograd functions (the "efficient" gradient × input form).

Every rule keeps the forward pass exact and only changes the backward pass, so that
``input * input.grad`` at the embeddings *is* the relevance (one backward pass, no extra forward).
Public as :mod:`lucidlm.rules`: a custom component is explainable when it calls these helpers at
the lines where its non-linearities act (check it with :func:`lucidlm.explain.check`).

References
----------
* AttnLRP: R. Achtibat et al., "AttnLRP: Attention-Aware Layer-Wise Relevance Propagation for
  Transformers", ICML 2024 (proceedings.mlr.press/v235/achtibat24a).
* CP-LRP: A. Ali et al., "XAI for Transformers: Better Explanations through Conservative
  Propagation", ICML 2022 (proceedings.mlr.press/v162/ali22a).

How the model uses them
-----------------------
The model calls the helpers at the end of this file (:func:`activation`, :func:`product`,
:func:`normalizer`, :func:`attention_weights` ...). With no explanation running (:func:`current`
is ``None``) each helper is the plain operation.

Each rule is an autograd Function in the ``setup_context`` form with ``generate_vmap_rule``, so
that a backward can be batched over many scores at once (``torch.autograd.grad(...,
is_grads_batched=True)``, i.e. ``vmap`` over the backward): :mod:`lucidlm.explain.multi` explains
many targets of one forward that way.

The method in force lives in a :class:`contextvars.ContextVar`, not a module global: each thread
(and each asyncio task) sees only the method its own ``with explaining(...)`` set, so a server
can explain in one thread while it generates in another.

>>> import torch
>>> x = torch.tensor([1.0, -2.0], requires_grad=True)
>>> with explaining("attnlrp"):
...     y = activation(torch.tanh, x)
>>> y.sum().backward()
>>> torch.allclose(x * x.grad, torch.tanh(x.detach()))  # identity rule: relevance passes unchanged
True
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

import torch

from ..methods import METHODS, check_method  # the one list, torch-free: rules.METHODS

_active: contextvars.ContextVar[str | None] = contextvars.ContextVar("lucidlm_lrp_method", default=None)


def current() -> str | None:
    """The explanation method in force in this thread/task, or ``None`` for plain inference.
    Inside ``torch.compile`` it is ``None``: only inference is compiled (see :mod:`lucidlm.compiled`),
    and a ContextVar read would break the graph at every rule."""
    if torch.compiler.is_compiling():
        return None
    return _active.get()


@contextlib.contextmanager
def explaining(method: str) -> Iterator[None]:
    """Switch the rules on for the duration of a ``with`` block (in this thread/task only).

    >>> with explaining("attnlrp"):
    ...     current()
    'attnlrp'
    """
    token = _active.set(check_method(method, METHODS))
    try:
        yield
    finally:
        _active.reset(token)


@contextlib.contextmanager
def in_force(method: str | None) -> Iterator[None]:
    """Put ``method`` in force exactly as given, ``None`` (plain operations) included: the
    recompute of a checkpointed block re-enters the forward's choice
    (:mod:`lucidlm.model.checkpointing`), which was checked when it was first set.

    >>> with explaining("cp-lrp"), in_force(None):
    ...     current() is None
    True
    """
    token = _active.set(method)
    try:
        yield
    finally:
        _active.reset(token)


class IdentityRule(torch.autograd.Function):
    """Identity rule for element-wise non-linearities y = f(x) (AttnLRP, Sec. 3, "element-wise
    non-linearities": relevance passes through unchanged, R_x = R_y).

    In gradient × input form the backward multiplies the incoming gradient by y / x, so that
    x · grad_x = y · grad_y. The ratio is formed in float32 with a zero where x == 0 (LXT divides by
    x + 1e-10, which underflows in float16 and returns NaN); at x == 0 the relevance x · grad_x is 0
    whatever the ratio, so zero is exact, not an approximation.
    """

    generate_vmap_rule = True  # see the module docstring: a batched backward vmaps over this one

    @staticmethod
    def forward(x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        return fn(x)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[0], output)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, y = ctx.saved_tensors
        x32 = x.float()
        nonzero = x32 != 0
        ratio = torch.where(nonzero, y.float() / torch.where(nonzero, x32, 1.0), 0.0)
        return (grad.float() * ratio).to(grad.dtype), None


class DivideGradient(torch.autograd.Function):
    """Uniform rule for a product of ``n`` factors (AttnLRP, Sec. 3, "uniform rule" for
    multiplicative gates and the bilinear q·kᵀ and A·V matmuls): each factor receives 1/n of the
    relevance. The forward is the identity; the backward divides the gradient by ``n``, applied to
    the product's output (so every factor's gradient is divided once)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, n: int) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.n = inputs[1]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad / ctx.n, None


class BranchSwitch:
    """Whether relevance may flow back through the branches a :class:`SwitchedBranch` guards: one
    instance per explanation (passed to the hooks that apply the rule, never global), flipped
    between two backward passes from the same forward."""

    def __init__(self) -> None:
        self.open = True


class SwitchedBranch(torch.autograd.Function):
    """Relevance split at a sum of two branches, y = W x + s·B A x (a LoRA layer; Hu et al. 2021,
    Eq. 3). LRP's rule for a sum divides the relevance of y between its summands by their
    contributions (Montavon et al., "Layer-wise Relevance Propagation: an overview", 2019, Eq. 1
    with the z-rule): R_{Wx} = (W x) ⊙ R_y / y and R_{sBAx} = (s·B A x) ⊙ R_y / y, and each part
    flows on to the inputs. In gradient × input form both parts see the same gradient ∂s/∂y, so
    the split is free: the forward is the identity on the branch's output, and the backward passes
    the gradient on while ``switch.open`` and returns zero once it is closed. A second backward
    from the same forward with the switch closed therefore gives the relevance that reaches the
    inputs through the base weights only; the tuned relevance minus it is the part that went
    through at least one adapter branch, and the two parts add up to the tuned relevance exactly
    (the backward is linear in the gradient)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, switch: BranchSwitch) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.switch = inputs[1]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # closed: None, which autograd reads as a zero gradient and so skips the branch's own backward
        return (grad if ctx.switch.open else None), None


def switched_branch(x: torch.Tensor, switch: BranchSwitch) -> torch.Tensor:
    """The output ``x`` of an adapter branch, its backward gated by ``switch`` (:class:`SwitchedBranch`).

    >>> switch = BranchSwitch()
    >>> x = torch.ones(2, requires_grad=True)
    >>> y = (x + switched_branch(x * 3, switch)).sum()     # a base path and a branch
    >>> torch.autograd.grad(y, x, retain_graph=True)[0].tolist()
    [4.0, 4.0]
    >>> switch.open = False                                 # the base path only
    >>> torch.autograd.grad(y, x)[0].tolist()
    [1.0, 1.0]
    """
    return SwitchedBranch.apply(x, switch)


def identity_rule(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Apply ``fn`` element-wise with the identity rule on its backward pass."""
    return IdentityRule.apply(x, fn)


def divide_gradient(x: torch.Tensor, n: int) -> torch.Tensor:
    """Identity forward; gradient divided by ``n`` on the way back (uniform rule)."""
    return DivideGradient.apply(x, n)


def stop_gradient(x: torch.Tensor) -> torch.Tensor:
    """Treat ``x`` as a constant (CP-LRP, Ali et al. 2022, Sec. 3: LayerNorm normaliser and the
    attention softmax are detached so that the rest of the network is locally linear and conserves
    relevance; AttnLRP reuses it for the normaliser of LayerNorm/RMSNorm)."""
    return x.detach()


# ----- helpers called at the exact lines of the model -----------------------------------------
def _lrp() -> bool:
    method = current()
    return method is not None and method != "inputxgrad"


def activation(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Element-wise non-linearity (SiLU, GELU, GELU-tanh, logit soft-capping ...)."""
    return identity_rule(fn, x) if _lrp() else fn(x)


def product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Element-wise product of two activations (the gate of GLU MLPs): the uniform rule over the
    factors that depend on the input (AttnLRP, Eq. 7). A constant factor (one that needs no
    gradient, e.g. a gate CP-LRP detached with :func:`gate`) takes none: the product is then linear
    in the other factor, which keeps all of the relevance (halving it would break conservation).

    >>> a, b = torch.tensor([2.0], requires_grad=True), torch.tensor([3.0], requires_grad=True)
    >>> with explaining("attnlrp"):
    ...     product(a, b).backward()
    >>> (a * a.grad).item(), (b * b.grad).item()  # 6 split in two
    (3.0, 3.0)
    """
    if not _lrp():
        return a * b
    factors = int(a.requires_grad) + int(b.requires_grad)
    return divide_gradient(a * b, factors) if factors > 1 else a * b


def gate(x: torch.Tensor) -> torch.Tensor:
    """The gate pre-activation of a gated linear unit, ``act(gate(x)) * up(x)``.

    CP-LRP: a constant, exactly as LXT 2.1's ``cp_gated_mlp_forward`` computes
    ``act_fn(stop_gradient(gate_proj(x))) * up_proj(x)``: the gate is treated like the attention
    softmax (a gating of the signal, Ali et al. 2022, Sec. 3), the unit is linear in ``up(x)`` and
    all of its relevance flows through the up projection. AttnLRP keeps it (identity rule on the
    activation, uniform rule on the product, :func:`product`).

    >>> x = torch.ones(2, requires_grad=True)
    >>> with explaining("cp-lrp"):
    ...     gate(x).requires_grad
    False
    """
    return stop_gradient(x) if current() == "cp-lrp" else x


def bilinear(x: torch.Tensor) -> torch.Tensor:
    """Mark a bilinear matmul for the uniform rule (AttnLRP only): applied to q and k of q·kᵀ and
    to the output of A·V. Under CP-LRP the softmax output A is a constant, so A·V is linear in V
    and must keep its full gradient (halving it would break conservation)."""
    return divide_gradient(x, 2) if current() == "attnlrp" else x


def normalizer(x: torch.Tensor) -> torch.Tensor:
    """The normaliser (1/rms or 1/std) of RMSNorm/LayerNorm: a constant for LRP (identity rule)."""
    return stop_gradient(x) if _lrp() else x


def attention_weights(weights: torch.Tensor) -> torch.Tensor:
    """Softmax output of attention: detached for CP-LRP, kept for AttnLRP (whose softmax rule is
    the gradient × input of the softmax itself, with the uniform rule on the two matmuls)."""
    return stop_gradient(weights) if current() == "cp-lrp" else weights


def query_key(x: torch.Tensor) -> torch.Tensor:
    """q or k entering a fused attention kernel (SDPA), which keeps no weights to detach: under
    CP-LRP the softmax is a constant and q, k reach the output only through it, so they are
    detached instead; the relevances equal the explicit kernel's with :func:`attention_weights`."""
    return stop_gradient(x) if current() == "cp-lrp" else x


def router_weights(weights: torch.Tensor) -> torch.Tensor:
    """Mixture-of-experts routing weights multiply each expert's output. We treat them as
    constants for both LRP methods (like CP-LRP treats attention weights): all relevance flows
    through the experts' computation, none through the router, which keeps conservation exact.
    The alternative, the uniform rule, would hand half of every expert's relevance to the router
    logits, i.e. to *which* expert was chosen rather than *what* it computed."""
    return stop_gradient(weights) if _lrp() else weights


def sink_logits(sinks: torch.Tensor) -> torch.Tensor:
    """gpt-oss's learned per-head sink logits, one more column of the attention softmax that takes
    probability mass and carries no value. CP-LRP: a constant, as the rest of the softmax
    (:func:`attention_weights`). AttnLRP: the softmax's gradient × input reaches the sink logit like
    a bias term: the relevance it takes stays in the parameter (absorbed, like a bias's) and none
    of it reaches a token; the keys' logits keep the rest.

    >>> s = torch.zeros(2, requires_grad=True)
    >>> with explaining("cp-lrp"):
    ...     sink_logits(s).requires_grad
    False
    """
    return stop_gradient(sinks) if current() == "cp-lrp" else sinks
