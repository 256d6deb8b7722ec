"""Output people read: why devices were not invited as a few lines by reason (not one per device), progress of a
long step as one updating line on a terminal and as plain lines in a log, the demo's logs as JSON lines in a file
(not on the console), `edgefleet status` against a served control plane, and `edgefleet demo --serve`."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
from typer.testing import CliRunner

from controlplane.cli import app as cli
from controlplane.devices.schemas import DeviceCreate
from controlplane.output import Progress, stderr_to, summarize_skipped
from controlplane.wiring import Fleet
from tests._services import free_port, fx_fleet, wait_for  # noqa: F401 - fx_fleet
from tests.controlplane.test_cli_fleet import fx_served  # noqa: F401 - the served fleet with an online device

runner = CliRunner()


def test_skipped_devices_are_summarized_by_reason() -> None:
    # Prepare: 100 devices, not invited for three rules (batteries each with its own reading) and one profile
    skipped = {f"dev-{i:03d}": f"battery {i % 30:.0f}% < 30% and not charging" for i in range(60)}
    skipped |= {f"off-{i:03d}": "offline" for i in range(35)}
    skipped |= {f"hot-{i}": f"temperature {80 + i:.0f} °C > 75 °C" for i in range(3)}
    skipped |= {"coral-1": "profile coral-dev-board may not train"}
    # Execute
    lines = summarize_skipped(skipped)
    # Assert: one line per rule, largest first, with the count and a few example ids
    assert len(lines) == 4, lines
    assert lines[0].split()[:2] == ["60", "battery"] and "x% < 30% and not charging" in lines[0]
    assert "dev-000, dev-001, dev-002, +57 more" in lines[0]
    assert lines[1].split()[:2] == ["35", "offline"] and "+32 more" in lines[1]
    assert "temperature x °C > 75 °C" in lines[2] and "hot-0, hot-1, hot-2)" in lines[2]
    assert lines[3].split()[0] == "1" and "(coral-1)" in lines[3]


def test_progress_on_a_pipe_prints_changes_and_a_heartbeat() -> None:
    # Prepare: a clock the test moves, a stream that is not a terminal
    now = [0.0]
    out = io.StringIO()
    progress = Progress("round #7", stream=out, every_s=15.0, clock=lambda: now[0])
    # Execute: the same status for 20 s, then a change, then the end
    for t in (0.0, 2.0, 4.0, 16.0, 18.0):
        now[0] = t
        progress.update("running: flower round 1/3, invited 3")
    now[0] = 20.0
    progress.update("running: flower round 2/3, invited 3, took part 3")
    now[0] = 48.0
    progress.done("succeeded: flower round 3/3, invited 3, took part 3, accuracy 0.955")
    # Assert: no carriage returns; a line per change, one heartbeat at 16 s, the final line with the elapsed time
    assert "\r" not in out.getvalue()
    assert out.getvalue().splitlines() == [
        "round #7 running: flower round 1/3, invited 3 (0 s)",
        "round #7 running: flower round 1/3, invited 3 (16 s)",
        "round #7 running: flower round 2/3, invited 3, took part 3 (20 s)",
        "round #7 succeeded: flower round 3/3, invited 3, took part 3, accuracy 0.955 (48 s)",
    ]


def test_progress_on_a_terminal_is_one_line_updated_in_place() -> None:
    now = [0.0]
    out = io.StringIO()
    progress = Progress("job #3", stream=out, tty=True, clock=lambda: now[0])
    for t in (0.0, 1.0, 2.0):
        now[0] = t
        progress.update(f"running on local, epoch {int(t)}/20")
    progress.done("succeeded on local, epoch 20/20")
    text = out.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")
    assert text.count("\r") == 4 and text.split("\r")[-1].startswith("job #3 succeeded on local, epoch 20/20 (2 s)")


@pytest.fixture(name="restore_logging")
def fx_restore_logging() -> Iterator[None]:
    """configure_logging() changes the root logger and structlog for the process: put both back."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    edgefleet_level = logging.getLogger("edgefleet").level
    config = structlog.get_config()
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger("edgefleet").setLevel(edgefleet_level)
    structlog.configure(**config)


def test_demo_logs_are_json_lines_in_the_log_file(tmp_path: Path, restore_logging: None,
                                                  capfd: pytest.CaptureFixture[str]) -> None:
    from agent.logsetup import configure_logging, get_logger

    # Prepare
    log_file = tmp_path / "demo.log"
    # Execute: what the demo's processes do: structlog events, stdlib loggers (ours and a library's), a Python
    # warning, a C++ library writing to file descriptor 2, a library printing its own format
    with stderr_to(log_file):
        configure_logging("info", json=True)
        structlog.get_logger("controlplane.rounds").info("round.started", round_id=4, invited=["a", "b"])
        get_logger("edgefleet.ingest").info("ingest.batch", stored=100)
        logging.getLogger("absl").warning("a library's warning")
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("torch says something deprecated", DeprecationWarning, stacklevel=1)
        try:
            raise ValueError("boom")
        except ValueError:
            structlog.get_logger("controlplane.api").exception("request.failed")
        os.write(2, b"native library line\n")
        print("W1126 08:02:37.173000 13424 torch/utils/_pytree.py:630] deprecated", file=sys.stderr)
    print("after", file=sys.stderr)
    # Assert: the console got nothing until the block ended; every line of the file is one JSON object
    console = capfd.readouterr()
    assert console.err == "after\n" and console.out == ""
    events = [json.loads(line) for line in log_file.read_text().splitlines()]
    by_event = {e["event"]: e for e in events}
    assert by_event["native library line"]["logger"] == "native"
    assert by_event["W1126 08:02:37.173000 13424 torch/utils/_pytree.py:630] deprecated"]["level"] == "warning"
    assert by_event["round.started"]["round_id"] == 4 and by_event["round.started"]["level"] == "info"
    assert by_event["ingest.batch"]["stored"] == 100 and by_event["ingest.batch"]["logger"] == "edgefleet.ingest"
    assert by_event["a library's warning"]["level"] == "warning"
    assert any("torch says something deprecated" in e["event"] for e in events)
    assert "ValueError: boom" in by_event["request.failed"]["exception"]


@pytest.mark.integration
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_status_table_and_json(served: tuple[Fleet, list[str]]) -> None:
    # Prepare: cam-0 online (raspberry-pi-5), cam-1 (jetson) and gone-0 (raspberry-pi-5) offline, model m1; a
    # rollout of m1 to every device (running: two are offline) and a round that failed at once (1 eligible of 2)
    fleet, common = served
    for i in range(5):
        fleet.devices.enroll(DeviceCreate(device_id=f"far-{i}", profile="coral-dev-board"))
    rollout = runner.invoke(cli, ["deployments", "create", "m1", "--all", *common])
    started = runner.invoke(cli, ["rounds", "start", "--rounds", "1", *common])
    # Execute
    table = runner.invoke(cli, ["status", *common])
    as_json = runner.invoke(cli, ["status", "--json", *common])
    no_token = runner.invoke(cli, ["status", "--url", common[1]], env={"EDGEFLEET_TOKEN": ""})
    # Assert: the round's refusals are summarized by reason
    assert rollout.exit_code == 0, rollout.output
    assert started.exit_code == 1, started.output
    not_invited = re.search(r"^not invited: (\d+), by reason:$", started.stdout, re.MULTILINE)
    assert not_invited and int(not_invited.group(1)) >= 7, started.stdout
    assert any(line.split()[:2] == ["5", "profile"] and "far-0, far-1, far-2, +2 more" in line
               for line in started.stdout.splitlines()), started.stdout
    assert len(started.stdout.splitlines()) <= 7, started.stdout
    # the table
    assert table.exit_code == 0, table.output
    text = table.stdout
    assert "DEVICES      8  (online 1, offline 7)" in text
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines() if line.startswith("  ") and
            line.split()[0] in ("raspberry-pi-5", "jetson-orin-nano", "coral-dev-board")}
    assert rows == {"coral-dev-board": ["0", "5", "5"], "jetson-orin-nano": ["0", "1", "1"],
                    "raspberry-pi-5": ["1", "1", "2"]}
    assert "LAST ROUND   #1 failed" in text and "reason: " in text
    assert "DEPLOYMENTS  1 active of 1" in text and "m1" in text and "running: wave 1/1" in text
    assert "JOBS         none" in text
    # the JSON
    figures = json_document(as_json.stdout)
    assert figures["devices"] == {"total": 8, "online": 1, "offline": 7, "by_profile": {
        "coral-dev-board": {"online": 0, "offline": 5}, "jetson-orin-nano": {"online": 0, "offline": 1},
        "raspberry-pi-5": {"online": 1, "offline": 1}}}
    assert figures["last_round"]["status"] == "failed" and "min_clients is 2" in figures["last_round"]["reason"]
    (active,) = figures["deployments"]["active"]
    assert active["model_version"] == "m1" and sum(active["counts"].values()) == 8
    assert figures["jobs"] == {"counted": 0, "by_status": {}, "active": []}
    assert no_token.exit_code != 0 and "an API token is needed" in no_token.output


def json_document(stdout: str) -> Any:
    """The indented JSON document a command printed (the control plane in this process may log to stdout too)."""
    lines = stdout.splitlines()
    return json.loads("\n".join(lines[lines.index("{"):len(lines) - lines[::-1].index("}")]))


def _edgefleet(*args: str, **kwargs: Any) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "controlplane._entry", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


@pytest.mark.integration
@pytest.mark.slow
def test_demo_prints_only_its_own_lines_and_serves_until_ctrl_c(tmp_path: Path) -> None:
    # Prepare: the fleet part of the demo (no learning: seconds, not minutes), kept serving on a known port
    port = free_port()
    demo = _edgefleet("demo", "--no-learn", "--agents", "2", "--duration", "2", "--serve", "--port", str(port),
                      "--data-dir", str(tmp_path / "demo"))
    lines: list[str] = []
    try:
        assert demo.stdout is not None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = demo.stdout.readline()
            if not line:
                break
            lines.append(line.rstrip("\n"))
            if line.startswith("serving until Ctrl-C"):
                break
        # Execute: the console is there, and its login accepts the token printed
        token = next(line.split()[1] for line in lines if line.startswith("token:"))
        console = httpx.get(f"http://127.0.0.1:{port}/", follow_redirects=True, timeout=10)
        api = httpx.get(f"http://127.0.0.1:{port}/api/v1/devices", headers={"Authorization": f"Bearer {token}"},
                        timeout=10)
        status = subprocess.run([sys.executable, "-m", "controlplane._entry", "status", "--json"], text=True,
                                check=False,
                                capture_output=True, timeout=60,
                                env=dict(os.environ, EDGEFLEET_URL=f"http://127.0.0.1:{port}",
                                         EDGEFLEET_TOKEN=token))
        demo.send_signal(signal.SIGINT)
        out, err = demo.communicate(timeout=60)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    lines += out.splitlines()
    # Assert: a clean exit; the console got the demo's own lines only, the logs went to the file as JSON
    assert demo.returncode == 0, (lines, err)
    assert err == ""
    assert all(line.startswith(("[demo]", "console:", "token:", "CLI:", "serving", "DEVICE", "demo-", "ingest:",
                                "demo wall time")) or not line.strip() for line in lines), lines
    assert f"console: http://127.0.0.1:{port}/  (log in with the demo's admin token below; the agents keep running)" \
        in lines
    assert console.status_code == 200 and api.status_code == 200 and len(api.json()) == 2
    assert json.loads(status.stdout)["devices"]["total"] == 2, status.stderr
    log_lines = (tmp_path / "demo" / "demo.log").read_text().splitlines()
    assert log_lines and sum(line.startswith("{") for line in log_lines) / len(log_lines) >= 0.9
    wait_for(lambda: subprocess.run(["pgrep", "-f", str(tmp_path / "demo")], capture_output=True,
                                    check=False).returncode == 1,
             timeout=20, what="the demo's agents and broker gone")
