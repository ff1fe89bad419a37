"""The guides' code runs: every ```python block of each page, in order, in one namespace per page."""

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).parent.parent / "docs"
PAGES = ["custom-models.md", "adding-a-family.md"]


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)


@pytest.fixture(autouse=True)
def restore_registries():
    """The guides register configs, components and families process-wide: undo it for the other tests."""
    from lucidlm.checkpoints.layouts import LAYOUTS
    from lucidlm.families import COMPONENTS, FAMILIES, REGISTRY
    from lucidlm.registry import scoped

    with scoped(REGISTRY, COMPONENTS, FAMILIES, LAYOUTS):
        yield


@pytest.mark.parametrize("page", PAGES)
def test_every_code_block_runs(page, tmp_path, monkeypatch):
    blocks = python_blocks(DOCS / page)
    assert len(blocks) >= 5, f"{page}: expected its walkthrough's code blocks"
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": f"docs_{page.replace('-', '_').removesuffix('.md')}"}
    for n, block in enumerate(blocks):
        code = compile(block, f"{page} block {n + 1}", "exec")
        exec(code, namespace)  # noqa: S102 - our own documentation
