"""What a device installs and imports stays light: no torch, flwr or Litestar on the agent side."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import tomllib
from collections.abc import Collection
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Not on a device: the control plane's and training's libraries, the operator CLI's typer/click/rich, and structlog
# (it imports asyncio and rich; the agent logs through stdlib logging, agent.logsetup).
HEAVY = {"torch", "flwr", "litestar", "sqlmodel", "sqlalchemy", "uvicorn", "amqtt", "apscheduler", "ray",
         "tensorflow", "jax", "typer", "click", "rich", "structlog"}


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_agent_extras_declare_no_heavy_dependency() -> None:
    # Prepare
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    # Execute
    declared = {_name(r) for r in project["dependencies"]}
    for extra in ("agent", "agent-tflite"):
        declared |= {_name(r) for r in project["optional-dependencies"][extra]}
    # Assert
    assert not declared & HEAVY


def test_the_tflite_extra_is_a_raspberry_pi_4s_runtime_without_litert() -> None:
    # Prepare
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["agent-tflite"]
    # Execute
    declared = {_name(r): r.replace(" ", "") for r in extra}
    # Assert: tflite-runtime 2.14 (the raspberry-pi-4 profile's runtime) needs numpy<2; LiteRT would take its place
    assert declared["tflite-runtime"] == "tflite-runtime==2.14.0"
    assert "<2" in declared["numpy"]
    assert "ai-edge-litert" not in declared


@pytest.mark.slow
@pytest.mark.parametrize(("extra", "runtime", "absent"), [
    ("agent", "ai-edge-litert", "tflite-runtime"),
    ("agent-tflite", "tflite-runtime", "ai-edge-litert"),
])
def test_agent_install_resolves_without_heavy_packages(extra: str, runtime: str, absent: str, tmp_path: Path) -> None:
    # Execute: what pip would install for `edgefleet[EXTRA]` into an empty environment
    report = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
         "--disable-pip-version-check", "--report", str(report), f"{ROOT}[{extra}]"],
        check=False, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    # Assert: one TFLite runtime, the extra's, and nothing heavy
    versions = {item["metadata"]["name"].lower().replace("_", "-"): item["metadata"]["version"]
                for item in json.loads(report.read_text())["install"]}
    assert {"paho-mqtt", runtime, "msgspec", "numpy"} <= versions.keys()
    assert absent not in versions
    assert not versions.keys() & HEAVY, versions.keys() & HEAVY
    if extra == "agent-tflite":
        assert versions["tflite-runtime"] == "2.14.0"
        assert int(versions["numpy"].split(".")[0]) < 2


def test_importing_the_wire_contract_pulls_nothing_heavy() -> None:
    # Execute
    code = ("import sys, agent.protocol; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'paho', 'torch', 'ai_edge_litert', 'tflite_runtime', 'numpy', 'litestar', 'flwr'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    # Assert
    assert out.stdout.strip() == "[]"


def _imports(package: str) -> dict[str, set[str]]:
    import ast

    found: dict[str, set[str]] = {}
    for path in (ROOT / package).rglob("*.py"):
        tree = ast.parse(path.read_text())
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = names
    return found


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("firmware_profiles", {"agent", "federated", "controlplane", "paho", "torch", "flwr", "litestar"}),
        ("agent", {"federated", "controlplane", "torch", "flwr", "litestar", "sqlalchemy"}),
        ("federated", {"controlplane", "litestar"}),
    ],
)
def test_packages_import_only_downwards(package: str, forbidden: set[str]) -> None:
    # Execute
    offending = {path: sorted(names & forbidden) for path, names in _imports(package).items() if names & forbidden}
    # Assert
    assert offending == {}


PACKAGES = ("agent", "controlplane", "federated", "firmware_profiles")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _imported_modules(path: Path, known: Collection[str] = ()) -> set[str]:
    """Every module `path` imports (function-level imports too; not those under `if TYPE_CHECKING:`).

    `from pkg import name` counts as `pkg.name` where that is one of the `known` modules, else as `pkg`.
    """
    module = _module_name(path)
    tree = ast.parse(path.read_text())
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(child) for stmt in node.body for child in ast.walk(stmt)}
    names: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(node, module, path.name == "__init__.py")
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                names.add(sub if sub in known else target)
                names.add(sub)
    return names


def _private_part(module: str) -> str | None:
    """The package a private module belongs to (`agent._ota` -> `agent`), or None for a public module."""
    parts = module.split(".")
    for i, part in enumerate(parts):
        if part.startswith("_") and not part.startswith("__"):
            return ".".join(parts[:1]) if i > 0 else None
    return None


def test_private_modules_are_imported_only_inside_their_package() -> None:
    # A module named `_x` is its package's own business: another top-level package, the benchmarks and the tests of
    # another package import public modules only (tests/<package>/ may test <package>'s private modules directly).
    # Arrange
    sources = [p for d in (*PACKAGES, "bench", "tests") for p in (ROOT / d).rglob("*.py")]
    # Execute
    offending: dict[str, list[str]] = {}
    for path in sources:
        rel = path.relative_to(ROOT).parts
        home = rel[1] if rel[0] == "tests" and len(rel) > 2 else rel[0]
        bad = sorted(
            name for name in _imported_modules(path)
            if (owner := _private_part(name)) is not None and owner in PACKAGES and owner != home
        )
        if bad:
            offending[str(path.relative_to(ROOT))] = bad
    # Assert
    assert offending == {}


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycle_inside_a_package(package: str) -> None:
    # Arrange: the graph of module -> modules of the same package it imports (a name imported from a package counts
    # as that package's __init__, unless the name is a submodule)
    paths = {_module_name(p): p for p in (ROOT / package).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in paths.items():
        graph[module] = {name for name in _imported_modules(path, paths) if name in paths and name != module}
    # Execute: Tarjan's strongly connected components; a component of more than one module is a cycle
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    # ... and between the package's features (controlplane.models and controlplane.deployments, say): no two of its
    # subpackages or top modules import each other, directly or through a third
    def feature(module: str) -> str:
        return ".".join(module.split(".")[:2])

    reaches: dict[str, set[str]] = {}
    for module, targets in graph.items():
        reaches.setdefault(feature(module), set()).update(feature(t) for t in targets if feature(t) != feature(module))
    for start in sorted(reaches):
        seen, todo = set(), list(reaches[start])
        while todo:
            current = todo.pop()
            if current == start:
                cycles.append([start, "(through its features' imports)"])
                break
            if current not in seen:
                seen.add(current)
                todo.extend(reaches.get(current, ()))
    # Assert
    assert cycles == []
