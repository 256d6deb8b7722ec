"""Flower, shielded (issue 10 §4): a real SuperLink over TLS with SuperNode authentication, real SuperNodes, the
Fleet API proxy in front of it. No mocks: the fleet CA and server certificate come from ``controlplane.pki``.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

import httpx
import psutil
import pytest

pytest.importorskip("flwr")
pytest.importorskip("torch")
pytest.importorskip("sklearn")

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from controlplane.pki import FleetPKI, ServerIdentity
from federated.flower.fleet_proxy import is_fleet_path
from federated.flower.runtime import SuperLinkProcess, SuperNodeProcess, supernode_public_key_pem
from federated.tasks import get_task
from tests._services import fx_fleet  # noqa: F401 - fx_fleet

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RUN_TIMEOUT_S = 150.0


@pytest.fixture(name="identity", scope="module")
def fx_identity(tmp_path_factory: pytest.TempPathFactory) -> ServerIdentity:
    pki = FleetPKI(tmp_path_factory.mktemp("pki"), server_names=["127.0.0.1", "localhost"]).ensure()
    return pki.server


@pytest.fixture(name="partitions", scope="module")
def fx_partitions(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    task = get_task("digits")
    directory = tmp_path_factory.mktemp("partitions")
    paths = []
    for i, part in enumerate(task.partition(2, 1.0, 0)):
        path = directory / f"part{i}.npz"
        task.write_partition(part, path)
        paths.append(path)
    return paths


@pytest.fixture(name="link")
def fx_link(tmp_path: Path, identity: ServerIdentity) -> Iterator[SuperLinkProcess]:
    link = SuperLinkProcess(tmp_path / "superlink", tls=identity, supernode_auth=True, fleet_host="127.0.0.1")
    link.start()
    try:
        yield link
    finally:
        link.stop()


def _key(path: Path) -> str:
    """A device's SuperNode key as `edgefleet agent enroll --train` makes it: EC P-384, OpenSSH, 0600; returns the
    public key (OpenSSH line) the control plane stores."""
    key = ec.generate_private_key(ec.SECP384R1())
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()))
    path.chmod(0o600)
    return key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def _node(link: SuperLinkProcess, root: Path, name: str, data: Path, key_file: Path | None,
          identity: ServerIdentity, *, address: str | None = None) -> SuperNodeProcess:
    return SuperNodeProcess(
        address or link.device_address, device_id=name, data_path=data, flwr_home=root / name,
        status_path=root / name / "status.json", log_path=root / f"{name}.log",
        root_certificates=identity.ca_file, auth_key_file=key_file,
    )


class _TokenWatch:
    """Samples the process list during a run: every Flower app command line seen."""

    def __init__(self) -> None:
        self.seen: list[list[str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(0.1):
            for proc in psutil.process_iter(["cmdline"]):
                cmd = proc.info.get("cmdline") or []
                if any(part.endswith(("flwr-serverapp", "flwr-clientapp")) for part in cmd[:2]):
                    self.seen.append(cmd)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def test_round_over_tls_with_registered_supernodes(link: SuperLinkProcess, identity: ServerIdentity,
                                                    partitions: list[Path], tmp_path: Path) -> None:
    names = ["pi-a", "pi-b"]
    for name in names:
        node_id = link.register_supernode(_key(tmp_path / f"{name}.key"), name=name)
        assert link.register_supernode(_pub(tmp_path, name)) == node_id  # idempotent
    nodes = [_node(link, tmp_path, n, p, tmp_path / f"{n}.key", identity).start() for n, p in zip(names, partitions,
                                                                                                   strict=True)]
    results = tmp_path / "results"
    try:
        link.wait_for_nodes(2, timeout=60)
        started = time.monotonic()
        with _TokenWatch() as watch:
            run_id = link.submit_run(run_config={
                "devices": ",".join(names), "num-rounds": 1, "min-clients": 2, "local-epochs": 1,
                "discovery-timeout-s": 30.0, "round-timeout-s": 60.0, "results-dir": str(results)})
            status = link.wait_run(run_id, RUN_TIMEOUT_S)
        duration = time.monotonic() - started
    finally:
        for node in nodes:
            node.stop()
    assert status.completed, (status, link.run_logs(run_id))
    report = json.loads((results / f"{run_id}.json").read_text())
    assert sorted(report["participants"]) == names
    print(f"round over TLS + SuperNode auth: {duration:.1f} s")
    # The run token is on no command line: the apps read it from an inherited in-memory file.
    assert watch.seen, "no Flower app process was seen during the run"
    assert all("--token" not in cmd and "--token-file" in cmd for cmd in watch.seen), watch.seen[:3]


def _pub(tmp_path: Path, name: str) -> str:
    key = serialization.load_ssh_private_key((tmp_path / f"{name}.key").read_bytes(), None)
    return key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                         serialization.PublicFormat.OpenSSH).decode()


def test_unregistered_and_withdrawn_supernodes_are_refused(link: SuperLinkProcess, identity: ServerIdentity,
                                                           partitions: list[Path], tmp_path: Path) -> None:
    _key(tmp_path / "stranger.key")  # never registered
    stranger = _node(link, tmp_path, "stranger", partitions[0], tmp_path / "stranger.key", identity).start()
    withdrawn_pub = _key(tmp_path / "gone.key")
    link.register_supernode(withdrawn_pub, name="gone")
    assert link.unregister_supernode(withdrawn_pub)
    assert supernode_public_key_pem(withdrawn_pub) not in link.registered_supernodes()
    gone = _node(link, tmp_path, "gone", partitions[1], tmp_path / "gone.key", identity).start()
    try:
        assert stranger.wait(60) not in (None, 0), "a SuperNode with an unregistered key kept running"
        assert gone.wait(60) not in (None, 0), "a SuperNode whose key was unregistered kept running"
        assert link.online_nodes() == []
    finally:
        stranger.stop()
        gone.stop()


def test_proxy_forwards_the_fleet_api_only(link: SuperLinkProcess, identity: ServerIdentity) -> None:
    assert link.fleet_proxy is not None
    base = f"https://{link.device_address}"
    with httpx.Client(verify=str(identity.ca_file)) as client:
        for path in ("/v1/control/list-nodes", "/v1/control/register-node", "/v1/control/start-run",
                     "/v1/fleet/../control/list-nodes", "/v1/fleet/%2e%2e/control/list-nodes",
                     "/v1/fleet//control/list-nodes", "/health", "/docs", "/v1/fleet/pull-messages?x=1"):
            response = client.post(base + path, content=b"", headers={"content-type": "application/protobuf"})
            assert response.status_code in (403, 404), (path, response.status_code)
        # A Fleet route reaches the SuperLink (which refuses an unsigned request itself), on one kept-alive
        # connection.
        for _ in range(3):
            response = client.post(base + "/v1/fleet/pull-messages", content=b"\x00",
                                   headers={"content-type": "application/protobuf"})
            assert response.status_code not in (403, 404, 502), response.status_code
    # The same Control API call works on loopback for the control plane.
    assert link.registered_supernodes() == {}
    assert is_fleet_path(b"/v1/fleet/send-node-heartbeat") and not is_fleet_path(b"/v1/fleet/PULL")


def test_plaintext_is_refused(link: SuperLinkProcess, partitions: list[Path], tmp_path: Path) -> None:
    for address in (link.device_address, link.address):
        with pytest.raises(httpx.HTTPError):
            httpx.post(f"http://{address}/v1/fleet/pull-messages", content=b"", timeout=5)
    plain = SuperNodeProcess(link.device_address, device_id="plain", data_path=partitions[0],
                             flwr_home=tmp_path / "plain", log_path=tmp_path / "plain.log", max_wait_time_s=20)
    plain.start()
    try:
        assert plain.wait(60) not in (None, 0)
        assert link.online_nodes() == []
    finally:
        plain.stop()


def _stale_request(link: SuperLinkProcess, ca_file: Path, key_file: Path) -> httpx.Response:
    """What a SuperNode whose clock is 10 minutes slow sends to activate itself (flwr's signed-timestamp headers)."""
    from flwr.proto.fleet_pb2 import ActivateNodeRequest
    from flwr.supercore.primitives.asymmetric import sign_message

    private = serialization.load_ssh_private_key(key_file.read_bytes(), None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    pem = private.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    stamp = (dt.datetime.now(dt.UTC) - dt.timedelta(minutes=10)).isoformat()
    headers: dict[str, Any] = {
        "content-type": "application/protobuf", "flwr-timestamp": stamp,
        "flwr-public-key": base64.b64encode(pem).decode(),
        "flwr-signature": base64.b64encode(sign_message(private, stamp.encode("ascii"))).decode(),
    }
    body = ActivateNodeRequest(public_key=pem, heartbeat_interval=30.0).SerializeToString()
    return httpx.post(f"https://{link.device_address}/v1/fleet/activate-node", content=body, headers=headers,
                      verify=ssl.create_default_context(cafile=str(ca_file)))


def test_clock_skew_is_recorded(link: SuperLinkProcess, identity: ServerIdentity, tmp_path: Path) -> None:
    public = _key(tmp_path / "late.key")
    link.register_supernode(public, name="late")
    pem = supernode_public_key_pem(public)
    since = time.time()
    response = _stale_request(link, identity.ca_file, tmp_path / "late.key")
    assert response.status_code == 401
    skews = link.clock_skews(since)
    assert pem in skews and -610 < skews[pem] < -590


# --------------------------------------------------------------------------------- the agent's join_round


def _agent(tmp_path: Path, device_id: str, train_data: Path, ca_file: Path | None, key_file: Path | None) -> Any:
    """The parts of an agent's CommandContext that join_round uses, with the fleet CA and SuperNode key files that
    enrolment writes (AgentSettings.ca_file / supernode_auth_key_file)."""
    from types import SimpleNamespace

    from firmware_profiles import get_profile

    settings = SimpleNamespace(data_dir=tmp_path / device_id, profile=get_profile("raspberry-pi-5"),
                               train_data_path=train_data, superlink_host=None, controlplane_url=None,
                               broker=SimpleNamespace(host="127.0.0.1"), ca_file=ca_file,
                               supernode_auth_key_file=key_file)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return SimpleNamespace(settings=settings, device_id=device_id, wait_for_stop=threading.Event().wait)


def test_join_round_over_tls_with_the_device_key(link: SuperLinkProcess, identity: ServerIdentity,
                                                 partitions: list[Path], tmp_path: Path) -> None:
    from agent import protocol as wire
    from agent.join_round import Rounds

    names = ["pi-a", "pi-b"]
    agents = {}
    for name, data in zip(names, partitions, strict=True):
        link.register_supernode(_key(tmp_path / f"{name}.key"), name=name)
        agents[name] = _agent(tmp_path, name, data, identity.ca_file, tmp_path / f"{name}.key")
    results = tmp_path / "results"
    run_id = link.submit_run(run_config={
        "round-id": "r1", "devices": ",".join(names), "num-rounds": 1, "min-clients": 2, "local-epochs": 1,
        "discovery-timeout-s": 60.0, "round-timeout-s": 60.0, "results-dir": str(results)})
    acks: dict[str, Any] = {}

    def join(name: str) -> None:
        command = wire.Command(command_id=f"j-{name}", kind="join_round", ts=time.time(),
                               args={"superlink": link.device_address, "round_id": "r1", "timeout_s": 120,
                                     "tls": True})
        acks[name] = Rounds().handle(agents[name], command)

    threads = [threading.Thread(target=join, args=(n,)) for n in names]
    for thread in threads:
        thread.start()
    status = link.wait_run(run_id, RUN_TIMEOUT_S)
    for thread in threads:
        thread.join(timeout=60)
    assert status.completed, status
    for name in names:
        ok, reason, result = acks[name]
        assert ok, reason
        assert result["participated"] is True and abs(result["clock_skew_s"]) < 5


def test_join_round_refusals_over_tls(tmp_path: Path, partitions: list[Path], identity: ServerIdentity) -> None:
    from agent import protocol as wire
    from agent.join_round import Rounds

    # Without a CA file the SuperNode still speaks TLS (system store), never plaintext.
    no_ca = SuperNodeProcess("cp.example:9092", device_id="x", data_path=partitions[0], flwr_home=tmp_path / "x",
                             tls=True).command()
    assert "--insecure" not in no_ca and "--root-certificates" not in no_ca
    with pytest.raises(ValueError, match="TLS only"):
        SuperNodeProcess("cp.example:9092", device_id="x", data_path=partitions[0], flwr_home=tmp_path / "x",
                         auth_key_file=tmp_path / "k.key", tls=False)
    # An enrolled device (it has the fleet CA) refuses a plaintext SuperLink beyond loopback.
    enrolled = _agent(tmp_path, "enrolled", partitions[0], identity.ca_file, None)
    enrolled.settings.superlink_host = "cp.example"
    plain = wire.Command(command_id="c2", kind="join_round", args={"superlink": "cp.example:9092", "round_id": "r1"})
    ok, reason, _ = Rounds().handle(enrolled, plain)
    assert not ok and reason is not None and "refusing a plaintext SuperLink" in reason
    bad = wire.Command(command_id="c3", kind="join_round",
                       args={"superlink": "127.0.0.1:9092", "round_id": "r1", "tls": "yes"})
    ok, reason, _ = Rounds().handle(_agent(tmp_path, "bad", partitions[0], identity.ca_file, None), bad)
    assert not ok and reason is not None and "'tls'" in reason


def test_join_round_names_clock_skew(link: SuperLinkProcess, identity: ServerIdentity, partitions: list[Path],
                                     tmp_path: Path) -> None:
    """The agent names clock skew when its SuperNode could not connect and the command's timestamp says its clock
    is further off than Flower accepts. The SuperNode here fails for an unregistered key (one process's clock cannot
    be set without root or libfaketime); test_clock_skew_is_recorded covers the SuperLink refusing a stale stamp."""
    from agent import protocol as wire
    from agent.join_round import Rounds

    _key(tmp_path / "slow.key")  # not registered: the SuperNode exits, as it would for a stale timestamp
    agent = _agent(tmp_path, "slow", partitions[0], identity.ca_file, tmp_path / "slow.key")
    command = wire.Command(command_id="j", kind="join_round", ts=time.time() + 600,
                           args={"superlink": link.device_address, "round_id": "r9", "timeout_s": 90, "tls": True})
    ok, reason, result = Rounds().handle(agent, command)
    assert not ok and reason is not None and reason.startswith("clock skew: this device's clock is -600 s"), reason
    assert result["clock_skew_s"] == pytest.approx(-600, abs=5)


# ------------------------------------------------------------------------------------- the control plane's runner


def test_runner_registers_keys_unregisters_and_names_clock_skew(fleet: Any, tmp_path: Path) -> None:
    """FlowerRoundRunner on a real control plane: the invited device's key (Device.flower_public_key) is registered
    with its TLS SuperLink, a device without one is not invited, a stale-clock refusal becomes the device's drop
    reason, and unregister() withdraws the key."""
    from sqlmodel import Session

    from controlplane.db import Device
    from controlplane.devices.schemas import DeviceCreate
    from controlplane.rounds.runner import FlowerRoundRunner
    from controlplane.rounds.service import RoundOutcome

    for device_id in ("k-a", "k-none"):
        fleet.devices.enroll(DeviceCreate(device_id=device_id, profile="raspberry-pi-5"))
    public = _key(tmp_path / "k-a.key")
    with Session(fleet.engine) as session:
        device = session.get(Device, "k-a")
        device.flower_public_key = public
        session.add(device)
        session.commit()
    runner = FlowerRoundRunner(tmp_path / "flower", fleet.devices, tls=fleet.pki.server, supernode_auth=True)
    try:
        link = runner._ensure_superlink()
        assert link.address.startswith("127.0.0.1:") and link.device_address != link.address
        pem = runner._register(link, "k-a")
        assert pem in link.registered_supernodes()
        with pytest.raises(ValueError, match="no SuperNode key on record"):
            runner._register(link, "k-none")
        since = time.time()
        assert _stale_request(link, fleet.pki.server.ca_file, tmp_path / "k-a.key").status_code == 401
        outcome = RoundOutcome(ok=False, refused={"k-a": "the SuperNode exited with code 1"})
        runner._add_clock_skews(link, outcome, {pem: "k-a"}, since)
        assert outcome.dropped["k-a"].startswith("clock skew: the device's clock is -600 s"), outcome.dropped
        assert "k-a" not in outcome.refused
        assert runner.unregister("k-a") is True
        assert pem not in link.registered_supernodes()
        assert runner.unregister("k-a") is False
    finally:
        runner.stop()
