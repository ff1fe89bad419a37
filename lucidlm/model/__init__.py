"""Model components: ``gpt`` (GPT, Block), ``attention``, ``mlp``, ``norm``, ``rope``."""

from .gpt import GPT, Block

__all__ = ["GPT", "Block"]
