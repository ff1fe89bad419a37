"""Named configs and the classes a checkpoint may name: two registries that
:func:`lucidlm.register_config` fills.

:data:`REGISTRY` holds the named configs besides the catalogue's real checkpoints
(``Config.from_name``, ``lucidlm models``); :data:`COMPONENTS` the classes (Config subclasses,
custom attention/MLP/block modules) that lucidlm's own checkpoint format may name. Loading never
imports a module a file names: an unregistered class is an error.

>>> REGISTRY["tiny-llama"]["n_layer"], qualified_name(Registry)
(2, 'lucidlm.registry.Registry')
"""

from __future__ import annotations

from typing import Any

from ..registry import Registry

#: named configs besides the catalogue's real checkpoints: name -> a Config or a dict of its fields
REGISTRY: Registry[Any] = Registry("config", {
    "tiny-llama": dict(name="tiny-llama", vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_query_groups=2,
                       intermediate_size=128, block_size=256),
})

#: classes a checkpoint may name (config subclasses and custom components), by qualified name;
#: filled by :func:`lucidlm.register_config` and :func:`register_component`
COMPONENTS: Registry[type] = Registry("component")


def qualified_name(cls: type) -> str:
    """``module.QualName``: how a checkpoint names a class."""
    return f"{cls.__module__}.{cls.__qualname__}"


def register_component(cls: type) -> type:
    """Allow checkpoints to name ``cls`` (a Config subclass or a custom module); usable as a decorator."""
    COMPONENTS[qualified_name(cls)] = cls
    return cls
