"""agent._deploy and agent._active_model: model deployments over a real HTTP server, with real ed25519 signatures and the real LiteRT
interpreter, driven through a real (never connected) Agent."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgspec
import numpy as np
import numpy.typing as npt
import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from agent import _deploy
from agent import protocol as wire
from agent._active_model import resolve_startup_model
from agent._daemon import Agent
from agent._model_store import ModelStore
from agent._settings import AgentSettings, DownloadPolicy, WatchdogPolicy
from agent.manifest import (
    Golden,
    ModelManifest,
    ModelSource,
    Release,
    SignedManifest,
    SignedRelease,
    canonical_bytes,
    file_sha256,
    key_id,
    release_bytes,
)
from agent.mqtt import BrokerAddress
from agent.runtime import DataSource, TFLiteModel, starter_model_path
from firmware_profiles import Profile, get_profile
from tests._services import wait_for

REPO_ROOT = Path(__file__).resolve().parents[2]
# The shipped starter models play the part of newly built artifacts.
ARTIFACTS = {"fp32": starter_model_path("fp32"), "full-int8": starter_model_path("int8")}
STARTER_VERSION = "starter-digits-1"
TOLERANCE = 1e-3


# ------------------------------------------------------------------------------------------- HTTP server


@dataclass(frozen=True)
class Hit:
    path: str
    range: str | None
    authorization: str | None


class FileServer(ThreadingHTTPServer):
    """Serves files under ``root`` with single-range support; ``faults[path]`` misbehaves on purpose:
    ``drop-once`` sends half the body then closes (once), ``drop-then-503`` does that and answers 503 from then
    on, ``stall`` sends the headers and no body."""

    daemon_threads = True

    def __init__(self, root: Path) -> None:
        super().__init__(("127.0.0.1", 0), RangeHandler)
        self.root = root
        self.hits: list[Hit] = []
        self.faults: dict[str, str] = {}
        self.release = threading.Event()
        self.releases: dict[str, int] = {}  # model version -> release number, as a registry assigns them

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def hits_for(self, prefix: str) -> list[Hit]:
        return [hit for hit in self.hits if hit.path.startswith(prefix)]


class RangeHandler(BaseHTTPRequestHandler):
    server: FileServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        name = urlsplit(self.path).path.lstrip("/")
        wanted = self.headers.get("Range")
        self.server.hits.append(Hit(name, wanted, self.headers.get("Authorization")))
        fault = self.server.faults.get(name)
        if fault == "503":
            self.send_error(503)
            return
        if fault and fault.startswith("401 "):  # the control plane's refusal: a JSON body with its reason
            body = json.dumps({"status_code": 401, "detail": fault.removeprefix("401 ")}).encode()
            self.send_response(401)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        if fault and fault.startswith("redirect "):
            self.send_response(302)
            self.send_header("Location", fault.removeprefix("redirect "))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        file = self.server.root / name
        if not file.is_file():
            self.send_error(404)
            return
        data = file.read_bytes()
        start = 0
        if wanted:
            match = re.fullmatch(r"bytes=(\d+)-", wanted)
            assert match, f"unexpected Range header {wanted!r}"
            start = int(match.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        body = data[start:]
        self.send_response(206 if wanted else 200)
        if wanted:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if fault in ("drop-once", "drop-then-503"):
            if fault == "drop-once":
                del self.server.faults[name]
            else:
                self.server.faults[name] = "503"
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        if fault == "stall":
            self.wfile.flush()
            self.server.release.wait(10)
            self.close_connection = True
            return
        self.wfile.write(body)


@contextlib.contextmanager
def _file_server(root: Path) -> Iterator[FileServer]:
    """A FileServer over `root` (with manifests/ and artifacts/) on its own thread, for the test's duration."""
    (root / "manifests").mkdir(parents=True)
    (root / "artifacts").mkdir()
    server = FileServer(root)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), name=f"test-http-{root.name}", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.release.set()
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture(name="server")
def fx_server(tmp_path: Path) -> Iterator[FileServer]:
    with _file_server(tmp_path / "www") as server:
        yield server


# -------------------------------------------------------------------------------------- keys and manifests


def public_raw(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


@pytest.fixture(name="key")
def fx_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def golden_for(artifact: Path, samples: int = 5) -> Golden:
    x = DataSource().x[:samples]
    y = TFLiteModel.load(artifact).predict(x)
    return Golden(input=x.tolist(), output=y.tolist(), tolerance=TOLERANCE)


def sign(manifest: ModelManifest, key: Ed25519PrivateKey, claimed_key: bytes | None = None) -> bytes:
    """A signed manifest; ``claimed_key`` forges the key id (the signature is still ``key``'s)."""
    signature = base64.b64encode(key.sign(canonical_bytes(manifest))).decode()
    signed = SignedManifest(manifest, signature, key_id(claimed_key or public_raw(key)))
    return msgspec.json.encode(signed)


def sign_release(release: Release, key: Ed25519PrivateKey, claimed_key: bytes | None = None) -> bytes:
    """A signed release; ``claimed_key`` forges the key id (the signature is still ``key``'s)."""
    signature = base64.b64encode(key.sign(release_bytes(release))).decode()
    return msgspec.json.encode(SignedRelease(release, signature, key_id(claimed_key or public_raw(key))))


def make_release(manifest: ModelManifest, release: int, **changes: Any) -> Release:
    """What a deployment issues for ``manifest``: for every profile the tests use, valid for an hour."""
    now = int(time.time())
    made = Release(release=release, model_version=manifest.model_version, variant=manifest.variant,
                   task=manifest.task, device_classes=["raspberry-pi-5", "coral-dev-board"], deployment_id=1,
                   issued_at=now, expires_at=now + 3600, artifact=manifest)
    return msgspec.structs.replace(made, **changes)


def make_manifest(model_version: str, variant: str, artifact: Path, **changes: Any) -> ModelManifest:
    manifest = ModelManifest(
        model_version=model_version, task="digits", variant=variant,
        file_name=f"digits-{variant}.tflite", sha256=file_sha256(artifact), size_bytes=artifact.stat().st_size,
        runtimes={"ai-edge-litert": "1.0", "tflite-runtime": "2.14"}, source=ModelSource("burst", "b-1"),
        input_scale=1 / 16, golden=golden_for(artifact), created_at="2025-01-01T00:00:00Z",
    )
    return msgspec.structs.replace(manifest, **changes)


def publish(
    server: FileServer, key: Ed25519PrivateKey, model_version: str, variant: str, *,
    artifact_bytes: bytes | None = None, manifest: ModelManifest | None = None, signed: bytes | None = None,
    source: Path | None = None, **release: Any,
) -> dict[str, Any]:
    """Put a model and its signed release on the server; returns the deploy_model args (manifest URL relative,
    artifact absolute). Each new model version gets the next release number unless ``release=`` says;
    other keyword arguments change the release (``deployment_id``, ``rollback``, ``expires_at``...)."""
    source = source or ARTIFACTS[variant]
    name = f"{model_version}-{variant}"
    (server.root / "artifacts" / f"{name}.tflite").write_bytes(
        artifact_bytes if artifact_bytes is not None else source.read_bytes()
    )
    manifest = manifest or make_manifest(model_version, variant, source)
    number = release.pop("release", None) or server.releases.get(model_version) or (
        max(server.releases.values(), default=1) + 1)
    server.releases[model_version] = number
    issued = make_release(manifest, number, **release)
    (server.root / "manifests" / f"{name}.json").write_bytes(signed or sign_release(issued, key))
    return {"model_version": model_version, "variant": variant, "deployment_id": issued.deployment_id,
            "manifest_url": f"manifests/{name}.json", "artifact_url": f"{server.url}/artifacts/{name}.tflite"}


# ------------------------------------------------------------------------------------------------- agents


# Faster than the defaults, so that retries and watchdog windows fit a test.
FAST_DOWNLOAD = DownloadPolicy(stall_timeout_s=5.0, backoff_s=0.05)
FAST_WATCHDOG = WatchdogPolicy(window_s=1.0, poll_s=0.05)

AgentFactory = Callable[..., Agent]


@pytest.fixture(name="make_agent")
def fx_make_agent(tmp_path: Path, server: FileServer, key: Ed25519PrivateKey) -> Iterator[AgentFactory]:
    """Real agents (never connected: the broker port is closed) with inference running; stopped at teardown."""
    agents: list[Agent] = []

    def make(profile: str | Profile = "raspberry-pi-5", *, signing_key: bytes | None = b"default",
             data_dir: Path | None = None, download: DownloadPolicy = FAST_DOWNLOAD,
             watchdog: WatchdogPolicy = FAST_WATCHDOG, device_id: str = "pi-ota") -> Agent:
        settings = AgentSettings(
            device_id=device_id, profile=get_profile(profile) if isinstance(profile, str) else profile,
            broker=BrokerAddress("127.0.0.1", 1), data_dir=data_dir or tmp_path / "agent",
            controlplane_url=server.url, inference_rate_hz=50.0,
            signing_key=public_raw(key) if signing_key == b"default" else signing_key,
            download=download, watchdog=watchdog,
        )
        agent = Agent(settings)
        agents.append(agent)
        agent._start_inference()
        return agent

    yield make
    for agent in agents:
        agent.models.stop(timeout=5.0)
        agent.outbox.close()


def deploy(agent: Agent, args: dict[str, Any]) -> tuple[bool, str | None, dict[str, Any]]:
    command = wire.Command(command_id=uuid.uuid4().hex, kind=wire.CommandKind.DEPLOY_MODEL, args=args)
    return _deploy.handle(agent, command)


def reported(agent: Agent) -> wire.State:
    return wire.decode(agent._state_payload(online=True), wire.State)


def pointer(agent: Agent) -> dict[str, Any] | None:
    path = agent.settings.data_dir / "models" / "current.json"
    return json.loads(path.read_bytes()) if path.exists() else None


def model_dirs(agent: Agent) -> list[str]:
    models = agent.settings.data_dir / "models"
    return sorted(p.name for p in models.iterdir() if p.is_dir()) if models.exists() else []


def partials(agent: Agent) -> list[str]:
    partial = agent.settings.data_dir / "models" / ".partial"
    return sorted(p.name for p in partial.iterdir()) if partial.exists() else []


def assert_unchanged(agent: Agent) -> None:
    """Still on the starter model: nothing installed, nothing left behind."""
    assert agent.model_version == STARTER_VERSION and agent.active_variant == "fp32"
    assert reported(agent).active_model == STARTER_VERSION
    assert agent.models.loop.model.path == str(ARTIFACTS["fp32"])
    assert pointer(agent) is None
    assert model_dirs(agent) == [".partial"]
    assert partials(agent) == []


# ------------------------------------------------------------------------------------------------- imports


def test_startup_path_imports_neither_cryptography_nor_torch(tmp_path: Path) -> None:
    # Execute: what an agent start does (the pointer lookup), in a fresh interpreter
    code = ("import sys, pathlib; from agent._active_model import resolve_startup_model; "
            f"print(resolve_startup_model(pathlib.Path({str(tmp_path)!r}), 'ai-edge-litert')); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'cryptography', 'torch', 'httpx', 'requests'}))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=60, check=False)

    # Assert
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["None", "[]"]


# ----------------------------------------------------------------------------------------------- happy path


def test_deploy_swaps_fp32_for_int8(make_agent: AgentFactory, server: FileServer,
                                    key: Ed25519PrivateKey) -> None:
    # Prepare
    agent = make_agent()
    assert (agent.model_version, agent.active_variant) == (STARTER_VERSION, "fp32")
    args = publish(server, key, "digits-2", "full-int8") | {"bearer": "s3cret"}

    # Execute
    ok, reason, result = deploy(agent, args)

    # Assert: acked with the figures
    assert (ok, reason) == (True, None), result
    assert result["previous"] == STARTER_VERSION
    assert result["self_test"]["max_abs_diff"] <= TOLERANCE and result["self_test"]["top1_agreement"] == "5/5"
    assert result["download"] == {"bytes": ARTIFACTS["full-int8"].stat().st_size, "resumed_from": 0,
                                  "requests": 1}
    # the manifest was fetched (relative URL) before the artifact, both with the bearer token
    assert [hit.path for hit in server.hits] == ["manifests/digits-2-full-int8.json",
                                                 "artifacts/digits-2-full-int8.tflite"]
    assert {hit.authorization for hit in server.hits} == {"Bearer s3cret"}
    # on disk: the model directory and the pointer
    models = agent.settings.data_dir / "models"
    assert pointer(agent) == {
        "model_version": "digits-2", "variant": "full-int8", "path": "digits-2-full-int8/model.tflite",
        "sha256": file_sha256(ARTIFACTS["full-int8"]),
        "previous": {"model_version": STARTER_VERSION, "variant": "fp32", "path": None, "sha256": None},
        "activated_at": pytest.approx(pointer(agent)["activated_at"]),  # type: ignore[index]
    }
    assert (models / "digits-2-full-int8" / "model.tflite").read_bytes() == ARTIFACTS["full-int8"].read_bytes()
    assert (models / "digits-2-full-int8" / "manifest.json").read_bytes() == (
        server.root / "manifests" / "digits-2-full-int8.json").read_bytes()
    assert model_dirs(agent) == [".partial", "digits-2-full-int8"] and partials(agent) == []
    # in memory: the agent, its reported state and the inference loop run the int8 model
    assert (agent.model_version, agent.active_variant) == ("digits-2", "full-int8")
    state = reported(agent)
    assert (state.active_model, state.active_variant) == ("digits-2", "full-int8")
    loop = agent.models.loop
    assert loop.model_version == "digits-2"
    assert loop.model.input_dtype == np.int8
    before = loop.stats.count
    wait_for(lambda: loop.stats.count >= before + 5, timeout=10, what="inferences on the new model")
    # the watchdog window passes: the bare model runs on
    wait_for(lambda: type(loop.model) is TFLiteModel, timeout=10, what="watchdog done")
    assert loop.model.path == str(models / "digits-2-full-int8" / "model.tflite")


def test_redeploying_the_active_model_is_a_no_op(make_agent: AgentFactory, server: FileServer,
                                                 key: Ed25519PrivateKey) -> None:
    # Prepare
    agent = make_agent()
    args = publish(server, key, "digits-2", "full-int8")
    assert deploy(agent, args)[0]
    hits = len(server.hits)

    # Execute
    ok, reason, result = deploy(agent, args)

    # Assert
    assert (ok, reason) == (True, None)
    assert result["already_active"] is True and "already active" in result["message"]
    assert len(server.hits) == hits


def test_keeps_one_previous_model_and_restarts_on_the_current_one(
    make_agent: AgentFactory, server: FileServer, key: Ed25519PrivateKey
) -> None:
    # Prepare
    agent = make_agent()

    # Execute
    for version, variant in (("digits-2", "full-int8"), ("digits-3", "fp32"), ("digits-4", "full-int8")):
        ok, reason, _ = deploy(agent, publish(server, key, version, variant))
        assert ok, reason
    agent.models.stop(timeout=5.0)
    restarted = make_agent(data_dir=agent.settings.data_dir)

    # Assert
    assert model_dirs(agent) == [".partial", "digits-3-fp32", "digits-4-full-int8"]
    assert pointer(agent)["previous"]["model_version"] == "digits-3"  # type: ignore[index]
    assert (restarted.model_version, restarted.active_variant) == ("digits-4", "full-int8")
    assert restarted.models.loop.model.path == str(
        agent.settings.data_dir / "models" / "digits-4-full-int8" / "model.tflite")
    assert (reported(restarted).active_model, reported(restarted).active_variant) == ("digits-4", "full-int8")


# --------------------------------------------------------------------------------------------------- download


def test_interrupted_download_resumes_with_range(make_agent: AgentFactory, server: FileServer,
                                                 key: Ed25519PrivateKey) -> None:
    # Prepare: the server drops the connection halfway through the first artifact request
    agent = make_agent()
    args = publish(server, key, "digits-2", "full-int8")
    server.faults["artifacts/digits-2-full-int8.tflite"] = "drop-once"
    size = ARTIFACTS["full-int8"].stat().st_size

    # Execute
    ok, reason, result = deploy(agent, args)

    # Assert
    assert (ok, reason) == (True, None), result
    hits = server.hits_for("artifacts/")
    assert len(hits) == 2
    assert hits[0].range is None
    assert hits[1].range == f"bytes={size // 2}-"
    assert result["download"]["requests"] == 2
    assert agent.model_version == "digits-2"
    assert file_sha256(agent.settings.data_dir / "models" / "digits-2-full-int8" / "model.tflite") == \
        file_sha256(ARTIFACTS["full-int8"])


def test_failed_download_is_resumed_by_the_next_deployment(
    make_agent: AgentFactory, server: FileServer, key: Ed25519PrivateKey
) -> None:
    # Prepare: the connection drops halfway, then the server answers 503 until it is repaired
    agent = make_agent(download=DownloadPolicy(attempts=2, backoff_s=0.01))
    args = publish(server, key, "digits-2", "full-int8")
    name = "artifacts/digits-2-full-int8.tflite"
    server.faults[name] = "drop-then-503"
    size = ARTIFACTS["full-int8"].stat().st_size

    # Execute
    first = deploy(agent, args)
    kept = partials(agent)
    del server.faults[name]
    second = deploy(agent, args)

    # Assert
    assert first[0] is False and first[2]["stage"] == "download"
    assert f"({size // 2}/{size} bytes received, resumable): HTTP 503" in (first[1] or "")
    assert first[2]["active_model"] == STARTER_VERSION
    assert len(kept) == 1
    assert second[:2] == (True, None)
    assert second[2]["download"]["resumed_from"] == size // 2
    assert [hit.range for hit in server.hits_for("artifacts/")] == [None] + [f"bytes={size // 2}-"] * 3
    assert partials(agent) == []


def test_stalled_download_fails_with_a_reason(
    make_agent: AgentFactory, server: FileServer, key: Ed25519PrivateKey
) -> None:
    # Prepare: the server sends headers and then nothing
    agent = make_agent(download=DownloadPolicy(stall_timeout_s=0.3, attempts=2, backoff_s=0.01))
    args = publish(server, key, "digits-2", "full-int8")
    server.faults["artifacts/digits-2-full-int8.tflite"] = "stall"

    # Execute
    ok, reason, result = deploy(agent, args)

    # Assert
    assert ok is False and result["stage"] == "download"
    assert "stalled: no data for 0.3 s" in (reason or "")
    assert len(server.hits_for("artifacts/")) == 2
    assert agent.model_version == STARTER_VERSION and pointer(agent) is None


def test_a_withdrawn_download_acks_the_control_planes_reason(
    make_agent: AgentFactory, server: FileServer, key: Ed25519PrivateKey
) -> None:
    # Prepare: the deployment was cancelled after the command was queued: the control plane refuses the token
    agent = make_agent(download=DownloadPolicy(attempts=2, backoff_s=0.01))
    args = publish(server, key, "digits-2", "full-int8")
    why = "deployment 4's command to pi-1 was cancelled (by an operator): its download token is withdrawn\x1b[31m"
    server.faults["artifacts/digits-2-full-int8.tflite"] = f"401 {why}"

    # Execute
    ok, reason, result = deploy(agent, args)

    # Assert: refused at once (not retried), the reason says why, control characters dropped
    assert ok is False and result["stage"] == "download"
    assert reason is not None and reason.endswith(
        ": deployment 4's command to pi-1 was cancelled (by an operator): its download token is withdrawn[31m")
    assert "HTTP 401" in reason
    assert len(server.hits_for("artifacts/")) == 1
    assert agent.model_version == STARTER_VERSION


# ------------------------------------------------------------------------------------------------ rejections


def test_tampered_artifact_is_rejected(make_agent: AgentFactory, server: FileServer,
                                       key: Ed25519PrivateKey) -> None:
    # Prepare: one byte flipped after the manifest was signed
    agent = make_agent()
    tampered = bytearray(ARTIFACTS["full-int8"].read_bytes())
    tampered[len(tampered) // 2] ^= 0x01
    args = publish(server, key, "digits-2", "full-int8", artifact_bytes=bytes(tampered))

    # Execute
    ok, reason, result = deploy(agent, args)

    # Assert
    assert ok is False and result["stage"] == "verify"
    assert "artifact rejected" in (reason or "") and "sha256" in (reason or "")
    assert result["active_model"] == STARTER_VERSION
    assert_unchanged(agent)


@pytest.mark.parametrize("forgery", ["other key", "forged key id"])
def test_bad_signature_is_rejected_before_the_artifact_is_downloaded(
    forgery: str, make_agent: AgentFactory, server: FileServer, key: Ed25519PrivateKey
) -> None:
    # Prepare: the manifest is signed by another key (claiming its own key id, or the trusted one)
    agent = make_agent()
    manifest = make_release(make_manifest("digits-2", "full-int8", ARTIFACTS["full-int8"]), 2)
    other = Ed25519PrivateKey.generate()
    signed = sign_release(manifest, other, claimed_key=public_raw(key) if forgery == "forged key id" else None)
    args = publish(server, key, "digits-2", "full-int8", signed=signed)

    # Execute
    ok, reason, result = deploy(agent, args)

    # Assert
    assert ok is False and result["stage"] == "signature"
    assert "manifest signature rejected" in (reason or "")
    expected = "bad signature" if forgery == "forged key id" else f"this device trusts {key_id(public_raw(key))}"
    assert expected in (reason or "")
    assert server.hits_for("artifacts/") == []
    assert_unchanged(agent)


def test_golden_mismatch_fails_the_self_test(make_agent: AgentFactory, server: FileServer,
                                             key: Ed25519PrivateKey) -> None:
    # Prepare: a correctly signed manifest whose golden output is wrong
    agent = make_agent()
    manifest = make_manifest("digits-2", "full-int8", ARTIFACTS["full-int8"])
    output = [row[:] for row in manifest.golden.output]
    output[1][3] += 0.5
    manifest = msgspec.structs.replace(manifest, golden=msgspec.structs.replace(manifest.golden, output=output))
    args = publish(server, key, "digits-2", "full-int8", manifest=manifest)

    # Execute
    ok, reason, result = deploy(agent, args)

    # Assert
    assert ok is False and result["stage"] == "self-test"
    assert "self-test" in (reason or "")
    assert "max |output - golden| = 0.5 > tolerance 0.001 (sample 1, class 3" in (reason or "")
    assert_unchanged(agent)


@pytest.mark.parametrize(
    ("case", "expected", "fetches_manifest"),
    [
        ("variant not in profile", "variant fp32 is not allowed on profile coral-dev-board", False),
        ("no signing key", "no model signing key is configured", False),
        ("runtime cannot run variant", "not supported on tflite-runtime 2.14.0", False),
        ("runtime not in manifest", "the model is built for tflite-runtime runtime(s)", True),
        ("runtime too old", "the model needs ai-edge-litert >= 99.0", True),
        ("artifact too large", "profile raspberry-pi-5 allows at most 1000", True),
    ],
)
def test_incompatible_deployments_are_refused_early(
    case: str, expected: str, fetches_manifest: bool, make_agent: AgentFactory, server: FileServer,
    key: Ed25519PrivateKey,
) -> None:
    # Prepare
    variant, source = "full-int8", ARTIFACTS["full-int8"]
    runtimes = {"ai-edge-litert": "1.0"}
    if case == "variant not in profile":
        agent, variant, source = make_agent("coral-dev-board"), "fp32", ARTIFACTS["fp32"]
    elif case == "no signing key":
        agent = make_agent(signing_key=None)
    elif case == "runtime cannot run variant":  # e.g. a device image that fell back to tflite-runtime 2.14
        agent, variant = make_agent(), "dynamic-int8"
        agent.models.runtime_name, agent.models.runtime_version = "tflite-runtime", "2.14.0"
    elif case == "artifact too large":
        agent = make_agent(msgspec.structs.replace(get_profile("raspberry-pi-5"), max_model_bytes=1000))
    else:
        agent = make_agent()
        runtimes = {"tflite-runtime": "2.14"} if case == "runtime not in manifest" else {"ai-edge-litert": "99.0"}
    manifest = make_manifest("digits-2", variant, source, runtimes=runtimes)
    args = publish(server, key, "digits-2", variant, manifest=manifest, source=source)
    before = (agent.model_version, agent.active_variant)

    # Execute
    ok, reason, result = deploy(agent, args)

    # Assert
    assert ok is False
    assert expected in (reason or ""), reason
    assert result["stage"] in ("request", "compatibility")
    assert [hit.path for hit in server.hits] == (["manifests/digits-2-" + variant + ".json"] if fetches_manifest
                                                 else [])
    assert (agent.model_version, agent.active_variant) == before
    assert pointer(agent) is None


def test_malformed_commands_are_refused(make_agent: AgentFactory) -> None:
    # Prepare
    agent = make_agent()
    good = {"model_version": "digits-2", "variant": "fp32", "deployment_id": 1, "manifest_url": "m.json",
            "artifact_url": "a.tflite"}

    # Execute
    outcomes = {
        "version": deploy(agent, good | {"model_version": "../../etc"}),
        "variant": deploy(agent, good | {"variant": "int4"}),
        "scheme": deploy(agent, good | {"artifact_url": "file:///etc/passwd"}),
        "missing": deploy(agent, {k: v for k, v in good.items() if k != "manifest_url"}),
    }

    # Assert
    assert all(ok is False for ok, _, _ in outcomes.values())
    assert "model_version must be" in (outcomes["version"][1] or "")
    assert "unknown variant 'int4'" in (outcomes["variant"][1] or "")
    assert "only http:// and https://" in (outcomes["scheme"][1] or "")
    assert "manifest_url is required" in (outcomes["missing"][1] or "")


# ------------------------------------------------------------------------------------ replay and downgrade


@pytest.fixture(name="other_server")
def fx_other_server(tmp_path: Path) -> Iterator[FileServer]:
    """Any other HTTP server (an attacker's, or a stale mirror): same files, another origin."""
    with _file_server(tmp_path / "elsewhere") as server:
        yield server


def assert_still_on(agent: Agent, version: str, variant: str) -> None:
    assert (agent.model_version, agent.active_variant) == (version, variant)
    assert reported(agent).active_model == version
    current = pointer(agent)
    assert current is not None and (current["model_version"], current["variant"]) == (version, variant)


def test_an_older_signed_release_from_any_server_does_not_roll_a_device_back(
    make_agent: AgentFactory, server: FileServer, other_server: FileServer, key: Ed25519PrivateKey
) -> None:
    # Prepare: the device runs release 3; release 2 (validly signed by the same key) is kept elsewhere
    agent = make_agent()
    ok, reason, _ = deploy(agent, publish(server, key, "digits-3", "full-int8", release=3))
    assert ok, reason
    older = publish(other_server, key, "digits-2", "fp32", release=2)
    older_here = publish(server, key, "digits-2", "fp32", release=2)

    # Execute: named in a deploy_model command, from the other server, then from the control plane itself
    from_elsewhere = deploy(agent, older | {"manifest_url": f"{other_server.url}/{older['manifest_url']}"})
    from_home = deploy(agent, older_here)

    # Assert: both refused with the reason, the newer model kept, nothing fetched from the other server
    assert from_elsewhere[0] is False and from_elsewhere[2]["stage"] == "request"
    assert f"{other_server.url}/manifests/digits-2-fp32.json" in (from_elsewhere[1] or "")
    assert f"not on the control plane this device was enrolled with ({server.url})" in (from_elsewhere[1] or "")
    assert other_server.hits == []
    assert from_home[0] is False and from_home[2]["stage"] == "release"
    assert ("release 2 (digits-2 fp32) is not newer than this device's release 3 (digits-3 full-int8); only a "
            "deployment signed as a rollback may go back") in (from_home[1] or "")
    assert server.hits_for("artifacts/digits-2") == []
    assert_still_on(agent, "digits-3", "full-int8")


def test_the_release_survives_a_restart(make_agent: AgentFactory, server: FileServer,
                                        key: Ed25519PrivateKey) -> None:
    # Prepare: release 3 installed, then the watchdog-free path: the device restarts on the same data dir
    agent = make_agent()
    assert deploy(agent, publish(server, key, "digits-3", "full-int8", release=3))[0]
    older = publish(server, key, "digits-2", "fp32", release=2)
    agent.models.stop(timeout=5.0)
    restarted = make_agent(data_dir=agent.settings.data_dir)

    # Execute
    ok, reason, _ = deploy(restarted, older)

    # Assert
    assert ok is False and "is not newer than this device's release 3" in (reason or "")
    assert json.loads((agent.settings.data_dir / "models" / "release.json").read_bytes())["release"] == 3


def test_an_explicit_rollback_goes_back_once_and_cannot_be_replayed_later(
    make_agent: AgentFactory, server: FileServer, key: Ed25519PrivateKey
) -> None:
    # Prepare: release 3 active; an operator's rollback to release 2, signed when 3 was the newest
    agent = make_agent()
    assert deploy(agent, publish(server, key, "digits-3", "full-int8", release=3))[0]
    rollback = publish(server, key, "digits-2", "fp32", release=2, deployment_id=7, rollback=True,
                       rollback_from=3)

    # Execute: the rollback, then release 4, then the same rollback replayed
    rolled = deploy(agent, rollback)
    newer = deploy(agent, publish(server, key, "digits-4", "full-int8", release=4, deployment_id=8))
    replayed = deploy(agent, rollback)

    # Assert
    assert rolled[0] is True and rolled[2]["rollback"] is True and rolled[2]["release"] == 2, rolled
    assert newer[0] is True, newer
    assert replayed[0] is False and replayed[2]["stage"] == "release"
    assert ("the rollback to release 2 was signed when release 3 was the newest; this device has release 4 "
            "(digits-4 full-int8)") in (replayed[1] or "")
    assert_still_on(agent, "digits-4", "full-int8")


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("other device class", "the release is for device classes coral-dev-board, this device is raspberry-pi-5"),
        ("other task", "the release is a 'keywords' model, this device runs task 'digits'"),
        ("other deployment", "the release belongs to deployment 5, the command to deployment 6"),
        ("expired", "clock skew allowed 300 s"),
        ("issued in the future", "s in the future"),
        ("build manifest", "a build manifest, not a release"),
        ("same release, another artifact", "release 3 (digits-3 fp32) is not newer than this device's release 3"),
    ],
)
def test_releases_not_meant_for_this_device_now_are_refused(
    case: str, expected: str, make_agent: AgentFactory, server: FileServer, key: Ed25519PrivateKey
) -> None:
    # Prepare: release 3 (full-int8) is active; each case is a validly signed document this device must refuse
    agent = make_agent()
    assert deploy(agent, publish(server, key, "digits-3", "full-int8", release=3))[0]
    now = int(time.time())
    fp32 = make_manifest("digits-4", "fp32", ARTIFACTS["fp32"])
    if case == "other device class":
        args = publish(server, key, "digits-4", "fp32", device_classes=["coral-dev-board"])
    elif case == "other task":
        fp32 = msgspec.structs.replace(fp32, task="keywords")
        args = publish(server, key, "digits-4", "fp32", manifest=fp32, task="keywords")
    elif case == "other deployment":
        args = publish(server, key, "digits-4", "fp32", deployment_id=5) | {"deployment_id": 6}
    elif case == "expired":  # beyond the clock skew allowed (300 s)
        args = publish(server, key, "digits-4", "fp32", issued_at=now - 4000, expires_at=now - 400)
    elif case == "issued in the future":
        args = publish(server, key, "digits-4", "fp32", issued_at=now + 3600, expires_at=now + 7200)
    elif case == "build manifest":
        args = publish(server, key, "digits-4", "fp32", signed=sign(fp32, key))
    else:
        args = publish(server, key, "digits-3", "fp32")

    # Execute
    ok, reason, result = deploy(agent, args)

    # Assert: acked as an error with the reason, the artifact never fetched, the model kept
    assert ok is False and expected in (reason or ""), reason
    assert result["stage"] in ("release", "manifest")
    assert [hit.path for hit in server.hits_for("artifacts/") if "digits-3-full" not in hit.path] == []
    assert_still_on(agent, "digits-3", "full-int8")


def test_downloads_stay_on_the_control_plane(make_agent: AgentFactory, server: FileServer,
                                             other_server: FileServer, key: Ed25519PrivateKey) -> None:
    # Prepare: the control plane's artifact URL redirects to another server that has the same file
    agent = make_agent()
    args = publish(server, key, "digits-2", "full-int8")
    publish(other_server, key, "digits-2", "full-int8")
    server.faults["artifacts/digits-2-full-int8.tflite"] = (
        f"redirect {other_server.url}/artifacts/digits-2-full-int8.tflite")
    no_home = make_agent(data_dir=agent.settings.data_dir.parent / "no-home")
    no_home.settings.controlplane_url = None

    # Execute
    redirected = deploy(agent, args)
    absolute_elsewhere = deploy(agent, args | {"artifact_url": f"{other_server.url}/artifacts/x.tflite"})
    unconfigured = deploy(no_home, args)

    # Assert
    assert redirected[0] is False and "redirects to " + other_server.url in (redirected[1] or "")
    assert "off the control plane: refused" in (redirected[1] or "")
    assert absolute_elsewhere[0] is False and "is not on the control plane" in (absolute_elsewhere[1] or "")
    assert unconfigured[0] is False and "no control plane URL is configured" in (unconfigured[1] or "")
    assert other_server.hits == []
    assert_unchanged(agent)


# ------------------------------------------------------------------------------------------------- rollback


def test_model_failing_at_runtime_is_rolled_back(
    make_agent: AgentFactory, server: FileServer, key: Ed25519PrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the new model passes its self-test, then every inference on it fails
    agent = make_agent(watchdog=WatchdogPolicy(window_s=10.0, min_inferences=5, poll_s=0.05))
    starter = agent.models.loop.model
    broken = threading.Event()
    predict = TFLiteModel.predict

    def failing(self: TFLiteModel, x: npt.ArrayLike) -> npt.NDArray[np.float32]:
        if broken.is_set() and "digits-2-full-int8" in self.path:
            raise RuntimeError("delegate failed")
        return predict(self, x)

    monkeypatch.setattr(TFLiteModel, "predict", failing)
    ok, reason, _ = deploy(agent, publish(server, key, "digits-2", "full-int8"))
    assert ok, reason

    # Execute
    broken.set()
    wait_for(lambda: agent.model_version == STARTER_VERSION, timeout=15, what="rollback to the starter")

    # Assert
    loop = agent.models.loop
    assert loop.model is starter and loop.model_version == STARTER_VERSION
    assert (reported(agent).active_model, reported(agent).active_variant) == (STARTER_VERSION, "fp32")
    assert pointer(agent) is None  # the starter needs no pointer
    assert model_dirs(agent) == [".partial"]
    before = loop.stats.count
    wait_for(lambda: loop.stats.count >= before + 5, timeout=10, what="inferences on the restored model")
    # the device's release stays where it was: a local rollback does not reopen older releases
    release = json.loads((agent.settings.data_dir / "models" / "release.json").read_bytes())
    assert (release["release"], release["model_version"]) == (server.releases["digits-2"], "digits-2")


def test_rollback_restores_the_previous_installed_model(
    make_agent: AgentFactory, server: FileServer, key: Ed25519PrivateKey
) -> None:
    # Prepare: two deployments, the watchdog window of the second one over
    agent = make_agent()
    for version, variant in (("digits-2", "full-int8"), ("digits-3", "fp32")):
        ok, reason, _ = deploy(agent, publish(server, key, version, variant))
        assert ok, reason
    wait_for(lambda: type(agent.models.loop.model) is TFLiteModel, timeout=10, what="watchdog done")

    # Execute
    first = agent.models.rollback()
    second = agent.models.rollback()

    # Assert
    assert (first, second) == (True, False)
    assert (agent.model_version, agent.active_variant) == ("digits-2", "full-int8")
    assert agent.models.loop.model_version == "digits-2" and agent.models.loop.model.input_dtype == np.int8
    assert reported(agent).active_model == "digits-2"
    current = pointer(agent)
    assert current is not None and current["model_version"] == "digits-2" and current["previous"] is None
    assert model_dirs(agent) == [".partial", "digits-2-full-int8"]


# ---------------------------------------------------------------------------------------- one agent per agent


def acks(agent: Agent) -> dict[str, wire.Ack]:
    """The acks an agent has queued for the control plane, by command id."""
    topic = wire.topic(agent.device_id, wire.Channel.ACK)
    found = (wire.decode(entry.payload, wire.Ack) for entry in agent.outbox.peek(1000) if entry.topic == topic)
    return {ack.command_id: ack for ack in found}


def test_two_agents_in_one_process_share_no_model_or_round_state(
    make_agent: AgentFactory, server: FileServer, key: Ed25519PrivateKey, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: two agents side by side, each with its own data directory
    monkeypatch.setattr(_deploy, "_LOCK_WAIT_S", 0.5)  # how long a deployment waits for one in progress
    first = make_agent(device_id="pi-one", data_dir=tmp_path / "one")
    second = make_agent(device_id="pi-two", data_dir=tmp_path / "two")
    args = publish(server, key, "digits-2", "full-int8")
    leave = wire.Command(command_id="leave-r7", kind=wire.CommandKind.JOIN_ROUND,
                         args={"round_id": "r7", "leave": True})
    message = mqtt.MQTTMessage(topic=wire.topic(first.device_id, wire.Channel.CMD).encode())
    message.payload = wire.encode(leave)

    # Execute: the first agent is busy with a deployment (its lock held) while the second deploys; the end of a
    # round reaches the first agent through its command registry
    with first.models.lock:
        deployed = deploy(second, args)
        busy = deploy(first, args)
    first._on_message(None, None, message)  # type: ignore[arg-type]
    wait_for(lambda: "leave-r7" in acks(first), timeout=10, what="the leave's ack")
    rolled_back = (first.models.rollback(), second.models.rollback())

    # Assert: the second agent deployed and rolled back on its own; the first was refused only by its own lock
    assert deployed[:2] == (True, None), deployed
    assert busy[:2] == (False, "another model deployment is in progress")
    assert rolled_back == (False, True)
    assert (first.model_version, first.active_variant) == (STARTER_VERSION, "fp32")
    assert first.models.loop is not None and first.models.loop.model.path == str(ARTIFACTS["fp32"])
    assert pointer(first) is None and model_dirs(first) == []
    assert (second.model_version, second.active_variant) == (STARTER_VERSION, "fp32")
    assert json.loads((tmp_path / "two" / "models" / "release.json").read_bytes())["model_version"] == "digits-2"
    assert not (tmp_path / "one" / "models" / "release.json").exists()
    # rounds: the first agent recorded the ended round, the second knows nothing of it
    ack = acks(first)["leave-r7"]
    assert (ack.ok, ack.result) == (True, {"round_id": "r7", "left": False})
    assert first.rounds.was_ended("r7") and not second.rounds.was_ended("r7")
    assert first.rounds is not second.rounds and first.models is not second.models
    assert acks(second) == {}


# ---------------------------------------------------------------------------------------------- crash safety


def test_startup_falls_back_when_the_current_model_is_damaged(
    make_agent: AgentFactory, server: FileServer, key: Ed25519PrivateKey
) -> None:
    # Prepare
    agent = make_agent()
    for version, variant in (("digits-2", "full-int8"), ("digits-3", "fp32")):
        ok, reason, _ = deploy(agent, publish(server, key, version, variant))
        assert ok, reason
    agent.models.stop(timeout=5.0)
    data_dir, models = agent.settings.data_dir, agent.settings.data_dir / "models"
    current_file = models / "digits-3-fp32" / "model.tflite"

    # Execute / Assert: intact
    assert resolve_startup_model(data_dir, "ai-edge-litert") == (current_file, "digits-3", "fp32")
    # the current model corrupted (one byte): the previous one
    damaged = bytearray(current_file.read_bytes())
    damaged[100] ^= 0xFF
    current_file.write_bytes(bytes(damaged))
    assert resolve_startup_model(data_dir, "ai-edge-litert") == (
        models / "digits-2-full-int8" / "model.tflite", "digits-2", "full-int8")
    restarted = make_agent(data_dir=data_dir)
    assert (restarted.model_version, restarted.active_variant) == ("digits-2", "full-int8")
    # the previous one missing too: the starter
    shutil.rmtree(models / "digits-2-full-int8")
    assert resolve_startup_model(data_dir, "ai-edge-litert") is None
    # a garbled pointer: the starter
    (models / "current.json").write_text("{not json")
    assert resolve_startup_model(data_dir, "ai-edge-litert") is None


class _Killed(BaseException):
    """Stands in for kill -9: nothing after it runs (BaseException, so no handler catches it)."""


def test_crash_between_model_dir_and_pointer_keeps_the_old_model(
    make_agent: AgentFactory, server: FileServer, key: Ed25519PrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    agent = make_agent()
    ok, reason, _ = deploy(agent, publish(server, key, "digits-2", "full-int8"))
    assert ok, reason
    args = publish(server, key, "digits-3", "fp32")

    def killed(*args: Any) -> None:
        raise _Killed

    # Execute: the process "dies" once the new model directory is in place, before the pointer is replaced
    with monkeypatch.context() as patch:
        patch.setattr(ModelStore, "write_pointer", killed)
        with pytest.raises(_Killed):
            deploy(agent, args)
    on_disk = model_dirs(agent)
    resolved = resolve_startup_model(agent.settings.data_dir, "ai-edge-litert")
    retried = deploy(agent, args)

    # Assert
    assert "digits-3-fp32" in on_disk
    assert resolved is not None and resolved[1:] == ("digits-2", "full-int8")
    assert retried[:2] == (True, None)
    assert resolve_startup_model(agent.settings.data_dir, "ai-edge-litert")[1:] == (  # type: ignore[index]
        "digits-3", "fp32")


_COMMIT_LOOP = """
import json, shutil, sys
from pathlib import Path
from agent._model_store import ModelStore
from agent.manifest import decode_signed

models, specs = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
(models / ".partial").mkdir(parents=True, exist_ok=True)
print("ready", flush=True)
previous = None
for i in range(10**9):
    spec = specs[i % len(specs)]
    raw = Path(spec["manifest"]).read_bytes()
    partial = models / ".partial" / "artifact.tflite"
    shutil.copyfile(spec["artifact"], partial)
    previous = ModelStore(models).commit(partial, raw, decode_signed(raw).manifest, previous)
"""


@pytest.mark.slow
def test_kill_9_at_random_points_always_leaves_a_verified_model(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    # Prepare: four versions installed round and round by a subprocess that is killed at random moments
    specs, expected = [], {}
    for i, variant in enumerate(["fp32", "full-int8", "fp32", "full-int8"]):
        manifest = make_manifest(f"v{i}", variant, ARTIFACTS[variant])
        path = tmp_path / f"v{i}.json"
        path.write_bytes(sign(manifest, key))
        specs.append({"manifest": str(path), "artifact": str(ARTIFACTS[variant])})
        expected[f"v{i}"] = (variant, manifest.sha256)
    (tmp_path / "specs.json").write_text(json.dumps(specs))
    data_dir = tmp_path / "agent"
    rng = random.Random(1234)
    seen: set[str] = set()

    for _ in range(10):
        # Execute
        process = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(_COMMIT_LOOP), str(data_dir / "models"),
             str(tmp_path / "specs.json")],
            cwd=REPO_ROOT, stdout=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)),
        )
        try:
            assert process.stdout is not None and process.stdout.readline() == b"ready\n"
            threading.Event().wait(rng.uniform(0.0, 0.3))
            process.send_signal(signal.SIGKILL)
        finally:
            process.kill()
            process.wait(10)
        resolved = resolve_startup_model(data_dir, "ai-edge-litert")

        # Assert: the pointer names complete, verified files, current and previous
        pointer_file = data_dir / "models" / "current.json"
        if not pointer_file.exists():  # killed before the first install completed
            assert resolved is None and not seen
            continue
        current = json.loads(pointer_file.read_bytes())
        for entry in (current, current["previous"]):
            if entry is None:
                continue
            variant, sha = expected[entry["model_version"]]
            assert (entry["variant"], entry["sha256"]) == (variant, sha)
            model_dir = data_dir / "models" / Path(entry["path"]).parent
            assert file_sha256(model_dir / "model.tflite") == sha
            assert json.loads((model_dir / "manifest.json").read_bytes())["manifest"]["sha256"] == sha
        assert resolved is not None
        assert resolved == (data_dir / "models" / current["path"], current["model_version"], current["variant"])
        seen.add(current["model_version"])
    assert len(seen) > 1, "the kills should land at different points of the install loop"
