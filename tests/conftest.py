"""Shared fixtures: private MQTT brokers on free ports.

* ``dynsec_mosquitto``: a private mosquitto 2 with the dynamic-security plugin (admin user in ``.admin_username``
  / ``.admin_password``, ``.url`` = ``mqtt://ADMIN:PASSWORD@127.0.0.1:PORT``). Skipped when mosquitto is not
  installed, except under ``CI=true`` where that is a failure.
* ``embedded_broker``: the control plane's embedded amqtt broker in a subprocess, with a service account.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

# The service fixtures (PostgreSQL, SQLite, the machine's mosquitto, a private mosquitto) and helpers; the port and
# process helpers are tests/processes.py's, re-exported here for the modules that import them from conftest.
from tests._services import (
    free_port,
    fx_database_url,
    fx_mosquitto_url,
    fx_pg_url,
    fx_private_mosquitto,
    mosquitto_binary,
    service_missing,
    stop_process,
    wait_for_port,
)

__all__ = [
    "free_port",
    "fx_database_url",
    "fx_mosquitto_url",
    "fx_pg_url",
    "fx_private_mosquitto",
    "stop_process",
    "wait_for_port",
]

if TYPE_CHECKING:
    from controlplane.broker import EmbeddedBroker, EmbeddedBrokerAuth

DYNSEC_PLUGIN_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/aarch64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/mosquitto_dynamic_security.so",
    "/usr/local/lib/mosquitto_dynamic_security.so",
    "/opt/homebrew/lib/mosquitto_dynamic_security.so",
)


def find_mosquitto() -> tuple[str, str, str]:
    """Paths of (mosquitto, mosquitto_ctrl, the dynsec plugin); skips (fails under CI=true) if absent."""
    mosquitto = mosquitto_binary()
    ctrl = shutil.which("mosquitto_ctrl")
    plugin = os.environ.get("MOSQUITTO_DYNSEC_PLUGIN") or next(
        (p for p in DYNSEC_PLUGIN_CANDIDATES if os.path.exists(p)), None
    )
    if mosquitto is None:
        service_missing("mosquitto")
    if ctrl is None:
        service_missing("mosquitto_ctrl")
    if plugin is None:
        service_missing("mosquitto_dynamic_security.so (set MOSQUITTO_DYNSEC_PLUGIN)")
    assert mosquitto and ctrl and plugin
    return mosquitto, ctrl, plugin


@dataclass(frozen=True)
class MosquittoInstance:
    host: str
    port: int
    admin_username: str
    admin_password: str
    config_file: Path
    dynsec_file: Path
    log_file: Path
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        """With the admin's credentials, as the control plane takes it (``--broker``)."""
        return f"mqtt://{self.admin_username}:{self.admin_password}@{self.host}:{self.port}"

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def start_mosquitto(
    directory: Path,
    *,
    dynsec: bool = True,
    admin_username: str = "edgefleet-admin",
    admin_password: str | None = None,
    extra_config: str = "",
) -> MosquittoInstance:
    """Start a private mosquitto in ``directory`` on a free port (dynsec on, or anonymous without it)."""
    mosquitto, ctrl, plugin = find_mosquitto()
    directory.mkdir(parents=True, exist_ok=True)
    password = admin_password or secrets.token_urlsafe(12)
    dynsec_file = directory / "dynamic-security.json"
    port = free_port()
    lines = [f"listener {port} 127.0.0.1", "per_listener_settings false", "persistence false"]
    if dynsec:
        subprocess.run(
            [ctrl, "dynsec", "init", str(dynsec_file), admin_username, password],
            check=True,
            stdin=subprocess.DEVNULL,
            capture_output=True,
        )
        lines += [
            "allow_anonymous false",
            f"plugin {plugin}",
            f"plugin_opt_config_file {dynsec_file}",
        ]
    else:
        lines.append("allow_anonymous true")
    if os.geteuid() == 0:
        lines.append("user root")  # otherwise mosquitto drops to 'mosquitto', which cannot write our tmp dir
    lines.append(extra_config)
    config_file = directory / "mosquitto.conf"
    config_file.write_text("\n".join(lines) + "\n")
    log_file = directory / "mosquitto.log"
    with log_file.open("wb") as log:
        process = subprocess.Popen(
            [mosquitto, "-c", str(config_file), "-v"], stdin=subprocess.DEVNULL, stdout=log, stderr=log
        )
    instance = MosquittoInstance(
        "127.0.0.1", port, admin_username, password, config_file, dynsec_file, log_file, process
    )
    if not wait_for_port(instance.host, port, 10.0, process):
        stop_process(process)
        raise RuntimeError(f"mosquitto did not start on port {port}:\n{instance.log_tail()}")
    return instance


@pytest.fixture
def dynsec_mosquitto(tmp_path: Path) -> Iterator[MosquittoInstance]:
    instance = start_mosquitto(tmp_path / "mosquitto")
    try:
        yield instance
    finally:
        stop_process(instance.process)


@dataclass
class EmbeddedBrokerInstance:
    broker: EmbeddedBroker
    auth: EmbeddedBrokerAuth
    service_username: str
    service_password: str

    @property
    def host(self) -> str:
        return self.broker.host

    @property
    def port(self) -> int:
        return self.broker.port

    @property
    def url(self) -> str:
        return self.broker.url


@pytest.fixture
def embedded_broker(tmp_path: Path) -> Iterator[EmbeddedBrokerInstance]:
    pytest.importorskip("amqtt")
    from controlplane.broker import EmbeddedBroker, EmbeddedBrokerAuth

    credentials = tmp_path / "embedded-broker" / "credentials.json"
    auth = EmbeddedBrokerAuth(credentials)
    service_password = secrets.token_urlsafe(12)
    auth.ensure_service("edgefleet-cp", service_password)
    with EmbeddedBroker(credentials, log_level="INFO") as broker:
        yield EmbeddedBrokerInstance(broker, auth, "edgefleet-cp", service_password)


# The device-like environment `make test` builds (edgefleet[agent-tflite]: tflite-runtime 2.14, numpy<2, no LiteRT).
TFLITE_VENV_PYTHON = Path(__file__).resolve().parents[1] / ".venv-tflite" / "bin" / "python"


@pytest.fixture(name="tflite_python", scope="session")
def fx_tflite_python() -> str:
    """The Python of the device-like tflite-runtime environment: ``EDGEFLEET_TFLITE_PYTHON`` (the Makefile exports
    it), else ``.venv-tflite`` when it was built. Skipped when there is none, except under ``CI=true`` where that
    is a failure (``make test`` builds it)."""
    python = os.environ.get("EDGEFLEET_TFLITE_PYTHON") or (str(TFLITE_VENV_PYTHON) if TFLITE_VENV_PYTHON.exists()
                                                          else "")
    if not python:
        service_missing("the tflite-runtime environment (EDGEFLEET_TFLITE_PYTHON; `make venv-tflite` builds one)")
    elif not os.access(python, os.X_OK):
        service_missing(f"the tflite-runtime environment (EDGEFLEET_TFLITE_PYTHON={python}: no such executable)")
    return python
