"""The one vocabulary of dtype names (torch-free: the command line offers them before torch loads).

Canonical names are torch's (``float32``, ``bfloat16``, ``float16``, ``float64``); the short forms
``fp32``/``bf16``/``fp16`` are accepted everywhere a name is.

>>> dtype_name("bf16")
'bfloat16'
>>> try:
...     dtype_name("int3")
... except ConfigError as exc:
...     print(exc)
dtype='int3': expected one of float32, bfloat16, float16, float64 (or fp32, bf16, fp16)
"""

from __future__ import annotations

from .errors import ConfigError

#: canonical names, in the order the command line offers them
DTYPES = ("float32", "bfloat16", "float16", "float64")
#: the weights' dtypes the command line offers for models (float64 is for checks, not for running)
MODEL_DTYPES = DTYPES[:3]
ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
#: the tensor types a GGUF export writes (``LLM.export_gguf(type=...)``, ``lucidlm export --type``),
#: in llama.cpp's spelling
GGUF_EXPORT_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")


def dtype_name(name: object, argument: str = "dtype") -> str:
    """The canonical name of ``name`` (a dtype name, an alias or a ``torch.dtype``); else a
    :class:`ConfigError` naming ``argument``."""
    text = str(name).removeprefix("torch.") if type(name).__name__ == "dtype" else name
    if isinstance(text, str) and text in ALIASES:
        return ALIASES[text]
    if not isinstance(text, str) or text not in DTYPES:
        aliases = ", ".join(ALIASES)
        raise ConfigError(f"{argument}={name!r}: expected one of {', '.join(DTYPES)} (or {aliases})")
    return text


def torch_dtype(name, argument: str = "dtype"):
    """``torch.dtype`` for ``name`` (``None`` stays ``None``; a ``torch.dtype`` is checked too)."""
    if name is None:
        return None
    import torch

    return getattr(torch, dtype_name(name, argument))
