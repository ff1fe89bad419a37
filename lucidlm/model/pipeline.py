"""Models larger than one device: blocks placed across devices and run as a pipeline
(``LLM.load(..., device_map=...)``).

A device map names where each part of the model lives. Its keys:

* ``"embed"`` (token and learned position embeddings; HF ``"model.embed_tokens"``),
* ``"layers.3"``, a range ``"layers.0-11"`` (both ends included), or ``"layers"`` for every block
  (HF ``"model.layers.3"``),
* ``"final_norm"`` (HF ``"model.norm"``) and ``"lm_head"``.

Its values: a device (``"cpu"``, ``"cuda:1"``, an index ``1`` for ``cuda:1``, ``"meta"`` for a
stand-in that holds no weights). Every block must be placed; the embeddings default to the first
block's device, the final norm and ``lm_head`` to the last block's. Tied embeddings keep
``lm_head`` with ``embed`` (one tensor cannot live on two devices). ``"auto"`` balances the
blocks by parameter bytes over the CUDA devices (by free memory), then the CPU: all-CPU without
a GPU.

>>> import dataclasses
>>> from lucidlm import Config
>>> config = dataclasses.replace(Config.from_name("tiny-llama"), n_layer=4)
>>> plan = resolve_device_map(config, {"layers.0-1": "cpu", "model.layers.2": "meta", "layers.3": "meta"})
>>> [str(plan[k]) for k in ("embed", "layers.1", "layers.2", "final_norm", "lm_head")]
['cpu', 'cpu', 'meta', 'meta', 'meta']
>>> resolve_device_map(config, {"layers.0-2": "cpu"})
Traceback (most recent call last):
    ...
lucidlm.errors.DeviceMapError: device_map: block 'layers.3' is on no device (the map places layers.0-2); give every block of the model's 4 a device
>>> auto_device_map(config, {"cuda:0": 10**9, "cpu": None})["layers.3"]
device(type='cuda', index=0)

Running it: :func:`dispatch` moves each part to its device and adds hooks that carry the
activations (and the positions, and each block's KV-cache layer) to the next block's device;
the logits come back on the embeddings' device, where generation and explanations start, so
neither knows the model is split. Gradients flow back through the same moves.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import torch
from torch import nn

from ..errors import DeviceMapError

#: HF module names accepted as keys, and ours they stand for
_HF_ALIASES = {"model.embed_tokens": "embed", "model.norm": "final_norm", "model.layers": "layers"}
_LAYER_KEY = re.compile(r"^layers(?:\.(\d+)(?:-(\d+))?)?$")

Placement = dict[str, torch.device]  # our part names ("embed", "layers.i", "final_norm", "lm_head") -> device


def parse_device(value, key: str, check: bool = True) -> torch.device:
    """A device map value as a ``torch.device`` that exists on this machine (``"meta"`` always
    does; ``check=False``: any)."""
    if isinstance(value, bool) or not isinstance(value, (str, int, torch.device)):
        raise DeviceMapError(f"device_map[{key!r}]={value!r}: expected a device such as 'cpu', 'cuda:0', 0 or 'meta'")
    try:
        device = torch.device("cuda", value) if isinstance(value, int) else torch.device(value)
    except (RuntimeError, ValueError):
        raise DeviceMapError(f"device_map[{key!r}]={value!r}: not a device (expected 'cpu', 'cuda:0', 0 or 'meta')") \
            from None
    if check and not device_exists(device):
        raise DeviceMapError(f"device_map[{key!r}]={value!r}: no such device on this machine "
                             f"({_available_devices()})")
    return device


def device_exists(device: torch.device) -> bool:
    if device.type in ("cpu", "meta"):
        return True
    if device.type == "cuda":
        return torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()
    backend = getattr(torch, device.type, None)  # mps, xpu, ...
    return bool(backend is not None and getattr(backend, "is_available", lambda: False)())


def _available_devices() -> str:
    cuda = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return "available: " + ", ".join(["cpu", *cuda, "meta"])


def _expand_key(key: str, n_layer: int) -> list[str]:
    """One map key as our part names (a range is its blocks); a DeviceMapError names a key that is
    not a part of this model."""
    if not isinstance(key, str):
        raise DeviceMapError(f"device_map key {key!r}: expected a name such as 'embed', 'layers.3', "
                             "'layers.0-11', 'final_norm' or 'lm_head'")
    name = key
    for hf, ours in _HF_ALIASES.items():
        if name == hf or name.startswith(hf + "."):
            name = ours + name[len(hf):]
    if name in ("embed", "final_norm", "lm_head"):
        return [name]
    match = _LAYER_KEY.match(name)
    if match is None:
        raise DeviceMapError(f"device_map key {key!r}: not a part of the model (expected 'embed', 'layers.3', "
                             "'layers.0-11', 'layers', 'final_norm' or 'lm_head'; HF names 'model.layers.3' too)")
    if match.group(1) is None:
        return [f"layers.{i}" for i in range(n_layer)]
    first = int(match.group(1))
    last = int(match.group(2)) if match.group(2) is not None else first
    if last < first or last >= n_layer:
        missing = last if last >= n_layer else first
        raise DeviceMapError(f"device_map key {key!r}: the model has no block layers.{missing} "
                             f"(it has {n_layer}: layers.0-{n_layer - 1})")
    return [f"layers.{i}" for i in range(first, last + 1)]


def resolve_device_map(config, device_map: Mapping, check_devices: bool = True) -> Placement:
    """A user's map (see the module docs) as a device for every part of a model of ``config``;
    DeviceMapError for a key naming no part, a device this machine lacks (``check_devices``), or a
    block left out."""
    if not isinstance(device_map, Mapping) or not device_map:
        raise DeviceMapError(f"device_map={device_map!r}: expected 'auto' or a non-empty dict "
                             "{part: device}, e.g. {'layers.0-11': 'cuda:0', 'layers.12-23': 'cuda:1'}")
    n = config.n_layer
    plan: Placement = {}
    for key, value in device_map.items():
        device = parse_device(value, key, check_devices)
        for part in _expand_key(key, n):
            plan[part] = device
    missing = [f"layers.{i}" for i in range(n) if f"layers.{i}" not in plan]
    if missing:
        given = ", ".join(str(k) for k in device_map)
        raise DeviceMapError(f"device_map: block {missing[0]!r} is on no device (the map places {given}); "
                             f"give every block of the model's {n} a device")
    plan.setdefault("embed", plan["layers.0"])
    plan.setdefault("final_norm", plan[f"layers.{n - 1}"])
    if config.tie_embeddings:
        if "lm_head" in plan and plan["lm_head"] != plan["embed"]:
            raise DeviceMapError(f"device_map['lm_head']={str(plan['lm_head'])!r}: this model ties lm_head to the "
                                 f"embeddings (on {str(plan['embed'])!r}), so they share one device; "
                                 "leave lm_head out of the map")
        plan["lm_head"] = plan["embed"]
    plan.setdefault("lm_head", plan["final_norm"])
    return {k: plan[k] for k in _part_order(n)}


def _part_order(n_layer: int) -> list[str]:
    return ["embed", *(f"layers.{i}" for i in range(n_layer)), "final_norm", "lm_head"]


def part_bytes(config, dtype: torch.dtype = torch.float32) -> dict[str, int]:
    """Parameter bytes of each part of a model of ``config`` in ``dtype`` (built on "meta": no memory).

    >>> from lucidlm import Config
    >>> sizes = part_bytes(Config.from_name("tiny-llama"))      # 2 blocks, width 64, 256 tokens
    >>> sizes["layers.0"] == sizes["layers.1"], sizes["lm_head"] == 256 * 64 * 4
    (True, True)
    """
    from .gpt import GPT

    with torch.device("meta"):
        model = GPT(config)
    size = torch.empty((), dtype=dtype).element_size()
    parts = model_parts(model)
    seen: set[int] = set()
    sizes = {}
    for name, modules in parts.items():  # a tied lm_head counts once, with the embeddings
        params = [p for m in modules for p in m.parameters() if id(p) not in seen]
        seen.update(id(p) for p in params)
        sizes[name] = sum(p.numel() for p in params) * size
    return sizes


def device_budgets(margin: float = 0.9) -> dict[str, int | None]:
    """Bytes each device may take for weights: ``margin`` of every CUDA device's free memory, most
    free first, then the CPU without a limit."""
    budgets: dict[str, int | None] = {}
    if torch.cuda.is_available():
        free = {f"cuda:{i}": torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())}
        budgets = {d: int(f * margin) for d, f in sorted(free.items(), key=lambda kv: -kv[1])}
    budgets["cpu"] = None
    return budgets


def auto_device_map(config, budgets: Mapping[str, int | None] | None = None,
                    dtype: torch.dtype = torch.float32) -> Placement:
    """``device_map="auto"``: blocks in order over the accelerators of ``budgets`` (device ->
    bytes; default :func:`device_budgets`), spread evenly by parameter bytes as far as each
    device's budget allows, the rest on the CPU; then :func:`resolve_device_map`'s defaults
    (embeddings with the first block, final norm and lm_head with the last, a tied lm_head with
    the embeddings). Without a GPU: everything on the CPU."""
    budgets = dict(device_budgets() if budgets is None else budgets)
    sizes = part_bytes(config, dtype)
    accelerators = [d for d in budgets if torch.device(d).type != "cpu"]
    if not accelerators:
        return resolve_device_map(config, {"layers": "cpu"})
    share = (sum(sizes.values()) + len(accelerators) - 1) // len(accelerators)  # even spread, rounded up
    assignment: dict[str, str] = {}
    order = iter(accelerators)
    device, count = next(order), 0
    used = sizes["embed"] + (sizes["lm_head"] if config.tie_embeddings else 0)
    for i in range(config.n_layer):
        size = sizes[f"layers.{i}"]
        while device != "cpu" and count and used + size > min(share, _budget(budgets, device)):
            device, used, count = next(order, "cpu"), 0, 0
        if device != "cpu" and used + size > _budget(budgets, device):
            device = "cpu"  # not even one block fits the next device: the rest stays on the CPU
        assignment[f"layers.{i}"] = device
        used, count = used + size, count + 1
    tail = sizes["final_norm"] + sizes["lm_head"]  # they follow the last block, if its device has room
    if device != "cpu" and used + tail > _budget(budgets, device):
        assignment["final_norm"] = "cpu"
        if not config.tie_embeddings:
            assignment["lm_head"] = "cpu"
    return resolve_device_map(config, assignment, check_devices=False)


def _budget(budgets: Mapping[str, int | None], device: str) -> float:
    value = budgets.get(device)
    return float("inf") if value is None else value


def model_parts(model: nn.Module) -> dict[str, list[nn.Module]]:
    """Our part names -> the modules of ``model`` (a :class:`~lucidlm.model.GPT`) they hold."""
    parts = {"embed": [model.embed] + ([model.pos_embed] if model.pos_embed is not None else [])}
    parts.update({f"layers.{i}": [block] for i, block in enumerate(model.layers)})
    parts["final_norm"] = [model.final_norm]
    parts["lm_head"] = [model.lm_head]
    return parts


def placement_for(config, device_map, dtype: torch.dtype = torch.float32) -> Placement:
    """``"auto"`` (:func:`auto_device_map`) or a user's dict (:func:`resolve_device_map`) as a placement."""
    if device_map == "auto":
        return auto_device_map(config, dtype=dtype)
    if isinstance(device_map, str):
        raise DeviceMapError(f"device_map={device_map!r}: expected 'auto' or a dict {{part: device}}")
    return resolve_device_map(config, device_map)


def part_of(name: str) -> str:
    """The part a parameter or buffer name (ours) belongs to.

    >>> part_of("layers.3.attn.q_proj.weight"), part_of("pos_embed.weight"), part_of("lm_head.bias")
    ('layers.3', 'embed', 'lm_head')
    """
    head, _, rest = name.partition(".")
    if head == "layers":
        return f"layers.{rest.partition('.')[0]}"
    return "embed" if head in ("embed", "pos_embed") else head


def place_empty(model: nn.Module, plan: Placement) -> nn.Module:
    """A model built on "meta" given uninitialised storage on each part's device (the loader fills it)."""
    for name, modules in model_parts(model).items():
        for module in modules:
            module.to_empty(device=memory_of(plan[name]))
    return model


def placement_of(model: nn.Module) -> Placement | None:
    """The placement :func:`dispatch` gave ``model`` (None: one device, never dispatched)."""
    return getattr(model, "_placement", None)


def cache_devices(model: nn.Module, default: torch.device | str) -> torch.device | str | list[torch.device]:
    """Where a KV cache for ``model`` goes: ``default`` for a model on one device, else a device per
    layer, its block's (no layer's cache passes through the first device)."""
    plan = placement_of(model)
    if plan is None:
        return default
    return [memory_of(plan[f"layers.{i}"]) for i in range(len(model.layers))]


# ---------------------------------------------------------------------------- running the pipeline
Move = Callable[[torch.Tensor, torch.device], torch.Tensor]


def memory_of(device: torch.device) -> torch.device:
    """The memory a device's tensors live in: ``cpu:1`` is the CPU (torch keeps one CPU memory, but
    ``.to("cpu:1")`` would copy), any other device is itself.

    >>> memory_of(torch.device("cpu", 1)), memory_of(torch.device("cuda", 1))
    (device(type='cpu'), device(type='cuda', index=1))
    """
    return torch.device("cpu") if device.type == "cpu" else device


def _to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    device = memory_of(device)
    return tensor if tensor.device == device else tensor.to(device)


def dispatch(model: nn.Module, plan: Placement, move: Move = _to) -> nn.Module:
    """Put each part of ``model`` on its device of ``plan`` (a part already there is not copied)
    and hook the moves between them in: every block's inputs (activations, positions, its KV-cache
    layer) go to its device, the final norm's and lm_head's to theirs, and the logits back to the
    embeddings' device. ``move(tensor, device)``: how a tensor travels (``tensor.to``; tests pass
    one that records). Returns ``model``."""
    if placement_of(model) is not None:
        raise DeviceMapError("device_map: this model is already placed across devices; load it again to re-place it")
    parts = model_parts(model)
    for name, modules in parts.items():
        for module in modules:
            if name == "lm_head" and model.config.tie_embeddings:
                continue  # the tied weight is the embeddings', already placed
            _place(module, plan[name])
    for name, modules in parts.items():
        if name not in ("embed", "lm_head"):
            modules[0].register_forward_pre_hook(_InputsTo(plan[name], move), with_kwargs=True)
    # lm_head's input moves as the final norm's output: quantize() and adapters replace lm_head (and
    # would drop a hook on it), never the norm
    model.final_norm.register_forward_hook(_OutputTo(plan["lm_head"], move))
    model.register_forward_hook(_OutputTo(plan["embed"], move))
    model._placement = dict(plan)
    return model


def _place(module: nn.Module, device: torch.device) -> None:
    if device.type == "meta":
        module.to_empty(device="meta")  # a stand-in: drops the weights, keeps shapes and dtypes
    elif any(t.device != memory_of(device) for t in (*module.parameters(), *module.buffers())):
        module.to(memory_of(device))


class _InputsTo:
    """A forward pre-hook: the module's tensor inputs to ``device``; a KV-cache layer's tensors
    too (once: they then stay there); a dict (the layers' shared RoPE memo) swapped for this
    device's own, so that cos/sin computed on one device are not used on another."""

    def __init__(self, device: torch.device, move: Move) -> None:
        self.device, self.move = device, move

    def __call__(self, module, args, kwargs):
        return tuple(self._carry(a) for a in args), {k: self._carry(v) for k, v in kwargs.items()}

    def _carry(self, value):
        if isinstance(value, torch.Tensor):
            return self.move(value, self.device)
        if isinstance(value, dict):
            return value.setdefault(("device", str(self.device)), {})
        if _is_layer_cache(value):
            _migrate(value, self.device, self.move)
        return value


def _is_layer_cache(value) -> bool:
    return value is not None and hasattr(value, "extend") and hasattr(value, "settle")


def _migrate(layer, device: torch.device, move: Move) -> None:
    """A KV-cache layer's tensors (lists/tuples of them: quantised stores; a layer it wraps: the
    cached explainer's recording) to ``device``, once."""
    if getattr(layer, "_pipeline_device", None) == device:
        return
    for name, value in list(vars(layer).items()):
        if isinstance(value, torch.Tensor):
            setattr(layer, name, move(value, device))
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
            setattr(layer, name, type(value)(move(v, device) for v in value))
        elif _is_layer_cache(value):
            _migrate(value, device, move)
    layer._pipeline_device = device


class _OutputTo:
    """A forward hook: the module's output to ``device`` (the final norm's to lm_head's device; the
    whole model's logits back to the embeddings' device)."""

    def __init__(self, device: torch.device, move: Move) -> None:
        self.device, self.move = device, move

    def __call__(self, module, args, output):
        return self.move(output, self.device) if isinstance(output, torch.Tensor) else output
