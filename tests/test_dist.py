"""`make dist`: a device installs `edgefleet[agent]` from the wheelhouse alone, with no package index."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What the device side must never carry (DESIGN: `edgefleet[agent]` installs no torch, flwr or Litestar).
HEAVY = {"torch", "flwr", "litestar", "sqlmodel", "sqlalchemy", "uvicorn", "amqtt", "ray", "structlog", "typer"}
INFERENCE = """
from agent.runtime import DataSource, TFLiteModel, starter_model_path
model = TFLiteModel.load(starter_model_path())
x, y = DataSource().next_labelled(200)
print(float((model.predict(x).argmax(1) == y).mean()))
"""


def _offline_env() -> dict[str, str]:
    # No pip configuration at all: this machine's pip.conf adds find-links and extra indexes that a device lacks.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    return env


@pytest.mark.slow
@pytest.mark.integration
def test_a_device_installs_the_agent_from_the_wheelhouse_without_an_index(tmp_path: Path) -> None:
    if shutil.which("make") is None:
        pytest.fail("make is needed to build the wheelhouse")
    # Prepare: the operator machine builds the wheelhouse (pip's own cache keeps the rebuild to seconds)
    dist = tmp_path / "dist"
    build = subprocess.run(["make", "-C", str(ROOT), "dist", f"DIST={dist}", f"VENV={Path(sys.prefix)}"],
                           capture_output=True, text=True, check=False, timeout=600)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    wheels = sorted(p.name for p in (dist / "wheels").glob("*.whl"))
    assert [p.name for p in dist.glob("edgefleet-*.whl")] == [w for w in wheels if w.startswith("edgefleet-")]
    # Execute: the device, with a bare venv and no index
    venv = tmp_path / "device-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    env = _offline_env()
    installed = subprocess.run(
        [str(venv / "bin/python"), "-m", "pip", "install", "--disable-pip-version-check", "--no-index",
         "--find-links", str(dist / "wheels"), "edgefleet[agent]"],
        capture_output=True, text=True, check=False, timeout=600, env=env)
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]
    helped = subprocess.run([str(venv / "bin/edgefleet"), "agent", "--help"], capture_output=True, text=True,
                            check=False, timeout=120, env=env, cwd=tmp_path)
    inference = subprocess.run([str(venv / "bin/python"), "-c", INFERENCE], capture_output=True, text=True,
                               check=False, timeout=120, env=env, cwd=tmp_path)
    listed = subprocess.run([str(venv / "bin/python"), "-m", "pip", "list", "--format", "json"],
                            capture_output=True, text=True, check=True, timeout=120, env=env)
    # Assert: the agent's CLI runs, the shipped model classifies with the wheelhouse's LiteRT, and nothing heavy
    assert helped.returncode == 0, helped.stderr
    assert "run" in helped.stdout
    assert inference.returncode == 0, inference.stderr[-3000:]
    assert float(inference.stdout.strip().splitlines()[-1]) > 0.9
    names = {item["name"].lower().replace("_", "-") for item in json.loads(listed.stdout)}
    assert {"edgefleet", "ai-edge-litert", "paho-mqtt", "numpy", "cryptography"} <= names
    assert not names & HEAVY, names & HEAVY
