"""The package's layout: no import cycles between its modules (TYPE_CHECKING imports counted),
modules of a few hundred lines, the 0.1.0 module names either still importing or failing with a
line that says where to, and the README's layout table naming what is there."""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "csae_plugin"
MAX_LINES = 600
LAYOUT_HEADER = "| package | what | modules |"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_imports(tree: ast.AST, modules: set[str], this: str) -> set[str]:
    """Package modules ``tree`` imports anywhere: module or function level, and inside
    ``if TYPE_CHECKING:`` blocks too (a cycle there still ties the modules together)."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                if sub in modules:
                    found.add(sub)
                elif node.module in modules:
                    found.add(node.module)
    found.discard(this)
    return found


def import_graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(f) for f in files}
    return {
        module_name(f): module_imports(ast.parse(f.read_text()), modules, module_name(f))
        for f in files
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := dfs(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := dfs(node)):
            return cycle
    return None


def test_the_checker_finds_a_cycle_when_there_is_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    tree = ast.parse("from csae_plugin.x import y\nif TYPE_CHECKING:\n    import csae_plugin.z")
    assert module_imports(tree, {"csae_plugin.x", "csae_plugin.z"}, "m") == {
        "csae_plugin.x",
        "csae_plugin.z",
    }


def test_no_import_cycles_between_the_package_modules():
    graph = import_graph()
    assert len(graph) > 20  # the scan sees the package
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_modules_stay_a_few_hundred_lines():
    long = {
        module_name(f): n
        for f in PACKAGE.rglob("*.py")
        if (n := len(f.read_text().splitlines())) > MAX_LINES
    }
    assert not long, long


@pytest.mark.parametrize("old", ["causal_sae", "runner", "training_terms", "interventions", "nces"])
def test_0_1_0_module_names_still_import_with_a_deprecation_warning(old):
    with pytest.warns(DeprecationWarning, match=f"csae_plugin.{old} moved to csae_plugin"):
        importlib.import_module(f"csae_plugin.{old}")


def test_the_package_imports_in_a_fresh_process_in_any_order():
    """Each subpackage imported first, in its own process, imports cleanly (a cycle that only
    bites for one entry point shows here)."""
    for first in ["csae_plugin.causal.engine", "csae_plugin.training", "csae_plugin.evals.api"]:
        result = subprocess.run(
            [sys.executable, "-c", f"import {first}"], capture_output=True, text=True
        )
        assert result.returncode == 0, (first, result.stderr[-2000:])


def readme_layout_table(text: str) -> dict[str, list[str]]:
    """The README's layout table: each row's package folder (relative to the repository root,
    first column) and the files and folders its last column names (relative to that package).
    Every backticked name in the last column that ends in ``.py`` or ``/`` is one of them."""
    lines = text.splitlines()
    start = lines.index(LAYOUT_HEADER)
    rows: dict[str, list[str]] = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        (package,) = re.findall(r"`([^`]+)`", cells[0])
        rows[package] = [n for n in re.findall(r"`([^`]+)`", cells[-1]) if n.endswith((".py", "/"))]
    return rows


def test_the_layout_table_parser_reads_rows():
    text = (
        "intro\n\n" + LAYOUT_HEADER + "\n|---|---|---|\n"
        "| `csae_plugin/x/` | what `y` | `a.py` (`f`), `b/` |\n| `csae_plugin/` | top | `c.py` |\n"
        "\nafter | `z.py` |"
    )
    assert readme_layout_table(text) == {"csae_plugin/x/": ["a.py", "b/"], "csae_plugin/": ["c.py"]}


def test_the_readme_layout_table_names_only_what_exists():
    table = readme_layout_table((ROOT / "README.md").read_text())
    assert len(table) >= 5  # the parser found the table
    missing = [
        f"{package}{name}"
        for package, names in table.items()
        for name in ["__init__.py", *names]
        if not (ROOT / package / name).exists()
    ]
    assert not missing, f"README's layout table names paths that do not exist: {missing}"


def test_the_readme_layout_table_names_every_subpackage():
    table = readme_layout_table((ROOT / "README.md").read_text())
    subpackages = {
        f"{init.parent.relative_to(ROOT).as_posix()}/" for init in PACKAGE.rglob("__init__.py")
    }
    unnamed = sorted(subpackages - set(table))
    assert not unnamed, f"subpackages missing from README's layout table: {unnamed}"
