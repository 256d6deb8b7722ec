"""What a device installs and imports stays light: no torch, flwr or Litestar on the agent side."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = {"torch", "flwr", "litestar", "sqlmodel", "sqlalchemy", "uvicorn", "amqtt", "apscheduler", "ray",
         "tensorflow", "jax", "typer", "click", "rich"}


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


@pytest.mark.slow
def test_agent_install_resolves_without_heavy_packages(tmp_path: Path) -> None:
    # Execute: what pip would install for `edgefleet[agent]` into an empty environment
    report = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
         "--disable-pip-version-check", "--report", str(report), f"{ROOT}[agent]"],
        check=False, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    # Assert
    names = {item["metadata"]["name"].lower().replace("_", "-") for item in json.loads(report.read_text())["install"]}
    assert {"paho-mqtt", "ai-edge-litert", "msgspec"} <= names
    assert not names & HEAVY, names & HEAVY


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
