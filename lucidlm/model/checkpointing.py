"""Activation checkpointing of the blocks: keep only each block's input for the backward, and
recompute the block's inside when the backward reaches it.

Memory then holds one hidden state per layer (tokens × n_embd) plus one block's activations at a
time, instead of every block's; the price is a second forward of each block during the backward
(about a third more time). Explanations and training switch it on with ``with checkpointing():``;
:meth:`~lucidlm.model.gpt.GPT.forward` reads it (a ContextVar, so each thread/task has its own).

The LRP rules are chosen while the forward builds the graph (:func:`lucidlm.model.rules.current`),
but a checkpointed block is built a second time during the backward, where that choice is not in
force (on a GPU autograd runs the backward in threads of its own, and on any device the caller may
run it outside ``with explaining(...)``). So the method in force at the forward is captured and
re-entered for the recompute (``torch.utils.checkpoint``'s ``context_fn``, non-reentrant): the
recomputed block applies exactly the rules of the first forward, and the relevances equal the
plain run's. The recompute also sets :func:`recomputing`, which the recorders of activations
(latent relevances, attention weights) read so that a block is recorded once, at the forward.

>>> import torch
>>> from lucidlm import Config, GPT
>>> model = GPT(Config.from_name("tiny-llama"))
>>> h0 = model.embed_tokens(torch.tensor([[1, 2, 3]]), torch.arange(3)[None]).detach().requires_grad_()
>>> plain = torch.autograd.grad(model(inputs_embeds=h0)[0, -1, 5], h0)[0]
>>> with checkpointing():
...     saved = torch.autograd.grad(model(inputs_embeds=h0)[0, -1, 5], h0)[0]
>>> torch.allclose(plain, saved, atol=1e-6)
True
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

import torch
from torch.utils.checkpoint import checkpoint

from . import rules

_enabled: contextvars.ContextVar[bool] = contextvars.ContextVar("lucidlm_checkpointing", default=False)
_recomputing: contextvars.ContextVar[bool] = contextvars.ContextVar("lucidlm_recomputing", default=False)


@contextlib.contextmanager
def checkpointing(enabled: bool = True) -> Iterator[None]:
    """Checkpoint every block of the forwards run inside the block (in this thread/task only);
    ``enabled=False`` leaves things as they are (so callers can pass their flag through).

    >>> with checkpointing():
    ...     active()
    True
    >>> active()
    False
    """
    if not enabled:
        yield
        return
    token = _enabled.set(True)
    try:
        yield
    finally:
        _enabled.reset(token)


def active() -> bool:
    """Whether forwards here checkpoint their blocks (never inside ``torch.compile``: only
    inference is compiled, and a ContextVar read would break the graph)."""
    return not torch.compiler.is_compiling() and _enabled.get()


def recomputing() -> bool:
    """True while a checkpointed block is recomputed for the backward: activations recorded at the
    forward must not be recorded again."""
    return not torch.compiler.is_compiling() and _recomputing.get()


class _Recompute:
    """What the recompute runs under: the rules and the checkpointing the forward had (a chunked
    attention inside a block decides by both whether to keep its chunks), and :func:`recomputing`
    on. Re-enterable: a graph kept for several backward passes (``retain_graph``, one backward per
    generated token) recomputes a block once per backward, through the same context."""

    def __init__(self, method: str | None, enabled: bool) -> None:
        self.method, self.enabled = method, enabled
        self._stack: list[contextlib.ExitStack] = []

    def __enter__(self) -> None:
        stack = contextlib.ExitStack()
        for var, value in ((_recomputing, True), (_enabled, self.enabled)):
            stack.callback(var.reset, var.set(value))
        stack.enter_context(rules.in_force(self.method))
        self._stack.append(stack)

    def __exit__(self, *exc) -> None:
        self._stack.pop().close()


def run_block(block: Callable[..., torch.Tensor], *args) -> torch.Tensor:
    """``block(*args)``, checkpointed when :func:`active` and autograd records this forward (a
    forward under ``no_grad`` keeps nothing anyway)."""
    if not (active() and torch.is_grad_enabled()):
        return block(*args)
    return recomputed(block, *args)


def recomputed(fn: Callable[..., torch.Tensor], *args) -> torch.Tensor:
    """``fn(*args)`` with nothing of its inside kept for the backward: recomputed there under the
    rules in force now (a block, or one chunk of an attention's queries)."""
    method, enabled = rules.current(), active()
    return checkpoint(fn, *args, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), _Recompute(method, enabled)))
