"""Target resolution: what a user's ``target`` names, as token ids, checked.

One copy, shared by lucidlm's explainer (:func:`lucidlm.explain.explain`, which turns any target
into a :class:`TargetSpec`) and the ``transformers`` API (:mod:`lucidlm.hf.api`, which looks up
classifier labels first and falls back on :func:`text_ids` for a single token).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..errors import ExplainError

Target = int | str | tuple | Sequence[int] | None


@dataclass
class TargetSpec:
    """What to explain: ``ids`` (one id; two for a contrast; ``None`` = the top token) or a
    ``continuation`` (token ids appended to the prompt)."""

    ids: list[int] | None = None
    contrast: bool = False
    continuation: list[int] = field(default_factory=list)

    def score(self, logits: torch.Tensor, objective: str = "logprob") -> tuple[torch.Tensor, list[int]]:
        """The scalar to explain and the target ids, from logits (positions, vocab) whose rows are
        the scored positions (the last prompt token onwards)."""
        if self.continuation:
            rows = torch.arange(len(self.continuation), device=logits.device)
            cols = torch.tensor(self.continuation, device=logits.device)
            # log_softmax in float32: half-precision logsumexp over a large vocabulary loses digits
            chosen = _wide(logits).log_softmax(-1) if objective == "logprob" else _wide(logits)
            return chosen[rows, cols].sum(), list(self.continuation)
        last = logits[-1]
        ids = self.ids if self.ids is not None else [int(last.argmax())]
        if self.contrast:
            return _wide(last[ids[0]]) - _wide(last[ids[1]]), ids
        return _wide(last[ids[0]]), ids

    def score_label(self, objective: str = "logprob") -> str:
        """What :meth:`score` computes, in words (every rendering labels the value with it)."""
        if self.continuation:
            return "log-prob" if objective == "logprob" else "logit sum"
        return "logit difference" if self.contrast else "logit"

    def label(self, tokenizer, target_ids: list[int]) -> str:
        """Display string of the target."""
        if self.contrast:
            a, b = token_strings(tokenizer, target_ids)
            return f"{a} vs {b}"
        if tokenizer is None:
            return " ".join(map(str, target_ids))
        return tokenizer.decode(target_ids)


def leading_space_hint(tokenizer, target: Target, spec: TargetSpec, logits: torch.Tensor,
                       candidates: int = 5) -> str | None:
    """A note when a one-token text ``target`` differs from one of the model's top ``candidates``
    next tokens only by leading whitespace (``'Paris'`` vs ``' Paris'``) that scores higher, else
    None. ``logits``: the last position's (vocab,)."""
    if not isinstance(target, str) or spec.ids is None or spec.contrast or tokenizer is None:
        return None
    chosen = spec.ids[0]
    for candidate in logits.topk(min(candidates, logits.shape[-1])).indices.tolist():
        text = tokenizer.decode([candidate])
        if candidate != chosen and text != target and text.strip() == target.strip() \
                and float(logits[candidate]) > float(logits[chosen]):
            return (f"target {target!r} is token {chosen} (logit {float(logits[chosen]):.4g}), but the model's "
                    f"top candidate {text!r} (token {candidate}, logit {float(logits[candidate]):.4g}) differs "
                    f"from it only by leading whitespace; explaining {target!r} as asked: pass {text!r} "
                    f"(or its id {candidate}) to explain the predicted token")
    return None


def resolve_target(tokenizer, target: Target, vocab_size: int) -> TargetSpec:
    """Turn the user's ``target`` into a :class:`TargetSpec` (ExplainError if malformed).

    >>> resolve_target(None, 7, 100)
    TargetSpec(ids=[7], contrast=False, continuation=[])
    >>> resolve_target(None, [7, 8], 100).continuation
    [7, 8]
    """
    if target is None:
        return TargetSpec()
    if isinstance(target, tuple):
        if len(target) != 2:
            raise ExplainError(f"target={target!r}: a contrast is a pair (a, b) of token ids or strings")
        return TargetSpec(ids=[single_token(tokenizer, t, vocab_size) for t in target], contrast=True)
    if isinstance(target, str):
        ids = encode_text(tokenizer, target)
        return TargetSpec(ids=ids) if len(ids) == 1 else TargetSpec(continuation=ids)
    if is_int(target):
        return TargetSpec(ids=[check_id(int(target), vocab_size)])
    if isinstance(target, (list, torch.Tensor)) or (isinstance(target, Sequence) and not isinstance(target, bytes)):
        ids = [int(t) for t in (target.tolist() if isinstance(target, torch.Tensor) else target)]
        if not ids:
            raise ExplainError("target=[]: a continuation needs at least one token id")
        return TargetSpec(continuation=[check_id(i, vocab_size) for i in ids])
    raise ExplainError(f"target={target!r}: expected None, a token id, a string, a pair (a, b) "
                       "or a list of token ids")


def single_token(tokenizer, t, vocab_size: int) -> int:
    """One side of a contrast: a token id or a string that tokenises to exactly one token."""
    if is_int(t):
        return check_id(int(t), vocab_size)
    if isinstance(t, str):
        ids = encode_text(tokenizer, t)
        if len(ids) != 1:
            raise ExplainError(f"contrast target {t!r} tokenises to {len(ids)} tokens {ids}: "
                               "each side of a contrast must be one token")
        return ids[0]
    raise ExplainError(f"contrast target {t!r}: expected a token id or a one-token string")


def is_int(t) -> bool:
    """A Python/NumPy integer or a 0-d integer tensor (not a bool)."""
    if isinstance(t, torch.Tensor):
        return t.dim() == 0 and not t.is_floating_point() and t.dtype != torch.bool
    return isinstance(t, numbers.Integral) and not isinstance(t, bool)


def check_id(i: int, vocab_size: int) -> int:
    """``i`` if it is a token id of the vocabulary, else ExplainError."""
    if not 0 <= i < vocab_size:
        raise ExplainError(f"token id {i} is out of range: the vocabulary has {vocab_size} tokens")
    return i


def text_ids(tokenizer, text: str) -> list[int]:
    """``text`` as token ids without the BOS/EOS the tokenizer adds to a prompt (no checks)."""
    try:
        return list(tokenizer.encode(text, add_special_tokens=False))
    except TypeError:  # a tokenizer without the keyword
        return list(tokenizer.encode(text))


def encode_text(tokenizer, text: str) -> list[int]:
    """A target's ids, without the BOS/EOS the tokenizer adds to a prompt."""
    if tokenizer is None:
        raise ExplainError(f"target={text!r} is text but the model has no tokenizer: pass token ids")
    ids = text_ids(tokenizer, text)
    if not ids:
        raise ExplainError(f"target={text!r} tokenises to no tokens")
    return ids


def token_strings(tokenizer, ids: Sequence[int]) -> list[str]:
    """Display string of each token: ``tokenizer.decode([id])``, or ``str(id)`` without one."""
    if tokenizer is None:
        return [str(i) for i in ids]
    return [tokenizer.decode([i]) for i in ids]


def _wide(t: torch.Tensor) -> torch.Tensor:
    """At least float32 (float64 models keep float64)."""
    return t if t.dtype == torch.float64 else t.float()
