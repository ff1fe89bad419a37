"""lucidlm: transformer language models you can run, extend and see into."""

from .config import Config, register_config
from .errors import LucidError
from .model import GPT, rules

__all__ = ["Config", "GPT", "LLM", "LucidError", "explain", "hf", "register_config", "rules"]
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
