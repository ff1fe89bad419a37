"""``explainable(model)``: patch one model instance, and give it back untouched on ``remove()``.

Only instance state changes: each patched module gets a ``forward`` entry in its own ``__dict__``
(which ``nn.Module.__call__`` finds before the class's method); removing the patch deletes that
entry again, or puts back the instance-level ``forward`` that was there before (accelerate's
hooks, for instance). Classes, other instances and ``transformers``' global attention registry
are never written to, so another instance of the same class runs the original code, bit for bit.
"""

from __future__ import annotations

import re
import warnings
import weakref
from typing import Any, Self

from torch import nn

from ..errors import PatchError
from ..methods import check_method
from .patches import IMAGE_METHODS, TEXT_METHODS, Rules
from .registry import ModelSpec, find_model, find_patch, refusal, supported

_MISSING = object()
_ACTIVE: weakref.WeakKeyDictionary[nn.Module, Handle] = weakref.WeakKeyDictionary()

# class names of modules whose plain gradient is *not* an LRP rule: left unpatched, they bend the
# relevances silently, so we warn (see UnpatchedModuleWarning)
_SUSPECT_NAME = re.compile(r"Norm|GELU|SiLU|Swish|Tanh|Sigmoid|Softmax|Softplus|Mish|Activation|Act$|ELU$")
_SUSPECT_MODULES = ("torch.nn.modules.activation", "torch.nn.modules.normalization",
                    "torch.nn.modules.batchnorm", "torch.nn.modules.instancenorm")


class UnpatchedModuleWarning(UserWarning):
    """An activation or norm module of the model has no patch: its relevances are not LRP's."""


class Handle:
    """An explainable model. ``remove()`` (or leaving the ``with`` block) restores it.

    >>> from torch import nn
    >>> from lucidlm.hf import register, patches
    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__(); self.act = nn.GELU()
    ...     def forward(self, x): return self.act(x)
    >>> _ = register(Net)
    >>> net = Net()
    >>> with explainable(net) as handle:
    ...     "forward" in vars(net.act)
    True
    >>> "forward" in vars(net.act), handle.removed
    (False, True)
    """

    def __init__(self, model: nn.Module, spec: ModelSpec, rules: Rules) -> None:
        self.model, self.spec, self.rules = model, spec, rules
        self._saved: list[tuple[nn.Module, Any]] = []
        self.removed = False

    @property
    def method(self) -> str:
        return self.rules.method

    def _install(self, module: nn.Module, forward: Any) -> None:
        self._saved.append((module, module.__dict__.get("forward", _MISSING)))
        module.__dict__["forward"] = forward

    def remove(self) -> None:
        """Undo every patch, newest first. Calling it twice is harmless."""
        if self.removed:
            return
        for module, saved in reversed(self._saved):
            if saved is _MISSING:
                module.__dict__.pop("forward", None)
            else:
                module.__dict__["forward"] = saved
        self._saved.clear()
        self.removed = True
        if _ACTIVE.get(self.model) is self:
            del _ACTIVE[self.model]

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self.removed else f"{len(self._saved)} modules patched"
        return f"Handle({type(self.model).__name__}, method={self.method!r}, {state})"


def active(model: nn.Module) -> Handle | None:
    """The live handle of ``model``, if it is explainable right now."""
    return _ACTIVE.get(model)


def require_spec(model: nn.Module) -> ModelSpec:
    """The registry entry for ``model``, or a PatchError naming it and listing what is supported."""
    spec = find_model(model)
    if spec is None:
        cls = type(model)
        reason = refusal(model)
        if reason is not None:
            raise PatchError(f"{cls.__name__} ({cls.__module__}) cannot be explained by patching: {reason}")
        raise PatchError(
            f"{cls.__name__} ({cls.__module__}) is not supported by lucidlm.hf. Supported: "
            f"{', '.join(supported())}. Register your model with lucidlm.hf.register "
            "(see docs/explaining-new-models.md).")
    return spec


def explainable(model: nn.Module, method: str = "attnlrp", *, gamma_conv: float = 0.25,
                gamma_linear: float = 0.05) -> Handle:
    """Make this one ``model`` instance explainable with ``method`` and return its :class:`Handle`.

    Methods: ``"attnlrp"`` and ``"cp-lrp"`` (and ``"inputxgrad"``, plain gradient × input); image
    models also take ``"gamma"`` (CP-LRP with LRP-γ on linear/conv layers, γ = ``gamma_conv`` /
    ``gamma_linear``). The forward pass stays the same up to rounding; only the backward pass
    follows the rules, so ``(x * x.grad).sum(-1)`` at the input of the first block is the relevance.

    Use it as a call (``handle = explainable(m)`` ... ``handle.remove()``) or as a context manager
    (``with explainable(m): ...``).
    """
    spec = require_spec(model)
    check_method(method, IMAGE_METHODS if spec.kind == "image" else TEXT_METHODS, where=f" for {spec.name}")
    if model in _ACTIVE:
        raise PatchError(f"this {type(model).__name__} instance is already explainable "
                         f"({_ACTIVE[model]!r}); remove that handle first")
    handle = Handle(model, spec, Rules(method, gamma_conv, gamma_linear))
    try:
        unpatched = _patch_modules(handle)
        if spec.forward is not None:
            forward = spec.forward(model, handle.rules)
            if forward is not None:
                handle._install(model, forward)
    except BaseException:
        handle.remove()
        raise
    _ACTIVE[model] = handle
    if unpatched:
        warnings.warn(
            f"lucidlm.hf: {len(unpatched)} activation/norm module(s) of {type(model).__name__} have "
            f"no patch, their relevances follow the plain gradient: {', '.join(unpatched)}. Register "
            "patches for them with lucidlm.hf.register.", UnpatchedModuleWarning, stacklevel=2)
    return handle


def _patch_modules(handle: Handle) -> list[str]:
    """Patch every module that has a factory; return ``"name (Class)"`` of suspect leftovers."""
    unpatched = []
    for name, module in handle.model.named_modules():
        factory = find_patch(handle.spec, module, name, handle.model)
        if factory is None:
            if _suspect(module):
                unpatched.append(f"{name or '<model>'} ({type(module).__name__})")
            continue
        forward = factory(module, handle.rules)
        if forward is not None:
            handle._install(module, forward)
    return unpatched


def _suspect(module: nn.Module) -> bool:
    if any(True for _ in module.children()):  # a container (StableLM's per-head norms): its leaves are checked
        return False
    cls = type(module)
    return cls.__module__ in _SUSPECT_MODULES or bool(_SUSPECT_NAME.search(cls.__name__))
