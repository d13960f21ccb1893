"""The package's import graph keeps the layout honest (issue 8).

Built from the source with the standard library's `ast`, module names exactly as pyproject's
`packages` and `package-dir` install them (`broker/aggregator.py` is
`fedclip_edge.broker.aggregator`). Every import statement counts, wherever it sits (module top,
inside a function, under `if TYPE_CHECKING`): a lazy import is still a dependency, only a later
one. Calls such as `importlib.import_module("...")` are not import statements and do not count.

An edge goes to the module an import names: `from fedclip_edge.broker import protocol` is an edge
to `fedclip_edge.broker.protocol`, `from fedclip_edge.broker import X` (X not a submodule) an
edge to the package `__init__` only, never to every submodule of the package; the parent
packages Python initialises on the way are not edges either (they would make every package look
circular).

Fails on (a) an import cycle, (b) typer imported by a library module (only files named cli.py or
cli_*.py may), (c) the core (the fedclip_edge/ folder, its cli.py and cli_*.py aside) importing
the server side, the device side, the benchmarks, serving, an MQTT client or broker, or
subprocess, (d) serving/ (fedclip_edge.serving, issue 17) importing the server side, the device
side, the benchmarks or an MQTT client or broker: it knows nothing of MQTT, and the agent imports
serving.store, never the other way.
"""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TOP = "fedclip_edge"

# (c): what the core must not import. A name matches itself and its submodules.
CORE_FORBIDDEN = (
    f"{TOP}.broker",
    f"{TOP}.device_agent",
    f"{TOP}.benchmarks",
    f"{TOP}.serving",
    "paho",
    "amqtt",
    "subprocess",
)

# (d): what serving/ must not import.
SERVING_FORBIDDEN = (
    f"{TOP}.broker",
    f"{TOP}.device_agent",
    f"{TOP}.benchmarks",
    "paho",
    "amqtt",
)


@dataclass(frozen=True)
class Import:
    """One imported name as written, resolved to an absolute dotted name."""

    module: str  # the importing module
    target: str  # the module it names (a package's __init__ or a submodule), or an external one
    line: int


def _is_cli(path: Path) -> bool:
    return path.name == "cli.py" or (path.name.startswith("cli_") and path.suffix == ".py")


def _pyproject_layout(pyproject: Path) -> tuple[list[str], dict[str, str]]:
    """`packages` and `package-dir` from [tool.setuptools] (tomllib on 3.11+, a minimal reader
    of these two keys on 3.10)."""
    text = pyproject.read_text()
    if sys.version_info >= (3, 11):
        import tomllib

        st = tomllib.loads(text)["tool"]["setuptools"]
        return list(st["packages"]), dict(st.get("package-dir", {}))
    block = re.search(r"^\[tool\.setuptools\]\n(.*?)^\[", text, re.S | re.M)
    dirs = re.search(r"^\[tool\.setuptools\.package-dir\]\n(.*?)^\[", text, re.S | re.M)
    assert block and dirs, "pyproject.toml: no [tool.setuptools] packages / package-dir"
    packages = re.findall(r'"([\w.]+)"', block.group(1).split("packages", 1)[1].split("]", 1)[0])
    return packages, dict(re.findall(r'^"([\w.]+)"\s*=\s*"([^"]*)"', dirs.group(1), re.M))


def module_files(
    root: Path, packages: Iterable[str], package_dir: dict[str, str]
) -> dict[str, Path]:
    """Dotted module name -> source file, as setuptools lays the packages out."""
    out: dict[str, Path] = {}
    for pkg in packages:
        # setuptools: the longest package-dir key that is the package or one of its parents
        keys = [k for k in package_dir if pkg == k or pkg.startswith(k + ".")]
        base = max(keys, key=len) if keys else ""
        rest = pkg[len(base) :].lstrip(".").split(".") if pkg != base else []
        folder = root.joinpath(package_dir.get(base, ""), *[p for p in rest if p])
        for f in sorted(folder.glob("*.py")):
            out[pkg if f.stem == "__init__" else f"{pkg}.{f.stem}"] = f
    return out


def imports_of(module: str, path: Path, known: set[str]) -> Iterator[Import]:
    """Every import in `path`, anywhere in the file, resolved to the module it names."""
    is_pkg = path.name == "__init__.py"
    package = module if is_pkg else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(module, alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                if node.level - 1 >= len(parts):
                    raise AssertionError(f"{path}:{node.lineno}: relative import above {TOP}")
                anchor = ".".join(parts[: len(parts) - (node.level - 1)])
                base = f"{anchor}.{node.module}" if node.module else anchor
            else:
                base = node.module or ""
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                yield Import(module, sub if sub in known else base, node.lineno)


def build_graph(files: dict[str, Path]) -> tuple[dict[str, set[str]], list[Import]]:
    """Internal edges (module -> modules it imports) and every import (internal or not)."""
    known = set(files)
    graph: dict[str, set[str]] = {m: set() for m in files}
    every: list[Import] = []
    for module, path in files.items():
        for imp in imports_of(module, path, known):
            every.append(imp)
            target = imp.target
            # `import fedclip_edge.a.b` names a.b; an unknown tail (an attribute) falls back to
            # the longest known module
            while target and target not in known and "." in target:
                target = target.rpartition(".")[0]
            if target in known and target != module:
                graph[module].add(target)
    return graph, every


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One concrete cycle per strongly connected component of more than one module (Tarjan,
    iterative), each written as a closed path a -> b -> ... -> a."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    sccs: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    comp.append(m)
                    if m == node:
                        break
                if len(comp) > 1:
                    sccs.append(sorted(comp))
    return [_cycle_in(graph, set(comp), comp[0]) for comp in sccs]


def _cycle_in(graph: dict[str, set[str]], comp: set[str], start: str) -> list[str]:
    """A shortest path start -> ... -> start inside one component (breadth first)."""
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for child in sorted(graph[node] & comp):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [start, *reversed(path[:-1]), start] if node != start else [start, start]
                if child not in prev:
                    prev[child] = node
                    nxt.append(child)
        frontier = nxt
    raise AssertionError(f"no cycle through {start} in its component")  # pragma: no cover


def _matches(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


# ----------------------------------------------------------------------------- the package


@pytest.fixture(scope="module")
def package() -> tuple[dict[str, Path], dict[str, set[str]], list[Import]]:
    packages, package_dir = _pyproject_layout(REPO / "pyproject.toml")
    files = module_files(REPO, packages, package_dir)
    graph, every = build_graph(files)
    return files, graph, every


def _where(files: dict[str, Path], imp: Import) -> str:
    return f"{files[imp.module].relative_to(REPO)}:{imp.line}"


def test_the_graph_covers_the_package(package) -> None:
    """Guards the other tests against passing on an empty or mis-mapped graph."""
    files, graph, _ = package
    folders = {f.relative_to(REPO).parts[0] for f in files.values()}
    rooms = {"fedclip_edge", "exporters", "broker", "device_agent", "benchmarks", "serving"}
    assert folders >= rooms
    assert f"{TOP}.broker.protocol" in files and f"{TOP}.device_agent.agent" in files
    assert f"{TOP}.serving.store" in files
    assert f"{TOP}.adapter" in graph[f"{TOP}.train"]  # train builds on the adapter
    assert sum(len(v) for v in graph.values()) > len(files)


def test_no_import_cycles(package) -> None:
    _, graph, _ = package
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join("  " + " -> ".join(c) for c in found)


def test_only_cli_modules_import_typer(package) -> None:
    files, _, every = package
    bad = [
        f"{_where(files, i)} {i.module} imports {i.target}"
        for i in every
        if _matches(i.target, ["typer"]) and not _is_cli(files[i.module])
    ]
    assert not bad, "typer outside cli.py / cli_*.py:\n" + "\n".join("  " + b for b in bad)


def test_core_imports_no_server_device_benchmark_mqtt_or_process_code(package) -> None:
    files, _, every = package
    core = REPO / TOP
    bad = [
        f"{_where(files, i)} {i.module} imports {i.target}"
        for i in every
        if files[i.module].is_relative_to(core)
        and not _is_cli(files[i.module])
        and _matches(i.target, CORE_FORBIDDEN)
    ]
    assert not bad, "the core reaches outside itself:\n" + "\n".join("  " + b for b in bad)


def test_serving_imports_no_server_device_benchmark_or_mqtt_code(package) -> None:
    files, _, every = package
    serving = REPO / "serving"
    bad = [
        f"{_where(files, i)} {i.module} imports {i.target}"
        for i in every
        if files[i.module].is_relative_to(serving) and _matches(i.target, SERVING_FORBIDDEN)
    ]
    assert not bad, "serving reaches outside itself:\n" + "\n".join("  " + b for b in bad)


# ----------------------------------------------------------------------------- the checker


def _tree(root: Path, files: dict[str, str]) -> dict[str, Path]:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return module_files(
        root, ["pkg", "pkg.sub", "pkg.side"], {"pkg": "pkg", "pkg.side": "side_folder"}
    )


def test_checker_finds_a_cycle_through_a_lazy_relative_import(tmp_path: Path) -> None:
    files = _tree(
        tmp_path,
        {
            "pkg/__init__.py": "from pkg.sub import b  # the package init: not an edge to all\n",
            "pkg/a.py": "def f():\n    from .sub import b\n",
            "pkg/sub/__init__.py": "",
            "pkg/sub/b.py": "import pkg.side.c\n",
            "side_folder/__init__.py": "",
            "side_folder/c.py": "from .. import a\nfrom pkg import side\n",
        },
    )
    assert set(files) == {"pkg", "pkg.a", "pkg.sub", "pkg.sub.b", "pkg.side", "pkg.side.c"}
    graph, _ = build_graph(files)
    assert graph["pkg.a"] == {"pkg.sub.b"}  # found inside a function, relative
    assert graph["pkg.side.c"] == {"pkg.a", "pkg.side"}  # `from pkg import side`: the init
    assert cycles(graph) == [["pkg.a", "pkg.sub.b", "pkg.side.c", "pkg.a"]]


def test_checker_sees_no_cycle_through_a_package_init(tmp_path: Path) -> None:
    """pkg/__init__ imports pkg.a and pkg.a imports `from pkg import X` (a name of the init):
    an edge a -> pkg and pkg -> a is a real cycle; but pkg.b importing pkg.a is not a cycle
    with the init that happens to import pkg.a too."""
    files = _tree(
        tmp_path,
        {
            "pkg/__init__.py": "from pkg import a\n",
            "pkg/a.py": "X = 1\n",
            "pkg/b.py": "from pkg import a\nimport pkg.a\n",
            "pkg/sub/__init__.py": "",
            "side_folder/__init__.py": "",
        },
    )
    graph, _ = build_graph(files)
    assert graph["pkg"] == {"pkg.a"} and graph["pkg.b"] == {"pkg.a"}
    assert cycles(graph) == []
    (tmp_path / "pkg/a.py").write_text("from pkg import X\n")  # now a imports the init
    graph, _ = build_graph(files)
    assert cycles(graph) == [["pkg", "pkg.a", "pkg"]]


@pytest.mark.parametrize(
    "old",
    [
        f"{TOP}.aggregator",
        f"{TOP}.protocol",
        f"{TOP}.transport",
        f"{TOP}.metrics",
        f"{TOP}.procs",
        f"{TOP}.pipeline",
        f"{TOP}.exporters.pipeline",
    ],
)
def test_the_removed_module_aliases_stay_removed(package, old: str) -> None:
    """The old paths moved (CHANGELOG.md says where); one module per name, no second copy."""
    files, _, _ = package
    assert old not in files


MAX_LINES = 600  # a file that fits in a head (issue 20): split along a seam before it grows past


def test_no_library_file_over_600_lines(package) -> None:
    files, _, _ = package
    long = {str(p.relative_to(REPO)): n for p in files.values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"over {MAX_LINES} lines (split along a seam): {long}"
