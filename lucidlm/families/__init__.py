"""What :class:`~lucidlm.config.Config` is read from, below the Config itself: the Hugging Face
families (``config.json`` -> Config fields) and the named configs.

* :mod:`~lucidlm.families.family`: :class:`Family`, one architecture's traits, defaults and readers;
* :mod:`~lucidlm.families.fields`: the keys every family spells alike;
  :mod:`~lucidlm.families.readers`: each family's own keys;
* :mod:`~lucidlm.families.table`: :data:`FAMILIES` (the built-in families) and :func:`register_family`;
* :mod:`~lucidlm.families.named`: the named configs (:data:`REGISTRY`) and the classes a checkpoint
  may name (:data:`COMPONENTS`).

Every table is a :class:`lucidlm.registry.Registry`, which tests scope with ``.scoped()``.
"""

from __future__ import annotations

from .family import Family, Reader
from .named import COMPONENTS, REGISTRY, qualified_name, register_component
from .table import FAMILIES, architecture_of, register_family

__all__ = ["COMPONENTS", "FAMILIES", "REGISTRY", "Family", "Reader", "architecture_of", "qualified_name",
           "register_component", "register_family"]
