"""Several explanations in one forward and one backward pass.

The prompts are left-padded into one batch (positions -1 on the padding, as
:func:`lucidlm.generate.left_pad` does for generation), so every real token keeps the position it
has alone and no real query attends to a padding key. The rows' scores are summed before the
backward: the rows never mix, so each row's gradient is exactly its own, and each returned
:class:`~lucidlm.explain.explanation.Explanation` is the single-prompt one up to float rounding
(batched matrix products round differently). The recipe is
:func:`lucidlm.explain.core.explain_prompts`'s; this module decides which prompts can share it.

>>> import torch
>>> from lucidlm import Config, GPT
>>> model = GPT(Config.from_name("tiny-llama")).eval()
>>> batch = explain_batch(model, None, [[1, 5, 7, 9], [1, 2]], targets=[3, None])
>>> [len(e.relevance) for e in batch], batch[0].target_ids
([4, 2], [3])
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..errors import ExplainError
from ..methods import METHODS
from .core import Prompt, check_explainable, check_objective, explain_prompts, prompt_ids
from .explainer import explain
from .explanation import Explanation
from .targets import Target, resolve_target


def explain_batch(model: nn.Module, tokenizer, prompts: Sequence[str | Sequence[int]],
                  targets: Sequence[Target] | None = None, method: str = "attnlrp",
                  layers: str | Sequence[int] | None = None, objective: str = "logprob",
                  kv_cache: str | None = None, cache_tokens: int | str | None = None) -> list[Explanation]:
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
    check_explainable(method)
    targets = [None] * len(prompts) if targets is None else list(targets)
    if len(targets) != len(prompts):
        raise ExplainError(f"targets: expected one per prompt ({len(prompts)}), got {len(targets)}")
    check_objective(objective)

    def single(i: int) -> Explanation:
        return explain(model, tokenizer, prompts[i], target=targets[i], method=method, layers=layers,
                       objective=objective, kv_cache=kv_cache, cache_tokens=cache_tokens)

    if layers is not None or kv_cache is not None or method not in METHODS:
        return [single(i) for i in range(len(prompts))]
    ids = [prompt_ids(tokenizer, p) for p in prompts]
    specs = [resolve_target(tokenizer, t, model.config.vocab_size) for t in targets]
    requests = [Prompt(*row) for row in zip(prompts, ids, targets, specs)]
    # a continuation is scored at several positions: those rows go one at a time
    results: dict[int, Explanation] = {i: single(i) for i, r in enumerate(requests) if r.spec.continuation}
    batched = [i for i, r in enumerate(requests) if not r.spec.continuation]
    if batched:
        explained = explain_prompts(model, tokenizer, [requests[i] for i in batched], method, objective)
        results.update(zip(batched, explained))
    return [results[i] for i in range(len(prompts))]
