"""lucidlm's own checkpoint format, for models with no Hugging Face config (custom ``Config``\\ s,
pretrained from scratch): ``lucidlm_config.json`` (the :class:`Config` fields) + ``model.safetensors``
(our tensor names). ``LLM.load(DIR)`` reads it like any checkpoint directory.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from ..config import Config
from ..errors import CheckpointError, ConfigError
from ..families import COMPONENTS, qualified_name
from ..fileio import atomic_path, atomic_write, read_json
from ..model import GPT

CONFIG_FILE, WEIGHTS_FILE = "lucidlm_config.json", "model.safetensors"


def is_native(directory: Path) -> bool:
    return (directory / CONFIG_FILE).is_file() and not (directory / "config.json").is_file()


CLASS_KEY = "config_class"  # a Config subclass, by qualified name


def config_to_dict(config: Config) -> dict:
    """The config as JSON-able fields; classes (a Config subclass, custom components) by name."""
    d = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name != "hf_config"}
    d = {k: qualified_name(v) if isinstance(v, type) else v for k, v in d.items()}
    if type(config) is not Config:
        d[CLASS_KEY] = qualified_name(type(config))
    return d


def _registered(name: str, source: str) -> type:
    if name not in COMPONENTS:
        raise ConfigError(f"{source}: names the class {name!r}, which is not registered; call "
                          "lucidlm.register_config(...) or lucidlm.config.register_component(cls) first "
                          "(lucidlm never imports code that a checkpoint names)")
    return COMPONENTS[name]


def config_from_dict(d: dict, source: str) -> Config:
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: expected a JSON object of Config fields")
    d = dict(d)
    cls = _registered(d.pop(CLASS_KEY), source) if CLASS_KEY in d else Config
    fields = {f.name for f in dataclasses.fields(cls)} - {"hf_config"}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise ConfigError(f"{source}: unknown {cls.__name__} field(s) {', '.join(unknown)}")
    for key in ("attention_class", "mlp_class", "block_class"):
        if isinstance(d.get(key), str):
            d[key] = _registered(d[key], source)
    if d.get("layer_types") is not None:
        d["layer_types"] = tuple(d["layer_types"])
    try:
        return cls(**d)
    except TypeError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def save_native(model: GPT, directory: str | Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = state if state is not None else {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={"format": "pt"})
    atomic_write(directory / CONFIG_FILE, json.dumps(config_to_dict(model.config), indent=2))
    return directory


def load_native(directory: str | Path, dtype: torch.dtype | None = torch.float32, device: str = "cpu") -> GPT:
    from .hf import read_tensors

    directory = Path(directory)
    path = directory / CONFIG_FILE
    config = config_from_dict(read_json(path, ConfigError), str(path))
    state = read_tensors(directory / WEIGHTS_FILE)
    model = GPT(config)
    expected = set(model.state_dict()) - ({"lm_head.weight"} if config.tie_embeddings else set())
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise CheckpointError(f"{directory / WEIGHTS_FILE}: does not match {CONFIG_FILE} "
                              f"(missing {missing[:3]}, unexpected {extra[:3]})")
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise CheckpointError(f"{directory / WEIGHTS_FILE}: {exc}") from None
    model.eval()
    return model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
