"""Explanations: the explainer, its results and renderings, and :func:`check` for custom models."""

__all__ = ["check"]


def __getattr__(name: str):
    # check (and torch) load on first use. Its module is named conservation, not check: importing a
    # submodule binds its name on the package, and a submodule called check would replace the
    # function lucidlm.explain.check whenever something imported it first
    if name == "check":
        from .conservation import check

        return check
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
