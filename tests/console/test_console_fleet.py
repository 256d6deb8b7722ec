"""The console's fleet and device pages in a real browser (Debian's chromium), against a served control plane on
the shared mosquitto with devices speaking the agent's protocol; and the console's auth edges over HTTP.

Browser: logging in (a bad token is refused, a good one lands on the fleet), a device going online without a
reload, filters, the device page's charts from published telemetry, an operator's ping with its ack, a viewer
refused an action (button disabled, a direct POST 403). HTTP (Litestar's TestClient): no cookie or a revoked token
is sent to the login page, ``next=//evil`` is refused, a form without its CSRF token is 403, bad query values are
400 pages, and what a device says (ack reasons, results) is shown escaped.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import pytest
from litestar.testing import TestClient
from sqlmodel import Session

from agent import protocol as wire
from controlplane.app import create_app
from controlplane.auth import Role, create_token, revoke_token
from controlplane.db import CommandRecord, utcnow
from controlplane.devices.schemas import DeviceCreate
from controlplane.statuses import CommandStatus
from tests._services import wait_for
from tests.console.conftest import ConsoleServer, login, screenshot

if TYPE_CHECKING:
    from playwright.sync_api import Page

pytestmark = pytest.mark.integration

CSRF_FIELD = re.compile(r'name="_csrf_token" value="([^"]+)"')


class Agents:
    """Devices on the shared broker, as their agents speak (agent/protocol.py), through one MQTT connection:
    retained state, telemetry, and acks to commands for the devices in ``answering``."""

    def __init__(self, broker_url: str) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.answering: set[str] = set()
        self.seq: dict[str, int] = {}
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"console-agents-{uuid.uuid4().hex[:8]}")
        self.client.on_message = self._on_message
        self._subscribed = threading.Event()
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        host, port = broker_url.removeprefix("mqtt://").split(":")
        self.client.connect(host, int(port))
        self.client.loop_start()

    def publish(self, device_id: str, channel: wire.Channel, message: Any, retain: bool = False) -> None:
        self.client.publish(wire.topic(device_id, channel), wire.encode(message), qos=1,
                            retain=retain).wait_for_publish(5)

    def online(self, device_id: str, online: bool = True, model: str | None = "m1",
               variant: str | None = "fp32") -> None:
        self.publish(device_id, wire.Channel.STATE, wire.State(
            device_id=device_id, online=online, ts=time.time(), agent_version="0.test", runtime="litert",
            active_model=model if online else None, active_variant=variant if online else None), retain=True)

    def answer(self, device_id: str) -> None:
        self._subscribed.clear()
        self.client.subscribe(wire.topic(device_id, wire.Channel.CMD), qos=1)
        assert self._subscribed.wait(5)
        self.answering.add(device_id)

    def telemetry(self, device_id: str, ts: float, *, cpu: float = 20.0, battery: float = 80.0,
                  temperature: float = 48.0, labels: dict[str, int] | None = None) -> None:
        seq = self.seq.get(device_id, -1) + 1
        self.seq[device_id] = seq
        self.publish(device_id, wire.Channel.TELEMETRY, wire.Telemetry(
            device_id=device_id, seq=seq, ts=ts,
            system=wire.SystemStats(cpu_percent=cpu, mem_used_mb=310 + seq % 40, mem_total_mb=4096,
                                    disk_used_percent=40, temperature_c=temperature),
            power=wire.PowerStats(source="simulated", power_source="battery", battery_percent=battery),
            network=wire.NetworkStats(source="simulated"),
            inference=wire.InferenceStats(model_version="m1", count=50, latency_p50_ms=1.2 + (seq % 5) / 10,
                                          latency_p95_ms=3.4 + (seq % 7) / 10, mean_confidence=0.9 - (seq % 4) / 50,
                                          class_histogram=labels or {"cat": 30, "dog": 15, "bird": 5},
                                          labelled=10, correct=9)))

    def _on_message(self, client: Any, userdata: object, msg: Any) -> None:
        command = wire.decode(msg.payload, wire.Command)
        device_id = msg.topic.split("/")[3]
        if device_id not in self.answering:
            return
        result: dict[str, Any] = {"pong": True}
        if command.kind == "logs":
            result = {"lines": ["agent started", "<b>not markup</b>"]}
        ack = wire.Ack(device_id=device_id, command_id=command.command_id, ok=True, result=result)
        client.publish(wire.topic(device_id, wire.Channel.ACK), wire.encode(ack), qos=1)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture(name="agents", scope="module")
def fx_agents(console_server: ConsoleServer) -> Iterator[Agents]:
    agents = Agents(console_server.broker_url)
    yield agents
    agents.close()  # console_server clears what the devices left retained


def enroll(server: ConsoleServer, device_id: str, profile: str = "raspberry-pi-5", tags: list[str] | None = None) -> None:
    server.fleet.devices.enroll(DeviceCreate(device_id=device_id, profile=profile, tags=tags or []))


def row(page: Page, device_id: str) -> Any:
    return page.locator(f'tr[data-device="{device_id}"]')


# -- in the browser ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_login_then_a_device_goes_online_live(page: Page, console_server: ConsoleServer, agents: Agents) -> None:
    # Prepare
    enroll(console_server, "live-0", tags=["lab"])
    # Execute: a bad token, then a good one
    page.goto("/console/")
    assert "/console/login" in page.url
    page.fill("input[name=token]", "ef_not-a-token")
    page.click("button[type=submit]")
    refused = page.locator("p.error").inner_text()
    login(page, console_server.tokens[Role.VIEWER])
    landed = page.url
    before = row(page, "live-0").locator("[data-status]").inner_text()
    agents.online("live-0")
    # Assert: the row flips without a reload (the live fragment is re-fetched every 5 s)
    row(page, "live-0").locator("[data-status]", has_text="online").wait_for(timeout=15_000)
    assert "invalid or revoked" in refused
    assert landed == f"{console_server.url}/console/"
    assert before == "offline"
    assert "m1" in row(page, "live-0").inner_text() and "fp32" in row(page, "live-0").inner_text()
    assert int(page.locator('[data-count="online"]').inner_text()) >= 1


@pytest.mark.slow
def test_filters(page: Page, console_server: ConsoleServer, agents: Agents) -> None:
    # Prepare
    enroll(console_server, "filt-jet", profile="jetson-orin-nano", tags=["yard"])
    enroll(console_server, "filt-pi", tags=["yard", "north"])
    agents.online("filt-pi")
    wait_for(lambda: console_server.fleet.devices.get("filt-pi").online, what="filt-pi online")
    login(page, console_server.tokens[Role.VIEWER])
    # Execute
    page.select_option("select[name=profile]", "jetson-orin-nano")
    with page.expect_navigation():
        page.click("form.filters button[type=submit]")
    by_profile = page.locator("tr[data-device]").evaluate_all("rows => rows.map(r => r.dataset.device)")
    page.goto("/console/?tag=yard&online=online")
    by_tag_online = page.locator("tr[data-device]").evaluate_all("rows => rows.map(r => r.dataset.device)")
    page.goto("/console/?tag=north")
    by_tag = page.locator("tr[data-device]").evaluate_all("rows => rows.map(r => r.dataset.device)")
    bad = page.goto("/console/?online=maybe")
    # Assert
    assert by_profile == ["filt-jet"]
    assert by_tag_online == ["filt-pi"]
    assert by_tag == ["filt-pi"]
    assert bad is not None and bad.status == 400
    assert page.locator("h1").inner_text() == "400"


@pytest.mark.slow
def test_device_page_charts_and_an_operators_ping(page: Page, console_server: ConsoleServer,
                                                  agents: Agents) -> None:
    # Prepare: an hour of telemetry, one record a minute
    enroll(console_server, "chart-0", tags=["lab", "cam"])
    agents.answer("chart-0")
    agents.online("chart-0")
    now = time.time()
    for i in range(60):
        agents.telemetry("chart-0", now - 3540 + 60 * i, cpu=20 + i % 15, battery=95 - i / 2)
    wait_for(lambda: console_server.fleet.devices.get("chart-0").last_seq == 59, what="telemetry stored")
    login(page, console_server.tokens[Role.OPERATOR], next_path="/console/devices/chart-0")
    # Execute
    page.locator('#charts[data-ready="1"]').wait_for()
    charts = page.locator("#charts .uplot").count()
    histogram = page.locator('[data-chart="class_histogram"]').inner_text()
    page.click('button[data-action="ping"]')
    outcome = page.locator("[data-action-status]")
    outcome.wait_for()
    pong = page.locator("pre.result").inner_text()
    page.click('button[data-action="logs"]')
    logs = page.locator("pre.result", has_text="agent started")
    logs.wait_for()
    screenshot(page, "device")
    # Assert
    assert charts == 6  # cpu, memory, temperature, battery, latency p50/p95, confidence
    assert "cat" in histogram and "dog" in histogram and "bird" in histogram
    assert outcome.get_attribute("data-action-status") == "ok"
    assert '"pong": true' in pong
    assert "<b>not markup</b>" in logs.inner_text()  # the device's words shown as text
    assert page.locator("#commands tbody tr").count() == 2


@pytest.mark.slow
def test_a_viewer_is_refused_an_action(page: Page, console_server: ConsoleServer) -> None:
    # Prepare
    enroll(console_server, "view-0")
    login(page, console_server.tokens[Role.VIEWER], next_path="/console/devices/view-0")
    # Execute
    disabled = [page.locator(f'button[data-action="{a}"]').is_disabled() for a in ("ping", "logs", "restart")]
    csrf = page.locator('input[name="_csrf_token"]').first.get_attribute("value")
    response = page.request.post(f"{console_server.url}/console/devices/view-0/actions/restart",
                                 form={"_csrf_token": csrf or ""}, max_redirects=0)
    # Assert
    assert disabled == [True, True, True]
    assert response.status == 403
    assert "operator" in response.text()
    assert console_server.fleet.devices.get("view-0") is not None
    with Session(console_server.fleet.engine) as session:
        assert session.query(CommandRecord).filter_by(device_id="view-0").count() == 0


@pytest.mark.slow
def test_screenshot_of_a_demo_fleet(page: Page, console_server: ConsoleServer, agents: Agents) -> None:
    """A dozen devices of three profiles with telemetry: docs/console/fleet.png (with EDGEFLEET_SCREENSHOTS=1)."""
    # Prepare
    profiles = ["raspberry-pi-5", "jetson-orin-nano", "raspberry-pi-4"]
    now = time.time()
    for i in range(12):
        device_id = f"demo-{i:02d}"
        enroll(console_server, device_id, profile=profiles[i % 3], tags=["demo", ["north", "south"][i % 2]])
        if i % 4 != 3:
            agents.online(device_id, variant=["fp32", "full-int8", "fp16"][i % 3])
            agents.telemetry(device_id, now - 5, cpu=10 + 5 * i, battery=100 - 6 * i, temperature=40 + i)
    wait_for(lambda: all(console_server.fleet.devices.get(f"demo-{i:02d}").last_seq == 0
                         for i in range(12) if i % 4 != 3), what="the demo fleet's telemetry")
    login(page, console_server.tokens[Role.OPERATOR], next_path="/console/?tag=demo")
    # Execute
    rows = page.locator("tr[data-device]").count()
    online = page.locator("tr[data-device] [data-status]", has_text="online").count()
    screenshot(page, "fleet")
    # Assert
    assert rows == 12 and online == 9


# -- over HTTP -------------------------------------------------------------------------------------------------
def csrf_of(html: str) -> str:
    found = CSRF_FIELD.search(html)
    assert found, "no CSRF field in the page"
    return found.group(1)


def test_auth_edges(console_server: ConsoleServer) -> None:
    # Prepare
    engine = console_server.fleet.engine
    revoked_info, revoked = create_token(engine, Role.ADMIN, "soon-revoked")
    revoke_token(engine, revoked_info.id)
    enroll(console_server, "edge-0")
    with TestClient(app=create_app(fleet=console_server.fleet)) as client:
        # Execute
        anonymous = client.get("/console/?profile=raspberry-pi-5&tag=lab", follow_redirects=False)
        anonymous_htmx = client.get("/console/fleet/live", headers={"HX-Request": "true"}, follow_redirects=False)
        client.cookies.set("edgefleet_console", revoked)
        with_revoked = client.get("/console/devices/edge-0", follow_redirects=False)
        client.cookies.delete("edgefleet_console")
        evil_page = client.get("/console/login", params={"next": "//evil.example/x"})
        csrf = csrf_of(evil_page.text)
        evil_login = client.post("/console/login", data={"token": console_server.tokens[Role.OPERATOR],
                                                         "next": "//evil.example/x", "_csrf_token": csrf},
                                 follow_redirects=False)
        absolute_next = client.post("/console/login", data={"token": console_server.tokens[Role.OPERATOR],
                                                            "next": "https://evil.example/", "_csrf_token": csrf},
                                    follow_redirects=False)
        no_csrf = client.post("/console/devices/edge-0/actions/ping", follow_redirects=False)
        fleet = client.get("/console/")
        # Assert
        assert anonymous.status_code in (302, 303)
        location = urlsplit(anonymous.headers["location"])
        assert location.path == "/console/login"
        assert parse_qs(location.query)["next"][0].endswith("?profile=raspberry-pi-5&tag=lab")
        assert anonymous_htmx.status_code == 401 and anonymous_htmx.headers["hx-redirect"].startswith("/console/login")
        assert with_revoked.status_code in (302, 303)
        assert with_revoked.headers["location"].startswith("/console/login")
        assert 'name="next" value="/console/"' in evil_page.text
        assert evil_login.status_code == 303 and evil_login.headers["location"] == "/console/"
        assert absolute_next.headers["location"] == "/console/"
        assert no_csrf.status_code == 403
        assert fleet.status_code == 200 and "edge-0" in fleet.text
        assert "script-src 'self'" in fleet.headers["content-security-policy"]


def test_bad_input_is_a_4xx_page_and_device_text_is_escaped(console_server: ConsoleServer) -> None:
    # Prepare: an ack as a hostile device could write it (reason and result are the device's words)
    enroll(console_server, "esc-0")
    with Session(console_server.fleet.engine) as session:
        session.add(CommandRecord(command_id=uuid.uuid4().hex, device_id="esc-0", kind="ping", args={},
                                  status=CommandStatus.ERROR, reason='<script>alert("r")</script>',
                                  result={"x": "<img src=x onerror=alert(1)>"}, created_at=utcnow(),
                                  acked_at=utcnow()))
        session.commit()
    with TestClient(app=create_app(fleet=console_server.fleet)) as client:
        client.cookies.set("edgefleet_console", console_server.tokens[Role.VIEWER])
        # Execute
        statuses = {url: client.get(url).status_code for url in (
            "/console/?page=0", "/console/?page=99999999999999999999999", "/console/?profile=../etc",
            "/console/?tag=%3Cb%3E", "/console/?online=yes", "/console/devices/..%2F..",
            "/console/devices/esc-0?window=2y", "/console/devices/esc-0/telemetry.json?window=1y",
            "/console/devices/nobody", "/console/devices/nobody/telemetry.json")}
        page = client.get("/console/devices/esc-0")
        commands = client.get("/console/devices/esc-0/commands")
        empty = client.get("/console/devices/esc-0/telemetry.json?window=7d")
        high_page = client.get("/console/?page=500")
    # Assert
    assert all(400 <= s < 500 for s in statuses.values()), statuses
    assert statuses["/console/devices/nobody"] == 404
    for html in (page.text, commands.text):
        assert "<script>alert" not in html and "<img src=x" not in html
        assert "&lt;script&gt;alert(&#34;r&#34;)&lt;/script&gt;" in html
    assert empty.status_code == 200 and empty.json()["ts"] == [] and empty.json()["records"] == 0
    assert high_page.status_code == 200 and "No device matches" in high_page.text


def test_a_viewer_does_not_see_log_lines_an_operator_does(console_server: ConsoleServer) -> None:
    # Prepare: a logs command answered (log lines may reveal what an agent saw; the API shows them to operators)
    enroll(console_server, "logs-0")
    with Session(console_server.fleet.engine) as session:
        session.add(CommandRecord(command_id=uuid.uuid4().hex, device_id="logs-0", kind="logs", args={"lines": 5},
                                  status=CommandStatus.OK, result={"lines": ["secret-ish agent line"]},
                                  created_at=utcnow(), acked_at=utcnow()))
        session.commit()
    pages = {}
    with TestClient(app=create_app(fleet=console_server.fleet)) as client:
        for role in (Role.VIEWER, Role.OPERATOR):
            client.cookies.set("edgefleet_console", console_server.tokens[role])
            # Execute
            pages[role] = [client.get("/console/devices/logs-0").text,
                           client.get("/console/devices/logs-0/commands").text]
    # Assert
    assert all("secret-ish agent line" not in html and "shown to operators only" in html
               for html in pages[Role.VIEWER])
    assert all("secret-ish agent line" in html for html in pages[Role.OPERATOR])


def test_model_history_names_the_deployment_and_its_outcome(console_server: ConsoleServer) -> None:
    # Prepare: a deployment to an offline device, cancelled by an operator
    from controlplane.deployments.schemas import DeploymentCreate, Targets
    from tests.controlplane.test_models_deployments import register_starter

    fleet = console_server.fleet
    enroll(console_server, "hist-0")
    register_starter(fleet, "hist-m1", {"fp32": 0.975, "full-int8": 0.9625})
    deployment = fleet.deployments.create(DeploymentCreate(model_version="hist-m1",
                                                           targets=Targets(device_ids=["hist-0"])))
    fleet.deployments.cancel(deployment.id)
    with TestClient(app=create_app(fleet=fleet)) as client:
        client.cookies.set("edgefleet_console", console_server.tokens[Role.VIEWER])
        # Execute
        page = client.get("/console/devices/hist-0")
    # Assert
    history = page.text.split('id="model-history"')[1]
    assert f'href="/console/deployments/{deployment.id}">#{deployment.id}</a>' in history
    assert "hist-m1" in history and '<span class="badge cancelled">cancelled</span>' in history


def test_an_address_no_console_page_matches_is_a_console_404_page(console_server: Any) -> None:
    # Prepare
    import httpx

    # Execute
    with httpx.Client(base_url=console_server.url) as client:
        answers = [client.get(path) for path in ("/console/rounds/1/x", "/console/nothing-here",
                                                  "/console/models/a%2Fb")]
        api = client.get("/api/v1/nothing-here")
    # Assert: a page (the API's JSON stays the API's)
    for answer in answers:
        assert answer.status_code == 404 and answer.headers["content-type"].startswith("text/html"), answer.text
        assert "Content-Security-Policy" not in answer.headers or "script-src 'self'" in answer.headers[
            "Content-Security-Policy"]
    assert api.status_code in (401, 404) and api.headers["content-type"].startswith("application/json")
