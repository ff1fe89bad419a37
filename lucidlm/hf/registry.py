"""Which models lucidlm.hf can explain, and which patch each of their module classes gets.

Classes are named by their fully qualified name (``"transformers.models.llama.modeling_llama.
LlamaRMSNorm"``) so that the table needs neither ``transformers`` nor ``torchvision`` imported;
:func:`register` also takes the class object. Lookups walk the MRO, so a subclass inherits its
parent's entry (``LlamaForCausalLM`` finds the ``LlamaPreTrainedModel`` entry).

The table is :data:`MODELS`, a :class:`lucidlm.registry.Registry`: a test scopes it instead of
unregistering by hand.

>>> from torch import nn
>>> class Tiny(nn.Module): ...
>>> with MODELS.scoped():
...     _ = register(Tiny, {nn.LayerNorm: patches.layer_norm}, name="Tiny")
...     find_model(Tiny()).name
'Tiny'
>>> find_model(Tiny()) is None
True
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import nn

from ..errors import PatchError
from ..registry import Registry
from . import patches
from .patches import PatchFactory
from .structure import structural_patch

ClassKey = type | str


def qualname(cls: type) -> str:
    """``module.QualName`` of a class: the key the registry stores."""
    return f"{cls.__module__}.{cls.__qualname__}"


def _key(cls: ClassKey) -> str:
    return cls if isinstance(cls, str) else qualname(cls)


@dataclass(frozen=True)
class ModelSpec:
    """How to make one model family explainable.

    * ``name``: shown in messages and in :func:`supported`.
    * ``modules``: class name -> patch factory for the family's own modules (its attention, norm,
      MLP ...). Generic modules (``nn.LayerNorm``, ``nn.GELU``, ``transformers`` activations ...)
      are covered by :data:`COMMON` for every family.
    * ``blocks``: dotted path to the list of transformer blocks, whose first block's input is the
      hidden state that token relevances are read from; ``None`` finds it (the first
      ``nn.ModuleList``).
    * ``forward``: optional patch factory for the model's own forward (e.g. logit soft-capping).
    * ``kind``: ``"text"`` (token relevances) or ``"image"`` (pixel relevances).
    * ``structural``: modules that neither ``modules`` nor :data:`COMMON` name are patched by
      what they are (:func:`lucidlm.hf.structure.structural_patch`): how the ``transformers``
      families are covered without naming their classes.
    """

    name: str
    modules: Mapping[str, PatchFactory] = field(default_factory=dict)
    blocks: str | None = None
    forward: PatchFactory | None = None
    kind: str = "text"
    structural: bool = False


#: model class (qualified name) -> its :class:`ModelSpec`; :func:`register` adds. The built-in
#: families register themselves in :mod:`lucidlm.hf.models`, which the package's ``__init__``
#: imports before anyone can reach this module (so no lazy import back from here)
MODELS: Registry[ModelSpec] = Registry("explainable model")

#: model class (qualified name) -> why lucidlm.hf refuses it: a family whose modules cannot be
#: matched to lucidlm's rules is refused by name with the reason, never approximated (:func:`refuse`)
REFUSED: Registry[str] = Registry("refused model")

_TF_ACT = "transformers.activations."
_NN = "torch.nn.modules."
#: Patches every registered model gets for generic modules (its own ``modules`` win over these).
COMMON: dict[str, PatchFactory] = {
    **{_NN + f"activation.{name}": patches.activation
       for name in ("SiLU", "GELU", "Tanh", "Sigmoid", "Mish", "Hardswish", "Softplus")},
    **{_NN + f"activation.{name}": patches.unchanged for name in ("ReLU", "LeakyReLU")},
    _NN + "linear.Identity": patches.unchanged,
    _NN + "normalization.LayerNorm": patches.layer_norm,
    _NN + "normalization.RMSNorm": patches.rms_norm(),
    **{_TF_ACT + name: patches.activation
       for name in ("GELUTanh", "PytorchGELUTanh", "NewGELUActivation", "GELUActivation",
                    "SiLUActivation", "FastGELUActivation", "QuickGELUActivation",
                    "AccurateGELUActivation", "MishActivation", "ClippedGELUActivation",
                    "LaplaceActivation", "ReLUSquaredActivation")},
    _TF_ACT + "LinearActivation": patches.unchanged,
}


def register(model: ClassKey, modules: Mapping[ClassKey, PatchFactory] | None = None, *,
             name: str | None = None, blocks: str | None = None,
             forward: PatchFactory | None = None, kind: str = "text", structural: bool = False) -> ModelSpec:
    """Make a model class (and its subclasses) explainable by :func:`lucidlm.hf.explainable`.

    ``modules`` maps the model's module classes to patch factories from
    :mod:`lucidlm.hf.patches` (or your own, see docs/explaining-new-models.md). Registering a
    class again replaces its entry.

    >>> from torch import nn
    >>> class Net(nn.Module): ...
    >>> register(Net, {nn.LayerNorm: patches.layer_norm}).name
    'Net'
    >>> unregister(Net)
    """
    if kind not in ("text", "image"):
        raise PatchError(f"kind={kind!r}: expected 'text' or 'image'")
    key = _key(model)
    spec = ModelSpec(name or key.rsplit(".", 1)[-1], {_key(c): f for c, f in (modules or {}).items()},
                     blocks, forward, kind, structural)
    MODELS[key] = spec
    return spec


def unregister(model: ClassKey) -> None:
    """Forget a model class registered with :func:`register` (no error if it was not)."""
    MODELS.pop(_key(model), None)


def refuse(model: ClassKey, reason: str) -> None:
    """Record that a model class (and its subclasses) cannot be explained by patching, and why:
    :func:`lucidlm.hf.explainable` then raises a :class:`PatchError` with ``reason``.

    >>> from torch import nn
    >>> class Odd(nn.Module): ...
    >>> with REFUSED.scoped():
    ...     refuse(Odd, "its experts mix attention heads")
    ...     refusal(Odd())
    'its experts mix attention heads'
    """
    REFUSED[_key(model)] = reason


def refusal(model: nn.Module) -> str | None:
    """Why ``model``'s class is refused (:func:`refuse`), or ``None``."""
    return next((REFUSED[qualname(c)] for c in type(model).__mro__ if qualname(c) in REFUSED), None)


def find_model(model: nn.Module) -> ModelSpec | None:
    """The spec registered for ``model``'s class or its nearest registered base class."""
    for cls in type(model).__mro__:
        spec = MODELS.get(qualname(cls))
        if spec is not None:
            return spec
    return None


def find_patch(spec: ModelSpec, module: nn.Module, name: str = "", model: nn.Module | None = None
               ) -> PatchFactory | None:
    """The factory for ``module`` (called ``name`` in ``model``) under ``spec``: its own table
    first, then :data:`COMMON`, then (``spec.structural``) the module's structure."""
    for cls in type(module).__mro__:
        key = qualname(cls)
        factory = spec.modules.get(key) or _common(key, cls, module)
        if factory is not None:
            return factory
    if spec.structural and model is not None:
        return structural_patch(module, name, model)
    return None


def _common(key: str, cls: type, module: nn.Module) -> PatchFactory | None:
    """The :data:`COMMON` patch of ``cls`` for ``module``, if the module still runs ``cls``'s
    forward: a subclass that rewrites it (Nemotron's ``LayerNorm1P(nn.LayerNorm)`` scales by
    ``1 + weight``) is not what the patch computes."""
    factory = COMMON.get(key)
    if factory is None or getattr(type(module), "forward", None) is not getattr(cls, "forward", None):
        return None
    return factory


def supported() -> list[str]:
    """Names of the registered model families, in registration order.

    >>> "Llama" in supported()
    True
    """
    return list(dict.fromkeys(spec.name for spec in MODELS.values()))
