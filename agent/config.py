"""The device config file (TOML) that ``edgefleet agent enroll`` writes and ``edgefleet agent run --config FILE``
reads::

    device_id = "pi-0001"
    profile = "raspberry-pi-4"
    controlplane = "https://cp.example:8443"
    broker = "mqtts://cp.example:8883"
    ca_file = "ca.pem"
    task = "digits"
    signing_key = "<base64 ed25519 public key>"
    superlink_host = "cp.example"   # optional
    [tls]                           # optional: client certificate identity
    cert_file = "device.crt"
    key_file = "device.key"
    [mqtt]                          # optional: password identity
    username = "pi-0001"
    password_file = "mqtt-password"
    [flower]                        # optional, training devices
    auth_key_file = "supernode.key"

Relative paths are relative to the config file's directory. Every key is optional here (flags and environment
variables fill in or override); a key of the wrong type is refused naming the file and the key; an unknown key is
reported (a newer enrolment may write more) and otherwise ignored. Standard library only: it runs on the device.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent._errors import ConfigError

__all__ = ["DeviceConfig", "load_device_config"]

_STRINGS = ("device_id", "profile", "controlplane", "broker", "task", "signing_key", "superlink_host")
_FILES = {None: ("ca_file",), "tls": ("cert_file", "key_file"), "mqtt": ("password_file",),
          "flower": ("auth_key_file",)}
_TABLE_STRINGS = {"mqtt": ("username",)}


@dataclass(frozen=True)
class DeviceConfig:
    """What a config file says; None where it says nothing. File paths are absolute."""

    path: Path
    device_id: str | None = None
    profile: str | None = None
    controlplane: str | None = None
    broker: str | None = None
    task: str | None = None
    signing_key: str | None = None
    superlink_host: str | None = None
    ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    mqtt_username: str | None = None
    mqtt_password_file: Path | None = None
    flower_auth_key_file: Path | None = None
    unknown: tuple[str, ...] = field(default=())  # keys this version does not know (reported, ignored)

    def mqtt_password(self) -> str | None:
        """The password in ``[mqtt] password_file`` (stripped), or None without one.

        Raises
        ------
        ConfigError
            The file cannot be read or is empty, named with the config file.
        """
        if self.mqtt_password_file is None:
            return None
        try:
            password = self.mqtt_password_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {self.path}: mqtt.password_file {self.mqtt_password_file}: "
                              f"{getattr(exc, 'strerror', None) or exc}") from None
        if not password:
            raise ConfigError(f"config file {self.path}: mqtt.password_file {self.mqtt_password_file} is empty")
        return password


def load_device_config(path: str | Path) -> DeviceConfig:
    """Read and check a device config file.

    Raises
    ------
    ConfigError
        The file is missing, not TOML, or a key has the wrong type (the message names the file and the key).
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    base = path.resolve().parent
    values: dict[str, Any] = {}
    unknown: list[str] = []

    def string(table: str | None, key: str, value: Any) -> str:
        if not isinstance(value, str) or not value.strip():
            where = f"{table}.{key}" if table else key
            raise ConfigError(f"config file {path}: {where} must be a non-empty string, got {value!r}")
        return value.strip()

    for key, value in data.items():
        if key in _STRINGS:
            values[key] = string(None, key, value)
        elif key in _FILES[None]:
            values[key] = base / string(None, key, value)
        elif key in _FILES or key in _TABLE_STRINGS:
            if not isinstance(value, dict):
                raise ConfigError(f"config file {path}: [{key}] must be a table, got {value!r}")
            for sub, subvalue in value.items():
                if sub in _FILES.get(key, ()):
                    values[f"{key}_{sub}"] = base / string(key, sub, subvalue)
                elif sub in _TABLE_STRINGS.get(key, ()):
                    values[f"{key}_{sub}"] = string(key, sub, subvalue)
                else:
                    unknown.append(f"{key}.{sub}")
        else:
            unknown.append(key)
    if ("tls_cert_file" in values) != ("tls_key_file" in values):
        raise ConfigError(f"config file {path}: [tls] needs both cert_file and key_file")
    return DeviceConfig(path=path, unknown=tuple(unknown), **values)
