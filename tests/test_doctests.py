"""Every module's docstring examples run, so that a moved name or a changed default cannot leave a
stale example behind (the refactor of issue 22 moved many names)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import lucidlm

MODULES = sorted(m.name for m in pkgutil.walk_packages(lucidlm.__path__, "lucidlm.")
                 if not m.name.endswith("__main__"))  # __main__ runs the command line when imported


def test_every_package_module_is_listed():
    assert {"lucidlm.cli", "lucidlm.explain.core", "lucidlm.render.html", "lucidlm.commands.options"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, report=True)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed (see above)"
