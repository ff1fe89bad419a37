"""Explain models that live in ``transformers`` (5.x) and torchvision, without converting them.

>>> import torch, transformers
>>> from lucidlm import hf
>>> config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
...                                   num_hidden_layers=1, num_attention_heads=2)
>>> model = transformers.LlamaForCausalLM(config)
>>> e = hf.explain(model, [1, 5, 9, 3], method="cp-lrp")
>>> e.relevance.shape, e.method
(torch.Size([4]), 'cp-lrp')
>>> with hf.explainable(model, "attnlrp") as handle:   # patch this instance only ...
...     logits = model(torch.tensor([[1, 5, 9, 3]])).logits
>>> handle.removed                                       # ... and give it back untouched
True

* :func:`explainable`: patch one instance (context manager, or a call returning a handle with
  ``.remove()``); :func:`explain`: one prediction as an ``Explanation``/``ImageExplanation``;
  :func:`attribute`: the same relevances at full precision.
* :func:`register`: make your own model explainable (docs/explaining-new-models.md; with
  ``structural=True`` its norms, MLPs, attention and experts are found by what they are);
  :func:`refuse`: say why a model cannot be; :func:`supported`: the registered families;
  :mod:`lucidlm.hf.patches`: the patch factories.
"""

from __future__ import annotations

from . import models, patches
from .api import Attribution, attribute, explain
from .patch import Handle, UnpatchedModuleWarning, active, explainable
from .patches import Rules
from .registry import COMMON, ModelSpec, refuse, register, supported, unregister

__all__ = [
    "COMMON", "Attribution", "Handle", "ModelSpec", "Rules", "UnpatchedModuleWarning", "active",
    "attribute", "explain", "explainable", "models", "patches", "refuse", "register", "supported", "unregister",
]
