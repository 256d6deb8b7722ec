"""agent.logsetup: structured events over stdlib logging, without structlog in the device process."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest

from agent.logsetup import _EventFormatter, get_logger


def _record(caplog: pytest.LogCaptureFixture) -> logging.LogRecord:
    assert len(caplog.records) == 1, caplog.records
    return caplog.records[0]


def test_an_event_carries_its_bound_and_own_fields_as_one_json_line(caplog: pytest.LogCaptureFixture) -> None:
    # Arrange
    log = get_logger("edgefleet.agent.test", device_id="pi-1").bind(command_id="c-7")
    # Execute
    with caplog.at_level(logging.INFO, logger="edgefleet"):
        log.info("ota.downloading", url="http://cp/a b", size=1024)
    line = json.loads(_EventFormatter(json=True).format(_record(caplog)))
    # Assert
    assert line.pop("timestamp").endswith("Z")
    assert line == {"level": "info", "logger": "edgefleet.agent.test", "event": "ota.downloading",
                    "device_id": "pi-1", "command_id": "c-7", "url": "http://cp/a b", "size": 1024}


def test_bind_leaves_the_parent_logger_unchanged(caplog: pytest.LogCaptureFixture) -> None:
    # Arrange
    parent = get_logger("edgefleet.agent.test")
    parent.bind(device_id="other")
    # Execute
    with caplog.at_level(logging.INFO, logger="edgefleet"):
        parent.info("plain")
    # Assert
    assert _record(caplog).__dict__["edgefleet_fields"] == {}


def test_events_below_the_level_are_not_formatted(caplog: pytest.LogCaptureFixture) -> None:
    # Arrange
    log = get_logger("edgefleet.agent.test")

    class Exploding:
        def __str__(self) -> str:
            raise AssertionError("rendered although filtered")

    # Execute
    with caplog.at_level(logging.INFO, logger="edgefleet"):
        log.debug("noisy", value=Exploding())
        log.warning("kept", value=1)
    # Assert
    assert [r.getMessage() for r in caplog.records] == ["kept"]


def test_exception_events_carry_the_traceback(caplog: pytest.LogCaptureFixture) -> None:
    # Execute
    with caplog.at_level(logging.INFO, logger="edgefleet"):
        try:
            raise ValueError("bad model")
        except ValueError:
            get_logger("edgefleet.agent.test").exception("ota.failed", stage="load")
    line = json.loads(_EventFormatter(json=True).format(_record(caplog)))
    console = _EventFormatter(json=False).format(_record(caplog))
    # Assert
    assert line["level"] == "error" and line["stage"] == "load"
    assert "ValueError: bad model" in line["exception"]
    assert "[error  ] ota.failed  stage=load" in console and "ValueError: bad model" in console


def test_the_agent_process_never_imports_structlog_or_asyncio() -> None:
    # Arrange: what `edgefleet agent run` imports before it connects (its CLI, logging set-up, daemon, runtime)
    code = ("import sys; import agent.cli; from agent.logsetup import configure_logging; "
            "configure_logging('info', structlog=False); import agent._daemon, agent.runtime, agent._outbox; "
            "print(sorted(m for m in ('structlog', 'asyncio', 'rich', 'typer', 'click') if m in sys.modules))")
    # Execute
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    # Assert
    assert out.stdout.strip() == "[]", out.stderr
