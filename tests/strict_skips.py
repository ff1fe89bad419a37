"""Skips that CI must not swallow: with ``LUCIDLM_STRICT_SKIPS=1`` (set by ``.ci/run``) every skip is
a failure, except the few named in :data:`ALLOWED_SKIPS`.

Every other skip in the suite means the environment lacks something the suite needs: an optional
test dependency (``pytest.importorskip``: gguf, transformers, accelerate, openai, httpx, peft,
pexpect, pyarrow, datasets, hypothesis, tokenizers, playwright), a tool (Debian's chromium, node,
a C++ compiler, torchrun), torchvision in ``.venv-torchvision``, LitGPT in ``.venv-litgpt``, or the
embedded SmolLM2 model. On
a developer's machine those skip, so that a partial setup still runs what it can; in CI they would
make a broken setup look green, so there they fail, with the skip's own reason.

The switch is a pytest plugin, :class:`StrictSkips`, that ``tests/conftest.py`` hands to
:func:`register`; it turns

* a skip while running a test (in its setup, the test itself, or teardown; a ``skipif`` mark, an
  ``importorskip`` in a fixture, a ``pytest.skip`` call) into a failed test, and
* a skip while collecting a module (a module-level ``importorskip`` or ``pytest.skip(...,
  allow_module_level=True)``) into a collection error,

and leaves expected failures (``xfail``) alone.

>>> StrictSkips.from_environment({}) is None
True
>>> StrictSkips.from_environment({ENV_VAR: "1"}).allowed == ALLOWED_SKIPS
True
>>> StrictSkips(frozenset({"tests/test_a.py::test_b[x]"})).is_allowed("tests/test_a.py::test_b[x]")
True
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import pytest

#: the environment variable that turns the switch on (any value but empty or "0")
ENV_VAR = "LUCIDLM_STRICT_SKIPS"

#: transformers' GGUF loader, the independent oracle of tests/test_gguf_families.py, cannot rebuild
#: these twelve cases faithfully (each case's ``oracle_gap`` says why); lucidlm is still checked
#: against the source model for each of them by ``test_logits_equal_source_model``
_GGUF_ORACLE_GAPS = ("falcon-new", "falcon-new-one-norm", "gemma", "gemma2-softcaps", "gemma3-linear-rope",
                     "gemma3-no-window", "phi3-partial-rotary", "qwen3-head-dim-24", "stablelm-parallel",
                     "starcoder2-no-bias", "starcoder2-theta", "nemotron-odd-rotary")

#: the skips that are part of the suite's design, not of a missing dependency: by pytest node id
ALLOWED_SKIPS: frozenset[str] = frozenset(
    f"tests/test_gguf_families.py::test_logits_equal_transformers[{case}]" for case in _GGUF_ORACLE_GAPS)


def _is_on(value: str | None) -> bool:
    return bool(value) and value != "0"


def _reason(longrepr: object) -> str:
    """The message of a skip report (pytest stores ``(path, line, "Skipped: why")``)."""
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        path, line, message = longrepr
        return f"{message} ({path}:{line})"
    return str(longrepr)


class StrictSkips:
    """The pytest plugin: skips become failures unless their node id is in ``allowed``."""

    def __init__(self, allowed: frozenset[str] = ALLOWED_SKIPS) -> None:
        self.allowed = allowed

    @classmethod
    def from_environment(cls, environ: Mapping[str, str]) -> StrictSkips | None:
        """The plugin when ``environ`` turns the switch on, else None."""
        return cls() if _is_on(environ.get(ENV_VAR)) else None

    def is_allowed(self, nodeid: str) -> bool:
        return nodeid in self.allowed

    def _fail(self, report: pytest.TestReport | pytest.CollectReport) -> None:
        if report.skipped and not hasattr(report, "wasxfail") and not self.is_allowed(report.nodeid):
            report.longrepr = f"{ENV_VAR}=1 makes this skip an error: {_reason(report.longrepr)}"
            report.outcome = "failed"

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo):
        report = yield
        self._fail(report)
        return report

    @pytest.hookimpl(wrapper=True)
    def pytest_make_collect_report(self, collector: pytest.Collector):
        report = yield
        self._fail(report)
        return report


def register(config: pytest.Config, environ: Mapping[str, str] = os.environ) -> None:
    """``pytest_configure``'s part: add the plugin when ``environ`` turns the switch on."""
    plugin = StrictSkips.from_environment(environ)
    if plugin is not None:
        config.pluginmanager.register(plugin, "lucidlm-strict-skips")
