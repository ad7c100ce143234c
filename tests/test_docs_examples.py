"""The Python examples of README.md ("From Python") and docs/getting-started.md run as written.

A reader pastes these blocks first, so:

- every name a block uses is defined by it or by an earlier block of the same page (a quick static
  check, no model needed);
- a line whose comment is a Python list or tuple (``cat.heads("induction", k=3)  # [(18, 6), ...]``)
  states its value: the real run checks it;
- the real run (marker ``real``) writes the page's blocks, in order and unchanged, into one script and
  runs it in a fresh interpreter in a temporary folder (the examples write ``catalogue.csv`` and
  ``report.html`` into the current folder).

Cost of the real runs: README scans 2 roles (induction and copy suppression: about 140 s of the 247 s
full scan on a quiet 2-core CPU), then 30 s of sweep, plot and generation; getting-started scans
induction twice with ``seq_len=20`` (the seed-0 and seed-1 runs it compares) and draws its plots.
Measured on a 2-core CPU shared with other test runs (load average 4 to 10): README 1406 s,
getting-started about 770 s (scans 471 s and 295 s, everything else under 10 s).
"""
import ast
import builtins
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
GETTING_STARTED = ROOT / "docs" / "getting-started.md"


def python_blocks(path: Path, section: str | None = None) -> list[str]:
    """The ```python blocks of a markdown file, or of its ``## section`` only."""
    text = path.read_text(encoding="utf-8")
    if section is not None:
        match = re.search(rf"^## {re.escape(section)}[ \t]*\n(.*?)(?=^## |\Z)", text, re.S | re.M)
        assert match, f"{path.name} has no section '## {section}'"
        text = match.group(1)
    return re.findall(r"^```python[ \t]*\n(.*?)^```[ \t]*$", text, re.S | re.M)


def pages() -> dict[str, list[str]]:
    return {"README": python_blocks(README, "From Python"),
            "getting-started": python_blocks(GETTING_STARTED)}


def _bound(node: ast.AST) -> set[str]:
    """Names a statement binds anywhere inside (assignments, imports, with/for targets, lambda and
    comprehension variables, definitions)."""
    names = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name) and isinstance(sub.ctx, (ast.Store, ast.Del)):
            names.add(sub.id)
        elif isinstance(sub, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in sub.names)
        elif isinstance(sub, ast.arg):
            names.add(sub.arg)
        elif isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(sub.name)
    return names


def undefined_names(blocks: list[str]) -> list[str]:
    """``"name (line)"`` for each name used before any block of the page defines it."""
    known, missing = set(dir(builtins)), []
    for block in blocks:
        for stmt in ast.parse(block).body:
            inside = _bound(stmt)
            for sub in ast.walk(stmt):
                if (isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Load)
                        and sub.id not in known | inside):
                    missing.append(f"{sub.id} ({ast.get_source_segment(block, stmt).splitlines()[0]})")
            known |= inside
    return missing


def with_claims(block: str) -> str:
    """The block with ``assert`` lines after each one-line expression whose comment is a literal list
    or tuple (the value the page shows), e.g. ``cat.heads("induction", k=3)  # [(18, 6), ...]``."""
    lines = block.splitlines()
    checks = {}
    for stmt in ast.parse(block).body:
        if not isinstance(stmt, ast.Expr) or stmt.lineno != stmt.end_lineno:
            continue
        line = lines[stmt.lineno - 1]
        comment = line[stmt.end_col_offset:].strip()
        if not comment.startswith("#"):
            continue
        try:
            value = ast.literal_eval(comment[1:].strip())
        except (ValueError, SyntaxError):
            continue
        if isinstance(value, (list, tuple)):
            expr = ast.get_source_segment(block, stmt.value)
            checks[stmt.lineno] = (f"assert ({expr}) == {value!r}, "
                                   f"f'the docs show {value!r} for {expr}, got {{({expr})!r}}'")
    out = []
    for i, line in enumerate(lines, 1):
        out.append(line)
        if i in checks:
            out.append(checks[i])
    return "\n".join(out) + "\n"


def test_the_pages_have_python_examples():
    found = pages()
    assert len(found["README"]) == 1, "README's '## From Python' should hold one ```python block"
    assert len(found["getting-started"]) >= 3
    for name, blocks in found.items():
        for block in blocks:
            compile(block, name, "exec")


@pytest.mark.parametrize("page", ["README", "getting-started"])
def test_every_name_in_the_examples_is_defined(page):
    assert undefined_names(pages()[page]) == [], f"{page}: names used but never defined"


def test_claims_become_checks():
    code = with_claims('x = [1]\nx  # [1]\nlen(x)  # a number\n')
    assert "assert (x) == [1]" in code and code.count("assert") == 1
    assert undefined_names(["f = lambda v: v + t\n"]) == ["t (f = lambda v: v + t)"]


def _child_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_page(page: str, folder: Path) -> float:
    """Run the page's blocks, in order, as one script in ``folder``; returns the seconds it took."""
    script = folder / f"{page}_example.py"
    script.write_text("\n".join(with_claims(b) for b in pages()[page]), encoding="utf-8")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    t0, cpu0 = time.perf_counter(), _child_cpu()
    proc = subprocess.run([sys.executable, script.name], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=3600)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, (f"{page}'s Python example failed after {seconds:.0f} s:\n"
                                  f"{proc.stderr[-6000:]}\n--- script ---\n{script.read_text()}")
    print(f"{page}: examples ran in {seconds:.0f} s ({_child_cpu() - cpu0:.0f} s of CPU)")
    return seconds


@pytest.mark.real
def test_readme_python_example_runs(tmp_path):
    run_page("README", tmp_path)
    assert (tmp_path / "catalogue.csv").stat().st_size > 0
    assert (tmp_path / "catalogue.json").stat().st_size > 0


@pytest.mark.real
def test_getting_started_python_examples_run(tmp_path):
    run_page("getting-started", tmp_path)
    assert (tmp_path / "catalogue.csv").stat().st_size > 0
    assert (tmp_path / "report.html").stat().st_size > 0


def test_the_pictures_the_docs_show_exist():
    """Every image README.md and docs/ point to is committed (docs/images/make_images.py makes them)."""
    shown = 0
    for page in [README, *sorted((ROOT / "docs").rglob("*.md"))]:
        for src in re.findall(r'<img src="([^"]+)"|!\[[^\]]*\]\(([^)\s]+)', page.read_text(encoding="utf-8")):
            src = next(s for s in src if s)
            if "://" in src:
                continue
            shown += 1
            assert (page.parent / src).is_file(), f"{page.relative_to(ROOT)} shows {src}, which is missing"
    assert shown >= 6
