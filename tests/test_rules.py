"""Each LRP rule's backward against its formula, in every floating dtype, and the helpers' switch."""

import pytest
import torch
from torch.nn import functional as F

from lucidlm.errors import ExplainError
from lucidlm import rules

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def backward(fn, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(fn(x), x, grad)
    return g


def test_identity_rule_backward_is_grad_times_y_over_x():
    x = torch.tensor([-3.0, -0.5, 0.0, 0.25, 2.0, 7.0], dtype=torch.float64)
    grad = torch.tensor([1.0, -2.0, 3.0, 0.5, -1.5, 2.5], dtype=torch.float64)
    g = backward(lambda t: rules.identity_rule(F.silu, t), x, grad)
    y = F.silu(x)
    expected = torch.where(x != 0, grad * y / x, 0.0)
    torch.testing.assert_close(g, expected, rtol=1e-7, atol=0)
    assert g[2] == 0  # x == 0: zero, not NaN
    # conservation: x · grad_x = y · grad_y element by element
    torch.testing.assert_close(x * g, y * grad, rtol=1e-7, atol=1e-12)


def test_identity_rule_forward_is_exact():
    x = torch.randn(50, dtype=torch.float64)
    for fn in (F.silu, F.gelu, torch.tanh):
        assert torch.equal(rules.identity_rule(fn, x), fn(x))


@pytest.mark.parametrize("dtype", DTYPES)
def test_identity_rule_finite_at_tiny_subnormal_and_zero_inputs(dtype):
    info = torch.finfo(dtype)
    x = torch.tensor([0.0, -0.0, info.smallest_normal, info.smallest_normal / 4, info.tiny * 1.5,
                      -info.smallest_normal / 2, 1e-3, -2.0, 3.0], dtype=dtype)
    x = x[x.isfinite()]
    grad = torch.ones_like(x) * 3
    for fn in (F.silu, F.gelu, lambda t: torch.tanh(t / 5.0) * 5.0):
        g = backward(lambda t: rules.identity_rule(fn, t), x, grad)
        assert g.dtype == dtype and torch.isfinite(g).all(), (dtype, g)
        assert (g[x == 0] == 0).all()
        # away from zero it is grad * y / x, computed in float32 then rounded once
        nz = x != 0
        expected = (grad.float() * fn(x).float() / x.float())[nz].to(dtype)
        torch.testing.assert_close(g[nz], expected, rtol=1e-2, atol=0)


def test_lxt_epsilon_would_give_nan_in_float16():
    """Why the rule guards x == 0 instead of dividing by x + 1e-10: that epsilon is 0 in float16."""
    x = torch.zeros(1, dtype=torch.float16)
    assert torch.isnan(F.silu(x) / (x + 1e-10)).all()
    assert torch.isfinite(backward(lambda t: rules.identity_rule(F.silu, t), x, torch.ones_like(x))).all()


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("n", [2, 3])
def test_divide_gradient(dtype, n):
    x = torch.randn(4, 5).to(dtype)
    grad = torch.randn(4, 5).to(dtype)
    assert torch.equal(rules.divide_gradient(x, n), x)
    g = backward(lambda t: rules.divide_gradient(t, n), x, grad)
    assert g.dtype == dtype
    torch.testing.assert_close(g, grad / n, rtol=0, atol=0)


def test_uniform_rule_on_a_product_splits_relevance_equally():
    a, b = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    grad = torch.randn(6, dtype=torch.float64)
    a_, b_ = a.clone().requires_grad_(), b.clone().requires_grad_()
    with rules.explaining("attnlrp"):
        out = rules.product(a_, b_)
    ga, gb = torch.autograd.grad(out, [a_, b_], grad)
    relevance = a * b * grad
    torch.testing.assert_close(a * ga, relevance / 2)
    torch.testing.assert_close(b * gb, relevance / 2)


def test_stop_gradient():
    x = torch.randn(3, requires_grad=True)
    y = rules.stop_gradient(x)
    assert torch.equal(y, x) and not y.requires_grad


def test_helpers_are_plain_operations_without_a_method():
    assert rules.current() is None
    x = torch.randn(4, 3, requires_grad=True)
    w = torch.rand(4, 3, requires_grad=True)
    for helper, expected in [
        (lambda t: rules.activation(F.silu, t), lambda t: F.silu(t)),
        (lambda t: rules.product(t, w), lambda t: t * w),
        (rules.bilinear, lambda t: t),
        (rules.normalizer, lambda t: t),
        (rules.attention_weights, lambda t: t),
        (rules.router_weights, lambda t: t),
    ]:
        out = helper(x)
        assert out.requires_grad
        assert out.grad_fn is None or "Rule" not in out.grad_fn.name() and "Divide" not in out.grad_fn.name()
        grad = torch.randn_like(out)
        torch.testing.assert_close(torch.autograd.grad(out, x, grad)[0],
                                   torch.autograd.grad(expected(x), x, grad)[0], rtol=0, atol=0)
    assert rules.normalizer(x) is x and rules.bilinear(x) is x and rules.attention_weights(x) is x


def test_helpers_by_method():
    x = torch.randn(3, requires_grad=True)
    grad = torch.ones(3)
    with rules.explaining("attnlrp"):
        assert torch.equal(torch.autograd.grad(rules.bilinear(x), x, grad)[0], grad / 2)
        assert rules.attention_weights(x).requires_grad  # softmax kept (its own gradient × input)
        assert rules.gate(x) is x  # the GLU gate keeps its share (uniform rule on the product)
        assert rules.query_key(x) is x  # q·kᵀ takes relevance through the softmax
        assert not rules.normalizer(x).requires_grad and not rules.router_weights(x).requires_grad
    with rules.explaining("cp-lrp"):
        assert rules.bilinear(x) is x  # A·V is linear once A is a constant: full gradient
        assert not rules.attention_weights(x).requires_grad and not rules.normalizer(x).requires_grad
        assert torch.equal(torch.autograd.grad(rules.product(x, x), x, grad)[0], x.detach())  # 2x / 2
        assert not rules.gate(x).requires_grad  # LXT's cp_gated_mlp_forward: a constant GLU gate
        assert not rules.query_key(x).requires_grad  # q, k reach the output only through the softmax
        # a constant factor takes no relevance: the product is linear in x, which keeps all of it
        y = torch.randn(3, requires_grad=True)
        assert torch.equal(torch.autograd.grad(rules.product(x, rules.gate(y)), x, grad)[0], y.detach())
    with rules.explaining("inputxgrad"):  # plain gradient: every helper is the identity
        assert rules.normalizer(x) is x and rules.attention_weights(x) is x and rules.bilinear(x) is x
        torch.testing.assert_close(torch.autograd.grad(rules.activation(torch.tanh, x), x, grad)[0],
                                   1 - torch.tanh(x.detach()) ** 2)


def test_explaining_restores_the_previous_method():
    assert rules.current() is None
    with rules.explaining("attnlrp"):
        with rules.explaining("cp-lrp"):
            assert rules.current() == "cp-lrp"
        assert rules.current() == "attnlrp"
        with pytest.raises(RuntimeError):
            with rules.explaining("inputxgrad"):
                raise RuntimeError("boom")
        assert rules.current() == "attnlrp"
    assert rules.current() is None


@pytest.mark.parametrize("bad", ["lrp", "AttnLRP", "", None])
def test_explaining_rejects_unknown_methods(bad):
    with pytest.raises(ExplainError, match="attnlrp, cp-lrp, inputxgrad"):
        with rules.explaining(bad):
            pass
    assert rules.current() is None
