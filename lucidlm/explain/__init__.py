"""Explanations: the explainer, its results and renderings, and :func:`check` for custom models."""

from .check import check

__all__ = ["check"]
