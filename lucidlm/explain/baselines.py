"""Baseline attribution methods, so that AttnLRP can be compared with them in one table.

Each explains the **same score** as the LRP methods (:meth:`TargetSpec.score
<lucidlm.explain.targets.TargetSpec.score>`: a logit, a contrast logit(a) − logit(b), or a
continuation's summed log-probability) and returns an :class:`Explanation` just like
:func:`lucidlm.explain.explainer.explain`, with the baseline's name in ``.method``. None of them
runs under the LRP rules. The relevances are over the prompt tokens; a continuation's own tokens
are inputs that stay as they are.

* ``integrated-gradients`` (Sundararajan et al., "Axiomatic Attribution for Deep Networks", ICML
  2017, Eq. 1): relevance of token t = Σ_d (h0 − b)[t, d] · mean over the path of ∂score/∂h[t, d],
  on the straight path h(α) = b + α (h0 − b) from a baseline ``b`` to the hidden state ``h0``
  entering the first block (what LRP attributes to), at ``steps`` midpoints α = (k + ½) / steps.
  Completeness: the relevances sum to score(h0) − score(b), up to the midpoint rule's error,
  O(1 / steps²) on a smooth path; a :class:`CompletenessWarning` says when they are more than 5%
  off. Default baseline: zeros (every prompt row of the hidden state at 0; on a bias-free model
  score(0) = 0, so the relevances share out the score itself, as CP-LRP's do). Real pre-norm
  models are far from smooth on that path: RMSNorm(α·h) jumps from 0 to full size while α·rms(h)
  < √eps, and on SmolLM2-135M the path from the space token's embeddings drops by 19 logits
  between two of 200 even points near α = 0.45 (the attention sink switching, we suppose).
  On "The capital of France is" → " Paris" (logit 17.37, float32) the zero baseline's sums at
  8/32/128 steps are 3.6/29.6/−497, the space token's 90.7/12.4/37.7 (against 7.74), while
  ``baseline=0.5 * h0`` gives 1.401/1.277/1.263 against 1.262. So check the warning, and raise
  ``steps`` or pick a nearer baseline when it comes.
* ``occlusion`` (leave one token out, after Zeiler & Fergus, ECCV 2014): relevance of token t =
  score(x) − score(x with token t replaced by the ``replacement`` token id). Default replacement:
  the single-space token (the token ``lucidlm bench faithfulness`` deletes with), id 0 when the
  tokenizer has none or there is no tokenizer.
* ``attention-rollout`` (Abnar & Zuidema, "Quantifying Attention Flow in Transformers", ACL 2020,
  Sec. 3): per layer, the attention weights averaged over heads plus the identity (the residual),
  rows renormalised, multiplied across layers; relevance of token t = the rolled-out weight from
  the last prompt position to t. It does not see the target: the relevances are non-negative and
  sum to 1 (a distribution over the prompt, not a share of the score).
* ``random``: standard normal relevances from a generator seeded with ``seed`` (default 0): the
  floor of a faithfulness table.

>>> from lucidlm import Config, GPT
>>> model = GPT(Config.from_name("tiny-llama")).eval()
>>> e = integrated_gradients(model, None, [1, 5, 7, 9], target=3, steps=16, baseline=11)
>>> e.method, e.relevance.shape
('integrated-gradients', torch.Size([4]))
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from collections.abc import Callable, Sequence
from types import MappingProxyType

import torch
from torch import nn

from ..errors import ExplainError
from ..methods import BASELINES, check_method
from ..model.attention import recording_weights
from ..model.parallel import gather_groups, shard_of
from .core import Pass, Prompt, check_objective, explain_mode, logits_from, token_relevance, warn_target
from .explanation import Explanation
from .targets import Target, TargetSpec, is_int, text_ids

__all__ = ["CompletenessWarning", "attention_rollout", "default_replacement", "explain_baseline",
           "integrated_gradients", "occlusion", "option_names", "random_baseline", "rollout"]

Baseline = str | int | torch.Tensor

#: integrated gradients warns when its relevances miss score(x) − score(baseline) by more than this share
COMPLETENESS_TOLERANCE = 0.05


class CompletenessWarning(UserWarning):
    """Integrated gradients' relevances do not sum to score(x) − score(baseline): the path is too
    rough for ``steps`` midpoints (see :mod:`lucidlm.explain.baselines`)."""


# ----------------------------------------------------------------------------- the explained score
@dataclasses.dataclass(frozen=True)
class _Problem:
    """One prompt, its target fixed to ids, and the score of any batch of input embeddings."""

    model: nn.Module
    ids: list[int]  # the prompt
    inputs: torch.Tensor  # (1, T): the prompt and the continuation but its last token
    spec: TargetSpec  # ids fixed: a None target is the top token of the unperturbed input
    objective: str

    @property
    def n_prompt(self) -> int:
        return len(self.ids)

    @property
    def first_scored(self) -> int | None:
        """The first scored position (:func:`lucidlm.explain.core.logits_from`)."""
        return self.n_prompt - 1 if self.spec.continuation else None

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """``model.embed_tokens`` of (batch, T) ids at positions 0..T-1."""
        return self.model.embed_tokens(ids, _positions(ids))

    def logits(self, embeds: torch.Tensor) -> torch.Tensor:
        """(batch, scored rows, vocab): the last prompt position onwards (only the last without a
        continuation), as the explainer scores them."""
        return logits_from(self.model, embeds, _positions(embeds[..., 0]), self.first_scored)

    def scores(self, embeds: torch.Tensor) -> torch.Tensor:
        """(batch,) explained scores, differentiable in ``embeds``."""
        return self.scores_of(self.logits(embeds))

    def scores_of(self, logits: torch.Tensor) -> torch.Tensor:
        """(batch,) explained scores of :meth:`logits`' output."""
        return torch.stack([self.spec.score(rows, self.objective)[0] for rows in logits])


def _positions(ids: torch.Tensor) -> torch.Tensor:
    return torch.arange(ids.shape[-1], device=ids.device).expand(ids.shape[0], -1)


@dataclasses.dataclass(frozen=True)
class _Prepared:
    problem: _Problem
    request: Prompt  # as the caller asked, the target unresolved
    score: float  # of the unperturbed input
    target_ids: list[int]

    def explanation(self, tokenizer, relevance: torch.Tensor, method: str) -> Explanation:
        return self.request.explanation(tokenizer, self.target_ids, relevance, self.score, method,
                                        self.problem.objective)


@torch.no_grad()
def _prepare(model: nn.Module, tokenizer, prompt: str | Sequence[int], target: Target,
             objective: str) -> _Prepared:
    """Resolve the target and score the unperturbed prompt (one forward)."""
    check_objective(objective)
    request = Prompt.resolve(model, tokenizer, prompt, target)
    spec = request.spec
    inputs = torch.tensor([request.inputs], device=next(model.parameters()).device)
    problem = _Problem(model, request.ids, inputs, spec, objective)
    logits = problem.logits(problem.embed(inputs))[0]
    score, target_ids = spec.score(logits, objective)
    warn_target(tokenizer, target, spec, logits[-1])
    if not spec.continuation:  # every perturbed input explains this token, not its own top one
        problem = dataclasses.replace(problem, spec=dataclasses.replace(spec, ids=target_ids))
    return _Prepared(problem, request, float(score), target_ids)


def _positive(name: str, value) -> int:
    if not is_int(value) or int(value) < 1:
        raise ExplainError(f"{name}={value!r}: expected an integer >= 1")
    return int(value)


# ----------------------------------------------------------------------------- integrated gradients
def integrated_gradients(model: nn.Module, tokenizer, prompt: str | Sequence[int], target: Target = None, *,
                         objective: str = "logprob", steps: int = 32, baseline: Baseline = "zeros",
                         batch_size: int = 16) -> Explanation:
    """Integrated gradients of the explained score with respect to the prompt's hidden state
    entering the first block (see the module docstring).

    ``steps``: path points (midpoint rule, error O(1 / steps²)); ``batch_size``: path points per
    forward/backward. ``baseline``: ``"zeros"``, a token id (its embedding at every prompt
    position) or a tensor (prompt tokens, n_embd). The continuation of a continuation target keeps
    its embeddings all along the path, so the relevances sum to score(x) − score(prompt at the
    baseline).

    >>> from lucidlm import Config, GPT
    >>> model = GPT(Config.from_name("tiny-llama")).eval()
    >>> e = integrated_gradients(model, None, [1, 5, 7, 9], target=3, steps=64, baseline=11)
    >>> at_baseline = model(torch.full((1, 4), 11))[0, -1, 3].item()  # every token replaced by 11
    >>> abs(e.relevance.sum().item() - (e.target_logit - at_baseline)) < 1e-3   # completeness
    True
    """
    steps, batch_size = _positive("steps", steps), _positive("batch_size", batch_size)
    prepared = _prepare(model, tokenizer, prompt, target, objective)
    problem = prepared.problem
    h0 = problem.embed(problem.inputs).detach()
    start = _baseline_embeds(problem, baseline, h0)
    delta = h0 - start
    alphas = ((torch.arange(steps, dtype=torch.float64) + 0.5) / steps).to(h0.device)
    total = torch.zeros_like(h0, dtype=torch.promote_types(h0.dtype, torch.float32))
    with explain_mode(None):  # plain gradients, also inside a caller's torch.no_grad()
        for chunk in alphas.split(batch_size):
            path = start + chunk.to(h0.dtype)[:, None, None] * delta
            run = Pass.forward(model, _positions(path[..., 0]), embeds=path, first_scored=problem.first_scored)
            grad, _ = run.gradients(problem.scores_of(run.logits).sum())
            total += grad.to(total.dtype).sum(0, keepdim=True)
    relevance = token_relevance(delta, total / steps)[:problem.n_prompt]
    with torch.no_grad():
        _check_completeness(float(relevance.double().sum()), prepared.score - float(problem.scores(start)[0]), steps)
    return prepared.explanation(tokenizer, relevance, "integrated-gradients")


def _check_completeness(total: float, difference: float, steps: int) -> None:
    """Warn when the relevances miss score(x) − score(baseline) by more than the tolerance."""
    if abs(total - difference) > COMPLETENESS_TOLERANCE * max(abs(difference), 1e-2):
        warnings.warn(f"integrated-gradients: the relevances sum to {total:.4g} but score(x) - score(baseline) = "
                      f"{difference:.4g}: {steps} steps do not follow this path; raise steps or choose a "
                      "baseline nearer the input", CompletenessWarning, stacklevel=3)


def _baseline_embeds(problem: _Problem, baseline: Baseline, h0: torch.Tensor) -> torch.Tensor:
    """(1, T, n_embd): the baseline on the prompt rows, ``h0`` on the continuation's."""
    n, width = problem.n_prompt, h0.shape[-1]
    if isinstance(baseline, str) and baseline == "zeros":
        prompt_rows = torch.zeros_like(h0[:, :n])
    elif is_int(baseline):
        prompt_rows = problem.embed(torch.full((1, n), _token_id("baseline", baseline, problem), device=h0.device))
    elif isinstance(baseline, torch.Tensor) and baseline.shape[-2:] == (n, width) and baseline.numel() == n * width:
        prompt_rows = baseline.detach().reshape(1, n, width).to(h0.device, h0.dtype)
    else:
        shape = tuple(baseline.shape) if isinstance(baseline, torch.Tensor) else None
        raise ExplainError(f"baseline={baseline!r}" + (f" (shape {shape})" if shape else "") +
                           f": expected 'zeros', a token id or a tensor of shape ({n}, {width}) (prompt tokens, "
                           "n_embd)")
    return torch.cat([prompt_rows.detach(), h0[:, n:]], dim=1)


def _token_id(name: str, value, problem: _Problem) -> int:
    vocab = problem.model.config.vocab_size
    if not is_int(value) or not 0 <= int(value) < vocab:
        raise ExplainError(f"{name}={value!r}: expected a token id of the vocabulary, 0 to {vocab - 1}")
    return int(value)


# ----------------------------------------------------------------------------- occlusion
def default_replacement(tokenizer) -> int:
    """The token occlusion puts in place of each prompt token by default: the single-space token
    (as ``lucidlm bench faithfulness``), or 0 without a tokenizer or when a space is not one token.

    >>> default_replacement(None)
    0
    """
    if tokenizer is None:
        return 0
    ids = text_ids(tokenizer, " ")
    return ids[0] if len(ids) == 1 else 0


@torch.no_grad()
def occlusion(model: nn.Module, tokenizer, prompt: str | Sequence[int], target: Target = None, *,
              objective: str = "logprob", replacement: int | None = None, batch_size: int = 16) -> Explanation:
    """Leave-one-token-out: relevance of token t = score(x) − score(x with token t replaced by
    ``replacement``; default :func:`default_replacement`). The unperturbed prompt and its n
    occluded copies run as batches of ``batch_size``.

    >>> from lucidlm import Config, GPT
    >>> model = GPT(Config.from_name("tiny-llama")).eval()
    >>> e = occlusion(model, None, [1, 5, 7, 5], target=3, replacement=5)
    >>> e.relevance[1].item(), e.relevance[3].item()   # replacing a token by itself changes nothing
    (0.0, 0.0)
    """
    batch_size = _positive("batch_size", batch_size)
    prepared = _prepare(model, tokenizer, prompt, target, objective)
    problem = prepared.problem
    fill = default_replacement(tokenizer) if replacement is None else _token_id("replacement", replacement, problem)
    n, x = problem.n_prompt, problem.inputs
    occluded = x.repeat(n, 1)
    occluded[torch.arange(n), torch.arange(n)] = fill
    # the unperturbed prompt runs in the same batches, so a token equal to the replacement gets 0
    batch = torch.cat([x, occluded])
    scores = torch.cat([problem.scores(problem.embed(rows)) for rows in batch.split(batch_size)])
    return prepared.explanation(tokenizer, scores[0] - scores[1:], "occlusion")


# ----------------------------------------------------------------------------- attention rollout
def rollout(attentions: Sequence[torch.Tensor]) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020, Eq. in Sec. 3) of per-layer attention matrices
    (queries, keys), first layer first, each already averaged over heads: Ã_l = rownorm(A_l + I),
    rolled out as Ã_L ⋯ Ã_1. Row q of the result: how much each key position flows into q.

    >>> a = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    >>> rollout([a])            # (a + I) / row sums
    tensor([[1.0000, 0.0000],
            [0.2500, 0.7500]])
    >>> rollout([a, a])[1]      # [0.25, 0.75] @ (a + I) / 2 = [0.25 + 0.1875, 0.5625]
    tensor([0.4375, 0.5625])
    """
    if not attentions:
        raise ExplainError("rollout needs at least one layer's attention weights")
    result = None
    for a in attentions:
        mixed = a + torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        mixed = mixed / mixed.sum(-1, keepdim=True)
        result = mixed if result is None else mixed @ result
    return result


def attention_rollout(model: nn.Module, tokenizer, prompt: str | Sequence[int], target: Target = None, *,
                      objective: str = "logprob") -> Explanation:
    """Attention rollout from the last prompt position (see :func:`rollout`): non-negative
    relevances that sum to 1, the same for every target (``target`` and ``objective`` only set the
    reported score). The weights come from one forward that records every layer's attention
    (:func:`lucidlm.model.attention.recording_weights`).

    >>> from lucidlm import Config, GPT
    >>> model = GPT(Config.from_name("tiny-llama")).eval()
    >>> e = attention_rollout(model, None, [1, 5, 7, 9])
    >>> round(e.relevance.sum().item(), 5), bool((e.relevance >= 0).all())
    (1.0, True)
    """
    with recording_weights() as weights:
        prepared = _prepare(model, tokenizer, prompt, target, objective)
    n_layer = model.config.n_layer
    if len(weights) != n_layer:
        raise ExplainError(f"attention-rollout: recorded the attention weights of {len(weights)} of {n_layer} "
                           "layers; a custom attention must compute its weights through "
                           "CausalSelfAttention.attend for rollout to see them")
    if shard_of(model) is not None:  # tensor parallel: every process's KV groups, so all heads are averaged
        weights = [gather_groups(w) for w in weights]
    # (batch, groups, heads per group, queries, keys) -> averaged over all heads, (queries, keys)
    per_layer = [w[0].flatten(0, 1).to(torch.promote_types(w.dtype, torch.float32)).mean(0) for w in weights]
    n = prepared.problem.n_prompt
    relevance = rollout(per_layer)[n - 1, :n]
    return prepared.explanation(tokenizer, relevance, "attention-rollout")


# ----------------------------------------------------------------------------- random
def random_baseline(model: nn.Module, tokenizer, prompt: str | Sequence[int], target: Target = None, *,
                    objective: str = "logprob", seed: int = 0) -> Explanation:
    """Standard normal relevances from a CPU generator seeded with ``seed`` (the same ones on
    every device), with the target and score of the real prediction.

    >>> from lucidlm import Config, GPT
    >>> model = GPT(Config.from_name("tiny-llama")).eval()
    >>> a, b = (random_baseline(model, None, [1, 5, 7], seed=s) for s in (0, 0))
    >>> torch.equal(a.relevance, b.relevance)
    True
    """
    if not is_int(seed):
        raise ExplainError(f"seed={seed!r}: expected an integer")
    prepared = _prepare(model, tokenizer, prompt, target, objective)
    relevance = torch.randn(prepared.problem.n_prompt, generator=torch.Generator().manual_seed(int(seed)))
    return prepared.explanation(tokenizer, relevance, "random")


# ----------------------------------------------------------------------------- dispatch
_FUNCTIONS: MappingProxyType[str, Callable[..., Explanation]] = MappingProxyType({
    "integrated-gradients": integrated_gradients, "occlusion": occlusion,
    "attention-rollout": attention_rollout, "random": random_baseline})


def option_names(method: str) -> tuple[str, ...]:
    """The options a baseline takes (its keyword-only parameters but ``objective``).

    >>> option_names("occlusion")
    ('replacement', 'batch_size')
    """
    params = inspect.signature(_FUNCTIONS[method]).parameters.values()
    return tuple(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name != "objective")


def explain_baseline(model: nn.Module, tokenizer, prompt: str | Sequence[int], target: Target = None,
                     method: str = "integrated-gradients", objective: str = "logprob", layers=None,
                     kv_cache: str | None = None, options: dict | None = None) -> Explanation:
    """:func:`~lucidlm.explain.explainer.explain` for a baseline ``method``, its settings in
    ``options``: ``integrated-gradients``: ``steps`` (32), ``baseline`` ("zeros"), ``batch_size``
    (16); ``occlusion``: ``replacement`` (the space token), ``batch_size`` (16); ``random``:
    ``seed`` (0); ``attention-rollout``: none (see :func:`option_names`). ``layers`` and
    ``kv_cache`` belong to the LRP methods: anything but None is an ExplainError.

    >>> from lucidlm import Config, GPT
    >>> model = GPT(Config.from_name("tiny-llama")).eval()
    >>> explain_baseline(model, None, [1, 5, 7], method="random", options={"seed": 1}).method
    'random'
    """
    check_method(method, BASELINES)
    if kv_cache is not None:
        raise ExplainError(f"kv_cache={kv_cache!r} does not apply to method={method!r}: a baseline explains the "
                           "dense forward; explain a cached prediction with attnlrp, cp-lrp or inputxgrad")
    if layers is not None:
        raise ExplainError(f"layers={layers!r} does not apply to method={method!r}: latent relevances come from "
                           "the LRP methods (attnlrp, cp-lrp, inputxgrad)")
    options = dict(options or {})
    allowed = option_names(method)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ExplainError(f"options {', '.join(map(repr, unknown))}: method={method!r} takes "
                           + (", ".join(allowed) if allowed else "no options"))
    return _FUNCTIONS[method](model, tokenizer, prompt, target, objective=objective, **options)
