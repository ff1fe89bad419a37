"""lucidlm: transformer language models you can run, extend and see into.

The names below load on first use (PEP 562), so ``import lucidlm`` (and the ``lucidlm`` command's
help, argument checks and catalogue) never waits for torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .errors import LucidError

if TYPE_CHECKING:
    from .checkpoints.layouts import Layout
    from .families import Family

__version__ = "0.1.0"

__all__ = ["Config", "Family", "GPT", "LLM", "LucidError", "explain", "hf", "register_config", "register_family",
           "rules"]

#: public name -> (module, attribute; None: the module itself)
_LAZY: dict[str, tuple[str, str | None]] = {
    "Config": (".config", "Config"),
    "Family": (".families", "Family"),
    "register_config": (".config", "register_config"),
    "GPT": (".model", "GPT"),
    "rules": (".model.rules", None),
    "LLM": (".api", "LLM"),
    "hf": (".hf", None),  # lucidlm.hf.explainable(...)
    "explain": (".explain", None),  # lucidlm.explain.check(...)
}


def register_family(family: Family, layout: Layout | None = None) -> Family:
    """Support a new Hugging Face architecture without editing lucidlm: ``family`` maps its
    config.json (see :class:`~lucidlm.families.Family`), ``layout`` (a
    :class:`~lucidlm.checkpoints.layouts.Layout`, when its weights are named unlike an existing
    layout) maps its tensor names; register it under ``family.layout``. The two tables are
    :data:`lucidlm.families.FAMILIES` and :data:`lucidlm.checkpoints.layouts.LAYOUTS`; a test
    undoes a registration with ``lucidlm.registry.scoped(FAMILIES, LAYOUTS)``."""
    from .checkpoints.layouts import LAYOUTS, register_layout
    from .families import register_family as register_config_family

    if layout is not None:
        register_layout(family.layout, layout)
    elif family.layout not in LAYOUTS:
        from .errors import ConfigError

        raise ConfigError(f"register_family: layout {family.layout!r} is unknown; pass layout=Layout(...) "
                          f"or use one of {', '.join(sorted(LAYOUTS))}")
    return register_config_family(family)


def __getattr__(name: str):
    if name in _LAZY:
        module, attribute = _LAZY[name]
        value = importlib.import_module(module, __name__)
        if attribute is not None:
            value = getattr(value, attribute)
    elif not name.startswith("__"):  # a submodule: lucidlm.api, lucidlm.cache, ... (as after an eager import)
        try:
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
