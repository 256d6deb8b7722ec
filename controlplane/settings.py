"""Control-plane settings: flags, else `EDGEFLEET_*` environment variables, else defaults."""

from __future__ import annotations

import enum
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlsplit, urlunsplit

import msgspec

__all__ = ["BrokerAuthMode", "Settings", "TlsMode", "default_data_dir", "is_loopback", "normalize_database_url"]


class TlsMode(enum.StrEnum):
    AUTO = "auto"  # TLS on every listener when the host is not loopback; plaintext on loopback (development)
    ON = "on"
    OFF = "off"  # loopback only (a reverse proxy on the same host terminates TLS): refused beyond loopback


class BrokerAuthMode(enum.StrEnum):
    EMBEDDED = "embedded"  # credentials file read by the embedded broker
    DYNSEC = "dynsec"  # mosquitto dynamic-security plugin
    NONE = "none"  # the broker authenticates on its own (or not at all: development only)


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "edgefleet"


def normalize_database_url(url: str) -> str:
    """Use psycopg 3 for PostgreSQL URLs given without a driver."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


@dataclass(frozen=True)
class Settings:
    data_dir: Path = field(default_factory=default_data_dir)
    database_url: str | None = None  # default: SQLite file in data_dir
    broker_url: str | None = None  # default: an embedded broker
    # The broker account's password, kept off the command line (where `ps` shows it): the value, or a file
    # holding it. Used when `broker_url` names a user but no password.
    broker_password: str | None = field(default=None, repr=False)
    broker_password_file: Path | None = None
    broker_auth: BrokerAuthMode | None = None  # default: embedded for the embedded broker, else none
    device_broker_url: str | None = None  # the URL handed to devices at enrolment (default: broker URL)
    host: str = "127.0.0.1"
    port: int = 8080
    embedded_broker_port: int | None = None  # default: 8883 when TLS is on (MQTTS), else 1883
    ingest_workers: int = 1
    # MQTT 5 shared subscription: on by default only with several workers. mosquitto 2.0 does not restore
    # shared subscriptions from persistence, so messages published after a broker restart and before the
    # workers reconnect are lost; a single worker's plain subscription on a persistent session is not.
    ingest_shared: bool | None = None
    ingest_group: str = "edgefleet-ingest"  # MQTT 5 shared-subscription group of all ingest workers
    # Broker session of an ingest worker: it keeps delivered-but-uncommitted messages across a restart.
    ingest_session_expiry_s: int = 3600
    instance_name: str = field(default_factory=socket.gethostname)  # part of the workers' MQTT client ids
    ingest_batch_max: int = 500
    ingest_batch_wait_s: float = 0.02
    log_level: str = "info"
    # Where devices' SuperNodes reach the Flower Fleet API: with TLS the path-filtering proxy listens there (the
    # SuperLink itself on loopback); default: the control plane's host with TLS, else 127.0.0.1 (development).
    superlink_host: str | None = None
    flower_fleet_port: int | None = None  # the Fleet API port devices connect to (default: a free one per start)
    ray_address: str | None = None  # a Ray cluster's Jobs API (RAY_ADDRESS); default: a local head on demand
    run_scheduler: bool = True  # exactly one control-plane process per database runs the schedules
    # TLS (issue 10): "auto" speaks TLS on every listener when the control plane listens beyond loopback; the
    # certificates come from the fleet CA in data_dir/pki unless all three tls_*_file are given (bring your own).
    tls: TlsMode = TlsMode.AUTO
    tls_names: tuple[str, ...] = ()  # names/addresses the server certificate covers (default: this host's)
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_ca_file: Path | None = None
    tls_ca_key_file: Path | None = None  # a bring-your-own CA's key: lets enrolment issue device certificates

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from `EDGEFLEET_*` variables (and `RAY_ADDRESS`); non-None keyword overrides (the CLI flags)
        win. msgspec converts and checks the strings against the field types and `_BOUNDS` (lax mode: "8080" is an
        int, "yes"/"1"/"true" a bool).

        Raises
        ------
        ValueError
            A variable that does not convert or is out of bounds, named with its value and the reason.
        """
        env = os.environ if env is None else env
        raw: dict[str, str] = {}
        for name in _ENV_FIELDS:
            value = env.get(f"EDGEFLEET_{name.upper()}")
            if value:
                raw[name] = value
        if env.get("RAY_ADDRESS"):
            raw["ray_address"] = env["RAY_ADDRESS"]
        values: dict[str, Any] = {}
        for name, value in raw.items():
            kind = _ENV_FIELDS.get(name, str)
            converted: object = value
            if kind is bool:  # msgspec's lax bools are true/false/1/0; "yes"/"on"/"no"/"off" were accepted too
                converted = _BOOL_WORDS.get(value.strip().lower(), value)
            elif kind == tuple[str, ...]:  # a comma list: EDGEFLEET_TLS_NAMES=cp.example,10.0.0.2
                converted = [item.strip() for item in value.split(",") if item.strip()]
            try:
                values[name] = msgspec.convert(converted, kind, strict=False, dec_hook=_decode)
            except msgspec.ValidationError as exc:
                variable = "RAY_ADDRESS" if name == "ray_address" else f"EDGEFLEET_{name.upper()}"
                raise ValueError(f"{variable}={value!r}: {str(exc).split(' - at ', 1)[0]}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def resolved(self) -> Settings:
        """Fill in the defaults that depend on other settings.

        Raises
        ------
        ValueError
            When the broker password file cannot be read, or a password is given without a broker URL.
        """
        database_url = self.database_url or f"sqlite:///{self.data_dir / 'edgefleet.db'}"
        auth = self.broker_auth or (BrokerAuthMode.EMBEDDED if self.broker_url is None else BrokerAuthMode.NONE)
        return replace(self, database_url=normalize_database_url(database_url), broker_auth=auth,
                       broker_url=self._broker_url_with_password(), broker_password=None, broker_password_file=None)

    def _broker_url_with_password(self) -> str | None:
        password = self.broker_password
        if self.broker_password_file is not None:
            try:
                password = self.broker_password_file.read_text().strip()
            except OSError as exc:
                raise ValueError(f"broker password file {self.broker_password_file}: {exc.strerror}") from None
            if not password:
                raise ValueError(f"broker password file {self.broker_password_file} is empty")
        if password is None:
            return self.broker_url
        if self.broker_url is None:
            raise ValueError("a broker password was given but no broker URL (EDGEFLEET_BROKER_URL / --broker)")
        parts = urlsplit(self.broker_url)
        if not parts.username:
            raise ValueError(f"broker URL {parts.hostname}: a password was given but the URL names no user "
                             "(mqtt://USER@HOST:PORT)")
        if parts.password:
            return self.broker_url  # the URL's own password wins (as flags win over the environment)
        netloc = f"{parts.username}:{quote(password, safe='')}@{parts.netloc.rpartition('@')[2]}"
        return urlunsplit(parts._replace(netloc=netloc))

    @property
    def tls_enabled(self) -> bool:
        """Whether the listeners speak TLS: always with ``tls=on``; with ``auto`` when the host is not loopback.

        Raises
        ------
        ValueError
            ``tls=off`` with a host beyond loopback (plaintext would leave this machine).
        """
        loopback = is_loopback(self.host)
        if self.tls is TlsMode.OFF and not loopback:
            raise ValueError(f"--tls off with host {self.host}: plaintext is served on loopback only; bind "
                             "127.0.0.1 behind a TLS-terminating reverse proxy, or use --tls auto/on")
        return self.tls is TlsMode.ON or (self.tls is TlsMode.AUTO and not loopback)

    @property
    def broker_port(self) -> int:
        """The embedded broker's port: the configured one, else 8883 (MQTTS) with TLS and 1883 without."""
        if self.embedded_broker_port is not None:
            return self.embedded_broker_port
        return 8883 if self.tls_enabled else 1883

    @property
    def db_url(self) -> str:
        return normalize_database_url(self.database_url or f"sqlite:///{self.data_dir / 'edgefleet.db'}")


# Hand-kept on purpose: which settings the environment may set (not every field: `ray_address` comes from the
# standard `RAY_ADDRESS`), with the type and bounds msgspec checks the variable's string against.
_Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
_ENV_FIELDS: dict[str, Any] = {
    "data_dir": Path,
    "database_url": str,
    "broker_url": str,
    "broker_password": str,
    "broker_password_file": Path,
    "broker_auth": BrokerAuthMode,
    "device_broker_url": str,
    "host": str,
    "port": _Port,
    "embedded_broker_port": _Port,
    "ingest_workers": Annotated[int, msgspec.Meta(ge=1, le=64)],
    "ingest_shared": bool,
    "ingest_group": str,
    "ingest_session_expiry_s": Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)],
    "instance_name": str,
    "ingest_batch_max": Annotated[int, msgspec.Meta(ge=1, le=100_000)],
    "ingest_batch_wait_s": Annotated[float, msgspec.Meta(ge=0, le=60)],
    "log_level": str,
    "superlink_host": str,
    "flower_fleet_port": _Port,
    "run_scheduler": bool,
    "tls": TlsMode,
    "tls_names": tuple[str, ...],
    "tls_cert_file": Path,
    "tls_key_file": Path,
    "tls_ca_file": Path,
    "tls_ca_key_file": Path,
}


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a bind address or name) is this machine's loopback only."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_BOOL_WORDS = {"yes": "true", "on": "true", "no": "false", "off": "false"}


def _decode(kind: type, value: object) -> object:
    if kind is Path and isinstance(value, str):
        return Path(value)
    raise NotImplementedError
