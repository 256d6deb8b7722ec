"""Wiring only: builds the long-lived parts of a running control plane (database, broker link, ingest workers,
services) and connects them; what each part does lives in its own package.

`create_app()` starts and stops a `Fleet` in the app's lifespan; the demo and tests use it directly too.
"""

from __future__ import annotations

import secrets
import socket
from dataclasses import dataclass, field, replace
from typing import Any

import structlog
from sqlalchemy import Engine

from agent.mqtt import BrokerAddress, MqttProtocol, parse_broker_url
from controlplane._errors import BrokerUnavailable
from controlplane._private import private_dir
from controlplane.broker import (
    BrokerAuth,
    EmbeddedBroker,
    EmbeddedBrokerAuth,
    MosquittoDynsecAuth,
    NoBrokerAuth,
    client_id_secret,
)
from controlplane.burst.backends import Backend, LocalBackend, RayBackend
from controlplane.burst.service import JobService
from controlplane.db import create_db_engine, migrate
from controlplane.deployments import DeploymentService
from controlplane.devices import CommandPublisher, DeviceService
from controlplane.ingest import IngestWorker
from controlplane.models import ModelService
from controlplane.pipeline import ModelPipeline
from controlplane.pki import FleetPKI, default_server_names
from controlplane.rounds.runner import FlowerRoundRunner
from controlplane.rounds.schemas import RoundCreate
from controlplane.rounds.service import RoundService
from controlplane.schedules import ScheduleService
from controlplane.settings import BrokerAuthMode, Settings, is_loopback
from federated.signing import Signer

__all__ = ["Fleet"]

log = structlog.get_logger("edgefleet.controlplane")

SERVICE_USERNAME = "edgefleet-controlplane"


@dataclass
class Fleet:
    settings: Settings
    engine: Engine = field(init=False)
    broker: BrokerAddress = field(init=False)
    device_broker_url: str = field(init=False)
    embedded: EmbeddedBroker | None = None
    broker_auth: BrokerAuth = field(default_factory=NoBrokerAuth)
    publisher: CommandPublisher | None = None
    workers: list[IngestWorker] = field(default_factory=list)
    devices: DeviceService = field(init=False)
    models: ModelService = field(init=False)
    signer: Signer = field(init=False)
    rounds: RoundService = field(init=False)
    schedules: ScheduleService = field(init=False)
    pipeline: ModelPipeline = field(init=False)
    runner: FlowerRoundRunner | None = field(init=False, default=None)
    jobs: JobService = field(init=False)
    deployments: DeploymentService = field(init=False)
    pki: FleetPKI = field(init=False)
    _stopped: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self.settings = self.settings.resolved()
        assert self.settings.database_url is not None
        private_dir(self.settings.data_dir)
        self.engine = create_db_engine(self.settings.database_url)
        settings = self.settings
        # The fleet CA exists from the first start, TLS or not: enrolment hands its certificate to devices.
        # Loopback names always: the control plane's own clients reach its listeners over loopback.
        names = [*settings.tls_names, "localhost", "127.0.0.1"] if settings.tls_names \
            else default_server_names(settings.host)
        self.pki = FleetPKI(settings.data_dir / "pki", server_names=names,
                            cert_file=settings.tls_cert_file, key_file=settings.tls_key_file,
                            ca_file=settings.tls_ca_file, ca_key_file=settings.tls_ca_key_file)

    def start(self, *, ingest: bool = True) -> Fleet:
        try:
            self.settings.tls_enabled  # noqa: B018 - raises for --tls off beyond loopback, before anything starts
            self.pki.ensure()
            migrate(self.engine)
            self._start_broker()
            protocol = self.broker.protocol
            self.publisher = CommandPublisher(self.broker, protocol)
            self.publisher.start()
            if ingest:
                shared = self.settings.ingest_shared
                if shared is None:
                    shared = self.settings.ingest_workers > 1
                # Unguessable (a client id names a session anyone could resume or wipe) and stable across
                # restarts (the persistent sessions).
                secret = client_id_secret(self.settings.data_dir)
                for index in range(self.settings.ingest_workers):
                    worker = IngestWorker(
                        self.engine, self.broker,
                        name=f"edgefleet-ingest-{self.settings.instance_name}-{index}",
                        client_id=f"edgefleet-ingest-{self.settings.instance_name}-{secret}-{index}",
                        shared=shared and self.embedded is None, group=self.settings.ingest_group, protocol=protocol,
                        session_expiry_s=self.settings.ingest_session_expiry_s,
                        batch_max=self.settings.ingest_batch_max, batch_wait_s=self.settings.ingest_batch_wait_s,
                    )
                    worker.start()
                    self.workers.append(worker)
        except BaseException:
            self.stop()
            raise
        self.signer = Signer(self.settings.data_dir / "keys")
        signer = self.signer
        log.info("signing_key.ready", key_id=signer.key_id)  # created here on first start, not at first enrolment
        self.devices = DeviceService(self.engine, self.broker_auth, self.device_broker_url, self.publisher,
                                     lambda: signer.public_key_b64)
        self.models = ModelService(self.engine, self.settings.data_dir / "models")
        self.deployments = DeploymentService(self.engine, self.models, self.publisher, self.signer)
        self.deployments.start()
        self.pipeline = ModelPipeline(self.engine, self.models, self.deployments, self.signer,
                                      self.settings.data_dir / "builds")
        self.runner = self._round_runner() if _installed("flwr") else None
        if self.runner is not None:  # a deleted device's SuperNode key is withdrawn (read from its row first)
            self.devices.before_delete.append(self.runner.unregister)
        backends: dict[str, Backend] = {"local": LocalBackend()}
        if _installed("ray"):
            backends["burst"] = RayBackend(self.settings.data_dir / "ray", address=self.settings.ray_address)
        self.jobs = JobService(self.engine, self.settings.data_dir / "jobs", backends, self.models, self.pipeline)
        self.jobs.start()
        self.rounds = RoundService(self.engine, runner=self.runner, pipeline=self.pipeline, jobs=self.jobs)
        self.rounds.recover()
        self.schedules = ScheduleService(self.engine, on_fire=self._on_schedule, validate=self.rounds.validate)
        if self.settings.run_scheduler:
            self.schedules.start()
        log.info("controlplane.started", broker=self.broker.url, database=_safe_db_url(self.settings.database_url),
                 embedded_broker=self.embedded is not None)
        return self

    def _start_broker(self) -> None:
        settings = self.settings
        tls = settings.tls_enabled
        if settings.broker_url is None:
            auth = EmbeddedBrokerAuth(settings.data_dir / "broker-credentials.json")
            password = secrets.token_urlsafe(24)
            auth.ensure_service(SERVICE_USERNAME, password)
            host = "127.0.0.1" if is_loopback(settings.host) else "0.0.0.0"
            port = settings.broker_port
            if port and _port_taken(host, port):
                raise BrokerUnavailable(
                    f"the embedded broker cannot listen on {host}:{port}: the port is in use (another MQTT broker?)."
                    " Use that broker with --broker mqtt://USER:PASS@HOST:PORT, or pick --embedded-broker-port"
                )
            # Beyond loopback the listener is MQTTS only; it asks for (optional) client certificates of the fleet CA.
            identity = self.pki.server if tls else None
            self.embedded = EmbeddedBroker(auth.credentials.path, host, port, tls=identity)
            try:
                self.embedded.start()
            except Exception as exc:
                raise BrokerUnavailable(f"the embedded broker did not start: {exc}") from exc
            self.broker_auth = auth
            # Our own clients connect over loopback; with TLS they verify the broker against the fleet CA (a BYO
            # certificate need not name 127.0.0.1: then the chain is checked, not the name, on loopback only).
            self.broker = BrokerAddress(
                host="127.0.0.1", port=self.embedded.port, tls=tls, username=SERVICE_USERNAME, password=password,
                protocol=MqttProtocol.V311,  # amqtt speaks MQTT 3.1.1 only
                ca_file=str(identity.ca_file) if identity else None,
                check_hostname=not self.pki.bring_your_own,
            )
            scheme = "mqtts" if tls else "mqtt"
            self.device_broker_url = (settings.device_broker_url
                                      or f"{scheme}://{_device_host(settings)}:{self.embedded.port}?protocol=3.1.1")
            return
        try:
            self.broker = parse_broker_url(settings.broker_url)
        except ValueError as exc:
            raise BrokerUnavailable(str(exc)) from None
        if self.broker.protocol is MqttProtocol.AUTO:
            self.broker = replace(self.broker, protocol=MqttProtocol.V5)
        if self.broker.tls:
            # A broker of this fleet (deploy/mosquitto) has a certificate of the fleet CA; another may have a public
            # one: trust both.
            self.broker = replace(self.broker, ca_file=str(self.pki.server.ca_file), trust_system=True)
        if settings.broker_auth is BrokerAuthMode.DYNSEC:
            dynsec_tls: dict[str, Any] = {"tls": self.broker.ssl_context()} if self.broker.tls else {}
            dynsec = MosquittoDynsecAuth.from_url(settings.broker_url, **dynsec_tls)
            # Before ingest and the publisher connect: granting the service role once disconnects the admin.
            dynsec.prepare()
            self.broker_auth = dynsec
        self.device_broker_url = settings.device_broker_url or self.broker.with_credentials(None, None).url

    def _round_runner(self) -> FlowerRoundRunner:
        """With TLS (the control plane listens beyond loopback) the SuperLink runs TLS with SuperNode
        authentication on loopback, and devices reach only its Fleet API, through the path-filtering proxy on the
        control plane's address; plaintext on loopback otherwise (development)."""
        settings = self.settings
        tls = settings.tls_enabled
        host = settings.superlink_host or (settings.host if tls else "127.0.0.1")
        wildcard = host in ("0.0.0.0", "::", "")
        return FlowerRoundRunner(
            settings.data_dir / "flower", self.devices, superlink_host=host,
            tls=self.pki.server if tls else None, supernode_auth=tls, fleet_port=settings.flower_fleet_port,
            device_host=_device_host(settings) if wildcard else None,
        )

    def _on_schedule(self, schedule_id: str, data: RoundCreate) -> None:
        log.info("schedule.fired", schedule_id=schedule_id)
        self.schedules.record_run(schedule_id)
        self.rounds.start(data, schedule_id)

    def stop(self) -> None:
        """Idempotent: the app's shutdown and its caller may both call it."""
        if self._stopped:
            return
        self._stopped = True
        schedules = self.__dict__.get("schedules")
        if schedules is not None:
            schedules.stop()
        rounds = self.__dict__.get("rounds")
        if rounds is not None:
            rounds.stop()
        jobs = self.__dict__.get("jobs")
        if jobs is not None:
            jobs.stop()
        runner = self.__dict__.get("runner")
        if runner is not None:
            runner.stop()
        deployments = self.__dict__.get("deployments")
        if deployments is not None:
            deployments.stop()
        for worker in self.workers:
            worker.stop()
        self.workers.clear()
        if self.publisher is not None:
            self.publisher.stop()
            self.publisher = None
        self.broker_auth.close()
        if self.embedded is not None:
            self.embedded.stop()
            self.embedded = None
        self.engine.dispose()


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _device_host(settings: Settings) -> str:
    """The name devices reach this control plane by: the first TLS name, else the bind address, else this host's
    fully qualified name (bound to every interface)."""
    if settings.tls_names:
        return settings.tls_names[0]
    if settings.host in ("0.0.0.0", "::", ""):
        return socket.getfqdn()
    return f"[{settings.host}]" if ":" in settings.host else settings.host


def _port_taken(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def _safe_db_url(url: str | None) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True) if url else ""
