"""Explain a prediction with one forward and one backward pass.

The model applies the LRP rules itself (see :mod:`lucidlm.rules`), so an explanation is:

1. ``h0 = model.embed_tokens(ids)``, detached and marked ``requires_grad``;
2. a forward from ``h0`` under ``rules.explaining(method)``;
3. one backward of the explained score (a logit, a logit difference, or a continuation's
   log-probability) to ``h0``;
4. relevance of token t = Σ_d h0[t, d] · ∂score/∂h0[t, d].

>>> import torch
>>> from lucidlm import Config, GPT
>>> model = GPT(Config.from_name("tiny-llama")).eval()
>>> e = explain(model, None, [1, 5, 7, 9], target=3)
>>> e.relevance.shape, e.target_ids
(torch.Size([4]), [3])
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from ..errors import ExplainError, TargetHint
from ..methods import BASELINES, EXPLAIN_METHODS
from ..model import rules
from .explanation import Explanation, GenerationExplanation
from .latent import LatentRecorder
from .targets import Target, TargetSpec, leading_space_hint, resolve_target, token_strings  # noqa: F401

OBJECTIVES = ("logprob", "logit")


# ----------------------------------------------------------------------------- public API
def explain(model: nn.Module, tokenizer, prompt: str | Sequence[int], target: Target = None,
            method: str = "attnlrp", layers: str | Sequence[int] | None = None, cache=None,
            objective: str = "logprob", kv_cache: str | None = None,
            cache_tokens: int | None = None, options: dict | None = None) -> Explanation:
    """Relevance of every prompt token for ``target`` (one forward + one backward).

    ``target``:

    * ``None``: the model's top next token;
    * ``int``: that token id's logit;
    * ``str``: one token's text (``" Paris"``); if it tokenises to several tokens it is a
      continuation (below);
    * ``(a, b)`` (ids or single-token strings): the contrast logit(a) − logit(b), "why a rather
      than b";
    * a continuation (a multi-token ``str`` or a ``list`` of ids, of any length): the sum of the
      log-probabilities of its tokens, each given the prompt and the continuation before it.
      The backward starts at the logits with the gradient of log-softmax, so under a conservative
      method the relevances sum to Σ_i (z_i[t_i] − E_{p_i}[z_i]): each target logit against the
      model's expected logit at that step (log-softmax itself has no conservative rule).
      Relevance that reaches the continuation's own tokens is not returned (the explanation is
      over the prompt). ``objective="logit"`` explains Σ_i z_i[t_i] instead.

    ``method``: ``"attnlrp"`` (default), ``"cp-lrp"`` or ``"inputxgrad"`` (plain gradient × input);
    or a baseline to compare them with, explaining the same score: ``"integrated-gradients"``,
    ``"occlusion"``, ``"attention-rollout"`` or ``"random"`` (see :mod:`lucidlm.explain.baselines`;
    ``options`` holds their settings, e.g. ``{"steps": 64}``, and is for baselines only).
    ``layers``: ``None``, ``"all"`` or layer indices: also return latent relevances in
    ``Explanation.layers`` (see :mod:`lucidlm.explain.latent`).
    ``kv_cache``/``cache_tokens``: explain the prediction made through that KV-cache policy
    (delegates to :func:`lucidlm.explain.cached.explain_cached`; evicted tokens are marked).
    ``cache``: unused, kept for compatibility.

    ``Explanation.target_logit`` is the explained score: the logit, the logit difference, or the
    continuation's summed log-probability (summed logit with ``objective="logit"``).

    >>> import torch
    >>> from lucidlm import Config, GPT
    >>> model = GPT(Config.from_name("tiny-llama")).eval()
    >>> e = explain(model, None, [1, 5, 7, 9], target=(3, 4), method="cp-lrp")
    >>> e.target, len(e.relevance)
    ('3 vs 4', 4)
    """
    _check_method(method, EXPLAIN_METHODS)
    if method in BASELINES:  # not rule-based: see explain.baselines
        from .baselines import explain_baseline

        return explain_baseline(model, tokenizer, prompt, target=target, method=method, objective=objective,
                                layers=layers, kv_cache=kv_cache, options=options)
    if options:
        raise ExplainError(f"options={options!r}: only the baselines ({', '.join(BASELINES)}) take options")
    if kv_cache is not None:  # the prediction made through an eviction policy: see explain.cached
        from .cached import explain_cached

        return explain_cached(model, tokenizer, prompt, target=target, method=method, kv_cache=kv_cache,
                              cache_tokens=cache_tokens, layers=layers)
    if objective not in OBJECTIVES:
        raise ExplainError(f"objective={objective!r}: expected one of {', '.join(OBJECTIVES)}")
    ids = prompt_ids(tokenizer, prompt)
    spec = resolve_target(tokenizer, target, model.config.vocab_size)
    n_prompt = len(ids)
    inputs = ids + spec.continuation[:-1]  # the continuation's last token is never an input
    recorder = LatentRecorder(model, layers)
    with _explain_mode(method), recorder:
        h0, logits = _forward(model, inputs, first_scored=n_prompt - 1 if spec.continuation else None)
        score, target_ids = spec.score(logits[0], objective)
        grads = torch.autograd.grad(score, [h0, *recorder.tensors()], allow_unused=True)
    warn_target(tokenizer, target, spec, logits[0, -1])
    relevance = _token_relevance(h0, grads[0])[:n_prompt]
    evicted = None  # a cache policy will mark the tokens it dropped here (relevance 0 there)
    return Explanation(
        tokens=token_strings(tokenizer, ids), token_ids=ids, relevance=relevance,
        target=spec.label(tokenizer, target_ids), target_ids=target_ids,
        target_logit=float(score.detach()), method=method, evicted=evicted,
        layers=recorder.relevances(grads[1:]) if layers is not None else None,
        prompt=prompt if isinstance(prompt, str) else None, score_label=spec.score_label(objective))


def explain_generation(model: nn.Module, tokenizer, prompt: str | Sequence[int], max_new_tokens: int = 20,
                       method: str = "attnlrp") -> GenerationExplanation:
    """Greedy-generate up to ``max_new_tokens`` tokens, then explain each generated token over every
    token before it (prompt and earlier generated tokens).

    One forward under the rules over prompt + generated tokens, then one backward per generated
    token (``retain_graph``): row i of the matrix is the relevance for generated token i; by
    causality its entries at and after column ``n_prompt + i`` are 0.

    >>> import torch
    >>> from lucidlm import Config, GPT
    >>> model = GPT(Config.from_name("tiny-llama")).eval()
    >>> g = explain_generation(model, None, [1, 5, 7], max_new_tokens=3)
    >>> tuple(g.matrix.shape)
    (3, 6)
    """
    _check_method(method)
    if max_new_tokens < 1:
        raise ExplainError(f"max_new_tokens={max_new_tokens}: expected at least 1")
    ids = prompt_ids(tokenizer, prompt)
    generated = greedy(model, ids, max_new_tokens, stop_ids=getattr(tokenizer, "eos_ids", None) or ())
    n_prompt, n_gen = len(ids), len(generated)
    matrix = torch.zeros(n_gen, n_prompt + n_gen)
    logits_out: list[float] = []
    with _explain_mode(method):
        h0, logits = _forward(model, ids + generated[:-1], first_scored=n_prompt - 1)
        for i, token in enumerate(generated):
            score = logits[0, i, token]
            (grad,) = torch.autograd.grad(score, h0, retain_graph=i < n_gen - 1)
            matrix[i, : n_prompt + n_gen - 1] = _token_relevance(h0, grad)
            logits_out.append(float(score.detach()))
    return GenerationExplanation(
        prompt_tokens=token_strings(tokenizer, ids), generated_tokens=token_strings(tokenizer, generated),
        matrix=matrix, method=method, prompt_ids=ids, generated_ids=generated, target_logits=logits_out,
        prompt=prompt if isinstance(prompt, str) else None)


# ----------------------------------------------------------------------------- tokens
def prompt_ids(tokenizer, prompt: str | Sequence[int]) -> list[int]:
    """The prompt as token ids (encoded with the tokenizer's special tokens, e.g. BOS)."""
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


def warn_target(tokenizer, target: Target, spec: TargetSpec, last_logits: torch.Tensor) -> None:
    """Warn (:class:`~lucidlm.errors.TargetHint`) when a text target is probably not the token
    the user meant: see :func:`~lucidlm.explain.targets.leading_space_hint`."""
    hint = leading_space_hint(tokenizer, target, spec, last_logits.detach())
    if hint is not None:
        warnings.warn(hint, TargetHint, stacklevel=3)


# ----------------------------------------------------------------------------- mechanics
def _check_method(method: str, allowed: Sequence[str] = rules.METHODS) -> None:
    if method not in allowed:
        raise ExplainError(f"method={method!r}: expected one of {', '.join(allowed)}")
    if torch.is_inference_mode_enabled():  # tensors made there can never join an autograd graph
        raise ExplainError("explanations need autograd, but this call runs inside torch.inference_mode(): "
                           "call it outside that block (torch.no_grad() is fine: explanations re-enable "
                           "gradients for themselves)")


@contextlib.contextmanager
def _explain_mode(method: str) -> Iterator[None]:
    # grad mode on even inside a caller's torch.no_grad(); the rules only touch the backward
    with torch.enable_grad(), rules.explaining(method):
        yield


def _forward(model: nn.Module, ids: list[int], first_scored: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``h0`` (1, T, n_embd, requires grad) and the logits from it.

    ``first_scored=None``: only the last position's logits (1, 1, vocab); otherwise the logits of
    positions ``first_scored`` onwards (lm_head runs on those rows only, not on the whole prompt).
    """
    param = next(model.parameters())
    x = torch.tensor([ids], device=param.device)
    positions = torch.arange(len(ids), device=param.device)[None]
    h0 = model.embed_tokens(x, positions).detach().requires_grad_(True)
    if first_scored is None:
        return h0, model(inputs_embeds=h0, positions=positions, last_only=True)
    # lm_head only on the scored rows; a forward argument, not a hook, so that a forward running
    # in another thread at the same time is left alone
    select = positions >= first_scored
    return h0, model(inputs_embeds=h0, positions=positions, select=select)[None]


def _token_relevance(h0: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
    """Σ_d h0 · grad per token, in float32 (the product of two half-precision numbers and a sum
    over thousands of them would otherwise round or overflow)."""
    if grad is None:
        return torch.zeros(h0.shape[1])
    return (h0.detach().float() * grad.float()).sum(-1)[0].cpu()


def greedy(model: nn.Module, ids: list[int], max_new_tokens: int, stop_ids: Sequence[int] = ()) -> list[int]:
    """Greedy continuation of ``ids`` with the library's generation loop (KV cache, no rules).
    Stops after a token in ``stop_ids`` (which is kept)."""
    from ..errors import CacheError
    from ..generate import generate_ids

    try:
        return [step[0] for step in generate_ids(model, [ids], max_new_tokens, stop_ids=stop_ids)]
    except CacheError as exc:
        raise ExplainError(f"nothing to generate: {exc}") from exc
