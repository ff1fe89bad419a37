"""The house keeps its floors (README "Layout", docs/layout.md): a module imports only from its own
floor or the floors below, lazily or not; no import circle between files; no file over 600 lines.
The imports are read from the source (ast), so the check needs no import of the package."""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "lucidlm"
MAX_LINES = 600

#: floor -> module prefixes (the longest prefix decides: lucidlm.train.names is floor 1, lucidlm.train 5)
FLOORS: dict[int, tuple[str, ...]] = {
    1: ("lucidlm.errors", "lucidlm.fileio", "lucidlm.registry", "lucidlm.methods", "lucidlm.dtypes",
        "lucidlm.train.names", "lucidlm.catalogue", "lucidlm.texts"),
    2: ("lucidlm.families", "lucidlm.config", "lucidlm.cache"),
    3: ("lucidlm.kernels", "lucidlm.model"),
    4: ("lucidlm.tokenizer", "lucidlm.chat", "lucidlm.checkpoints", "lucidlm.generate", "lucidlm.compiled",
        "lucidlm.perplexity", "lucidlm.records", "lucidlm.distributed", "lucidlm.progress", "lucidlm.ruler",
        "lucidlm.calibrate"),
    5: ("lucidlm.train", "lucidlm.explain", "lucidlm.render"),
    6: ("lucidlm.api", "lucidlm.hf", "lucidlm.evaluate"),
    7: ("lucidlm.serve", "lucidlm.repl", "lucidlm.bench", "lucidlm.commands", "lucidlm.cli", "lucidlm.__main__"),
}
#: the package's front door re-exports from every floor (lazily); it is above them all
TOP = "lucidlm"


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def floor(module: str) -> int | None:
    matches = [(len(prefix), number) for number, prefixes in FLOORS.items() for prefix in prefixes
               if module == prefix or module.startswith(prefix + ".")]
    return max(matches)[1] if matches else None


def _is_module(name: str) -> bool:
    path = PACKAGE.parent / name.replace(".", "/")
    return path.with_suffix(".py").is_file() or path.is_dir()


def imports(path: pathlib.Path) -> list[tuple[str, int]]:
    """(imported lucidlm module, line) for every import in the file, at any depth."""
    module, found = module_name(path), []
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.startswith("lucidlm")]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            name = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module or ""
            if name.startswith("lucidlm"):
                found += [(f"{name}.{a.name}" if _is_module(f"{name}.{a.name}") else name, node.lineno)
                          for a in node.names]
    return found


FILES = sorted(PACKAGE.rglob("*.py"))


def test_floor_map_covers_every_module():
    unmapped = [module_name(p) for p in FILES if module_name(p) != TOP and floor(module_name(p)) is None]
    assert not unmapped, f"give these modules a floor in tests/test_layout.py and the README: {unmapped}"


def test_no_module_imports_a_higher_floor():
    upward = []
    for path in FILES:
        module = module_name(path)
        if module == TOP:
            continue
        for target, line in imports(path):
            if target != TOP and floor(target) > floor(module):
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {module} (floor {floor(module)}) "
                              f"imports {target} (floor {floor(target)})")
    assert not upward, "\n".join(upward)


def test_no_import_circle_between_files():
    graph = {module_name(p): {t for t, _ in imports(p) if t != module_name(p)} for p in FILES}
    done: set[str] = set()

    def visit(node: str, stack: list[str]) -> list[str] | None:
        if node in stack:
            return stack[stack.index(node):] + [node]
        if node in done or node not in graph:
            return None
        for nxt in sorted(graph[node]):
            # importing a package runs its __init__, which is not a circle through a submodule's file
            if nxt == TOP or (node.startswith(nxt + ".") and nxt in graph):
                continue
            cycle = visit(nxt, stack + [node])
            if cycle:
                return cycle
        done.add(node)
        return None

    for start in sorted(graph):
        cycle = visit(start, [])
        assert cycle is None, " -> ".join(cycle)


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_file_over_600_lines(path):
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(PACKAGE.parent)}: {lines} lines; split it by concern"


def test_the_check_catches_an_upward_import(tmp_path, monkeypatch):
    """The floor check can fail: a floor-1 module that imports the command line is reported."""
    fake = PACKAGE / "errors.py"
    monkeypatch.setattr(pathlib.Path, "read_text", lambda self, encoding=None: "from .cli import main\n"
                        if self == fake else pathlib.Path.read_bytes(self).decode())
    assert [t for t, _ in imports(fake)] == ["lucidlm.cli"]
    with pytest.raises(AssertionError, match="lucidlm.errors .floor 1. imports lucidlm.cli .floor 7."):
        test_no_module_imports_a_higher_floor()
