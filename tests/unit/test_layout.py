"""The tree's layout is its architecture: hold the import graph to it.

Every module of the product (``ipvs_synproxy``, ``webui``), the testbed and
bench is parsed (ast, nothing is imported) and each ``import`` of the project
becomes an arrow. The test fails on an import cycle between modules, on an
arrow the table below does not allow, and on a private name (``_x``) imported
from another module. The rules say what each package's docstring says.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TREES = ("ipvs_synproxy", "ipvs_synproxy_testbed", "webui", "bench")

# Each area and the areas it may import (besides itself). The longest prefix
# of a module's name picks its area.
ALLOWED: dict[str, set[str]] = {
    "ipvs_synproxy.kernel": set(),
    "ipvs_synproxy.build": set(),
    "ipvs_synproxy.config": {"ipvs_synproxy.kernel"},
    "ipvs_synproxy.adm": {"ipvs_synproxy.kernel"},
    # never ipvs_synproxy.config: that is where the cookie secret is read
    "ipvs_synproxy.exporter": {"ipvs_synproxy.kernel"},
    "webui": {"ipvs_synproxy.kernel", "ipvs_synproxy.config", "ipvs_synproxy.exporter"},
    "ipvs_synproxy.cli": {"ipvs_synproxy.kernel", "ipvs_synproxy.config", "ipvs_synproxy.adm",
                          "ipvs_synproxy.build", "ipvs_synproxy.exporter", "webui",
                          "ipvs_synproxy_testbed"},
    "ipvs_synproxy": set(),  # the package's own __init__
    "ipvs_synproxy_testbed": {"ipvs_synproxy.kernel", "ipvs_synproxy.adm",
                              "ipvs_synproxy.build"},
    "bench": {"ipvs_synproxy.kernel", "ipvs_synproxy.build", "ipvs_synproxy_testbed"},
}
PRODUCT = ("ipvs_synproxy", "webui")
NOT_PRODUCT = ("ipvs_synproxy_testbed", "bench", "tests")


@dataclass(frozen=True)
class Arrow:
    source: str  # importing module
    target: str  # imported module
    names: tuple[str, ...]  # names taken from it (``from x import a, b``)
    where: str  # file:line


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    out = {}
    for tree in TREES:
        for path in sorted((ROOT / tree).rglob("*.py")):
            out[module_name(path)] = path
    return out


def resolve(source: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = source.split(".")
    drop = node.level - (1 if is_package else 0)
    base = base[: len(base) - drop] if drop else base
    return ".".join([*base, node.module] if node.module else base)


def arrows_of(name: str, path: Path, modules: dict[str, Path]) -> Iterator[Arrow]:
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in modules:
                    yield Arrow(name, alias.name, (), f"{path.name}:{node.lineno}")
        elif isinstance(node, ast.ImportFrom):
            target = resolve(name, is_package, node)
            if target.split(".")[0] not in TREES:
                continue
            plain = []
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in modules:  # ``from pkg import module``
                    yield Arrow(name, sub, (), f"{path.name}:{node.lineno}")
                else:
                    plain.append(alias.name)
            if plain or target not in modules:
                yield Arrow(name, target, tuple(plain), f"{path.name}:{node.lineno}")


def all_arrows(modules: dict[str, Path]) -> list[Arrow]:
    return [a for name, path in modules.items() for a in arrows_of(name, path, modules)]


def area(module: str) -> str:
    best = ""
    for key in ALLOWED:
        if (module == key or module.startswith(key + ".")) and len(key) > len(best):
            best = key
    return best


def wrong_way(arrows: list[Arrow]) -> list[str]:
    out = []
    for a in arrows:
        src, dst = area(a.source), area(a.target)
        if src == dst:
            continue
        if not src or not dst or dst not in ALLOWED[src]:
            out.append(f"{a.source} ({a.where}) imports {a.target}: {src or '?'} may import "
                       f"only {sorted(ALLOWED.get(src, set())) or 'itself'}")
    return out


def private_imports(arrows: list[Arrow]) -> list[str]:
    return [f"{a.source} ({a.where}) imports {n} from {a.target}"
            for a in arrows for n in a.names if n.startswith("_") and n != "__version__"]


def cycles(arrows: list[Arrow], modules: dict[str, Path]) -> list[list[str]]:
    """Every strongly connected set of more than one module (Tarjan)."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for a in arrows:
        if a.target in graph and a.target != a.source:
            graph[a.source].add(a.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                found.append(sorted(scc))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


@pytest.fixture(scope="module")
def graph() -> tuple[dict[str, Path], list[Arrow]]:
    modules = project_modules()
    return modules, all_arrows(modules)


def test_every_module_has_an_area(graph: tuple[dict[str, Path], list[Arrow]]) -> None:
    modules, _ = graph
    assert [m for m in modules if not area(m)] == []


def test_no_import_cycle(graph: tuple[dict[str, Path], list[Arrow]]) -> None:
    modules, arrows = graph
    assert cycles(arrows, modules) == []


def test_every_arrow_runs_the_right_way(graph: tuple[dict[str, Path], list[Arrow]]) -> None:
    _, arrows = graph
    assert wrong_way(arrows) == []


def test_no_private_name_crosses_a_module(graph: tuple[dict[str, Path], list[Arrow]]) -> None:
    _, arrows = graph
    assert private_imports(arrows) == []


def test_the_product_imports_no_testbed_bench_or_test_module(
        graph: tuple[dict[str, Path], list[Arrow]]) -> None:
    """Transitively: nothing reachable from the product (the cli's testbed
    dispatch aside, which is the one door ``vm exec`` goes through) leaves it."""
    modules, arrows = graph
    edges: dict[str, set[str]] = {}
    for a in arrows:
        if a.source == "ipvs_synproxy.cli.main" and a.target.startswith("ipvs_synproxy_testbed"):
            continue
        edges.setdefault(a.source, set()).add(a.target)
    seen: set[str] = set()
    todo = [m for m in modules if m.split(".")[0] in PRODUCT]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo.extend(edges.get(m, ()))
    assert sorted(m for m in seen if m.split(".")[0] in NOT_PRODUCT) == []


def test_each_package_says_what_it_owns_and_may_import() -> None:
    for init in sorted(ROOT.glob("ipvs_synproxy*/**/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert doc, f"{init.relative_to(ROOT)} has no docstring"
        if init.parent.name != "ipvs_synproxy":
            assert "import" in doc, f"{init.relative_to(ROOT)} does not say what it may import"


# The checks themselves: each must catch what it is for.

def _arrow(src: str, dst: str, *names: str) -> Arrow:
    return Arrow(src, dst, names, "x.py:1")


def test_the_checks_catch_a_cycle_a_wrong_arrow_and_a_private_name() -> None:
    modules = {m: Path(m) for m in ("ipvs_synproxy.kernel.model", "ipvs_synproxy.kernel.netlink",
                                    "ipvs_synproxy.config.load")}
    cyc = [_arrow("ipvs_synproxy.kernel.model", "ipvs_synproxy.kernel.netlink"),
           _arrow("ipvs_synproxy.kernel.netlink", "ipvs_synproxy.kernel.model")]
    assert cycles(cyc, modules) == [["ipvs_synproxy.kernel.model", "ipvs_synproxy.kernel.netlink"]]
    up = [_arrow("ipvs_synproxy.kernel.netlink", "ipvs_synproxy.config.load")]
    assert len(wrong_way(up)) == 1
    down = [_arrow("ipvs_synproxy.config.load", "ipvs_synproxy.kernel.netlink")]
    assert wrong_way(down) == []
    assert len(private_imports([_arrow("a", "b", "_hidden", "shown")])) == 1


def test_relative_imports_resolve_like_python() -> None:
    node = ast.parse("from ..kernel import model").body[0]
    assert isinstance(node, ast.ImportFrom)
    assert resolve("ipvs_synproxy.config.load", False, node) == "ipvs_synproxy.kernel"
    node = ast.parse("from . import reader").body[0]
    assert isinstance(node, ast.ImportFrom)
    assert resolve("ipvs_synproxy.config", True, node) == "ipvs_synproxy.config"
