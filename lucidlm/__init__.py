"""lucidlm: transformer language models you can run, extend and see into."""

from .config import Config, Family, register_config
from .errors import LucidError
from .model import GPT, rules

__all__ = ["Config", "Family", "GPT", "LLM", "LucidError", "explain", "hf", "register_config", "register_family",
           "rules"]


def register_family(family: Family, layout=None) -> Family:
    """Support a new Hugging Face architecture without editing lucidlm: ``family`` maps its
    config.json (see :class:`~lucidlm.config.Family`), ``layout`` (a
    :class:`~lucidlm.checkpoints.layouts.Layout`, when its weights are named unlike an existing
    layout) maps its tensor names; register it under ``family.layout``."""
    from .checkpoints.layouts import LAYOUTS, register_layout
    from .config import register_family as register_config_family

    if layout is not None:
        register_layout(family.layout, layout)
    elif family.layout not in LAYOUTS:
        from .errors import ConfigError

        raise ConfigError(f"register_family: layout {family.layout!r} is unknown; pass layout=Layout(...) "
                          f"or use one of {', '.join(sorted(LAYOUTS))}")
    return register_config_family(family)
__version__ = "0.1.0"


def __getattr__(name: str):
    # LLM pulls in tokenizer/generation code; import it lazily so `import lucidlm` stays light
    if name == "LLM":
        from .api import LLM

        return LLM
    if name in ("hf", "explain"):  # `lucidlm.hf.explainable(...)`, `lucidlm.explain.check(...)`
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'lucidlm' has no attribute {name!r}")
