"""Explanations: the explainer, its results and renderings, and :func:`check` for custom models."""

__all__ = ["check"]


def __getattr__(name: str):
    # check (and torch) load on first use: the CLI imports lucidlm.explain.dataset's options at start-up
    if name == "check":
        from .check import check

        globals()["check"] = check  # over the submodule the import just bound to this name
        return check
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
