"""What :func:`lucidlm.evaluate.faithfulness` evaluates: explanations in any of their forms, made
uniform.

An explanation can arrive as an :class:`~lucidlm.explain.explanation.Explanation`, as a dict in
its wire form (a row of ``lucidlm explain-dataset``, an ``Explanation.to_dict()``, a ``/v1/explain``
answer; what is read: ``token_ids``, ``relevance``, ``target_ids`` and optionally ``id``,
``score_label`` and ``method``), or as a ``(token_ids, relevance, target)`` tuple whose parts may be
lists, numpy arrays or tensors. Each becomes an :class:`Item`.

The explained score decides how the perturbed inputs are scored (:attr:`Item.kind`):

* ``"token"``: one target id (the usual next-token explanation);
* ``"continuation"``: several target ids, a continuation appended to the prompt (explained by its
  summed log-probability; rows whose ``score_label`` is ``"log-prob"`` or ``"logit sum"``);
* ``"contrast"``: two ids ``(a, b)``, explained as logit(a) − logit(b) (``score_label`` ``"logit
  difference"``; a tuple target ``(a, b)``).

A row without ``score_label`` is a token when it has one target id and a continuation otherwise.

>>> item = as_item(([5, 6, 7], [0.1, 0.9, -0.2], 3), 0)
>>> item.token_ids, item.target_ids, item.kind, item.relevance.tolist()
([5, 6, 7], [3], 'token', [0.1, 0.9, -0.2])
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ExplainError

KINDS = ("token", "continuation", "contrast")
_CONTINUATION_LABELS = ("log-prob", "logit sum")
_CONTRAST_LABEL = "logit difference"


@dataclass(frozen=True, eq=False)
class Item:
    """One explanation to evaluate: the prompt's ids, one relevance per id (float64), the target
    and its kind.

    >>> Item("a", [1, 2], np.array([0.5, 0.5]), [4], "token").kind
    'token'
    """

    id: Any
    token_ids: list[int]
    relevance: np.ndarray
    target_ids: list[int]
    kind: str
    method: str | None = None  # the explanation method, when the explanation says


def as_items(explanations: Any) -> list[Item]:
    """Every explanation of ``explanations`` (an iterable of any accepted form) as an :class:`Item`.

    >>> [i.kind for i in as_items([([1, 2], [0.0, 1.0], [3, 4]), ([1], [1.0], (3, 4))])]
    ['continuation', 'contrast']
    """
    if isinstance(explanations, (Mapping, str, bytes)) or not isinstance(explanations, Iterable):
        raise ExplainError(f"explanations: expected a list of explanations, got {type(explanations).__name__}")
    items = [as_item(e, i) for i, e in enumerate(explanations)]
    if not items:
        raise ExplainError("explanations: the list is empty; there is nothing to evaluate")
    return items


def as_item(explanation: Any, index: int) -> Item:
    """One explanation as an :class:`Item`; ``index`` is its id when it carries none and names it
    in errors."""
    from ..explain.explanation import Explanation

    where = f"explanations[{index}]"
    if isinstance(explanation, Explanation):
        return _item(index, explanation.token_ids, explanation.relevance.numpy(), explanation.target_ids,
                     _kind(explanation.score_label, len(explanation.target_ids), where), where, explanation.method)
    if isinstance(explanation, Mapping):
        missing = [k for k in ("token_ids", "relevance", "target_ids") if k not in explanation]
        if missing:
            raise ExplainError(f"{where}: a row lacks {', '.join(missing)} (expected the explain-dataset "
                               "row format: id, token_ids, relevance, target_ids)")
        target = _ids(explanation["target_ids"], f"{where}.target_ids")
        kind = _kind(explanation.get("score_label"), len(target), where)
        return _item(explanation.get("id", index), explanation["token_ids"], explanation["relevance"], target,
                     kind, where, explanation.get("method"))
    if isinstance(explanation, (tuple, list)) and len(explanation) == 3:
        ids, relevance, target = explanation
        target_ids, kind = _tuple_target(target, where)
        return _item(index, ids, relevance, target_ids, kind, where)
    raise ExplainError(f"{where}: expected an Explanation, a row dict or a (token_ids, relevance, target) "
                       f"tuple, got {type(explanation).__name__}")


def _item(id_: Any, ids: Any, relevance: Any, target_ids: Sequence[int], kind: str, where: str,
          method: str | None = None) -> Item:
    token_ids = _ids(ids, f"{where}.token_ids")
    if not token_ids:
        raise ExplainError(f"{where}: token_ids is empty (the explanation must carry the prompt's ids)")
    values = np.asarray(_numpy(relevance), dtype=np.float64)
    if values.ndim != 1 or len(values) != len(token_ids):
        raise ExplainError(f"{where}.relevance: expected {len(token_ids)} values (one per token), "
                           f"got shape {values.shape}")
    if not np.isfinite(values).all():
        raise ExplainError(f"{where}.relevance: holds NaN or infinite values; cannot rank the tokens")
    return Item(id_, token_ids, values, list(target_ids), kind, method)


def _kind(score_label: str | None, n_targets: int, where: str) -> str:
    """The target's kind from what the explanation says it explained (see the module docstring)."""
    if score_label == _CONTRAST_LABEL:
        kind = "contrast"
    elif score_label in _CONTINUATION_LABELS or (score_label is None and n_targets > 1):
        kind = "continuation"
    else:
        kind = "token"
    expected = {"token": n_targets == 1, "contrast": n_targets == 2, "continuation": n_targets >= 1}[kind]
    if not expected:
        raise ExplainError(f"{where}: a {kind} target ({score_label or 'logit'}) with {n_targets} target ids")
    return kind


def _tuple_target(target: Any, where: str) -> tuple[list[int], str]:
    """``target`` of a tuple: an id (token), a pair ``(a, b)`` (contrast) or a list of ids
    (continuation), as in :func:`lucidlm.explain.explain`."""
    if _is_int(target):
        return [int(target)], "token"
    if isinstance(target, tuple):
        ids = _ids(target, f"{where} target")
        if len(ids) != 2:
            raise ExplainError(f"{where}: a tuple target is a contrast (a, b), got {len(ids)} ids")
        return ids, "contrast"
    ids = _ids(target, f"{where} target")
    if not ids:
        raise ExplainError(f"{where}: the target has no token ids")
    return ids, "continuation"


def _ids(value: Any, where: str) -> list[int]:
    array = np.asarray(_numpy(value))
    if array.ndim != 1 or (array.size and not np.issubdtype(array.dtype, np.integer)):
        raise ExplainError(f"{where}: expected a list of integer token ids, got {value!r:.80}")
    if array.size and array.min() < 0:
        raise ExplainError(f"{where}: token ids cannot be negative")
    return [int(i) for i in array]


def _numpy(value: Any) -> Any:
    """Tensors (any device, with grad) as numpy; everything else as is."""
    detach = getattr(value, "detach", None)
    return detach().cpu().numpy() if callable(detach) else value


def _is_int(value: Any) -> bool:
    if isinstance(value, np.ndarray) or hasattr(value, "detach"):
        return getattr(value, "ndim", 1) == 0 and np.issubdtype(np.asarray(_numpy(value)).dtype, np.integer)
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)

