"""lucidlm: transformer language models you can run, extend and see into."""

from .config import Config
from .errors import LucidError
from .model import GPT

__all__ = ["Config", "GPT", "LLM", "LucidError", "hf"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # LLM pulls in tokenizer/generation code; import it lazily so `import lucidlm` stays light
    if name == "LLM":
        from .api import LLM

        return LLM
    if name == "hf":  # `lucidlm.hf.explainable(...)` without a separate import
        import importlib

        return importlib.import_module(".hf", __name__)
    raise AttributeError(f"module 'lucidlm' has no attribute {name!r}")
