"""Models to pretrain from scratch: resolve a config (name, JSON file, or object) and initialise it.

>>> resolve_config("tiny-llama").n_layer
2
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..config import Config
from ..errors import ConfigError
from ..fileio import read_json
from ..model import GPT


def resolve_config(config: Config | str | Path) -> Config:
    """A :class:`Config` from itself, a registered name, or a JSON file: an HF ``config.json``
    (it names ``architectures`` or ``model_type``) or a dict of our Config fields."""
    if isinstance(config, Config):
        return config
    path = Path(config)
    if path.suffix == ".json" or path.is_file():
        data = read_json(path, ConfigError, "a config: an HF config.json or lucidlm Config fields")
        if isinstance(data, dict) and ("architectures" in data or "model_type" in data):
            return Config.from_hf(data)
        from ..checkpoints.native import config_from_dict

        return config_from_dict(data, str(path))
    return Config.from_name(str(config))


def build_model(config: Config, seed: int = 0) -> GPT:
    """A freshly initialised model: linear and embedding weights ~ N(0, 0.02), biases 0 and norms
    at their identity (GPT-2's initialisation; PyTorch's defaults give N(0, 1) embeddings)."""
    torch.manual_seed(seed)
    model = GPT(config)
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
    return model.eval()
