"""The one mechanism behind every table that registration fills: :class:`Registry`.

lucidlm's extension points are tables by name: the Hugging Face architectures
(:data:`lucidlm.families.FAMILIES`), the weight-name layouts
(:data:`lucidlm.checkpoints.layouts.LAYOUTS`), the named configs and the classes a checkpoint may
name (:data:`lucidlm.families.named.CONFIGS`, :data:`~lucidlm.families.named.COMPONENTS`) and the
models :mod:`lucidlm.hf` can explain (:data:`lucidlm.hf.registry.MODELS`). Each is a
:class:`Registry`: a mapping whose module creates it with its built-in entries, that the public
registration functions (``lucidlm.register_family``, ``register_config``, ``register_layout``,
``lucidlm.hf.register``) add to, and that a test scopes instead of copying and restoring it by hand:

>>> colours = Registry("colour", {"red": "#f00"})
>>> with colours.scoped():
...     colours["green"] = "#0f0"
...     sorted(colours)
['green', 'red']
>>> sorted(colours)
['red']

Why a lock and not a context variable: a registration is process-wide configuration (a family
registered on the main thread must load in the server's worker threads), so a scope is
process-wide too; the lock makes each change, each snapshot and each restore whole. Tests that
scope run one at a time in their process (pytest-xdist runs workers as processes).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import ItemsView, Iterable, Iterator, Mapping, MutableMapping, ValuesView
from typing import Any, Generic, TypeVar

V = TypeVar("V")


class Registry(MutableMapping[str, V], Generic[V]):
    """Registered things of one ``kind`` by name: a dict whose changes hold a lock, with
    :meth:`scoped` to undo them. Iterating walks a copy, so another thread may register meanwhile."""

    def __init__(self, kind: str, entries: Mapping[str, V] | Iterable[tuple[str, V]] = ()) -> None:
        self.kind = kind
        self._entries: dict[str, V] = dict(entries)
        self._lock = threading.RLock()

    def __getitem__(self, name: str) -> V:
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __setitem__(self, name: str, value: V) -> None:
        with self._lock:
            self._entries[name] = value

    def __delitem__(self, name: str) -> None:
        with self._lock:
            del self._entries[name]

    def __iter__(self) -> Iterator[str]:
        with self._lock:
            return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self)} entries)"

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    _MISSING = object()

    def pop(self, name: str, default: Any = _MISSING) -> Any:
        with self._lock:
            if default is self._MISSING:
                return self._entries.pop(name)
            return self._entries.pop(name, default)

    # views of a copy: walking them never meets an entry another thread removed meanwhile
    def items(self) -> ItemsView[str, V]:
        return self.snapshot().items()

    def values(self) -> ValuesView[V]:
        return self.snapshot().values()

    def snapshot(self) -> dict[str, V]:
        """A copy of the entries, in registration order."""
        with self._lock:
            return dict(self._entries)

    @contextlib.contextmanager
    def scoped(self) -> Iterator[Registry[V]]:
        """Undo, on leaving the block, every registration and removal made in it (the entries are
        restored in place: references to this registry stay valid)."""
        saved = self.snapshot()
        try:
            yield self
        finally:
            with self._lock:
                self._entries.clear()
                self._entries.update(saved)


@contextlib.contextmanager
def scoped(*registries: Registry) -> Iterator[None]:
    """:meth:`Registry.scoped` for several registries at once (``lucidlm.register_family`` fills
    two: the family and its layout).

    >>> a, b = Registry("a"), Registry("b")
    >>> with scoped(a, b):
    ...     a["x"] = b["y"] = 1
    >>> len(a), len(b)
    (0, 0)
    """
    with contextlib.ExitStack() as stack:
        for registry in registries:
            stack.enter_context(registry.scoped())
        yield
