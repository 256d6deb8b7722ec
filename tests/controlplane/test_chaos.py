"""Chaos over the namespaced test network, with TLS on (issue 10 §6): a control plane, devices and an outsider on
their own hosts (tests/netns.py), the devices enrolled the production way (a provisioning token from
`edgefleet provisioning create`, `edgefleet agent enroll` on the device host, `edgefleet agent run --config`).

- A device unplugged while it downloads a rolled-out artifact: plugged back within the wave timeout, it resumes
  the download where the cut left it (HTTP Range) and the deployment succeeds; kept down past the wave timeout
  (``failed``, the rollout halts) or the deadline (``timed_out``), the deployment ends with that device's outcome
  and a reason, and once back the device still runs a valid model and keeps reporting inference.
- A device unplugged mid-round (Flower over TLS with SuperNode auth, min_clients 2 of 3): the round completes with
  the others and its record says why the device dropped out. Then the outsider: the Flower Control API is refused
  on the device-facing Fleet port (the proxy's 404; a SuperNode key registration fails), the SuperLink's own port
  is not reachable from another host; the control plane's own host registers a key on loopback (the control).
- A cut-off device is counted offline within two keepalives (the embedded broker ends a session silent for 1.5
  keepalives and publishes its will), and a device that contributed to a round and then dropped out has its
  reason in the round record: both were found by these tests and fixed.

A download of a model over an unthrottled veth pair takes milliseconds: the device host's link is slowed with a
token bucket (``Host.throttle``) and the released artifact is a real, signed model padded to 1 MiB (LiteRT reads
the flatbuffer from its start; the padding is covered by the manifest's size and sha256 like any other byte), so
the cut lands mid-download. Nothing in the agent or the control plane knows it is being tested.
"""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tests._services import wait_for
from tests.controlplane.test_network import API_PORT, ca_file, fx_net, http, stored_seqs  # noqa: F401 - fx_net
from tests.netns import Host, Network

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROFILE = "raspberry-pi-5"
ARTIFACT_BYTES = 1 << 20
# 1 MiB at 512 kbit/s: ~16 s of download, the first 64 KiB chunk on disk after ~1 s
THROTTLE_KBIT = 512
STALL_S = 30.0  # the agent's default stall timeout (agent._settings.DownloadPolicy): a cut connection ends then


@dataclass
class Fleet:
    """A served control plane on host cp and agents enrolled through provisioning on their own hosts."""

    net: Network
    api: str
    data: Path
    token: str  # admin
    ca: Path  # the fleet CA as the operator handed it to the devices (`provisioning create --ca-out`)
    root: Path

    @property
    def db(self) -> Path:
        return self.data / "edgefleet.db"

    def call(self, method: str, path: str, body: object = None) -> dict[str, Any]:
        """An API call from the control plane's own host (GET, or POST with ``body``)."""
        assert method in ("GET", "POST")
        return http(self.net["cp"], f"{self.api}{path}", self.token, body, ca=ca_file(self.db))

    def agent_log(self, device_id: str) -> Path:
        return self.root / f"{device_id}.log"


def _entry(*argv: str) -> list[str]:
    return [sys.executable, "-m", "controlplane._entry", *argv]


def _rows(db: Path, sql: str, *params: object) -> list[tuple[Any, ...]]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as conn:
        return list(conn.execute(sql, params))


def start_fleet(net: Network, root: Path, devices: list[str], *, train: bool = False) -> Fleet:
    """Serve the control plane on host cp (TLS: it listens beyond loopback), provision ``devices`` with one token
    and start their agents from the config files `agent enroll` wrote."""
    cp = net["cp"]
    data = root / "cp"
    token = subprocess.run(_entry("tokens", "create", "--role", "admin", "--data-dir", str(data), "--create"),
                           capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    cp.popen(_entry("controlplane", "serve", "--host", cp.address, "--port", str(API_PORT), "--data-dir", str(data)),
             log=root / "cp.log")
    api = f"https://{cp.address}:{API_PORT}"
    server_ca = ca_file(data / "edgefleet.db")
    wait_for(lambda: server_ca.exists() and http(net["dev1"], f"{api}/healthz", ca=server_ca)["status"] == 200,
             timeout=60, what=f"the control plane answering on {api} (log: {root / 'cp.log'})")
    fleet = Fleet(net=net, api=api, data=data, token=token, ca=root / "fleet-ca.pem", root=root)
    # The operator, on the control plane's host: one token for these devices; the CA to copy onto them
    created = cp.run(_entry("provisioning", "create", "--profile", PROFILE, "--max-uses", str(len(devices)),
                            "--expires", "30m", "--ca-out", str(fleet.ca), "--json", "--url", api, "--token", token),
                     env={**os.environ, "EDGEFLEET_CA_FILE": str(server_ca)}, check=False)
    assert created.returncode == 0, created.stdout + created.stderr
    provisioning = json.loads(created.stdout)["token"]
    for device_id in devices:
        host, home = net[device_id], root / device_id
        enrolled = host.run(_entry("agent", "enroll", "--controlplane", api, "--device-id", device_id,
                                   "--data-dir", str(home), "--ca-file", str(fleet.ca), *(["--train"] if train else [])),
                            env={**os.environ, "EDGEFLEET_PROVISIONING_TOKEN": provisioning}, check=False)
        assert enrolled.returncode == 0, enrolled.stdout + enrolled.stderr
        # --data-dir: the config does not name the agent's state directory (default ./edgefleet-agent)
        host.popen(_entry("agent", "run", "--config", str(home / "agent.toml"), "--data-dir", str(home / "state"),
                          "--telemetry-interval", "0.5", "--log-level", "info"),
                   env=dict(os.environ), log=fleet.agent_log(device_id))
    wait_for(lambda: all(stored_seqs(fleet.db, d) for d in devices), timeout=90,
             what=f"telemetry from {devices} over mqtts")
    return fleet


def register_padded_starter(fleet: Fleet, version: str) -> int:
    """A model version whose variants are the shipped starter models padded to ARTIFACT_BYTES (golden output what
    they compute), signed and registered in the control plane's database the way a build does; returns the size."""
    from agent.manifest import (
        Golden,
        ModelManifest,
        ModelSource,
        SignedManifest,
        canonical_bytes,
        file_sha256,
        key_id,
    )
    from agent.runtime import TFLiteModel, starter_model_path
    from controlplane.db import create_db_engine
    from controlplane.models import ModelService

    signing = Ed25519PrivateKey.generate()
    raw = signing.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    published = []
    for variant, file_variant in (("fp32", "fp32"), ("full-int8", "int8")):
        path = fleet.root / f"{version}-{variant}.tflite"
        model = starter_model_path(file_variant).read_bytes()
        path.write_bytes(model + bytes(ARTIFACT_BYTES - len(model)))
        output = TFLiteModel.load(path).predict(np.zeros((1, 64), dtype=np.float32)).tolist()
        manifest = ModelManifest(
            model_version=version, task="digits", variant=variant, file_name=f"{version}-{variant}.tflite",
            sha256=file_sha256(path), size_bytes=ARTIFACT_BYTES,
            runtimes={"ai-edge-litert": "2.3.0", "tflite-runtime": "2.14.0"}, source=ModelSource(kind="test", id="1"),
            metrics={"accuracy": 0.9}, input_scale=1 / 16,
            golden=Golden(input=[[0.0] * 64], output=output, tolerance=1.0),
        )
        published.append((SignedManifest(manifest=manifest, key_id=key_id(raw),
                                         signature=base64.b64encode(signing.sign(canonical_bytes(manifest))).decode()),
                          path))
    engine = create_db_engine(f"sqlite:///{fleet.db}")
    try:
        models = ModelService(engine, fleet.data / "models")
        models.start_version(version, "digits", "test", "1")
        models.register_build(version, published, {}, {"accuracy": 0.9})
    finally:
        engine.dispose()
    return ARTIFACT_BYTES


def partial_bytes(fleet: Fleet, device_id: str) -> int | None:
    """How much of an artifact the device has on disk (its models/.partial directory); None: no partial file."""
    files = [p for p in (fleet.root / device_id / "state" / "models" / ".partial").glob("*") if p.is_file()]
    try:
        return sum(p.stat().st_size for p in files) if files else None
    except FileNotFoundError:  # moved into place meanwhile
        return None


def reported_state(fleet: Fleet, device_id: str) -> dict[str, Any]:
    got = fleet.call("GET", f"/api/v1/devices/{device_id}")
    assert got["status"] == 200, got
    return dict(got["body"].get("reported_state") or {})


def last_telemetry(fleet: Fleet, device_id: str) -> tuple[int, dict[str, Any]]:
    seq, payload = _rows(fleet.db, "SELECT seq, payload FROM telemetry WHERE device_id = ? ORDER BY seq DESC "
                                   "LIMIT 1", device_id)[0]
    return int(seq), json.loads(payload)


def cut_mid_download(fleet: Fleet, host: Host, size: int) -> int:
    """Wait until the device has part of the artifact on disk, then unplug its host; returns the bytes it had."""
    wait_for(lambda: 0 < (partial_bytes(fleet, host.name) or 0) < size, timeout=60,
             what=f"{host.name} to have part of the artifact on disk (log {fleet.agent_log(host.name)})")
    host.partition()
    had = partial_bytes(fleet, host.name)
    assert had is not None
    return had


@pytest.fixture(name="rollout_fleet")
def fx_rollout_fleet(net: Network, tmp_path: Path) -> Iterator[Fleet]:
    fleet = start_fleet(net, tmp_path, ["dev1", "dev2"])
    yield fleet
    # the network fixture stops every process and removes the namespaces, whatever happened


def test_a_device_cut_mid_download_resumes_with_range_and_the_deployment_succeeds(rollout_fleet: Fleet) -> None:
    # Prepare: dev1's link slowed so that the 1 MiB artifact takes ~16 s; dev2 at full speed
    fleet = rollout_fleet
    dev1 = fleet.net["dev1"]
    size = register_padded_starter(fleet, "chaos-1")
    dev1.throttle(THROTTLE_KBIT)
    # Execute: roll out; unplug dev1 once part of the artifact is on its disk, until its agent has given the cut
    # connection up (the stall timeout) and retries; then plug it back, well within the wave timeout
    created = fleet.call("POST", "/api/v1/deployments", {"model_version": "chaos-1", "targets": {"all": True},
                                                         "wave_timeout_s": 300})
    assert created["status"] == 201, created
    deployment = created["body"]["id"]
    started = time.monotonic()
    try:
        had = cut_mid_download(fleet, dev1, size)
        log = fleet.agent_log("dev1")
        wait_for(lambda: "ota.download_retry" in log.read_text(errors="replace"), timeout=STALL_S + 30,
                 what=f"dev1's agent to give the cut connection up and retry (log {log})")
        assert partial_bytes(fleet, "dev1") == had, "bytes arrived through the partition"
    finally:
        dev1.heal()
    cut_s = time.monotonic() - started
    # While it finishes, the partial file only grows from what it had (a 200 instead of a 206 would start it
    # over from 0 bytes: at this link speed that is seconds of a smaller file, which these samples would see)
    sizes: list[int] = []

    def finished() -> bool:
        now = partial_bytes(fleet, "dev1")
        if now is not None:
            sizes.append(now)
        return bool(fleet.call("GET", f"/api/v1/deployments/{deployment}")["body"]["status"] != "running")

    wait_for(finished, timeout=120, what="the deployment to finish after healing")
    assert sizes and min(sizes) >= had, (had, sizes[:20])
    # Assert: the deployment succeeded on both devices, dev1 by resuming from what it had (HTTP Range)
    result = fleet.call("GET", f"/api/v1/deployments/{deployment}")["body"]
    targets = {t["device_id"]: t for t in result["targets"]}
    assert result["status"] == "succeeded", result
    assert targets["dev1"]["status"] == "succeeded", targets["dev1"]
    wait_for(lambda: _rows(fleet.db, "SELECT result FROM command WHERE command_id = ? AND result IS NOT NULL",
                           targets["dev1"]["command_id"]), timeout=30, what="dev1's ack to be stored")
    result_json = _rows(fleet.db, "SELECT result FROM command WHERE command_id = ?", targets["dev1"]["command_id"])
    download = json.loads(result_json[0][0])["download"]
    assert download["bytes"] == size and download["requests"] >= 2, download
    wait_for(lambda: reported_state(fleet, "dev1").get("active_model") == "chaos-1", timeout=30,
             what="dev1 to report the new model")
    print(f"cut with {had}/{size} bytes on disk; healed after {cut_s:.0f} s; download {download}")


# The broker sees a silent device gone after 1.5 keepalives (the agent's is 30 s): until then the control plane
# counts it online. A wave timeout shorter than that makes the cut device a failure (the rollout halts, saying so);
# a longer one leaves it to the deadline (timed_out, not a failure). Either way the deployment ends, with a reason.
ENDINGS = {
    "wave-timeout": ({"wave_timeout_s": 30, "deadline_s": 300}, "halted", "failed",
                     "no answer within the wave timeout (30 s) while online"),
    # "no answer by the deadline" (counted online) or "offline since ... (deadline passed)": which one depends on
    # whether the broker has ended the silent session (1.5 keepalives after the cut) by the deadline
    "deadline": ({"wave_timeout_s": 300, "deadline_s": 75}, "timed_out", "timed_out", "deadline"),
}


@pytest.mark.parametrize("ending", list(ENDINGS))
def test_a_device_cut_mid_download_for_good_ends_the_deployment_and_keeps_a_valid_model(
    rollout_fleet: Fleet, ending: str,
) -> None:
    # Prepare: dev1's link slowed as above; a deployment that gives up on dev1 while it is still cut off
    fleet = rollout_fleet
    dev1 = fleet.net["dev1"]
    limits, deployment_status, target_status, reason = ENDINGS[ending]
    size = register_padded_starter(fleet, "chaos-2")
    before = reported_state(fleet, "dev1").get("active_model")
    dev1.throttle(THROTTLE_KBIT)
    created = fleet.call("POST", "/api/v1/deployments", {"model_version": "chaos-2", "targets": {"all": True},
                                                         **limits})
    assert created["status"] == 201, created
    deployment = created["body"]["id"]
    # Execute: unplug dev1 mid-download and keep it down until the deployment has ended
    try:
        had = cut_mid_download(fleet, dev1, size)
        wait_for(lambda: fleet.call("GET", f"/api/v1/deployments/{deployment}")["body"]["status"] != "running",
                 timeout=150, what="the deployment to end while dev1 is cut off")
        result = fleet.call("GET", f"/api/v1/deployments/{deployment}")["body"]
        cut_seq = last_telemetry(fleet, "dev1")[0]
    finally:
        dev1.heal()
        dev1.unthrottle()
    # Assert: the deployment ended (not hanging) with dev1's outcome and the reason; dev2 got the model
    targets = {t["device_id"]: t for t in result["targets"]}
    print(f"cut with {had}/{size} bytes; deployment {result['status']} ({result['reason']}); dev1 "
          f"{targets['dev1']['status']} ({targets['dev1']['reason']})")
    assert targets["dev2"]["status"] == "succeeded", targets["dev2"]
    assert result["status"] == deployment_status, result
    assert targets["dev1"]["status"] == target_status, targets["dev1"]
    assert reason in (targets["dev1"]["reason"] or ""), targets["dev1"]
    # ... and once plugged back, dev1 reports again, runs a valid model (its previous one, or the new one if it
    # finished the download after all) and keeps inferring with it: its telemetry since healing (device clock: the
    # same machine's) shows inferences of the model it reports active
    healed_at = time.time()
    wait_for(lambda: last_telemetry(fleet, "dev1")[1]["ts"] > healed_at + 5, timeout=120,
             what="dev1's telemetry from after healing")
    state = reported_state(fleet, "dev1")
    assert state.get("active_model") in (before, "chaos-2"), state
    since = [json.loads(row[0]) for row in _rows(fleet.db, "SELECT payload FROM telemetry WHERE device_id = ? AND "
                                                           "seq > ? ORDER BY seq", "dev1", cut_seq)]
    after_heal = [p["inference"] for p in since if p["ts"] > healed_at + 1]
    assert after_heal and all(i["count"] > 0 and i["errors"] == 0 for i in after_heal), after_heal
    assert {i["model_version"] for i in after_heal} == {state["active_model"]}, (after_heal, state)
    after = fleet.call("GET", f"/api/v1/deployments/{deployment}")["body"]
    print(f"dev1 after healing: {state.get('active_model')}; inference {after_heal[-1]}; its target then: "
          f"{[(t['status'], t['reason']) for t in after['targets'] if t['device_id'] == 'dev1']}")


KEEPALIVE_S = 30  # the agent's MQTT keepalive (agent._settings.AgentSettings.keepalive_s)


def test_a_cut_off_device_is_counted_offline_within_two_keepalives(rollout_fleet: Fleet) -> None:
    # Prepare: dev1 online
    fleet = rollout_fleet

    def online(device_id: str) -> bool:
        got = fleet.call("GET", f"/api/v1/devices/{device_id}")
        assert got["status"] == 200, got
        return bool(got["body"]["online"])

    assert online("dev1")
    # Execute: unplug it for two keepalives and a margin (MQTT: the broker closes a session silent for 1.5)
    dev1 = fleet.net["dev1"]
    dev1.partition()
    try:
        deadline = time.monotonic() + 2 * KEEPALIVE_S + 15
        while online("dev1") and time.monotonic() < deadline:
            time.sleep(1)
        # Assert: the control plane no longer counts it online (rollouts wait for it, rounds do not invite it)
        assert not online("dev1"), f"dev1 still online {2 * KEEPALIVE_S + 15} s after its link went down"
        assert online("dev2")  # the control: a device that is reachable stays online
    finally:
        dev1.heal()


# -- a round -----------------------------------------------------------------------------------------------------------
FLEET_PORT = 9092  # the control plane's Fleet API proxy (the SuperLink itself listens on the cp's loopback only)
ROUND_DEVICES = ["dev1", "dev2", "dev3"]


# Run on a host: register a fresh SuperNode key through the Flower Control API at ADDRESS, as `flwr supernode
# register` does (federated.flower.runtime.register_supernode, TLS verified against the CA file); prints
# {"node_id": ...} or {"error": ...}.
REGISTER_PROBE = r"""
import json, sys
from pathlib import Path
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from federated.flower.runtime import register_supernode
address, ca = sys.argv[1], sys.argv[2]
key = ec.generate_private_key(ec.SECP384R1()).public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                       serialization.PublicFormat.OpenSSH)
try:
    print(json.dumps({"node_id": register_supernode(address, key, ca_file=Path(ca))}))
except Exception as exc:
    print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
"""


def register_probe(host: Host, address: str, ca: Path) -> dict[str, Any]:
    result = host.python(REGISTER_PROBE, address, str(ca), timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    out: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return out


@pytest.fixture(name="round_fleet")
def fx_round_fleet(net: Network, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Fleet]:
    pytest.importorskip("flwr")
    pytest.importorskip("torch")
    from federated.tasks import get_task

    task = get_task("digits")
    for device_id, part in zip(ROUND_DEVICES, task.partition(len(ROUND_DEVICES), 1.0, 0), strict=True):
        path = tmp_path / device_id / "state" / "data" / "partition.npz"  # where join_round looks
        path.parent.mkdir(parents=True)
        task.write_partition(part, path)
    monkeypatch.setenv("EDGEFLEET_FLOWER_FLEET_PORT", str(FLEET_PORT))  # inherited by the served control plane
    yield start_fleet(net, tmp_path, ROUND_DEVICES, train=True)


# When dev3 is cut: as soon as it has trained round 1 (its update is lost with the link: it never contributes), or
# as soon as it has trained round 2 (round 1 was aggregated with its update: it contributed, then drops out of round
# 2 or 3, whichever update the cut catches).
CUTS = {"before-its-first-update": 1, "after-its-first-update": 2}


@pytest.mark.parametrize("cut", [
    "before-its-first-update",
    "after-its-first-update",
])
def test_a_device_cut_mid_round_drops_with_a_reason_and_the_round_completes(round_fleet: Fleet, cut: str) -> None:
    # Prepare: three training devices (SuperNode keys from enrolment), min_clients 2; every device shares this
    # machine's CPU, so a busy CPU is not held against them
    fleet = round_fleet
    dev3 = fleet.net["dev3"]
    eligibility = {"allow_metered": True, "min_battery_percent": 10, "max_cpu_percent": 100}
    created = fleet.call("POST", "/api/v1/rounds", {"rounds": 3, "min_clients": 2, "local_epochs": 1,
                                                    "round_timeout_s": 30, "build": False,
                                                    "eligibility": eligibility})
    assert created["status"] in (200, 201), created
    round_id = created["body"]["id"]
    assert sorted(created["body"]["invited"]) == ROUND_DEVICES, created["body"]
    # Execute: once dev3 has trained round 1 or 2 (its agent's round status file says so), unplug it until the run
    # ends: it drops out of the run mid-way, with the SuperLink still counting its node online
    status = fleet.root / "dev3" / "state" / "round" / "status.json"

    def trained() -> list[int]:
        try:
            return list(json.loads(status.read_text()).get("trained") or [])
        except (OSError, ValueError):
            return []

    wait_for(lambda: CUTS[cut] in trained(), timeout=180, what=f"dev3 to train round {CUTS[cut]}")
    dev3.partition()
    try:
        wait_for(lambda: fleet.call("GET", f"/api/v1/rounds/{round_id}")["body"]["status"] not in
                 ("pending", "running"), timeout=300, what="the round to end with dev3 cut off")
    finally:
        dev3.heal()
    result = fleet.call("GET", f"/api/v1/rounds/{round_id}")["body"]
    print(f"round {result['status']} ({result['reason']}); participants {result['participants']}; skipped "
          f"{result['skipped']}; metrics {[(m.get('round'), m.get('participants'), m.get('dropped')) for m in result['metrics']]}")
    # Assert: the round completed with the two others, and its record says dev3 dropped out, and why
    assert result["status"] == "succeeded", result
    last = result["metrics"][-1]
    assert sorted(last["participants"]) == ["dev1", "dev2"], result["metrics"]
    assert any("dev3" in (m.get("dropped") or []) for m in result["metrics"]), result["metrics"]
    # the reason: in `skipped` (the run's drop-outs) or next to the round it dropped out of
    reasons = [result["skipped"].get("dev3")] + [(m.get("drop_reasons") or {}).get("dev3") for m in result["metrics"]]
    assert any(reasons), f"no reason recorded for dev3: skipped {result['skipped']}, metrics {result['metrics']}"

    # The Flower Control API from other hosts (issue 10 §4, §6), the SuperLink of this round still running:
    cp, outsider = fleet.net["cp"], fleet.net["outsider"]
    link = [json.loads(line)["address"] for line in (fleet.root / "cp.log").read_text().splitlines()
            if '"superlink.started"' in line]
    assert link, "the control plane did not log its SuperLink's address"
    link_port = link[-1].rsplit(":", 1)[1]
    # ... on the device-facing Fleet port only /v1/fleet/* passes: /v1/control/* is answered 404 by the proxy
    fleet_url = f"https://{cp.address}:{FLEET_PORT}"
    assert http(outsider, f"{fleet_url}/v1/control/list-runs", body={}, ca=fleet.ca)["status"] == 404
    refused = register_probe(outsider, f"{cp.address}:{FLEET_PORT}", fleet.ca)
    assert "node_id" not in refused and "404" in refused["error"], refused
    # ... and the SuperLink's own port is not reachable from another host at all (it listens on cp's loopback)
    unreachable = http(outsider, f"https://{cp.address}:{link_port}/v1/control/list-runs", body={}, ca=fleet.ca)
    assert unreachable["status"] is None and "refused" in unreachable["body"].lower(), unreachable
    assert "node_id" not in register_probe(fleet.net["dev1"], f"{cp.address}:{link_port}", fleet.ca)
    # ... while the proxy does forward the Fleet API (its answer is the SuperLink's: an unsigned request refused)
    fleet_api = http(outsider, f"{fleet_url}/v1/fleet/pull-messages", body={}, ca=fleet.ca)
    assert fleet_api["status"] not in (None, 404), fleet_api
    # The control: the same registration from the control plane's own host, on loopback, is accepted
    assert "node_id" in register_probe(cp, f"127.0.0.1:{link_port}", ca_file(fleet.db)), "the control failed"
