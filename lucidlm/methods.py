"""The names of the explanation methods lucidlm implements, and the one check of a method name.

Torch-free, so that the command line can offer them without loading a model;
:mod:`lucidlm.model.rules` (where the LRP methods live) re-exports the tuple as ``rules.METHODS``.
Training methods (``lora``, ``full`` ...) are another vocabulary: ``lucidlm.train.names.TRAIN_METHODS``.

>>> check_method("cp-lrp")
'cp-lrp'
>>> try:
...     check_method("gradcam")
... except ExplainError as exc:
...     print(exc)
method='gradcam': expected one of attnlrp, cp-lrp, inputxgrad, integrated-gradients, occlusion, attention-rollout, random
"""

from __future__ import annotations

from collections.abc import Sequence

from .errors import ExplainError

#: the LRP-style methods: one forward under the rules of :mod:`lucidlm.model.rules`, one backward
#: (the one list: CLI, benches, server and patches use it)
METHODS = ("attnlrp", "cp-lrp", "inputxgrad")

#: the baselines every method is compared with (:mod:`lucidlm.explain.baselines`): not rule-based,
#: so the ``transformers`` patch layer does not offer them
BASELINES = ("integrated-gradients", "occlusion", "attention-rollout", "random")

#: everything ``llm.explain(method=...)`` accepts
EXPLAIN_METHODS = METHODS + BASELINES


def check_method(method: object, allowed: Sequence[str] = EXPLAIN_METHODS, where: str = "") -> str:
    """``method`` unchanged when it is one of ``allowed``; else an :class:`ExplainError` in the one
    wording every entry point shares (``where``: what the method is for, e.g. ``" for vit"``)."""
    if not isinstance(method, str) or method not in allowed:
        raise ExplainError(f"method={method!r}{where}: expected one of {', '.join(allowed)}")
    return method
