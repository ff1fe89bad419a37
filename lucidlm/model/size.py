"""How many parameters a :class:`~lucidlm.config.Config` builds: counted on the model itself, so
every family, custom component and tied weight counts exactly as it loads.

>>> from lucidlm.config import Config
>>> round(parameter_count(Config.from_name("SmolLM2-135M-Instruct")) / 1e6)
135
"""

from __future__ import annotations

import torch

from ..config import Config
from .gpt import GPT


def parameter_count(config: Config) -> int:
    """Parameters of a model of ``config`` (tied embeddings counted once), built on the meta device
    (no memory, no initialisation: milliseconds for any size)."""
    with torch.device("meta"):
        model = GPT(config)
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
