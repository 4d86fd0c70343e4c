"""Architecture checks on the qmpbackup package: no import cycle, size limits, README layout.

Pure ``ast`` over the source files: nothing is imported or run.  The helpers take a
package root so that the self-tests can run them on small trees built in ``tmp_path``.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import qmpbackup

PACKAGE = Path(qmpbackup.__file__).resolve().parent
README = PACKAGE.parent / "README.md"
MODULE_LIMIT, FUNCTION_LIMIT = 400, 80


def module_files(root: Path) -> dict[str, Path]:
    """Dotted module name to file for every ``.py`` under ``root`` (``__init__`` is its package)."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = [root.name, *path.relative_to(root).with_suffix("").parts]
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def import_graph(root: Path) -> dict[str, dict[str, str]]:
    """Module to {imported module of the tree: where}, from every import statement in the file.

    Imports inside functions, ``if TYPE_CHECKING:`` and try/except all count.
    """
    modules = module_files(root)
    graph: dict[str, dict[str, str]] = {name: {} for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([node.module] if node.module else [])])
                for alias in node.names:  # ``from P import n``: module P.n if there is one
                    full = f"{base}.{alias.name}"
                    targets.append(full if full in modules else base)
            where = f"{path.relative_to(root.parent)}:{getattr(node, 'lineno', '?')}"
            for target in targets:
                if target in modules:
                    graph[name].setdefault(target, where)
    return graph


def find_cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Every elementary cycle once, from its smallest node: ``[a, b]`` is a -> b -> a."""
    cycles: list[list[str]] = []
    for start in sorted(graph):
        # Only nodes after ``start`` that lead back to it can be on a cycle found from it.
        back, todo = {start}, [start]
        while todo:
            node = todo.pop()
            for src, dsts in graph.items():
                if node in dsts and src > start and src not in back:
                    back.add(src)
                    todo.append(src)
        stack: list[list[str]] = [[start]]
        while stack:
            path = stack.pop()
            for nxt in sorted(graph.get(path[-1], ()), reverse=True):
                if nxt == start:
                    cycles.append(path)
                elif nxt in back and nxt != start and nxt not in path:
                    stack.append([*path, nxt])
    return sorted(cycles, key=lambda c: (len(c), c))


def cycle_report(root: Path) -> list[str]:
    """One line per cycle, ``a -> b -> a``, with where each import is."""
    graph = import_graph(root)
    lines = []
    for cycle in find_cycles(graph):
        hops = zip(cycle, [*cycle[1:], cycle[0]], strict=True)
        lines.append(" -> ".join([*cycle, cycle[0]]))
        lines += [f"      {graph[a][b]} imports {b}" for a, b in hops]
    return lines


def layout_section(readme: str) -> list[str]:
    """The lines of the README's ``## Layout`` section (empty if there is none)."""
    lines, inside = [], False
    for line in readme.splitlines():
        if line.startswith("## "):
            inside = line.strip() == "## Layout"
        elif inside:
            lines.append(line)
    return lines


BULLET = re.compile(r"- `(?P<path>[^`]+)`(?: `(?P<name>[^`]+)`)?\s*:(?P<why>.*)")


def size_explanations(readme: str) -> tuple[dict[tuple[str, str], str], list[str]]:
    """Layout's "Longer than" list: {(path, function or ""): reason}, and bad bullets."""
    explained: dict[tuple[str, str], str] = {}
    errors: list[str] = []
    lines = layout_section(readme)
    start = next((i for i, line in enumerate(lines) if line.startswith("Longer than")), len(lines))
    key = None
    for line in lines[start + 1 :]:
        if line.startswith("- "):
            match = BULLET.fullmatch(line.strip())
            key = (match["path"], match["name"] or "") if match else None
            if key and match:
                explained[key] = match["why"].strip()
            else:
                errors.append(f"not - `path.py`: why  nor  - `path.py` `name`: why: {line}")
        elif line.startswith((" ", "\t")) and line.strip():
            if key:  # a reason wrapped over several lines
                explained[key] = f"{explained[key]} {line.strip()}".strip()
        elif line.strip():
            break  # the first line that is not part of the list ends it
    for (path, name), why in explained.items():
        if not why:
            errors.append(f"{path} {name or '(module)'}: the bullet gives no reason")
    return explained, errors


def functions(tree: ast.AST, prefix: str = "") -> Iterator[tuple[str, int]]:
    """(Class.method or outer.inner, lines from ``def`` to its end) for every def in ``tree``."""
    for node in ast.iter_child_nodes(tree):
        name = f"{prefix}{getattr(node, 'name', '')}"
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield name, (node.end_lineno or node.lineno) - node.lineno + 1
        scope = isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
        yield from functions(node, f"{name}." if scope else prefix)


def size_problems(root: Path, readme: str) -> list[str]:
    """Oversized modules and functions README does not explain, and explanations gone stale."""
    explained, errors = size_explanations(readme)
    found = {}  # (path, function or ""): lines
    for file in module_files(root).values():
        text, rel = file.read_text(encoding="utf-8"), str(file.relative_to(root.parent))
        if len(text.splitlines()) > MODULE_LIMIT:
            found[(rel, "")] = len(text.splitlines())
        for name, length in functions(ast.parse(text)):
            if length > FUNCTION_LIMIT:
                found[(rel, name)] = length
    for (path, name), lines in sorted(found.items()):
        if (path, name) not in explained:
            limit = FUNCTION_LIMIT if name else MODULE_LIMIT
            errors.append(f"{path} {name or '(module)'}: {lines} lines, over {limit}")
    for path, name in sorted(set(explained) - set(found)):
        errors.append(f"{path} {name or '(module)'}: explained in README but within the limit")
    return errors


def layout_rows(readme: str) -> tuple[list[str], list[str]]:
    """The module paths in the first column of the Layout table, and the rows that are wrong."""
    rows, errors = [], []
    table = [line.strip() for line in layout_section(readme) if line.strip().startswith("|")]
    separator = re.compile(r"\|(\s*:?-+:?\s*\|)+")
    for i, line in enumerate(table):
        if separator.fullmatch(line) or (i + 1 < len(table) and separator.fullmatch(table[i + 1])):
            continue  # the header and the line under it
        cell = line.strip("|").split("|")[0].strip()
        paths = re.findall(r"`([^`]+)`", cell)
        if len(paths) != 1 or re.sub(r"`[^`]+`", "", cell).strip():
            errors.append(f"one module per row, its path alone in the first cell: {line}")
        rows += paths
    return rows, errors


def layout_problems(root: Path, readme: str) -> list[str]:
    """Modules with no row in the Layout table, and rows naming no module of ``root``."""
    rows, errors = layout_rows(readme)
    for row in rows:
        target = root.parent / row / "__init__.py" if row.endswith("/") else root.parent / row
        if not row.startswith(f"{root.name}/") or not target.is_file():
            errors.append(f"row `{row}` names no module of the tree (moved or removed?)")
    for path in module_files(root).values():
        rel = str(path.relative_to(root.parent))
        package = rel.removesuffix("__init__.py")  # a package is covered by any row in it
        if path.name == "__main__.py" or rel in rows:
            continue
        if path.name == "__init__.py" and any(row.startswith(package) for row in rows):
            continue
        errors.append(f"`{rel}` has no row in the table")
    return errors


def test_no_import_cycle() -> None:
    """No module of qmpbackup imports, directly or through others, a module importing it back."""
    report = cycle_report(PACKAGE)
    assert not report, (
        "Import cycles in qmpbackup/ (imports inside functions and under `if TYPE_CHECKING:`\n"
        "count too). Move what both sides need to a lower module, or pass it in:\n  "
        + "\n  ".join(report)
    )


def test_find_cycles_on_a_synthetic_graph() -> None:
    """The cycle finder finds a 2-cycle and a 3-cycle, each once, and nothing in a DAG."""
    graph = {"a": {"b"}, "b": {"a", "c"}, "c": {"d"}, "d": {"e"}, "e": {"c"}, "f": {"a"}}
    assert find_cycles(graph) == [["a", "b"], ["c", "d", "e"]]
    assert find_cycles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_type_checking_and_relative_imports_count(tmp_path: Path) -> None:
    """An import under ``if TYPE_CHECKING:`` is an edge; relative imports resolve to the module."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text('"""Pkg."""\n')
    (pkg / "sub" / "__init__.py").write_text('"""Sub."""\nfrom . import b\n')
    (pkg / "sub" / "a.py").write_text("import typing\nif typing.TYPE_CHECKING:\n  from .b import B")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..sub import a\n")
    assert import_graph(pkg)["pkg.sub"] == {"pkg.sub.b": "pkg/sub/__init__.py:2"}
    assert cycle_report(pkg) == [
        "pkg.sub.a -> pkg.sub.b -> pkg.sub.a",
        "      pkg/sub/a.py:3 imports pkg.sub.b",
        "      pkg/sub/b.py:2 imports pkg.sub.a",
    ]


def test_module_and_function_sizes() -> None:
    """Modules stay within 400 lines and functions within 80, unless README's Layout says why."""
    errors = size_problems(PACKAGE, README.read_text(encoding="utf-8"))
    assert not errors, (
        "Split these, or explain each in README.md's `## Layout`, in the bullet list under the\n"
        "line starting with `Longer than`, one bullet each, as\n"
        "  - `qmpbackup/x.py`: why    or    - `qmpbackup/x.py` `Class.method`: why\n  "
        + "\n  ".join(errors)
    )


SIZE_README = """## Layout

Longer than the limits (400 lines a module, 80 a function), and why:

- `pkg/ok.py` `f`: a long
  table
- `pkg/big.py` `C.m`:
- `bad`

Text.
- `pkg/x.py`: not in the list
"""


def test_size_rules_on_a_sample_tree(tmp_path: Path) -> None:
    """Bullets are read (wrapped reasons joined); unexplained, unreasoned and stale ones fail."""
    (tmp_path / "pkg").mkdir()
    body = "".join(f"        x = {i}\n" for i in range(80))
    (tmp_path / "pkg" / "big.py").write_text(f"class C:\n    @staticmethod\n    def m():\n{body}")
    (tmp_path / "pkg" / "ok.py").write_text("def f():\n    pass\n" + "\n" * 400)
    explained = {("pkg/ok.py", "f"): "a long table", ("pkg/big.py", "C.m"): ""}
    assert size_explanations(SIZE_README)[0] == explained
    assert size_problems(tmp_path / "pkg", SIZE_README) == [
        "not - `path.py`: why  nor  - `path.py` `name`: why: - `bad`",
        "pkg/big.py C.m: the bullet gives no reason",
        "pkg/ok.py (module): 402 lines, over 400",
        "pkg/ok.py f: explained in README but within the limit",
    ]
    assert size_explanations("# Title\n") == ({}, [])


def test_readme_layout_matches_the_tree() -> None:
    """README's Layout table has one row per module of qmpbackup/, and no row for a missing one."""
    errors = layout_problems(PACKAGE, README.read_text(encoding="utf-8"))
    assert not errors, (
        "README.md's `## Layout` table needs one row per module, its path alone in the first\n"
        "cell: | `qmpbackup/x.py` | what it is |  (an __init__.py: | `qmpbackup/pkg/` | |):\n  "
        + "\n  ".join(errors)
    )


LAYOUT_README = """## Layout

| module | idea |
|---|---|
| `pkg/a.py` | A |
| `pkg/sub/b.py` | B |
| `pkg/other/` | O |
| `pkg/gone.py` | G |
| `pkg/a.py`, `c.py` | two |

## Next
| `pkg/x.py` | not in Layout |
"""


def test_layout_rules_on_a_sample_tree(tmp_path: Path) -> None:
    """The Layout table is read from its section only; missing, extra and shared rows fail."""
    for name in ["__init__", "__main__", "a", "sub/__init__", "sub/b", "other/__init__", "other/c"]:
        (tmp_path / "pkg" / f"{name}.py").parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "pkg" / f"{name}.py").write_text('"""A module."""\n')
    rows = ["pkg/a.py", "pkg/sub/b.py", "pkg/other/", "pkg/gone.py", "pkg/a.py", "c.py"]
    assert layout_rows(LAYOUT_README)[0] == rows
    assert layout_problems(tmp_path / "pkg", LAYOUT_README) == [
        "one module per row, its path alone in the first cell: | `pkg/a.py`, `c.py` | two |",
        "row `pkg/gone.py` names no module of the tree (moved or removed?)",
        "row `c.py` names no module of the tree (moved or removed?)",
        "`pkg/other/c.py` has no row in the table",
    ]


def test_every_module_has_a_docstring() -> None:
    """Each module of qmpbackup/ opens with a docstring whose first line says what it is."""
    missing = []
    for path in module_files(PACKAGE).values():
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")), clean=False)
        if not doc or not doc.split("\n")[0].strip():
            missing.append(str(path.relative_to(PACKAGE.parent)))
    assert not missing, (
        "Modules without a docstring whose first line says what they are (the file opens with\n"
        '"""The NBD copy engine: ... with text on the opening line):\n  ' + "\n  ".join(missing)
    )
