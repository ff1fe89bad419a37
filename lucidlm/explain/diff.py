"""What fine-tuning changed: the relevance differences between a base model and its tuned version.

:func:`explain_diff` explains the same prompt ids for the same target ids with both models (the
tuned model's top token by default) and returns an :class:`ExplanationDiff`:

* ``.base``, ``.tuned``: the two :class:`~lucidlm.explain.explanation.Explanation` s, each with
  its own ``target_logit``; ``.relevance`` = tuned − base per token, ``.logit_delta`` the change of
  the explained score. Under CP-LRP on a bias-free model each explanation conserves, so the
  differences sum to ``logit_delta``.
* ``.adapter_relevance``: when the tuned model runs LoRA branches (peft's layers, ours or
  peft-made), the part of the tuned relevance that reaches each token through at least one
  adapter branch (:class:`lucidlm.model.rules.SwitchedBranch`: one forward, a second backward
  with the branches closed gives the base-weights-only part; the two parts add up to the tuned
  relevance). ``None`` for a model without branches (a full fine-tune, a merged adapter).
* Renderings and the wire format: see :mod:`lucidlm.explain.diff_result`, where the class lives.
* ``.components(kind)``: layers, heads or neurons ranked by the change of their latent relevance
  (:mod:`lucidlm.explain.latent`), named as :func:`~lucidlm.explain.components.ablated` takes them;
  ``.ablate(names)``: the tuned model's explained score with those components zeroed.

>>> from lucidlm import Config, GPT
>>> base = GPT(Config.from_name("tiny-llama")).eval()
>>> tuned = GPT(Config.from_name("tiny-llama")).eval()
>>> d = explain_diff(tuned, None, base, None, [1, 5, 7, 9], target=3)
>>> d.relevance.shape, d.base.target_ids == d.tuned.target_ids == [3]
(torch.Size([4]), True)
>>> name, change = d.components("heads", top=1)[0]
>>> isinstance(d.ablate([name]), float)
True
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from ..errors import ExplainError
from ..model import rules
from .components import ablated
from .core import Pass, Prompt, check_explainable, check_objective, explain_mode, explain_prompts, logits_from, \
    token_inputs, warn_target
from .diff_result import ExplanationDiff
from .explanation import Explanation
from .latent import LatentRecorder
from .targets import Target

#: Config fields two models must share for their relevances to be compared token by token and
#: component by component
SHAPE_FIELDS = ("vocab_size", "n_layer", "n_embd", "n_head", "n_query_groups", "head_size",
                "intermediate_size", "n_expert")
_BRANCHING: contextvars.ContextVar[object | None] = contextvars.ContextVar("lucidlm_branching", default=None)


# ----------------------------------------------------------------------------- checks
def check_comparable(tuned: nn.Module, base: nn.Module, tuned_tokenizer=None, base_tokenizer=None) -> None:
    """An :class:`ExplainError` naming what differs when ``base`` is not the same architecture and
    vocabulary as ``tuned`` (shapes from :data:`SHAPE_FIELDS`, the tokenizers' vocabularies)."""
    differ = [f"{f} {getattr(base.config, f)} vs {getattr(tuned.config, f)}" for f in SHAPE_FIELDS
              if getattr(base.config, f, None) != getattr(tuned.config, f, None)]
    if differ:
        raise ExplainError(f"base is not the tuned model's architecture ({base.config.name!r} vs "
                           f"{tuned.config.name!r}): {'; '.join(differ)} (base vs tuned)")
    if (tuned_tokenizer is None) != (base_tokenizer is None):
        raise ExplainError("base and tuned must both have a tokenizer or both have none")
    if tuned_tokenizer is not None and tuned_tokenizer is not base_tokenizer:
        vocab = _vocab(base_tokenizer), _vocab(tuned_tokenizer)
        if vocab[0] != vocab[1]:
            changed = sorted(set(vocab[0].items()) ^ set(vocab[1].items()), key=lambda kv: kv[1])[:3]
            raise ExplainError(f"base and tuned tokenizers have different vocabularies (sizes {len(vocab[0])} "
                               f"vs {len(vocab[1])}; e.g. {changed}): the same ids would be different tokens")


def _vocab(tokenizer) -> dict[str, int]:
    backend = getattr(tokenizer, "backend", None)
    return backend.get_vocab(with_added_tokens=True) if backend is not None else {}


# ----------------------------------------------------------------------------- adapter branches
def _branches(model: nn.Module) -> list[nn.Module]:
    """The LoRA ``B`` matrices of peft's layers in ``model`` (ours and peft-made alike): each
    branch's output s·B A x passes through them."""
    found = []
    for module in model.modules():
        lora_b = getattr(module, "lora_B", None)
        if isinstance(lora_b, nn.ModuleDict):
            found.extend(lora_b.values())
    return found


@contextlib.contextmanager
def switched_branches(model: nn.Module, switch: rules.BranchSwitch) -> Iterator[list[int]]:
    """Within the block, forwards of this thread/task put every adapter branch's output through
    :func:`lucidlm.model.rules.switched_branch` gated by ``switch``. Yields a one-element list: how
    many branch outputs ran (0 when the adapters are merged or absent)."""
    key, fired = object(), [0]

    def hook(_module, _args, output):
        if _BRANCHING.get() is not key:
            return None
        fired[0] += 1
        return rules.switched_branch(output, switch)

    handles = [b.register_forward_hook(hook) for b in _branches(model)]
    token = _BRANCHING.set(key)
    try:
        yield fired
    finally:
        _BRANCHING.reset(token)
        for handle in handles:
            handle.remove()


# ----------------------------------------------------------------------------- the diff
def explain_diff(tuned: nn.Module, tuned_tokenizer, base: nn.Module, base_tokenizer, prompt: str | Sequence[int],
                 target: Target = None, method: str = "cp-lrp", layers: str | Sequence[int] | None = "all",
                 objective: str = "logprob", checked: bool = False) -> ExplanationDiff:
    """Explain ``prompt`` with ``tuned`` (splitting off what flows through its adapter branches)
    and with ``base`` for the same target ids; see :mod:`lucidlm.explain.diff`. ``target``: as in
    :func:`~lucidlm.explain.explainer.explain` (``None``: the tuned model's top token). ``layers``:
    whose latent relevances to record (default all: :meth:`ExplanationDiff.components` ranks them;
    ``None`` records none). ``checked``: the caller has run :func:`check_comparable` on this pair
    already (a dataset run checks once, not per record: comparing two vocabularies takes ~50 ms)."""
    check_explainable(method, rules.METHODS)
    check_objective(objective)
    if not checked:
        check_comparable(tuned, base, tuned_tokenizer, base_tokenizer)
    given = Prompt.resolve(tuned, tuned_tokenizer, prompt, target)
    tuned_e, adapter = _explain_tuned(tuned, tuned_tokenizer, given, method, objective, layers)
    fixed = _fixed(given, tuned_e.target_ids)
    (base_e,) = explain_prompts(base, base_tokenizer, [fixed], method, objective, layers=layers)
    return ExplanationDiff(base_e, tuned_e, adapter, _Ablation(tuned, fixed, objective))


def _fixed(prompt: Prompt, target_ids: list[int]) -> Prompt:
    """``prompt`` with its target fixed to ``target_ids`` (a top-token target becomes that token)."""
    spec = prompt.spec if prompt.spec.continuation else dataclasses.replace(prompt.spec, ids=list(target_ids))
    return dataclasses.replace(prompt, spec=spec)


def _explain_tuned(model: nn.Module, tokenizer, prompt: Prompt, method: str, objective: str,
                   layers) -> tuple[Explanation, torch.Tensor | None]:
    """The tuned explanation and its adapter part: one forward, a backward with the branches open
    and, when any branch ran, a second one with them closed (base weights only)."""
    ids, positions = token_inputs(model, [prompt.inputs])
    recorder, switch = LatentRecorder(model, layers), rules.BranchSwitch()
    with explain_mode(method), recorder, switched_branches(model, switch) as fired:
        run = Pass.forward(model, positions, ids=ids, first_scored=prompt.first_scored)
        score, target_ids = prompt.spec.score(run.logits[0], objective)
        grad, latent = run.gradients(score, recorder.tensors(), retain=fired[0] > 0)
        base_only = None
        if fired[0]:
            switch.open = False
            base_only, _ = run.gradients(score)
    warn_target(tokenizer, prompt.target, prompt.spec, run.logits[0, -1], stacklevel=4)
    n = len(prompt.ids)
    relevance = run.relevance(grad)[:n]
    adapter = None if base_only is None else (relevance - run.relevance(base_only)[:n])
    explanation = prompt.explanation(tokenizer, target_ids, relevance, float(score.detach()), method, objective,
                                     layers=recorder.relevances(latent) if layers is not None else None)
    return explanation, adapter


@dataclasses.dataclass(frozen=True)
class _Ablation:
    """The tuned model's score of the fixed prompt and target with components zeroed."""

    model: nn.Module
    prompt: Prompt
    objective: str

    @torch.no_grad()
    def __call__(self, names: list[str]) -> float:
        ids, positions = token_inputs(self.model, [self.prompt.inputs])
        with ablated(self.model, names):
            h0 = self.model.embed_tokens(ids, positions)
            logits = logits_from(self.model, h0, positions, self.prompt.first_scored)
        score, _ = self.prompt.spec.score(logits[0], self.objective)
        return float(score)

