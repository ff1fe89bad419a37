"""Explain a prediction with one forward and one backward pass.

The model applies the LRP rules itself (see :mod:`lucidlm.rules`), so an explanation is:

1. ``h0 = model.embed_tokens(ids)``, detached and marked ``requires_grad``;
2. a forward from ``h0`` under ``rules.explaining(method)``;
3. one backward of the explained score (a logit, a logit difference, or a continuation's
   log-probability) to ``h0``;
4. relevance of token t = Σ_d h0[t, d] · ∂score/∂h0[t, d].

That recipe is written once, in :mod:`lucidlm.explain.core`; this module chooses the explainer
(the rules, a baseline, a KV-cache replay) and explains generations.

>>> import torch
>>> from lucidlm import Config, GPT
>>> model = GPT(Config.from_name("tiny-llama")).eval()
>>> e = explain(model, None, [1, 5, 7, 9], target=3)
>>> e.relevance.shape, e.target_ids
(torch.Size([4]), [3])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import CacheError, ExplainError
from ..generate import generate_ids
from ..methods import BASELINES, METHODS
from .baselines import explain_baseline
from .cached import explain_cached
from .core import Pass, Prompt, check_explainable, check_objective, explain_mode, explain_prompts, \
    prompt_ids, token_inputs, warn_target  # noqa: F401  (prompt_ids, warn_target: public here too)
from .explanation import Explanation, GenerationExplanation
from .multi import DEFAULT_BATCH_SIZE, HeadCut, Seed, batched_backward, check_batch_size
from .targets import Target, TargetSpec, leading_space_hint, resolve_target, token_strings  # noqa: F401


# ----------------------------------------------------------------------------- public API
def explain(model: nn.Module, tokenizer, prompt: str | Sequence[int], target: Target = None,
            method: str = "attnlrp", layers: str | Sequence[int] | None = None, objective: str = "logprob",
            kv_cache: str | None = None, cache_tokens: int | str | None = None,
            options: dict | None = None) -> Explanation:
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

    ``Explanation.target_logit`` is the explained score: the logit, the logit difference, or the
    continuation's summed log-probability (summed logit with ``objective="logit"``).

    >>> import torch
    >>> from lucidlm import Config, GPT
    >>> model = GPT(Config.from_name("tiny-llama")).eval()
    >>> e = explain(model, None, [1, 5, 7, 9], target=(3, 4), method="cp-lrp")
    >>> e.target, len(e.relevance)
    ('3 vs 4', 4)
    """
    check_explainable(method)
    if method in BASELINES:  # not rule-based: see explain.baselines
        return explain_baseline(model, tokenizer, prompt, target=target, method=method, objective=objective,
                                layers=layers, kv_cache=kv_cache, options=options)
    if options:
        raise ExplainError(f"options={options!r}: only the baselines ({', '.join(BASELINES)}) take options")
    if kv_cache is not None:  # the prediction made through an eviction policy: see explain.cached
        return explain_cached(model, tokenizer, prompt, target=target, method=method, kv_cache=kv_cache,
                              cache_tokens=cache_tokens, layers=layers)
    check_objective(objective)
    (explanation,) = explain_prompts(model, tokenizer, [Prompt.resolve(model, tokenizer, prompt, target)], method,
                                     objective, layers=layers)
    return explanation


def explain_generation(model: nn.Module, tokenizer, prompt: str | Sequence[int], max_new_tokens: int = 20,
                       method: str = "attnlrp",
                       batch_size: int | None = DEFAULT_BATCH_SIZE) -> GenerationExplanation:
    """Greedy-generate up to ``max_new_tokens`` tokens, then explain each generated token over every
    token before it (prompt and earlier generated tokens).

    One forward under the rules over prompt + generated tokens, then one backward for all the
    generated tokens at once, batched over them (:func:`lucidlm.explain.multi.batched_backward`;
    ``batch_size``: tokens per backward, default :data:`~lucidlm.explain.multi.DEFAULT_BATCH_SIZE`,
    ``None`` all in one, ``1`` one backward per token, the least memory). Row i of the matrix is the relevance for generated token i; by causality its
    entries at and after column ``n_prompt + i`` are 0.

    >>> import torch
    >>> from lucidlm import Config, GPT
    >>> model = GPT(Config.from_name("tiny-llama")).eval()
    >>> g = explain_generation(model, None, [1, 5, 7], max_new_tokens=3)
    >>> tuple(g.matrix.shape)
    (3, 6)
    """
    check_explainable(method, METHODS)
    if max_new_tokens < 1:
        raise ExplainError(f"max_new_tokens={max_new_tokens}: expected at least 1")
    check_batch_size(batch_size, max_new_tokens)
    ids = prompt_ids(tokenizer, prompt)
    generated = greedy(model, ids, max_new_tokens, stop_ids=getattr(tokenizer, "eos_ids", None) or ())
    n_prompt, n_gen = len(ids), len(generated)
    matrix = torch.zeros(n_gen, n_prompt + n_gen)
    x, positions = token_inputs(model, [ids + generated[:-1]])
    with explain_mode(method), HeadCut(model) as cut:  # one forward, one batched backward for every token
        run = Pass.forward(model, positions, ids=x, first_scored=n_prompt - 1)
        seeds = [Seed.of(i, [token], contrast=False) for i, token in enumerate(generated)]
        for i, grad, _ in batched_backward(run, cut, seeds, batch_size=batch_size):
            matrix[i, : n_prompt + n_gen - 1] = run.relevance(grad)
    return GenerationExplanation(
        prompt_tokens=token_strings(tokenizer, ids), generated_tokens=token_strings(tokenizer, generated),
        matrix=matrix, method=method, prompt_ids=ids, generated_ids=generated,
        target_logits=[float(run.logits[0, i, token].detach()) for i, token in enumerate(generated)],
        prompt=prompt if isinstance(prompt, str) else None)


# ----------------------------------------------------------------------------- generation
def greedy(model: nn.Module, ids: list[int], max_new_tokens: int, stop_ids: Sequence[int] = ()) -> list[int]:
    """Greedy continuation of ``ids`` with the library's generation loop (KV cache, no rules).
    Stops after a token in ``stop_ids`` (which is kept)."""
    try:
        return [step[0] for step in generate_ids(model, [ids], max_new_tokens, stop_ids=stop_ids)]
    except CacheError as exc:
        raise ExplainError(f"nothing to generate: {exc}") from exc
