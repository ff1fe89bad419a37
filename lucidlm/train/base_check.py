"""Whether an adapter belongs on a model: a fingerprint of the base weights it was trained on.

A name alone cannot tell: the embedded GGUF and ``lucidlm convert`` of it are the same weights
under two names, and two random initialisations of one config share every name and shape. So an
adapter stores, beside its own files, ``lucidlm_base.json``: a few hundred values read at fixed
positions of a few named weight matrices of its base. A model matches when every one of those
matrices exists with the same shape and its values at those positions are within
:data:`TOLERANCE` (relative L2 difference) of the stored ones. That survives float32 vs bfloat16
(~0.4%) and the dequantisation of the same weights (Q8_0 ~0.5%, Q5 ~4%, Q4 ~8%, the K-quants down
to Q2_K ~30%), and refuses unrelated weights (two random initialisations differ by ~130%).

The file is our own, so ``adapter_config.json`` stays exactly what ``peft`` writes and reads.
Any adapter format can use it (:func:`write_fingerprint` / :func:`check_fingerprint`).

>>> import torch
>>> from lucidlm import Config, GPT
>>> torch.manual_seed(0); model = GPT(Config.from_name("tiny-llama"))  # doctest: +ELLIPSIS
<...>
>>> stored = fingerprint(model)
>>> sorted(stored["tensors"])[:2], sum(len(t["values"]) for t in stored["tensors"].values())
(['embed', 'layers.0.attn.o_proj'], 320)
>>> difference(stored, model.to(torch.bfloat16)) is None  # the same weights, rounded
True
>>> torch.manual_seed(1); other = GPT(Config.from_name("tiny-llama"))  # doctest: +ELLIPSIS
<...>
>>> difference(stored, other)  # same shapes, other weights
'embed: relative difference 1.30 at the sampled positions'
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import AdapterError
from ..fileio import atomic_write, read_json
from ..model.quant import Int8Linear

FINGERPRINT_FILE = "lucidlm_base.json"
FORMAT, VERSION = "lucidlm.base-fingerprint", 1
#: matrices sampled (the first, usually the embedding, and others spread over the layers)
TENSORS = 5
#: values sampled per matrix
SAMPLES = 64
#: largest relative L2 difference of the sampled values that still counts as the same weights
TOLERANCE = 0.5
#: what a Python caller passes to skip the check (the CLI says --no-check-base instead)
PYTHON_HINT = "pass check_base=False to load it anyway"

_WEIGHTED = (nn.Linear, nn.Embedding, Int8Linear)


def weight_matrices(model: nn.Module) -> dict[str, nn.Module]:
    """Module name -> each linear or embedding layer of the base model, in model order; LoRA's own
    layers and LLaMA-Adapter's prefixes are left out, and a LoRA-wrapped layer is named as before it
    was wrapped."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, _WEIGHTED) and ".lora_" not in name and ".adapter_" not in name:
            found.setdefault(name.replace(".base_layer", ""), module)
    return found


def fingerprint(model: nn.Module, base: str | None = None) -> dict[str, Any]:
    """The fingerprint of ``model``'s weights (``base``: its name, kept for the reader)."""
    matrices = weight_matrices(model)
    names = list(matrices)
    if not names:
        raise AdapterError("the model has no linear or embedding layers to fingerprint")
    step = max(1, (len(names) - 1) / max(1, TENSORS - 1))
    chosen = sorted({names[min(len(names) - 1, round(i * step))] for i in range(TENSORS)}, key=names.index)
    tensors = {}
    for name in chosen:
        weight = _weight(matrices[name])
        positions = sample_positions(weight.numel(), SAMPLES)
        tensors[name] = {"shape": list(weight.shape), "positions": positions,
                         "values": [float(f"{v:.6g}") for v in _values(weight, positions)]}
    return {"format": FORMAT, "version": VERSION, "base": base, "tensors": tensors}


def sample_positions(numel: int, count: int) -> list[int]:
    """``count`` distinct flat positions spread over ``numel`` values: one in each of ``count``
    equal stretches, at a golden-ratio offset that moves from stretch to stretch (so the positions
    do not line up with rows); the same on every machine (no random generator involved).

    >>> sample_positions(10, 4), sample_positions(3, 8)
    ([0, 4, 5, 9], [0, 1, 2])
    """
    if numel <= count:
        return list(range(numel))
    stride, golden = numel / count, (math.sqrt(5) - 1) / 2
    return [int((i + (i * golden) % 1) * stride) for i in range(count)]  # one in each stride


def difference(stored: dict[str, Any], model: nn.Module) -> str | None:
    """None when ``model`` holds the weights ``stored`` was taken from (up to rounding and
    quantisation), else what differs."""
    matrices = weight_matrices(model)
    for name, entry in stored["tensors"].items():
        if name not in matrices:
            return f"this model has no {name}"
        weight = _weight(matrices[name])
        if list(weight.shape) != list(entry["shape"]):
            return f"{name} has shape {tuple(weight.shape)}, the adapter's base {tuple(entry['shape'])}"
        ours = torch.tensor(_values(weight, entry["positions"]), dtype=torch.float64)
        theirs = torch.tensor(entry["values"], dtype=torch.float64)
        scale = max(theirs.norm().item(), ours.norm().item(), 1e-12)
        relative = (ours - theirs).norm().item() / scale
        if relative > TOLERANCE:
            return f"{name}: relative difference {relative:.2f} at the sampled positions"
    return None


def write_fingerprint(model: nn.Module, directory: str | Path, base: str | None = None) -> Path:
    """``directory/lucidlm_base.json`` for ``model``'s weights, written atomically."""
    path = Path(directory) / FINGERPRINT_FILE
    atomic_write(path, json.dumps(fingerprint(model, base)) + "\n")
    return path


def read_fingerprint(directory: str | Path) -> dict[str, Any] | None:
    """The fingerprint stored in ``directory`` (None: the adapter has none, e.g. one ``peft``
    wrote); AdapterError naming the file when it is not one."""
    path = Path(directory) / FINGERPRINT_FILE
    if not path.is_file():
        return None
    data = read_json(path, AdapterError, "an adapter's base fingerprint")
    try:
        ok = data["format"] == FORMAT and all(
            len(t["positions"]) == len(t["values"]) and isinstance(t["shape"], list)
            for t in data["tensors"].values())
    except (KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        raise AdapterError(f"{path}: not a {FORMAT} file (delete it to skip the weight check)")
    return data


def check_fingerprint(model: nn.Module, directory: str | Path, recorded: str | None) -> bool | None:
    """Whether ``model`` is the base of the adapter in ``directory`` by its stored fingerprint
    (None: there is none); AdapterError, naming ``check_base=False``, when it is not."""
    stored = read_fingerprint(directory)
    if stored is None:
        return None
    problem = difference(stored, model)
    if problem is None:
        return True
    raise AdapterError(f"{directory}: the adapter was trained on {recorded or stored.get('base') or 'another model'}, "
                       f"whose weights differ from this model's ({problem}); {PYTHON_HINT}")


def _weight(module: nn.Module) -> torch.Tensor:
    return module.weight.detach()  # Int8Linear: the dequantised weight


def _values(weight: torch.Tensor, positions: list[int]) -> list[float]:
    flat = weight.reshape(-1)
    index = torch.tensor(positions, dtype=torch.long, device=flat.device)
    return flat[index].double().cpu().tolist()
