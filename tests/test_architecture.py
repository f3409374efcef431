"""The dependency rule of docs/ARCHITECTURE.md, checked on the source: layers import only downwards,
stage one and stage two never import each other, and no module imports itself back through others;
and every file of kd/ and bench/ stays small (one job a file).

Every import counts, also one inside a function: moving an import into a function hides a circle
from Python's loader, not from a reader.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOT = REPO / "kd"
BENCH = REPO / "bench"
LINE_LIMIT = 420  # "about 400 lines" (docs/ARCHITECTURE.md), with a little slack
# bench/ files over the limit, each at its length when the limit reached bench/ (issue #18): they
# may not grow, and leave this table once split under the limit.
BENCH_OVER_LIMIT: dict[str, int] = {}

# Layer of each package, lowest first; a module may import its own layer or lower ones, except
# that the two stages (same layer) never import each other.
LAYERS = {
    "kd.cache_schema": 0,
    "kd.pipeline.common": 1,
    "kd.pipeline.build": 2,
    "kd.pipeline.distill": 2,
    "kd.pipeline.importers": 2,
    "kd.integrations": 3,
    "kd.api": 3,
    "kd.pipeline.demo": 4,
    "kd.config_files": 5,
    "kd.cli_render": 5,
    "kd.cli_data": 5,
    "kd.cli": 6,
}
TOP_LEVEL = {"kd", "kd.pipeline"}  # package markers with no code of their own


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str) -> set[str]:
    """Every kd module ``path`` imports, at any depth of the file (relative imports resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("kd"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("kd"):
                found.add(mod)
                found.update(f"{mod}.{a.name}" for a in node.names)  # `from pkg import module`
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        graph[name] = {m for m in _imports(path, name) if m in files and m != name}
    return graph


def _layer(module: str) -> tuple[str, int] | None:
    best = None
    for prefix, layer in LAYERS.items():
        if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[0])):
            best = (prefix, layer)
    return best


GRAPH = _graph()


def test_every_module_has_a_layer():
    unplaced = sorted(m for m in GRAPH if m not in TOP_LEVEL and _layer(m) is None)
    assert not unplaced, f"modules outside the layers of docs/ARCHITECTURE.md: {unplaced}"


def test_imports_point_down_and_the_stages_stay_apart():
    bad = []
    for module, deps in sorted(GRAPH.items()):
        mine = _layer(module)
        if mine is None:
            continue
        for dep in sorted(deps):
            theirs = _layer(dep)
            if theirs is None:
                if dep not in TOP_LEVEL:
                    bad.append(f"{module} -> {dep} (no layer)")
            elif theirs[1] > mine[1] or (theirs[1] == mine[1] and theirs[0] != mine[0]):
                bad.append(f"{module} ({mine[0]}) -> {dep} ({theirs[0]})")
    assert not bad, "imports against the dependency rule:\n" + "\n".join(bad)


def test_no_import_circles():
    circles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(GRAPH[node]):
            if state.get(dep) == "open":
                circles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for node in sorted(GRAPH):
        if node not in state:
            visit(node, [node])
    # A package importing its own submodules in __init__ is how packages export; only circles
    # through other modules count.
    real = [c for c in circles if not _only_package_exports(c)]
    assert not real, "import circles:\n" + "\n".join(real)


def _only_package_exports(circle: str) -> bool:
    hops = circle.split(" -> ")
    return all(b.startswith(a + ".") or a.startswith(b + ".") for a, b in zip(hops, hops[1:]))


def _line_count(path: Path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines())


def _too_long(path: Path, limit: int = LINE_LIMIT) -> str | None:
    """Why ``path`` breaks the size rule, or None."""
    lines, name = _line_count(path), str(path.relative_to(REPO))
    allowed = BENCH_OVER_LIMIT.get(path.name, limit) if path.parent == BENCH else limit
    if lines > allowed:
        return f"{name}: {lines} lines (one job per file, about 400 at most; split it)"
    if allowed > limit and lines <= limit:
        return f"{name}: {lines} lines, under {limit} now: take it out of BENCH_OVER_LIMIT"
    return None


SOURCES = sorted(ROOT.rglob("*.py")) + sorted(BENCH.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_files_stay_small(path: Path):
    problem = _too_long(path)
    assert problem is None, problem


def test_the_size_rule_reaches_bench_and_its_exceptions_are_real():
    assert BENCH / "train_step.py" in SOURCES and BENCH / "train_step_worker.py" in SOURCES
    for name, allowed in BENCH_OVER_LIMIT.items():
        assert (BENCH / name).exists(), f"bench/{name} is gone: take it out of BENCH_OVER_LIMIT"
        assert allowed > LINE_LIMIT, f"bench/{name}: an exception under the limit is no exception"
