"""The package's layers import downward only, and no module of headlens/ is part of an import circle.

Every import inside ``headlens/`` counts: at module level and inside functions alike (an import written
inside a function to dodge a circle is still a circle). The layers are those of ``docs/architecture.md``;
this test reads the table from there, so the document and the code cannot drift apart.
"""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "headlens"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """The headlens modules ``path`` imports (``from . import x`` resolved to ``pkg.x`` when it is one)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("headlens")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("headlens"):
                continue
            for alias in node.names:       # `from .runtime import distributed` imports a module
                sub = f"{target}.{alias.name}"
                found.add(sub if (ROOT / Path(*sub.split("."))).with_suffix(".py").exists()
                          or (ROOT / Path(*sub.split("."))).is_dir() else target)
    return found - {name}


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def layers() -> list[list[str]]:
    """The layer table of docs/architecture.md: rows ``| n | `module`, `module` | ...``, bottom first."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    rows = re.findall(r"^\| *(\d+) *\| *([^|]+)\|", text, re.M)
    return [re.findall(r"`([\w./]+)`", cells) for _, cells in sorted(rows, key=lambda r: int(r[0]))]


def layer_of(module: str, table: list[list[str]]) -> int:
    """The layer of a module: the longest package prefix named in the table (``headlens.methods.x`` is in
    ``methods``'s layer)."""
    best, where = -1, None
    for i, names in enumerate(table):
        for n in names:
            full = "headlens." + n.strip("/").replace("/", ".")
            if (module == full or module.startswith(full + ".")) and len(full) > best:
                best, where = len(full), i
    if where is None:
        raise AssertionError(f"{module} is in no layer of docs/architecture.md")
    return where


def test_no_import_circle():
    g = graph()
    # a package's __init__ re-exporting its own modules is not a circle through the package: drop the
    # edges from a submodule up to its own package (`import headlens.x.y` runs headlens.x's __init__,
    # which only gathers names)
    edges = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in g.items()}
    seen, stack, cycles = {}, [], []

    def visit(m):
        seen[m] = "open"
        stack.append(m)
        for t in sorted(edges.get(m, ())):
            if seen.get(t) == "open":
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in seen:
                visit(t)
        stack.pop()
        seen[m] = "done"
    for m in sorted(edges):
        if m not in seen:
            visit(m)
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_layers_import_downward_only():
    table = layers()
    assert len(table) >= 8, "docs/architecture.md lost its layer table"
    wrong = []
    for module, targets in graph().items():
        if module == "headlens":              # the package's face re-exports every layer
            continue
        mine = layer_of(module, table)
        for t in targets:
            if t == "headlens":
                wrong.append(f"{module} imports the top-level package")
            elif layer_of(t, table) > mine:
                wrong.append(f"{module} (layer {mine}) imports {t} (layer {layer_of(t, table)})")
    assert not wrong, "\n".join(wrong)


def test_the_runtime_knows_nothing_of_the_science():
    science = ("headlens.models", "headlens.methods", "headlens.detectors", "headlens.results",
               "headlens.catalogue", "headlens.plots", "headlens.report", "headlens.cli", "headlens.data",
               "headlens.steering")
    for module, targets in graph().items():
        if module.startswith("headlens.runtime"):
            assert not [t for t in targets if t.startswith(science)], (module, targets)


def test_detectors_use_methods_not_each_other():
    for module, targets in graph().items():
        if module.startswith("headlens.detectors.") and module != "headlens.detectors.base":
            others = [t for t in targets if t.startswith("headlens.detectors.") and t != "headlens.detectors.base"]
            assert not others, f"{module} imports another detector: {others}"


def test_the_checker_sees_a_circle_and_an_upward_import(tmp_path, monkeypatch):
    """The two tests above can fail: a planted circle and a planted upward import are found."""
    pkg = tmp_path / "headlens"
    (pkg / "runtime").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "runtime" / "__init__.py").write_text("")
    (pkg / "runtime" / "a.py").write_text("def f():\n    from .b import g\n")
    (pkg / "runtime" / "b.py").write_text("from .a import f\nfrom ..cli import main\n")
    (pkg / "cli.py").write_text("")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "architecture.md").write_text("| 0 | `runtime/` |\n| 1 | `cli` |\n" +
                                                       "".join(f"| {i} | `x{i}` |\n" for i in range(2, 9)))
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
    g = graph()
    assert "headlens.runtime.b" in g["headlens.runtime.a"] and "headlens.runtime.a" in g["headlens.runtime.b"]
    with pytest.raises(AssertionError, match="headlens.runtime.a -> headlens.runtime.b"):
        test_no_import_circle()
    with pytest.raises(AssertionError, match=re.escape("headlens.runtime.b (layer 0) imports headlens.cli (layer 1)")):
        test_layers_import_downward_only()
