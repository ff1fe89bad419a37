"""The CI switch $LUCIDLM_STRICT_SKIPS (tests/strict_skips.py): pytest runs on a small project of
its own, with the switch off and on, and the twelve GGUF oracle skips of the real suite stay skips."""

from __future__ import annotations

import doctest
import os
import pathlib
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET

import pytest

import strict_skips
from strict_skips import ALLOWED_SKIPS, ENV_VAR

TESTS = pathlib.Path(__file__).parent

# a project whose skips cover every way the suite skips: a module-level importorskip and a
# module-level pytest.skip (collection), importorskip in a test and in a fixture, a skipif mark; and
# beside them an allowed skip (its node id is on the real allow-list), an xfail, and a passing test
PROJECT = {
    "pytest.ini": "[pytest]\n",
    "tests/conftest.py": """
        import pytest
        import strict_skips

        def pytest_configure(config):
            strict_skips.register(config)

        @pytest.fixture
        def needs_module():
            return pytest.importorskip("lucidlm_no_such_module_b")
    """,
    "tests/test_module_import.py": """
        import pytest
        pytest.importorskip("lucidlm_no_such_module_a")

        def test_never_collected():
            pass
    """,
    "tests/test_module_tool.py": """
        import pytest
        pytest.skip("no chromium at /nowhere/chromium", allow_module_level=True)
    """,
    "tests/test_mixed.py": """
        import pytest

        def test_import_in_test():
            pytest.importorskip("lucidlm_no_such_module_c")

        def test_import_in_fixture(needs_module):
            pass

        @pytest.mark.skipif(True, reason="node not installed")
        def test_skipif_mark():
            pass

        @pytest.mark.xfail(reason="a known gap", strict=True)
        def test_expected_failure():
            assert False

        def test_passes():
            pass
    """,
    "tests/test_gguf_families.py": """
        import pytest

        @pytest.mark.parametrize("case_id", ["gemma", "llama2"])
        def test_logits_equal_transformers(case_id):
            pytest.skip("transformers' GGUF loader cannot be the oracle here")
    """,
}


def write_project(root: pathlib.Path) -> pathlib.Path:
    for name, text in PROJECT.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def run_pytest(root: pathlib.Path, *args: str, strict: str | None, cwd: pathlib.Path | None = None
               ) -> tuple[subprocess.CompletedProcess, dict[str, str]]:
    """Run pytest with the switch set to ``strict`` (None: unset); returns the process and each
    outcome by test (JUnit XML: "passed", "skipped", "failure" or "error"; collection errors are
    named by their module)."""
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), env.get("PYTHONPATH")) if p)
    if strict is not None:
        env[ENV_VAR] = strict
    xml = root / "report.xml"
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", f"--junitxml={xml}",
                           *args], cwd=cwd or root, env=env, capture_output=True, text=True, timeout=300)
    outcomes = {}
    for case in ET.parse(xml).iter("testcase"):
        name = f"{case.get('classname')}.{case.get('name')}".strip(".")
        kinds = [child.tag for child in case if child.tag in ("skipped", "failure", "error")]
        outcomes[name] = kinds[0] if kinds else "passed"
    return done, outcomes


#: pytest's junit names (module.test) of the project's tests
MIXED = "tests.test_mixed."
DEPENDENCY_SKIPS = [f"{MIXED}test_import_in_test", f"{MIXED}test_import_in_fixture", f"{MIXED}test_skipif_mark"]
COLLECTION_SKIPS = ["tests.test_module_import", "tests.test_module_tool"]
ALLOWED = "tests.test_gguf_families.test_logits_equal_transformers[gemma]"
NOT_ALLOWED = "tests.test_gguf_families.test_logits_equal_transformers[llama2]"


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return write_project(tmp_path_factory.mktemp("strict-skips"))


@pytest.mark.parametrize("off", [None, "", "0"])
def test_without_the_switch_skips_stay_skips(project, off):
    done, outcomes = run_pytest(project, strict=off)
    assert done.returncode == 0, done.stdout + done.stderr
    skips = DEPENDENCY_SKIPS + COLLECTION_SKIPS + [ALLOWED, NOT_ALLOWED]
    assert {name: outcomes[name] for name in skips} == dict.fromkeys(skips, "skipped")
    assert outcomes[f"{MIXED}test_expected_failure"] == "skipped"  # junit writes an xfail as a skip
    assert outcomes[f"{MIXED}test_passes"] == "passed"


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["one-process", "xdist"])
def test_the_switch_makes_dependency_skips_fail_and_keeps_the_allowed_one(project, workers):
    done, outcomes = run_pytest(project, *workers, "--continue-on-collection-errors", strict="1")
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    for name in DEPENDENCY_SKIPS + [NOT_ALLOWED]:
        assert outcomes[name] in ("failure", "error"), (name, outcomes)
    for name in COLLECTION_SKIPS:
        assert outcomes[name] == "error", (name, outcomes)
    assert outcomes[ALLOWED] == "skipped" and outcomes[f"{MIXED}test_passes"] == "passed"
    assert outcomes[f"{MIXED}test_expected_failure"] == "skipped"  # an xfail stays an xfail
    # each failure says why: the switch and the skip's own reason
    for reason in ("lucidlm_no_such_module_a", "lucidlm_no_such_module_b", "lucidlm_no_such_module_c",
                   "no chromium at /nowhere/chromium", "node not installed"):
        assert f"{ENV_VAR}=1 makes this skip an error" in output and reason in output, reason


def test_a_collection_skip_under_the_switch_stops_the_run(project):
    """In one process (no ``-n``) pytest ends the run at a collection error, before any test: a setup
    that lacks a test dependency fails at once, naming it. (Under xdist the other tests still run.)"""
    done, outcomes = run_pytest(project, "tests/test_module_import.py", "tests/test_mixed.py", strict="1")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "lucidlm_no_such_module_a" in done.stdout and f"{MIXED}test_passes" not in outcomes


def test_node_ids_do_not_depend_on_the_directory_pytest_starts_in(project):
    done, outcomes = run_pytest(project, "test_gguf_families.py", strict="1", cwd=project / "tests")
    assert outcomes[ALLOWED] == "skipped" and outcomes[NOT_ALLOWED] == "failure", done.stdout


def test_the_gguf_oracle_skips_of_the_suite_stay_skips_under_the_switch(tmp_path):
    """The allow-list names exactly the cases transformers' loader cannot check: each still skips
    (a case the oracle learns to read would run, and this test would ask to drop its name)."""
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    assert len(ALLOWED_SKIPS) == 12
    root = TESTS.parent
    done, outcomes = run_pytest(tmp_path, *sorted(ALLOWED_SKIPS), strict="1", cwd=root)
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(outcomes.values()) == ["skipped"] * len(ALLOWED_SKIPS), outcomes


def test_doctests():
    assert doctest.testmod(strict_skips).failed == 0


# ----------------------------------------------------------------------------- scripts/test.sh
FAKE_APT = """#!/bin/sh
echo "$*" >> "$APT_CALLS"
case "$1" in
    update) echo "Hit:1 http://deb.example update-output" ;;
    install) [ -z "$APT_FAILS" ] || { echo "E: Unable to locate package lucidlm-fake-tool"; exit 100; } ;;
esac
"""


MISSING_AND_PRESENT = '"/nonexistent/lucidlm-tool lucidlm-fake-tool" "sh dash"'


def install_tools(tmp_path: pathlib.Path, strict: str | None = None, fails: bool = False,
                  tools: str = MISSING_AND_PRESENT) -> tuple[subprocess.CompletedProcess, list[str]]:
    """scripts/test.sh's install_system_tools with ``tools`` as its SYSTEM_TOOLS, apt-get (and sudo,
    for a CI user that is not root) replaced by fakes; returns the run and apt-get's calls."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("apt-get", FAKE_APT), ("sudo", '#!/bin/sh\n[ "$1" = -n ] && shift\nexec "$@"\n')):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    calls = tmp_path / "calls"
    calls.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", APT_CALLS=str(calls), APT_FAILS="1" if fails else "")
    if strict is not None:
        env[ENV_VAR] = strict
    script = f"source scripts/test.sh && SYSTEM_TOOLS=({tools}) && install_system_tools"
    done = subprocess.run(["bash", "-c", script], cwd=TESTS.parent, env=env, capture_output=True, text=True,
                          timeout=60)
    return done, calls.read_text().splitlines() if calls.exists() else []


@pytest.mark.parametrize("strict", [None, "1"], ids=["warns", "strict"])
def test_test_sh_updates_apt_first_and_shows_its_output_when_the_install_fails(tmp_path, strict):
    done, calls = install_tools(tmp_path, strict, fails=True)
    assert calls == ["update -q", "install -y -q lucidlm-fake-tool"]  # the present tool is not installed
    assert "update-output" in done.stderr and "E: Unable to locate package lucidlm-fake-tool" in done.stderr
    if strict:
        assert done.returncode != 0 and "error: could not install lucidlm-fake-tool" in done.stderr
    else:
        assert done.returncode == 0 and "warning: could not install lucidlm-fake-tool" in done.stderr


def test_test_sh_installs_quietly_and_runs_no_apt_when_nothing_is_missing(tmp_path):
    done, calls = install_tools(tmp_path, "1")
    assert done.returncode == 0 and done.stderr == "" and calls == ["update -q", "install -y -q lucidlm-fake-tool"]
    done, calls = install_tools(tmp_path, "1", tools='"sh dash"')
    assert done.returncode == 0 and done.stderr == "" and calls == []
