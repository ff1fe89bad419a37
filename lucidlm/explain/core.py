"""The one explanation recipe, which every explainer runs.

prompt ids → target → input embeddings ``h0`` that require grad → the method's rules in force →
forward → backward of the explained score → relevance of token t = Σ_d h0[t, d] · ∂score/∂h0[t, d]
→ :class:`~lucidlm.explain.explanation.Explanation`.

Two levels, so that each explainer passes only what makes it different:

* :func:`explain_prompts`: the whole recipe for one or more :class:`Prompt` s, left-padded into
  one forward with one backward (rows never mix, so each row's gradient is its own).
  :func:`~lucidlm.explain.explainer.explain` gives it one prompt,
  :func:`~lucidlm.explain.batch.explain_batch` several, and
  :func:`~lucidlm.explain.cached.explain_cached` one with a ``cache`` that replays what each query
  saw under a KV-cache policy, and the tokens it evicted.
* :class:`Pass`: one forward from ``h0`` and its backward(s), for the explainers that score in
  their own way: a generation (one backward per generated token from one forward), integrated
  gradients (the embeddings are path points supplied from outside, no rules) and
  :func:`~lucidlm.explain.conservation.check` (CP-LRP under a probe, with the biases' gradients watched).

The checks every entry point shares live here too: :func:`check_explainable` (the method's name,
through :func:`lucidlm.methods.check_method`, and no ``torch.inference_mode``) and
:func:`check_objective`. This module imports no other explainer, so each of them may import it.

>>> from lucidlm import Config, GPT
>>> model = GPT(Config.from_name("tiny-llama")).eval()
>>> prompt = Prompt.resolve(model, None, [1, 5, 7, 9], target=3)
>>> (e,) = explain_prompts(model, None, [prompt], "attnlrp")
>>> e.relevance.shape, e.target_ids
(torch.Size([4]), [3])
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from ..errors import ExplainError, TargetHint
from ..generate import left_pad
from ..methods import EXPLAIN_METHODS, check_method
from ..model import rules
from .explanation import Explanation
from .latent import LatentRecorder
from .targets import Target, TargetSpec, leading_space_hint, resolve_target, token_strings

#: what a continuation target explains: its summed log-probabilities, or its summed logits
OBJECTIVES = ("logprob", "logit")


# ----------------------------------------------------------------------------- checks at the entry
def check_explainable(method: object, allowed: Sequence[str] = EXPLAIN_METHODS) -> str:
    """``method`` when it is one of ``allowed`` (:func:`lucidlm.methods.check_method`) and autograd
    can run here (see :func:`refuse_inference_mode`); else an :class:`~lucidlm.errors.ExplainError`."""
    check_method(method, allowed)
    refuse_inference_mode()
    return method


def refuse_inference_mode() -> None:
    """An ExplainError inside ``torch.inference_mode()``: tensors made there can never join an
    autograd graph, and ``torch.enable_grad()`` does not lift it."""
    if torch.is_inference_mode_enabled():
        raise ExplainError("explanations need autograd, but this call runs inside torch.inference_mode(): "
                           "call it outside that block (torch.no_grad() is fine: explanations re-enable "
                           "gradients for themselves)")


def check_objective(objective: object) -> str:
    """``objective`` when it is one of :data:`OBJECTIVES`, else an ExplainError."""
    if objective not in OBJECTIVES:
        raise ExplainError(f"objective={objective!r}: expected one of {', '.join(OBJECTIVES)}")
    return objective


# ----------------------------------------------------------------------------- the prompt
def prompt_ids(tokenizer, prompt: str | Sequence[int]) -> list[int]:
    """The prompt as token ids (encoded with the tokenizer's special tokens, e.g. BOS).

    >>> prompt_ids(None, torch.tensor([[1, 5]]))
    [1, 5]
    """
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ExplainError("prompt is text but the model has no tokenizer: pass token ids")
        ids = list(tokenizer.encode(prompt))
    elif isinstance(prompt, torch.Tensor):
        ids = prompt.flatten().tolist()
    else:
        ids = [int(i) for i in prompt]
    if not ids:
        raise ExplainError("the prompt has no tokens: there is nothing to explain")
    return ids


def warn_target(tokenizer, target: Target, spec: TargetSpec, last_logits: torch.Tensor, stacklevel: int = 3) -> None:
    """Warn (:class:`~lucidlm.errors.TargetHint`) when a text target is probably not the token
    the user meant: see :func:`~lucidlm.explain.targets.leading_space_hint`. ``stacklevel``: as
    :func:`warnings.warn`'s, counted from here (3: the caller of the function that calls this)."""
    hint = leading_space_hint(tokenizer, target, spec, last_logits.detach())
    if hint is not None:
        warnings.warn(hint, TargetHint, stacklevel=stacklevel)


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One prompt to explain: as the caller gave it, as token ids, and its target as given and
    resolved (:func:`~lucidlm.explain.targets.resolve_target`)."""

    given: str | Sequence[int]
    ids: list[int]
    target: Target
    spec: TargetSpec

    @classmethod
    def resolve(cls, model: nn.Module, tokenizer, prompt: str | Sequence[int], target: Target) -> Prompt:
        ids = prompt_ids(tokenizer, prompt)
        return cls(prompt, ids, target, resolve_target(tokenizer, target, model.config.vocab_size))

    @property
    def inputs(self) -> list[int]:
        """The tokens the model reads: the prompt, then the continuation but its last token (that
        one is only predicted)."""
        return self.ids + self.spec.continuation[:-1]

    @property
    def first_scored(self) -> int | None:
        """The first position whose logits the score reads: the last prompt token when the target
        is a continuation; ``None`` when only the last position's logits count."""
        return len(self.ids) - 1 if self.spec.continuation else None

    def explanation(self, tokenizer, target_ids: list[int], relevance: torch.Tensor, score: float, method: str,
                    objective: str, evicted: torch.Tensor | None = None,
                    layers: dict[str, torch.Tensor] | None = None) -> Explanation:
        """The :class:`Explanation` of this prompt: ``relevance`` over its tokens (float32, on the
        CPU), ``score`` the explained value."""
        return Explanation(
            tokens=token_strings(tokenizer, self.ids), token_ids=self.ids, relevance=relevance.float().cpu(),
            target=self.spec.label(tokenizer, target_ids), target_ids=target_ids, target_logit=score,
            method=method, evicted=evicted, layers=layers,
            prompt=self.given if isinstance(self.given, str) else None, score_label=self.spec.score_label(objective))


# ----------------------------------------------------------------------------- one pass
@contextlib.contextmanager
def explain_mode(method: str | None) -> Iterator[None]:
    """Autograd on (even inside a caller's ``torch.no_grad()``) and ``method``'s rules in force
    (:func:`lucidlm.model.rules.explaining`; ``None``: plain gradients, as the baselines take them).
    The rules act while the forward builds the graph; the backward runs what it recorded."""
    refuse_inference_mode()
    with torch.enable_grad(), (rules.explaining(method) if method is not None else contextlib.nullcontext()):
        yield


def logits_from(model: nn.Module, h0: torch.Tensor, positions: torch.Tensor, first_scored: int | None = None,
                cache=None, all_positions: bool = False) -> torch.Tensor:
    """Logits (rows, scored positions, vocab) of the forward from input embeddings ``h0`` (rows,
    T, n_embd) at ``positions`` (rows, T).

    ``first_scored=None``: the last position's only; otherwise those of positions ``first_scored``
    onwards, the same number in every row (lm_head runs on those rows only). ``all_positions``:
    every position's, as a plain forward gives them. ``cache``: a
    :class:`~lucidlm.cache.base.KVCache` the forward runs through (the cached explainer's replay of
    what each query saw).
    """
    if all_positions:
        return model(inputs_embeds=h0, positions=positions, cache=cache)
    if first_scored is None:
        return model(inputs_embeds=h0, positions=positions, cache=cache, last_only=True)
    # lm_head only on the scored rows; a forward argument, not a hook, so that a forward running
    # in another thread at the same time is left alone
    select = positions >= first_scored
    return model(inputs_embeds=h0, positions=positions, cache=cache, select=select).unflatten(0, (h0.shape[0], -1))


def token_inputs(model: nn.Module, rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows as the model reads them, on its device: ids and positions (rows, T), left-padded
    to the longest (:func:`lucidlm.generate.left_pad`: positions -1 on the padding, so every real
    token keeps the position it has alone and no real query attends to a padding key)."""
    device = next(model.parameters()).device
    ids, positions = left_pad(rows)
    return ids.to(device), positions.to(device)


def token_relevance(h0: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
    """Σ_d h0 · grad per token of the first row (T,), in float32 on the CPU (the product of two
    half-precision numbers and a sum over thousands of them would otherwise round or overflow)."""
    if grad is None:
        return torch.zeros(h0.shape[1])
    return (h0.detach().float() * grad.float()).sum(-1)[0].cpu()


@dataclasses.dataclass(frozen=True)
class Pass:
    """One forward from input embeddings ``h0`` that require grad, and backward passes from its
    ``logits`` (rows, scored positions, vocab). Run it inside :func:`explain_mode` (and inside a
    :class:`~lucidlm.explain.latent.LatentRecorder` whose tensors are to be watched).

    >>> from lucidlm import Config, GPT
    >>> model = GPT(Config.from_name("tiny-llama")).eval()
    >>> ids, positions = token_inputs(model, [[1, 5, 7]])
    >>> with explain_mode("cp-lrp"):
    ...     run = Pass.forward(model, positions, ids=ids)
    ...     grad, _ = run.gradients(run.logits[0, -1, 3])
    >>> run.relevance(grad).shape
    torch.Size([3])
    """

    h0: torch.Tensor
    logits: torch.Tensor

    @classmethod
    def forward(cls, model: nn.Module, positions: torch.Tensor, *, ids: torch.Tensor | None = None,
                embeds: torch.Tensor | None = None, first_scored: int | None = None, cache=None,
                all_positions: bool = False) -> Pass:
        """Embed ``ids`` (rows, T) at ``positions``, or start from ``embeds`` (rows, T, n_embd)
        supplied from outside; then the forward of :func:`logits_from`."""
        start = model.embed_tokens(ids, positions) if embeds is None else embeds
        h0 = start.detach().requires_grad_(True)
        return cls(h0, logits_from(model, h0, positions, first_scored, cache, all_positions))

    def gradients(self, score: torch.Tensor, watch: Sequence[torch.Tensor] = (),
                  retain: bool = False) -> tuple[torch.Tensor | None, list[torch.Tensor | None]]:
        """∂score/∂h0, and ∂score/∂ each tensor of ``watch`` (recorded latents, bias parameters;
        None where the score does not depend on one). ``retain``: keep the graph for another
        backward from the same forward."""
        grads = torch.autograd.grad(score, [self.h0, *watch], allow_unused=True, retain_graph=retain)
        return grads[0], list(grads[1:])

    def relevance(self, grad: torch.Tensor | None, row: int = 0) -> torch.Tensor:
        """Token relevance (T,) of ``row``, padding included (see :func:`token_relevance`)."""
        return token_relevance(self.h0[row:row + 1], None if grad is None else grad[row:row + 1])


# ----------------------------------------------------------------------------- the recipe
def explain_prompts(model: nn.Module, tokenizer, prompts: Sequence[Prompt], method: str,
                    objective: str = "logprob", *, cache=None, layers: str | Sequence[int] | None = None,
                    evicted: torch.Tensor | None = None) -> list[Explanation]:
    """An :class:`Explanation` per prompt, from one forward over the left-padded prompts under
    ``method``'s rules and one backward of the sum of their scores (rows never mix, so each row's
    gradient is exactly its own).

    A continuation target (scored at several positions) must come alone. ``cache``: see
    :func:`logits_from`; ``layers``: latent relevances too (:mod:`lucidlm.explain.latent`);
    ``evicted``: the tokens a cache policy dropped, marked in the explanation. The caller has
    checked ``method`` and ``objective``.
    """
    first_scored = prompts[0].first_scored
    if len(prompts) > 1 and any(p.spec.continuation for p in prompts):
        raise ValueError("explain_prompts: a continuation target is explained alone")
    ids, positions = token_inputs(model, [p.inputs for p in prompts])
    recorder = LatentRecorder(model, layers)
    with explain_mode(method), recorder:
        run = Pass.forward(model, positions, ids=ids, first_scored=first_scored, cache=cache)
        scored = [p.spec.score(run.logits[row], objective) for row, p in enumerate(prompts)]
        grad, latent = run.gradients(torch.stack([score for score, _ in scored]).sum(), recorder.tensors())
    explanations = []
    for row, (prompt, (score, target_ids)) in enumerate(zip(prompts, scored)):
        warn_target(tokenizer, prompt.target, prompt.spec, run.logits[row, -1], stacklevel=4)
        # the row's own tokens are its last len(inputs) positions (left padding); the prompt
        # comes first among them, the continuation's inputs after it
        relevance = run.relevance(grad, row)[-len(prompt.inputs):][:len(prompt.ids)]
        explanations.append(prompt.explanation(
            tokenizer, target_ids, relevance, float(score.detach()), method, objective, evicted=evicted,
            layers=recorder.relevances(latent) if layers is not None else None))
    return explanations
