"""Several explanations in one forward and one backward pass.

The prompts are left-padded into one batch (positions -1 on the padding, as
:func:`lucidlm.generate.left_pad` does for generation), so every real token keeps the position it
has alone and no real query attends to a padding key. The rows' scores are summed before the
backward: the rows never mix, so each row's gradient is exactly its own, and each returned
:class:`~lucidlm.explain.explanation.Explanation` is the single-prompt one up to float rounding
(batched matrix products round differently).

>>> import torch
>>> from lucidlm import Config, GPT
>>> model = GPT(Config.from_name("tiny-llama")).eval()
>>> batch = explain_batch(model, None, [[1, 5, 7, 9], [1, 2]], targets=[3, None])
>>> [len(e.relevance) for e in batch], batch[0].target_ids
([4, 2], [3])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import ExplainError
from ..generate import left_pad
from ..model import rules
from ..methods import EXPLAIN_METHODS
from .explainer import OBJECTIVES, _check_method, _explain_mode, _token_relevance, explain, prompt_ids, warn_target
from .explanation import Explanation
from .targets import Target, TargetSpec, resolve_target, token_strings


def explain_batch(model: nn.Module, tokenizer, prompts: Sequence[str | Sequence[int]],
                  targets: Sequence[Target] | None = None, method: str = "attnlrp",
                  layers: str | Sequence[int] | None = None, objective: str = "logprob",
                  kv_cache: str | None = None, cache_tokens: int | None = None) -> list[Explanation]:
    """One :class:`Explanation` per prompt, as :func:`~lucidlm.explain.explainer.explain` gives
    it, with the prompts explained together in one forward and one backward pass.

    ``targets``: one per prompt (``None`` for all: each prompt's top next token); each is what
    ``explain`` accepts. Rows whose target is a multi-token continuation, a method that is not one
    of the rule methods, and calls with ``layers`` or ``kv_cache`` are explained one prompt at a
    time with ``explain`` (same results, no batching).

    >>> import torch
    >>> from lucidlm import Config, GPT
    >>> model = GPT(Config.from_name("tiny-llama")).eval()
    >>> one, = explain_batch(model, None, [[1, 5, 7, 9]], targets=[(3, 4)], method="cp-lrp")
    >>> one == explain(model, None, [1, 5, 7, 9], target=(3, 4), method="cp-lrp")
    True
    """
    _check_method(method, EXPLAIN_METHODS)
    targets = [None] * len(prompts) if targets is None else list(targets)
    if len(targets) != len(prompts):
        raise ExplainError(f"targets: expected one per prompt ({len(prompts)}), got {len(targets)}")
    if objective not in OBJECTIVES:
        raise ExplainError(f"objective={objective!r}: expected one of {', '.join(OBJECTIVES)}")

    def single(i: int) -> Explanation:
        return explain(model, tokenizer, prompts[i], target=targets[i], method=method, layers=layers,
                       objective=objective, kv_cache=kv_cache, cache_tokens=cache_tokens)

    if layers is not None or kv_cache is not None or method not in rules.METHODS:
        return [single(i) for i in range(len(prompts))]
    ids = [prompt_ids(tokenizer, p) for p in prompts]
    specs = [resolve_target(tokenizer, t, model.config.vocab_size) for t in targets]
    batched = [i for i, spec in enumerate(specs) if not spec.continuation]
    results: dict[int, Explanation] = {i: single(i) for i in range(len(prompts)) if specs[i].continuation}
    if batched:
        rows = _explain_rows(model, tokenizer, [ids[i] for i in batched], [specs[i] for i in batched],
                             [targets[i] for i in batched], method)
        for i, (relevance, score, target_ids) in zip(batched, rows):
            results[i] = Explanation(
                tokens=token_strings(tokenizer, ids[i]), token_ids=ids[i], relevance=relevance,
                target=specs[i].label(tokenizer, target_ids), target_ids=target_ids, target_logit=score,
                method=method, prompt=prompts[i] if isinstance(prompts[i], str) else None,
                score_label=specs[i].score_label(objective))
    return [results[i] for i in range(len(prompts))]


def _explain_rows(model: nn.Module, tokenizer, ids: list[list[int]], specs: list[TargetSpec],
                  targets: list[Target], method: str) -> list[tuple[torch.Tensor, float, list[int]]]:
    """(relevance over the row's own tokens, score, target ids) per row: one padded forward, one
    backward of the sum of the rows' scores."""
    device = next(model.parameters()).device
    x, positions = (t.to(device) for t in left_pad(ids))
    with _explain_mode(method):
        h0 = model.embed_tokens(x, positions).detach().requires_grad_(True)
        logits = model(inputs_embeds=h0, positions=positions, last_only=True)  # (rows, 1, vocab)
        scored = [spec.score(logits[row]) for row, spec in enumerate(specs)]
        (grad,) = torch.autograd.grad(torch.stack([score for score, _ in scored]).sum(), h0)
    out = []
    for row, (spec, (score, target_ids)) in enumerate(zip(specs, scored)):
        warn_target(tokenizer, targets[row], spec, logits[row, -1])
        # the row's real tokens are its last len(ids[row]) positions; padding is dropped
        relevance = _token_relevance(h0[row:row + 1], grad[row:row + 1])[-len(ids[row]):]
        out.append((relevance, float(score.detach()), target_ids))
    return out
