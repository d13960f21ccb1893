"""The TensorRT code checked against TensorRT's published Python API without a GPU.

Why: `exporters/tensorrt_build.py` and the TensorRT backend in `exporters/runtimes.py` only run
on a device, so a misspelt enum member or a method TensorRT 10 removed would first show on a
Jetson. This test reads the type stubs of the `tensorrt-stubs` package (TensorRT 10.13, the
JetPack 6 line), follows the types through our code (constructors, return annotations,
properties) and asserts that every `trt.X`, `trt.X.MEMBER` and every method or attribute used on
a TensorRT object exists there. Install the stubs without their multi-GB dependencies:
`pip install --no-deps tensorrt-stubs` (it skips with that hint otherwise).
"""

from __future__ import annotations

import ast
import importlib.util
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
SOURCES = [
    ROOT / "exporters" / "tensorrt_build.py",
    ROOT / "exporters" / "runtimes.py",
    ROOT / "exporters" / "fused_runtime.py",
]


def _stub_dir() -> Path:
    spec = importlib.util.find_spec("tensorrt_stubs")
    if spec is None or not spec.origin:
        pytest.skip("tensorrt-stubs is not installed (pip install --no-deps tensorrt-stubs)")
    site = Path(spec.origin).parents[1]
    stub = site / "tensorrt_bindings" / "tensorrt.pyi"
    if not stub.is_file():
        pytest.skip(f"tensorrt-stubs installed but {stub} is missing")
    return site


def _parse_stub(path: Path) -> ast.Module:
    """Parse a generated stub; a `def` line that is not valid Python (pybind11-stubgen writes
    defaults before non-defaults) keeps its name and return type, with a generic signature."""
    lines = path.read_text().splitlines()
    for _ in range(200):
        try:
            return ast.parse("\n".join(lines))
        except SyntaxError as exc:
            i = (exc.lineno or 0) - 1
            line = lines[i] if 0 <= i < len(lines) else ""
            head, sep, rest = line.partition("(")
            if not sep or not head.lstrip().startswith("def ") or ") ->" not in rest:
                raise
            lines[i] = f"{head}(self, *args, **kwargs) ->{rest.rsplit(') ->', 1)[1]}"
    raise AssertionError(f"{path}: too many lines that do not parse")


class Api:
    """Classes of the stubs: members (methods, properties, enum values) and bases."""

    def __init__(self, site: Path) -> None:
        self.members: dict[str, dict[str, str | None]] = {}  # class -> member -> type name
        self.bases: dict[str, list[str]] = {}
        tree = _parse_stub(site / "tensorrt_bindings" / "tensorrt.pyi")
        for node in tree.body:
            if isinstance(node, ast.ClassDef):
                members: dict[str, str | None] = {}
                for item in node.body:
                    if isinstance(item, ast.FunctionDef):
                        ret = self._type_name(item.returns)
                        props = {ast.unparse(d) for d in item.decorator_list}
                        if item.name not in members or ret:
                            members[item.name] = ret if ret or "property" in props else None
                    elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                        members[item.target.id] = self._type_name(item.annotation)
                    elif isinstance(item, ast.Assign):
                        for t in item.targets:
                            if isinstance(t, ast.Name):
                                members[t.id] = None
                self.members[node.name] = members
                self.bases[node.name] = [ast.unparse(b).split(".")[-1] for b in node.bases]
        # module level: what `import tensorrt` offers (re-exports of the bindings, helpers)
        self.module: set[str] = set(self.members)
        for pyi in (site / "tensorrt" / "__init__.pyi", site / "tensorrt_bindings" / "__init__.pyi",
                    site / "tensorrt_bindings" / "tensorrt.pyi"):
            for node in _parse_stub(pyi).body:
                if isinstance(node, ast.ImportFrom):
                    self.module |= {a.asname or a.name for a in node.names}
                elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                    self.module.add(node.name)
                elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                    self.module.add(node.target.id)
                elif isinstance(node, ast.Assign):
                    self.module |= {t.id for t in node.targets if isinstance(t, ast.Name)}

    def _type_name(self, ann: ast.expr | None) -> str | None:
        """`ICudaEngine`, `tensorrt.ICudaEngine | None`, 'ITensor' -> the class name."""
        if ann is None:
            return None
        text = ann.value if isinstance(ann, ast.Constant) and isinstance(ann.value, str) \
            else ast.unparse(ann)
        first = text.split("|")[0].strip().split("[")[0]
        return first.split(".")[-1] or None

    def lookup(self, cls: str, name: str) -> tuple[bool, str | None]:
        seen, todo = set(), [cls]
        while todo:
            c = todo.pop()
            if c in seen or c not in self.members:
                continue
            seen.add(c)
            if name in self.members[c]:
                t = self.members[c][name]
                return True, t if t in self.members else None
            todo += self.bases.get(c, [])
        return False, None


def _uses(api: Api, source: Path) -> tuple[list[str], list[str]]:
    """(problems, what was checked) for one source file."""
    tree = ast.parse(source.read_text())
    env: dict[str, str] = {}  # variable ("builder", "self._engine") -> TensorRT class
    problems: list[str] = []
    checked: list[str] = []

    def key(node: ast.expr) -> str | None:
        if isinstance(node, ast.Name):
            return node.id
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            return f"{node.value.id}.{node.attr}"
        return None

    def typeof(node: ast.expr) -> str | None:
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and \
                    f.value.id == "trt" and f.attr in api.members:
                return f.attr  # a constructor: trt.Builder(logger)
            if isinstance(f, ast.Attribute):
                owner = typeof(f.value)
                if owner:
                    return api.lookup(owner, f.attr)[1]
            return None
        if isinstance(node, ast.Attribute):
            k = key(node)
            if k in env:
                return env[k]
            owner = typeof(node.value)
            if owner:
                return api.lookup(owner, node.attr)[1]
            return None
        k = key(node)
        return env.get(k) if k else None

    nodes = sorted(ast.walk(tree), key=lambda n: (getattr(n, "lineno", 0),
                                                   getattr(n, "col_offset", 0)))
    for node in nodes:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            k, t = key(node.targets[0]), typeof(node.value)
            if k and t:
                env[k] = t
        if not isinstance(node, ast.Attribute):
            continue
        where = f"{source.name}:{node.lineno}"
        v = node.value
        if isinstance(v, ast.Name) and v.id == "trt":
            if node.attr.startswith("__"):
                continue  # __version__ is the package's, not in the stubs
            checked.append(f"trt.{node.attr}")
            if node.attr not in api.module:
                problems.append(f"{where}: trt.{node.attr} does not exist")
            continue
        if isinstance(v, ast.Attribute) and isinstance(v.value, ast.Name) and \
                v.value.id == "trt" and v.attr in api.members:
            checked.append(f"trt.{v.attr}.{node.attr}")
            if node.attr != "__init__" and not api.lookup(v.attr, node.attr)[0]:
                problems.append(f"{where}: trt.{v.attr}.{node.attr} does not exist")
            continue
        owner = typeof(v)
        if owner:
            checked.append(f"{owner}.{node.attr}")
            if not api.lookup(owner, node.attr)[0]:
                problems.append(f"{where}: {owner} has no {node.attr}")
    return problems, checked


def test_every_tensorrt_name_the_code_uses_exists_in_tensorrt_10() -> None:
    api = Api(_stub_dir())
    problems: list[str] = []
    checked: set[str] = set()
    for src in SOURCES:
        p, c = _uses(api, src)
        problems += p
        checked |= set(c)
    # The walk must really reach the objects, or the test would pass by checking nothing.
    for must in ("trt.Builder", "trt.BuilderFlag.FP16", "Builder.create_network",
                 "INetworkDefinition.get_layer", "ILayer.set_output_type",
                 "IBuilderConfig.set_memory_pool_limit", "IBuilderConfig.set_timing_cache",
                 "ITimingCache.serialize", "OnnxParser.parse_from_file",
                 "IOptimizationProfile.set_shape", "Runtime.deserialize_cuda_engine",
                 "ICudaEngine.get_tensor_name", "IExecutionContext.execute_async_v3",
                 "IExecutionContext.set_tensor_address", "ITensor.name", "trt.nptype"):
        assert must in checked, f"{must} was not reached; checked: {sorted(checked)}"
    assert not problems, "\n".join(problems)
    if os.environ.get("FEDCLIP_SHOW_TRT_API"):
        print("\n".join(sorted(checked)))


def test_the_checker_catches_a_wrong_name(tmp_path: Path) -> None:
    """Guard: a misspelt member, a removed method and an unknown class are all reported."""
    api = Api(_stub_dir())
    bad = tmp_path / "bad.py"
    bad.write_text(
        "def f(trt, logger):\n"
        "    builder = trt.Builder(logger)\n"
        "    config = builder.create_builder_config()\n"
        "    config.set_flag(trt.BuilderFlag.FP61)\n"
        "    network = builder.create_network(0)\n"
        "    network.mark_output_tensor(None)\n"
        "    trt.NoSuchThing\n"
        "    engine = trt.Runtime(logger).deserialize_cuda_engine(b'')\n"
        "    engine.execute_async_v2(0)\n"
    )
    problems, _ = _uses(api, bad)
    text = "\n".join(problems)
    assert "trt.BuilderFlag.FP61" in text
    assert "INetworkDefinition has no mark_output_tensor" in text
    assert "trt.NoSuchThing" in text
    assert "ICudaEngine has no execute_async_v2" in text
