"""EdgeFleet across a real network: a control plane, three devices and an outsider, each on its own host (Linux
network namespaces on a bridge, tests/netns.py), running the real `edgefleet` processes.

What this shows: devices on other hosts enrol and report over the network; a device host unplugged for 60 s while
it publishes loses nothing and duplicates nothing once its link is back; an outsider with no credentials (or
another device's id) gets nothing from the broker or the API; a device cannot read another device's commands
nor publish as another device.

The control plane listens on its network address, beyond loopback, so TLS is on without being asked for (issue 10
§2): the API is HTTPS only, the embedded broker MQTTS only (8883), both with the fleet CA's server certificate, which
every other host verifies with the CA file (the control plane's data dir is on the one shared filesystem). The
outsider also tries plaintext MQTT and HTTP, which get no answer.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controlplane.pki import FleetPKI
from tests._services import service_missing, wait_for
from tests.netns import Host, Network, cannot_build

pytestmark = [pytest.mark.integration, pytest.mark.slow]

API_PORT = 8080
MQTT_PORT = 8883  # MQTTS: the embedded broker's default once TLS is on
DEVICES = ["dev1", "dev2", "dev3"]
PARTITION_S = 60.0
TELEMETRY_INTERVAL_S = 0.5

# Run on a host: an MQTT 3.1.1 CONNECT (+ optional SUBSCRIBE, or a QoS 1 PUBLISH of a payload), over TLS verified
# against the CA file when one is given (else plaintext); prints {"connack": ..., "suback"/"puback": ...} as JSON.
# (On MQTT 3.1.1 a broker acknowledges a publish it drops for its ACL: a PUBACK says nothing about delivery.)
MQTT_PROBE = r"""
import json, ssl, sys, time
import paho.mqtt.client as mqtt
host, port, client_id, username, password, topic, ca_file = sys.argv[1:8]
publish = sys.argv[8] if len(sys.argv) > 8 else None
out = {}
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
if ca_file:
    c.tls_set_context(ssl.create_default_context(cafile=ca_file))
if username:
    c.username_pw_set(username, password)
def on_connect(c, u, f, reason, p):
    out["connack"] = "success" if not reason.is_failure else str(reason)
    if not reason.is_failure and topic and publish is not None:
        c.publish(topic, publish.encode(), qos=1)
    elif not reason.is_failure and topic:
        c.subscribe(topic, qos=1)
def on_subscribe(c, u, mid, reasons, p):
    out["suback"] = ["granted" if not r.is_failure else str(r) for r in reasons]
def on_publish(c, u, mid, reason, p):
    out["suback"] = out["puback"] = True  # "suback": the wait below ends on either
c.on_connect, c.on_subscribe, c.on_publish = on_connect, on_subscribe, on_publish
try:
    c.connect(host, int(port), keepalive=10)
except ssl.SSLError as exc:
    out["connack"] = f"tls: {exc}"
except OSError as exc:
    out["connack"] = f"unreachable: {exc}"
else:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not ("suback" in out or (out.get("connack") and not topic)
                                               or out.get("connack", "success") != "success"):
        try:
            if c.loop(0.1) != mqtt.MQTT_ERR_SUCCESS:
                out.setdefault("connack", "connection lost")
        except OSError as exc:
            out.setdefault("connack", f"connection lost: {exc}")
out.setdefault("connack", "no answer")
print(json.dumps(out))
"""

# Run on a host: one HTTP request (https verified against the CA file); {"status": None} when no HTTP answer came.
HTTP_PROBE = r"""
import http.client, json, ssl, sys, urllib.request, urllib.error
url, token, body, ca_file = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
context = ssl.create_default_context(cafile=ca_file or None)
request = urllib.request.Request(url, data=body.encode() or None, method="POST" if body else "GET",
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {token}"} if token else {})})
try:
    with urllib.request.urlopen(request, timeout=10, context=context) as response:
        print(json.dumps({"status": response.status, "body": json.loads(response.read() or b"null")}))
except urllib.error.HTTPError as exc:
    print(json.dumps({"status": exc.code, "body": exc.read().decode(errors="replace")}))
except (OSError, http.client.HTTPException) as exc:
    print(json.dumps({"status": None, "body": str(exc)}))
"""


def _json(result: subprocess.CompletedProcess[str]) -> Any:
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def ca_file(db: Path) -> Path:
    """The fleet CA bundle of the control plane whose database is ``db``."""
    return db.parent / "pki" / "ca-bundle.pem"


def http(host: Host, url: str, token: str = "", body: object = None, ca: Path | None = None) -> dict[str, Any]:
    result: dict[str, Any] = _json(host.python(HTTP_PROBE, url, token, json.dumps(body) if body is not None else "",
                                               str(ca) if ca else ""))
    return result


def mqtt_probe(host: Host, target: Host, client_id: str, username: str = "", password: str = "",
               subscribe: str = "", *, ca: Path | None, publish: str | None = None) -> dict[str, Any]:
    """``ca``: connect with TLS verifying the broker against it; None: plaintext. ``publish``: publish it on the
    topic ``subscribe`` names instead of subscribing."""
    result: dict[str, Any] = _json(host.python(MQTT_PROBE, target.address, str(MQTT_PORT), client_id, username,
                                               password, subscribe, str(ca) if ca else "",
                                               *([publish] if publish is not None else [])))
    if publish is not None:
        result.pop("suback", None)
    return result


def stored_seqs(db: Path, device_id: str) -> list[int]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as conn:
        return [row[0] for row in conn.execute("SELECT seq FROM telemetry WHERE device_id = ? ORDER BY seq",
                                               (device_id,))]


def _rows_payload(db: Path, device_id: str) -> str:
    """The newest telemetry record stored for the device, as the device sent it."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as conn:
        row = conn.execute("SELECT payload FROM telemetry WHERE device_id = ? ORDER BY seq DESC LIMIT 1",
                           (device_id,)).fetchone()
    assert row is not None, device_id
    return str(row[0])


@pytest.fixture(name="net")
def fx_net() -> Iterator[Network]:
    why = cannot_build()
    if why:
        service_missing(f"the namespaced test network ({why})")
    with Network(["cp", *DEVICES, "outsider"]) as net:
        yield net


@pytest.fixture(name="fleet_net")
def fx_fleet_net(net: Network, tmp_path: Path) -> Iterator[tuple[Network, Path, str, dict[str, dict[str, Any]]]]:
    """The control plane on host cp (API and embedded broker on its network address: TLS by default), three
    enrolled agents running on their own hosts with the fleet CA; yields (network, control-plane database, admin
    token, credentials by device)."""
    cp = net["cp"]
    data = tmp_path / "cp"
    token = subprocess.run([sys.executable, "-m", "controlplane._entry", "tokens", "create", "--role", "admin",
                            "--data-dir", str(data), "--create"], capture_output=True, text=True, check=True).stdout.strip()
    # No --tls and no broker port: beyond loopback both are TLS (HTTPS; MQTTS on 8883) on their own.
    cp.popen([sys.executable, "-m", "controlplane._entry", "controlplane", "serve", "--host", cp.address,
              "--port", str(API_PORT), "--data-dir", str(data)], log=tmp_path / "cp.log")
    api = f"https://{cp.address}:{API_PORT}"
    ca = ca_file(data / "edgefleet.db")
    wait_for(lambda: ca.exists() and http(net["dev1"], f"{api}/healthz", ca=ca)["status"] == 200, timeout=60,
             what=f"the control plane answering on {api} from another host (log: {tmp_path / 'cp.log'})")
    creds: dict[str, dict[str, Any]] = {}
    for device_id in DEVICES:
        enrolled = http(cp, f"{api}/api/v1/devices", token, {"device_id": device_id, "profile": "raspberry-pi-5"},
                        ca=ca)
        assert enrolled["status"] == 201, enrolled
        creds[device_id] = enrolled["body"]
        assert creds[device_id]["broker_url"] == f"mqtts://{cp.address}:{MQTT_PORT}?protocol=3.1.1"
        host = net[device_id]
        host.popen([sys.executable, "-m", "controlplane._entry", "agent", "run", "--device-id", device_id,
                    "--profile", "raspberry-pi-5", "--broker", creds[device_id]["broker_url"], "--ca-file", str(ca),
                    "--username", creds[device_id]["mqtt_username"], "--controlplane", api,
                    "--data-dir", str(tmp_path / device_id), "--telemetry-interval", str(TELEMETRY_INTERVAL_S)],
                   env={**os.environ, "EDGEFLEET_MQTT_PASSWORD": creds[device_id]["mqtt_password"]},
                   log=tmp_path / f"{device_id}.log")
    db = data / "edgefleet.db"
    wait_for(lambda: all(stored_seqs(db, d) for d in DEVICES), timeout=90,
             what="telemetry from every device host")
    yield net, db, token, creds


def test_devices_on_other_hosts_report_and_a_partition_loses_nothing(
    fleet_net: tuple[Network, Path, str, dict[str, dict[str, Any]]],
) -> None:
    net, db, _, _ = fleet_net
    dev1, ca = net["dev1"], ca_file(db)
    # Positive control: the partition really cuts the host off (the broker is unreachable from it)
    dev1.partition()
    try:
        assert mqtt_probe(dev1, net["cp"], "probe", ca=ca)["connack"].startswith("unreachable"), \
            "the partition leaks"
        before = stored_seqs(db, "dev1")[-1]
        # Execute: 60 s unplugged while its agent keeps measuring (2 records a second go to its outbox)
        time.sleep(PARTITION_S)
        during = stored_seqs(db, "dev1")[-1]
    finally:
        dev1.heal()
    # Nothing got through while unplugged (beyond what was in flight when the cable went)
    assert during - before <= 5, (before, during)
    produced = before + int(PARTITION_S / TELEMETRY_INTERVAL_S)
    # Assert: once healed, every record of the partition arrives, each stored once, no gap
    wait_for(lambda: stored_seqs(db, "dev1")[-1] >= produced, timeout=150,
             what="dev1's telemetry from the partition to arrive after healing")
    seqs = stored_seqs(db, "dev1")
    assert seqs == list(range(seqs[0], seqs[-1] + 1)), "a gap or a duplicate in dev1's stored seqs"
    # ... and the other devices were not held up meanwhile
    for device_id in ("dev2", "dev3"):
        assert stored_seqs(db, device_id)[-1] > int(PARTITION_S / TELEMETRY_INTERVAL_S) // 2, device_id


def test_the_outsider_and_other_devices_get_nothing(
    fleet_net: tuple[Network, Path, str, dict[str, dict[str, Any]]], tmp_path: Path,
) -> None:
    net, db, token, creds = fleet_net
    cp, outsider, dev2, ca = net["cp"], net["outsider"], net["dev2"], ca_file(db)
    api = f"https://{cp.address}:{API_PORT}"
    # Positive control: the outsider host does reach the control plane's listeners (the refusals are the
    # control plane's, not the network's)
    assert http(outsider, f"{api}/healthz", ca=ca)["status"] == 200
    # Plaintext gets nothing: HTTP on the API port (no HTTP answer), MQTT on the broker port (no CONNACK) even with
    # a device's real credentials
    assert http(outsider, f"http://{cp.address}:{API_PORT}/healthz")["status"] is None
    dev1 = creds["dev1"]
    plain = mqtt_probe(outsider, cp, "dev1", dev1["mqtt_username"], dev1["mqtt_password"], ca=None)
    assert plain["connack"] != "success", plain
    # A client trusting another CA (the outsider's own) does not talk to the broker or the API at all
    theirs = FleetPKI(tmp_path / "outsider-ca", server_names=[cp.address]).ensure().server.ca_file
    assert mqtt_probe(outsider, cp, "dev1", dev1["mqtt_username"], dev1["mqtt_password"],
                      ca=theirs)["connack"].startswith("tls:")
    assert http(outsider, f"{api}/healthz", ca=theirs)["status"] is None
    # The broker over TLS: no credentials, made-up credentials, a real device id with a guessed password
    assert mqtt_probe(outsider, cp, "outsider", ca=ca)["connack"] != "success"
    assert mqtt_probe(outsider, cp, "outsider", "outsider", "guess", ca=ca)["connack"] != "success"
    assert mqtt_probe(outsider, cp, "dev1", "dev1", "guess", ca=ca)["connack"] != "success"
    # ... with dev1's real credentials it does get in (the control: credentials are what is checked)
    assert mqtt_probe(outsider, cp, "dev1", dev1["mqtt_username"], dev1["mqtt_password"], ca=ca)["connack"] \
        == "success"
    # The API over HTTPS: no token, a made-up token
    assert http(outsider, f"{api}/api/v1/devices", ca=ca)["status"] == 401
    assert http(outsider, f"{api}/api/v1/devices", "ef_madeup", ca=ca)["status"] == 401
    assert http(outsider, f"{api}/api/v1/devices", token, ca=ca)["status"] == 200  # the control
    # A device host with its own credentials cannot read another device's commands. Its agent is stopped first:
    # the probe connects with the agent's client id (the broker binds it to the device), and the two would take
    # the session from each other.
    dev2.stop_processes()
    mine = creds["dev2"]
    other = mqtt_probe(dev2, cp, "dev2", mine["mqtt_username"], mine["mqtt_password"],
                       "edgefleet/v1/devices/dev1/cmd", ca=ca)
    own = mqtt_probe(dev2, cp, "dev2", mine["mqtt_username"], mine["mqtt_password"],
                     "edgefleet/v1/devices/dev2/cmd", ca=ca)
    assert own == {"connack": "success", "suback": ["granted"]}  # the control
    assert other["connack"] == "success" and other["suback"] != ["granted"], other
    # ... nor publish as another device: a record on dev1's telemetry topic with dev2's credentials is dropped by
    # the broker's ACL (acknowledged all the same, as MQTT 3.1.1 does) and nothing of it is stored for dev1
    seq = 9_000_000
    forged = json.loads(_rows_payload(db, "dev1"))
    forged.update(seq=seq, ts=time.time())
    sent = mqtt_probe(dev2, cp, "dev2", mine["mqtt_username"], mine["mqtt_password"],
                      "edgefleet/v1/devices/dev1/telemetry", ca=ca, publish=json.dumps(forged))
    own_record = json.loads(_rows_payload(db, "dev2"))
    own_record.update(seq=seq, ts=time.time())
    mine_sent = mqtt_probe(dev2, cp, "dev2", mine["mqtt_username"], mine["mqtt_password"],
                           "edgefleet/v1/devices/dev2/telemetry", ca=ca, publish=json.dumps(own_record))
    assert mine_sent == {"connack": "success", "puback": True}, mine_sent
    wait_for(lambda: seq in stored_seqs(db, "dev2"), timeout=30, what="the control: dev2's own record stored")
    assert sent["connack"] == "success", sent  # it got in, as itself
    assert seq not in stored_seqs(db, "dev1")
    # (The broker drops it without a trace the operator sees: its ACL logs the denial at info on amqtt's logger,
    # which the control plane keeps at warning, and no counter counts it.)
