"""Control-plane settings: flags, else `EDGEFLEET_*` environment variables, else defaults."""

from __future__ import annotations

import enum
import os
import socket
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

__all__ = ["BrokerAuthMode", "Settings", "default_data_dir", "normalize_database_url"]


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
    embedded_broker_port: int = 1883
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
    superlink_host: str = "127.0.0.1"  # where the Flower SuperLink listens (devices' SuperNodes connect to it)
    ray_address: str | None = None  # a Ray cluster's Jobs API (RAY_ADDRESS); default: a local head on demand
    run_scheduler: bool = True  # exactly one control-plane process per database runs the schedules

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from `EDGEFLEET_*` variables; non-None keyword overrides (the CLI flags) win."""
        env = dict(os.environ if env is None else env)
        values: dict[str, Any] = {}
        conversions: dict[str, Any] = {
            "data_dir": Path,
            "database_url": str,
            "broker_url": str,
            "broker_password": str,
            "broker_password_file": Path,
            "broker_auth": BrokerAuthMode,
            "device_broker_url": str,
            "host": str,
            "port": int,
            "embedded_broker_port": int,
            "ingest_workers": int,
            "ingest_shared": lambda v: v.lower() in ("1", "true", "yes", "on"),
            "ingest_group": str,
            "ingest_session_expiry_s": int,
            "instance_name": str,
            "ingest_batch_max": int,
            "ingest_batch_wait_s": float,
            "log_level": str,
            "superlink_host": str,
            "run_scheduler": lambda v: v.lower() in ("1", "true", "yes", "on"),
        }
        for name, convert in conversions.items():
            raw = env.get(f"EDGEFLEET_{name.upper()}")
            if raw:
                try:
                    values[name] = convert(raw)
                except ValueError as exc:
                    raise ValueError(f"EDGEFLEET_{name.upper()}={raw!r}: {exc}") from None
        if env.get("RAY_ADDRESS"):
            values["ray_address"] = env["RAY_ADDRESS"]
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
    def db_url(self) -> str:
        return normalize_database_url(self.database_url or f"sqlite:///{self.data_dir / 'edgefleet.db'}")
