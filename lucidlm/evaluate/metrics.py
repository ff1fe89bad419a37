"""Faithfulness of token attributions: do the tokens an explanation ranks first carry the prediction?

Each metric perturbs the prompt by replacing tokens with one fixed **replacement** token, in the
order the explanation ranks them (most relevant first; ties keep prompt order), re-runs the model,
and reads the target's **score**: ``"prob"`` (default; its softmax probability) or ``"logit"``.
With n prompt tokens and k of them replaced:

* ``deletion`` (Petsiuk, Das & Saenko, "RISE", BMVC 2018): the curve of the score as the k most
  relevant tokens are replaced, k = 0..n, and its area (trapezoid rule, x = k/n on [0, 1]).
  A faithful explanation removes the evidence first, so the curve falls fast: **lower is better**.
* ``insertion`` (same paper): start from the all-replaced prompt and restore the k most relevant
  tokens, k = 0..n; its area: **higher is better**.
* ``comprehensiveness`` (DeYoung et al., "ERASER", ACL 2020; AOPC over its bins of 1, 5, 10, 20
  and 50 %, the default ``fractions``): the mean over the ``fractions`` f of
  score(x) − score(x with its top ⌈f·n⌉ tokens replaced): **higher is better**.
* ``sufficiency`` (same paper): the mean over f of score(x) − score(only the top ⌈f·n⌉ tokens kept,
  the rest replaced): **lower is better**. A bin removes or keeps at least one token.
* ``abpc`` (Achtibat et al., "AttnLRP", ICML 2024): the area between the least-relevant-first
  (LeRF) and the most-relevant-first (MoRF = deletion) curves, area(LeRF) − area(MoRF):
  **higher is better**; a random order scores about 0. Since deleting the least relevant first is
  restoring the most relevant first read backwards, with every k it equals insertion − deletion.

``keep_first=True``: token 0 is never replaced, and the curves run over the other n − 1 tokens. A
model's first token is often its attention sink (a BOS token, or the first word of a model without
one, as SmolLM2): replacing it disrupts every prediction whatever the explanation says, so a method
that ranks it first wins the deletion metrics for that reason alone (off by default: every token
counts, as the explanation ranks it).

``steps``: for long prompts, the curves are measured at ``steps + 1`` evenly spaced k (rounded to
whole tokens) instead of every k. Every perturbed prompt of one explanation runs in batches of
``batch_size``, each distinct prompt once (every curve starts at the intact prompt and ends at the
all-replaced one).

The target's score by kind (see :mod:`lucidlm.evaluate.inputs`): a **token** t scores p(t) or its
logit at the last prompt position; a **continuation** t_1..t_m is appended to every perturbed prompt
(never perturbed itself) and scores its joint probability Π_i p(t_i | prompt, t_<i) (``"prob"``:
exp of the summed log-probability the explainer explains) or Σ_i logit(t_i); a
**contrast** (a, b) scores p(a) − p(b) or logit(a) − logit(b).

The replacement token (``replacement=None``): the single-space token, else id 0, the same default
as occlusion's (:func:`lucidlm.explain.baselines.default_replacement`, one copy). A perturbed prompt
keeps its n tokens (positions do not move), and a space adds as little meaning as an in-text token
can; ``unk``/``pad`` are out of distribution mid-text, and some chat models pad with their
end-of-turn token (SmolLM2's ``<|im_end|>``). Pass ``replacement=ID`` to choose another.

>>> import torch
>>> from lucidlm import Config, GPT
>>> from lucidlm.explain.explainer import explain
>>> _ = torch.manual_seed(0)
>>> model = GPT(Config.from_name("tiny-llama")).eval()
>>> e = explain(model, None, [1, 5, 7, 9, 11], target=3)
>>> r = faithfulness(model, [e])
>>> sorted(r.mean), len(r.examples[0].curves["deletion"][1])  # n + 1 points on the curve
(['abpc', 'comprehensiveness', 'deletion', 'insertion', 'sufficiency'], 6)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ExplainError
from ..explain.baselines import default_replacement
from .inputs import Item, as_items
from .result import ExampleResult, FaithfulnessResult

METRICS = ("deletion", "insertion", "comprehensiveness", "sufficiency", "abpc")
SCORES = ("prob", "logit")
FRACTIONS = (0.01, 0.05, 0.1, 0.2, 0.5)

#: a perturbed prompt: ("del", k) = the k most relevant tokens replaced, ("ins", k) = all but them
State = tuple[str, int]


def faithfulness(llm_or_model: Any, explanations: Iterable[Any], metrics: Sequence[str] = METRICS,
                 replacement: int | None = None, score: str = "prob",
                 fractions: Sequence[float] = FRACTIONS, steps: int | None = None, batch_size: int = 64,
                 keep_first: bool = False, progress: bool = False) -> FaithfulnessResult:
    """Faithfulness metrics of ``explanations`` on the model that made them (see the module docstring).

    ``llm_or_model``: an :class:`~lucidlm.LLM` (its tokenizer picks the default replacement) or a
    model whose call on ids (batch, tokens) gives logits (batch, tokens, vocab), a lucidlm
    :class:`~lucidlm.GPT` or a ``transformers`` causal LM. ``explanations``: Explanations,
    explain-dataset rows or ``(token_ids, relevance, target)`` tuples
    (:mod:`lucidlm.evaluate.inputs`). ``keep_first``: never replace token 0 (see the module
    docstring). ``progress``: a bar on stderr counting explanations.

    >>> import torch
    >>> from lucidlm import Config, GPT
    >>> model = GPT(Config.from_name("tiny-llama")).eval()
    >>> r = faithfulness(model, [([1, 5, 7], [0.5, 2.0, -1.0], 3)], metrics=["deletion"], score="logit")
    >>> r.examples[0].curves["deletion"][0]  # x = k / n
    [0.0, 0.3333333333333333, 0.6666666666666666, 1.0]
    """
    metrics = check_metrics(metrics)
    _check_options(score, fractions, steps, batch_size)
    model, tokenizer = _unwrap(llm_or_model)
    replacement = default_replacement(tokenizer) if replacement is None else _check_replacement(replacement, model)
    items = as_items(explanations)
    scorer = _Scorer(model, replacement, score, batch_size, keep_first)
    examples = [_evaluate_item(scorer, item, metrics, fractions, steps) for item in _bar(items, progress)]
    methods = {item.method for item in items}
    return FaithfulnessResult(examples, metrics, score, replacement, tuple(float(f) for f in fractions), steps,
                              method=methods.pop() if len(methods) == 1 else None, keep_first=keep_first)


# ----------------------------------------------------------------------------- one explanation
def _evaluate_item(scorer: _Scorer, item: Item, metrics: Sequence[str], fractions: Sequence[float],
                   steps: int | None) -> ExampleResult:
    """Every metric of one explanation: its perturbed prompts scored in one go, then read off."""
    n = len(item.token_ids) - int(scorer.keep_first)  # the tokens that may be replaced
    if n < 1:
        raise ExplainError(f"explanation {item.id!r}: keep_first leaves no token to replace in a 1-token prompt")
    grid = curve_points(n, steps)
    bins = bin_sizes(n, fractions)
    curves = {"deletion": [("del", k) for k in grid], "insertion": [("ins", k) for k in grid],
              "lerf": [("ins", n - k) for k in grid]}  # LeRF: deleting the least relevant = keeping the rest
    wanted = {"deletion": ["deletion"], "insertion": ["insertion"], "abpc": ["deletion", "lerf"]}
    names = [c for c in curves if any(c in wanted.get(m, ()) for m in metrics)]
    states = [("del", 0), ("del", n)] + [s for c in names for s in curves[c]]
    states += [("del", k) for k in bins if "comprehensiveness" in metrics]
    states += [("ins", k) for k in bins if "sufficiency" in metrics]
    value = dict(zip(states, scorer.scores(item, states)))
    full = value[("del", 0)]
    x = (np.asarray(grid, dtype=np.float64) / n).tolist()
    curve = {c: (x, [value[s] for s in curves[c]]) for c in names}
    out = {"deletion": lambda: area(*curve["deletion"]), "insertion": lambda: area(*curve["insertion"]),
           "comprehensiveness": lambda: float(np.mean([full - value[("del", k)] for k in bins])),
           "sufficiency": lambda: float(np.mean([full - value[("ins", k)] for k in bins])),
           "abpc": lambda: area(*curve["lerf"]) - area(*curve["deletion"])}
    return ExampleResult(item.id, n, full, value[("del", n)], {m: out[m]() for m in metrics}, curve)


def curve_points(n: int, steps: int | None = None) -> list[int]:
    """The numbers of replaced tokens a curve is measured at: every k = 0..n, or ``steps + 1``
    evenly spaced ones (rounded to whole tokens) when ``steps < n``.

    >>> curve_points(4), curve_points(10, steps=4)
    ([0, 1, 2, 3, 4], [0, 2, 5, 8, 10])
    """
    if steps is None or steps >= n:
        return list(range(n + 1))
    return sorted({int(k) for k in np.rint(np.linspace(0, n, steps + 1))})


def bin_sizes(n: int, fractions: Sequence[float]) -> list[int]:
    """Tokens in each top-f bin: ⌈f·n⌉, at least 1 (a bin that moves nothing measures nothing).

    >>> bin_sizes(10, (0.01, 0.05, 0.1, 0.2, 0.5)), bin_sizes(100, (0.07,))
    ([1, 1, 1, 2, 5], [7])
    """
    return [min(n, max(1, math.ceil(f * n - 1e-9))) for f in fractions]  # 1e-9: 0.07 · 100 = 7.000000000000001


def area(x: Sequence[float], y: Sequence[float]) -> float:
    """Area under the curve y(x) by the trapezoid rule.

    >>> area([0.0, 0.5, 1.0], [4.0, 2.0, 0.0])
    2.0
    """
    xs, ys = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    return float(np.sum((ys[1:] + ys[:-1]) / 2 * np.diff(xs)))


def perturbed(item: Item, states: Sequence[State], replacement: int, keep_first: bool = False) -> torch.Tensor:
    """The prompts of ``states`` (see :data:`State`) as ids (len(states), n); with ``keep_first``
    token 0 is never replaced and k counts the other tokens.

    >>> from lucidlm.evaluate.inputs import as_item
    >>> item = as_item(([5, 6, 7], [0.1, 0.9, -0.2], 3), 0)
    >>> perturbed(item, [("del", 1), ("ins", 1)], replacement=0).tolist()
    [[5, 0, 7], [0, 6, 0]]
    >>> perturbed(item, [("del", 1), ("ins", 0)], replacement=0, keep_first=True).tolist()
    [[5, 0, 7], [5, 0, 0]]
    """
    start = int(keep_first)
    free = len(item.token_ids) - start
    rank = np.empty(free, dtype=np.int64)
    rank[np.argsort(-item.relevance[start:], kind="stable")] = np.arange(free)  # ties: prompt order
    replaced = np.array([rank < k if kind == "del" else rank >= k for kind, k in states]).reshape(-1, free)
    replaced = np.concatenate([np.zeros((len(replaced), start), dtype=bool), replaced], axis=1)
    ids = np.where(replaced, replacement, np.asarray(item.token_ids, dtype=np.int64))
    return torch.from_numpy(ids)


# ----------------------------------------------------------------------------- running the model
class _Scorer:
    """Scores perturbed prompts of an item: batched, each distinct prompt once."""

    def __init__(self, model: Any, replacement: int, score: str, batch_size: int, keep_first: bool) -> None:
        self.model, self.replacement, self.score, self.batch_size = model, replacement, score, batch_size
        self.keep_first = keep_first
        params = next(iter(model.parameters()), None) if isinstance(model, nn.Module) else None
        self.device = params.device if params is not None else torch.device("cpu")

    @torch.no_grad()
    def scores(self, item: Item, states: Sequence[State]) -> list[float]:
        rows = perturbed(item, states, self.replacement, self.keep_first)
        unique, inverse = torch.unique(rows, dim=0, return_inverse=True)
        values = torch.cat([self._batch(item, chunk) for chunk in unique.split(self.batch_size)])
        return values[inverse].tolist()

    def _batch(self, item: Item, rows: torch.Tensor) -> torch.Tensor:
        n = rows.shape[1]
        appended = item.target_ids[:-1] if item.kind == "continuation" else []
        ids = torch.cat([rows, torch.tensor(appended, dtype=rows.dtype).expand(len(rows), -1)], 1)
        z = logits_from(self.model, ids.to(self.device), first=n - 1).double()  # (B, scored positions, V)
        return target_score(z, item.target_ids, item.kind, self.score).cpu()


def logits_from(model: Any, ids: torch.Tensor, first: int) -> torch.Tensor:
    """Logits (batch, positions ``first``.., vocab). A lucidlm GPT projects only those positions
    onto the vocabulary; any other model's full output is sliced."""
    from ..model.gpt import GPT

    if isinstance(model, GPT):
        if first == ids.shape[1] - 1:
            return model(ids, last_only=True)
        select = torch.zeros_like(ids, dtype=torch.bool)
        select[:, first:] = True
        return model(ids, select=select).reshape(len(ids), ids.shape[1] - first, -1)
    out = model(ids)
    logits = getattr(out, "logits", out)  # a transformers model returns an output object
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or logits.shape[:2] != ids.shape:
        raise ExplainError(f"the model's output on ids of shape {tuple(ids.shape)}: expected logits (batch, "
                           f"tokens, vocab), got {getattr(logits, 'shape', type(logits).__name__)}")
    return logits[:, first:]


def target_score(z: torch.Tensor, target_ids: Sequence[int], kind: str, score: str) -> torch.Tensor:
    """The target's score per row from logits ``z`` (batch, scored positions, vocab).

    >>> z = torch.tensor([[[0.0, 2.0, 1.0]]])
    >>> float(target_score(z, [1], "token", "logit")), float(target_score(z, [1, 2], "contrast", "logit"))
    (2.0, 1.0)
    """
    if kind == "contrast":
        last = z[:, -1] if score == "logit" else z[:, -1].softmax(-1)
        return last[:, target_ids[0]] - last[:, target_ids[1]]
    steps = torch.arange(len(target_ids), device=z.device)
    cols = torch.tensor(list(target_ids), device=z.device)
    if score == "logit":
        return z[:, steps, cols].sum(-1)
    return z.log_softmax(-1)[:, steps, cols].sum(-1).exp()


# ----------------------------------------------------------------------------- checks
def _unwrap(llm_or_model: Any) -> tuple[Any, Any]:
    """(model, tokenizer) of an LLM; (model, None) of a bare model."""
    inner = getattr(llm_or_model, "model", None)
    if not isinstance(llm_or_model, nn.Module) and isinstance(inner, nn.Module):
        return inner, getattr(llm_or_model, "tokenizer", None)
    if not callable(llm_or_model):
        raise ExplainError(f"llm_or_model: expected an LLM or a model that maps ids to logits, got "
                           f"{type(llm_or_model).__name__}")
    return llm_or_model, None


def check_metrics(metrics: Sequence[str]) -> tuple[str, ...]:
    """``metrics`` checked (ExplainError naming the unknown ones), duplicates dropped.

    >>> check_metrics(["abpc", "deletion", "abpc"])
    ('abpc', 'deletion')
    """
    if isinstance(metrics, str):
        metrics = [metrics]
    chosen = tuple(dict.fromkeys(metrics))
    unknown = [m for m in chosen if m not in METRICS]
    if unknown or not chosen:
        raise ExplainError(f"metrics={list(metrics)!r}: expected some of {', '.join(METRICS)}")
    return chosen


def _check_options(score: str, fractions: Sequence[float], steps: int | None, batch_size: int) -> None:
    if score not in SCORES:
        raise ExplainError(f"score={score!r}: expected one of {', '.join(SCORES)}")
    if not fractions or any(not 0 < f <= 1 for f in fractions):
        raise ExplainError(f"fractions={list(fractions)!r}: expected fractions of the prompt in (0, 1]")
    if steps is not None and steps < 1:
        raise ExplainError(f"steps={steps}: expected at least 1 (or None: every token)")
    if batch_size < 1:
        raise ExplainError(f"batch_size={batch_size}: expected at least 1")


def _check_replacement(replacement: Any, model: Any) -> int:
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(replacement, bool) or not isinstance(replacement, (int, np.integer)) or replacement < 0 \
            or (vocab is not None and replacement >= vocab):
        raise ExplainError(f"replacement={replacement!r}: expected a token id in [0, {vocab or 'vocab size'})")
    return int(replacement)


def _bar(items: list[Item], progress: bool) -> Iterable[Item]:
    if not progress:
        return items
    import sys

    from tqdm import tqdm

    return tqdm(items, desc="faithfulness", unit="explanation", file=sys.stderr, dynamic_ncols=True)
