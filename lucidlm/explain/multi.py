"""Many targets of one text, explained by one forward and one batched backward.

:func:`explain_positions` explains the prediction at each of several positions of one text (by
default the token that follows it there), and
:func:`~lucidlm.explain.explainer.explain_generation` every generated token, the same way:

1. one forward under the rules over the text, with logits only for the explained positions, its
   graph cut at the last hidden states (:class:`HeadCut`);
2. one backward through the head (norm, vocabulary projection) for all targets at once: the rows
   do not mix there, so row p's gradient is its target's;
3. one backward through the blocks for all targets at once: ``torch.autograd.grad(hidden, h0,
   grad_outputs=seeds, is_grads_batched=True)``, a ``vmap`` over the backward whose seed k holds
   target k's head gradient alone (the rules of :mod:`lucidlm.model.rules` carry vmap rules for it);
4. relevance of token t for target k = Σ_d h0[t, d] · ∂score_k/∂h0[t, d].

Row k of the batched backward is exactly the one-target backward, so each explanation is the one
:func:`~lucidlm.explain.explainer.explain` gives for the text cut after that position (up to float
rounding: a longer sequence rounds differently). ``batch_size`` bounds memory: the batched
backward holds ``batch_size`` gradients of every activation at once, so the targets go
``batch_size`` at a time (one backward per chunk, the forward's graph kept between them);
``batch_size=1`` is the plain loop, one backward per target, the least memory (and what a
tensor-parallel model always runs: its all-reduce has no batching rule).

>>> import torch
>>> from lucidlm import Config, GPT
>>> from lucidlm.explain.explainer import explain
>>> model = GPT(Config.from_name("tiny-llama")).eval()
>>> ids = [1, 5, 7, 9, 11]
>>> first, last = explain_positions(model, None, ids, positions=[1, 3])
>>> first.token_ids, first.target_ids, last.token_ids, last.target_ids
([1, 5], [7], [1, 5, 7, 9], [11])
>>> alone = explain(model, None, [1, 5, 7, 9], target=11)
>>> torch.allclose(last.relevance, alone.relevance, atol=1e-5)
True
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ExplainError
from ..methods import METHODS
from .core import Pass, Prompt, check_explainable, explain_mode, prompt_ids, token_inputs, warn_target
from .explanation import Explanation
from .latent import LatentRecorder
from .targets import Target, TargetSpec, is_int, resolve_target

#: targets per batched backward unless asked otherwise. On the CPU (embedded model, 64 targets over
#: 256 tokens, scripts/multi_target_bench.py) 8 or 16 at a time took the loop's time for 10-17% more
#: peak memory, and all 64 in one backward 24% longer for 34% more: the CPU does the same
#: arithmetic either way; a GPU, which one small backward leaves mostly idle, is where batches pay
DEFAULT_BATCH_SIZE = 8


def explain_positions(model: nn.Module, tokenizer, prompt: str | Sequence[int],
                      positions: Sequence[int] | None = None, targets: Sequence[Target] | None = None,
                      method: str = "attnlrp", layers: str | Sequence[int] | None = None,
                      batch_size: int | None = DEFAULT_BATCH_SIZE) -> list[Explanation]:
    """One :class:`~lucidlm.explain.explanation.Explanation` per position of ``prompt``: why the
    model predicts what follows it, over the tokens up to it. All from one forward and one batched
    backward (see the module docstring); each equals ``explain(model, tokenizer, ids[:p + 1],
    target=...)``.

    ``positions``: token indices (negative count from the end; ``None``: every position but the
    last). ``targets``: one per position, each a token id, a one-token string, a contrast pair
    ``(a, b)`` or ``None`` (the model's top next token); ``None`` for all: the token that follows
    each position in the text (the model's top token after the last one). ``method``: a rule
    method (``"attnlrp"``, ``"cp-lrp"``, ``"inputxgrad"``). ``layers``: latent relevances too, per
    target (:mod:`lucidlm.explain.latent`). ``batch_size``: targets per backward (default
    :data:`DEFAULT_BATCH_SIZE`; ``None``: all in one; ``1``: one backward per target, the least memory).

    >>> from lucidlm import Config, GPT
    >>> model = GPT(Config.from_name("tiny-llama")).eval()
    >>> [e.target_ids for e in explain_positions(model, None, [1, 5, 7], targets=[(2, 3), 4])]
    [[2, 3], [4]]
    """
    check_explainable(method, METHODS)
    ids = prompt_ids(tokenizer, prompt)
    chosen = check_positions(positions, len(ids))
    specs = position_targets(tokenizer, model.config.vocab_size, ids, chosen, targets)
    given = [None] * len(chosen) if targets is None else list(targets)
    rows = sorted(set(chosen))  # the logits rows, in the forward's order
    x, pos = token_inputs(model, [ids[:rows[-1] + 1]])
    recorder, cut = LatentRecorder(model, layers), HeadCut(model)
    with explain_mode(method), recorder, cut:
        h0 = model.embed_tokens(x, pos).detach().requires_grad_(True)
        select = torch.zeros_like(pos, dtype=torch.bool)
        select[0, rows] = True
        run = Pass(h0, model(inputs_embeds=h0, positions=pos, select=select))
        row_of = {p: i for i, p in enumerate(rows)}
        logits = [run.logits[row_of[p]].detach().unsqueeze(0) for p in chosen]
        scored = [spec.score(row) for spec, row in zip(specs, logits)]
        seeds = [Seed.of(row_of[p], ids_k, spec.contrast) for p, spec, (_, ids_k) in zip(chosen, specs, scored)]
        explanations = []
        for k, grad, latent in batched_backward(run, cut, seeds, recorder.tensors(), batch_size=batch_size):
            p, (score, target_ids) = chosen[k], scored[k]
            request = Prompt(ids[:p + 1], ids[:p + 1], given[k], specs[k])
            warn_target(tokenizer, given[k], specs[k], logits[k][-1], stacklevel=3)
            explanations.append(request.explanation(
                tokenizer, target_ids, run.relevance(grad)[:p + 1], float(score.detach()), method, "logprob",
                layers=recorder.relevances(latent) if layers is not None else None))
    return explanations


@dataclass(frozen=True)
class Seed:
    """What one target explains, as a linear function of the logits: ``Σ weight · logits[row,
    token]`` over ``terms`` (a logit: ``((t, 1.0),)``; a contrast: ``((a, 1.0), (b, -1.0))``),
    ``row`` counting the logits' rows across their leading dimensions."""

    row: int
    terms: tuple[tuple[int, float], ...]

    @classmethod
    def of(cls, row: int, target_ids: Sequence[int], contrast: bool) -> Seed:
        return cls(row, ((target_ids[0], 1.0), (target_ids[1], -1.0)) if contrast else ((target_ids[0], 1.0),))


class HeadCut:
    """Context manager: cuts the graph of the one forward run inside it at the input of
    ``model.final_norm`` (the last hidden states of the scored rows), so that the backward of
    many targets runs in two steps: through the head (norm, vocabulary projection, logit scale
    and soft-cap: each row on its own) for all targets at once, then from the hidden states
    (``d`` wide) through the blocks, batched over the targets. Seeding the batched backward at
    the logits instead would hold ``targets × rows × vocabulary`` numbers."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.body: torch.Tensor | None = None  # the blocks' output, in the graph from h0
        self.leaf: torch.Tensor | None = None  # the same values, where the head's graph starts

    def __enter__(self) -> HeadCut:
        norm = getattr(self.model, "final_norm", None)
        if not isinstance(norm, nn.Module):
            raise ExplainError(f"{type(self.model).__name__} has no final_norm module: several targets in one "
                               "backward need the model's last norm (explain them one at a time with explain())")
        self._token = _CUTTING.set(self)
        self._handle = norm.register_forward_pre_hook(self._cut)
        return self

    def __exit__(self, *exc) -> None:
        _CUTTING.reset(self._token)
        self._handle.remove()

    def _cut(self, _module, args):
        if _CUTTING.get() is not self or self.leaf is not None:  # another thread's forward, or a second one
            return None
        self.body, self.leaf = args[0], args[0].detach().requires_grad_(True)
        return (self.leaf, *args[1:])

    def head_gradients(self, logits: torch.Tensor, seeds: Sequence[Seed]) -> torch.Tensor:
        """∂score_k/∂(hidden state of seeds[k].row), (targets, d): one backward through the head
        for every target whose row no earlier target took (rows do not mix in the head), one more
        for each repeat of a row."""
        width = self.leaf.shape[-1]
        out = self.leaf.new_zeros(len(seeds), width)
        rounds: list[list[int]] = []
        taken: dict[int, int] = {}
        for k, seed in enumerate(seeds):
            taken[seed.row] = taken.get(seed.row, -1) + 1
            if taken[seed.row] == len(rounds):
                rounds.append([])
            rounds[taken[seed.row]].append(k)
        for i, members in enumerate(rounds):
            grad_out = torch.zeros_like(logits)
            rows = grad_out.view(-1, logits.shape[-1])
            for k in members:
                for token, weight in seeds[k].terms:
                    rows[seeds[k].row, token] += weight
            (grad,) = torch.autograd.grad(logits, self.leaf, grad_out, retain_graph=i < len(rounds) - 1)
            grad = grad.reshape(-1, width)
            for k in members:
                out[k] = grad[seeds[k].row]
        return out


_CUTTING: contextvars.ContextVar[HeadCut | None] = contextvars.ContextVar("lucidlm_head_cut", default=None)


def batched_backward(run: Pass, cut: HeadCut, seeds: Sequence[Seed], watch: Sequence[torch.Tensor] = (),
                     batch_size: int | None = None) -> Iterator[tuple[int, torch.Tensor | None, list]]:
    """For each target k of ``run``'s forward (run inside ``cut``), in order: ``(k, ∂score_k/∂h0,
    [∂score_k/∂w for w in watch])``, score k as ``seeds[k]`` says: through the head for all
    targets (:meth:`HeadCut.head_gradients`), then one backward through the blocks per
    ``batch_size`` targets (``None``: one for all), batched over them with ``is_grads_batched``;
    ``batch_size=1``: a plain backward per target. The graph is kept until the last chunk."""
    n = len(seeds)
    size = check_batch_size(batch_size, n)
    if getattr(cut.model, "tensor_parallel", None) is not None:
        size = 1  # a tensor-parallel model's all-reduce has no batching rule (vmap): a backward per target
    head = cut.head_gradients(run.logits, seeds)
    body = cut.body
    for start in range(0, n, size):
        chunk = range(start, min(start + size, n))
        grad_out = body.new_zeros(len(chunk), *body.shape)
        rows = grad_out.view(len(chunk), -1, body.shape[-1])
        for j, k in enumerate(chunk):
            rows[j, seeds[k].row] = head[k]
        keep = chunk.stop < n
        if size == 1:  # the loop: one plain backward per target
            grads = torch.autograd.grad(body, [run.h0, *watch], grad_out[0], allow_unused=True, retain_graph=keep)
            yield start, grads[0], list(grads[1:])
            continue
        grads = torch.autograd.grad(body, [run.h0, *watch], grad_out, allow_unused=True, retain_graph=keep,
                                    is_grads_batched=True)
        del grad_out, rows
        for j, k in enumerate(chunk):
            yield k, _row(grads[0], j), [_row(g, j) for g in grads[1:]]
        del grads


def _row(grad: torch.Tensor | None, j: int) -> torch.Tensor | None:
    return None if grad is None else grad[j]


def check_batch_size(batch_size: object, n_targets: int) -> int:
    """Targets per backward: ``batch_size``, or all ``n_targets`` for ``None``; an ExplainError
    unless a positive integer.

    >>> check_batch_size(None, 5), check_batch_size(2, 5), check_batch_size(9, 5)
    (5, 2, 5)
    """
    if batch_size is None:
        return max(n_targets, 1)
    if not is_int(batch_size) or int(batch_size) < 1:
        raise ExplainError(f"batch_size={batch_size!r}: expected a positive number of targets per backward, "
                           "or None for all in one")
    return min(int(batch_size), max(n_targets, 1))


def check_positions(positions: Sequence[int] | None, n_tokens: int) -> list[int]:
    """``positions`` as indices in ``range(n_tokens)`` (negative count from the end; ``None``:
    every position but the last), in the given order; an ExplainError for anything else.

    >>> check_positions(None, 4), check_positions([-1, 0], 4)
    ([0, 1, 2], [3, 0])
    """
    if positions is None:
        if n_tokens < 2:
            raise ExplainError("positions=None explains every position that has a next token, but the text has "
                               "one token: pass positions=[0] (and a target) to explain its prediction")
        return list(range(n_tokens - 1))
    if isinstance(positions, (str, bytes)) or not isinstance(positions, Sequence | torch.Tensor):
        raise ExplainError(f"positions={positions!r}: expected a list of token indices")
    chosen = []
    for p in (positions.tolist() if isinstance(positions, torch.Tensor) else positions):
        if not is_int(p) or not -n_tokens <= int(p) < n_tokens:
            raise ExplainError(f"positions: {p!r} is not a token index of this {n_tokens}-token text")
        chosen.append(int(p) % n_tokens)
    if not chosen:
        raise ExplainError("positions=[]: expected at least one token index")
    return chosen


def position_targets(tokenizer, vocab_size: int, ids: list[int], positions: list[int],
                     targets: Sequence[Target] | None) -> list[TargetSpec]:
    """The target of each position: resolved from ``targets`` (one per position), or the text's
    next token (the top token after the last one) when ``targets`` is None. A continuation
    (several tokens) is an ExplainError: a position predicts one token."""
    if targets is None:
        return [TargetSpec(ids=[ids[p + 1]]) if p + 1 < len(ids) else TargetSpec() for p in positions]
    if isinstance(targets, (str, bytes)) or not isinstance(targets, Sequence):
        raise ExplainError(f"targets={targets!r}: expected a list with one target per position")
    if len(targets) != len(positions):
        raise ExplainError(f"targets: expected one per position ({len(positions)}), got {len(targets)}")
    specs = [resolve_target(tokenizer, t, vocab_size) for t in targets]
    for t, spec in zip(targets, specs):
        if spec.continuation:
            raise ExplainError(f"target {t!r} is a continuation of {len(spec.continuation)} tokens: a position "
                               "predicts one token (explain a continuation with explain(..., target=...))")
    return specs
