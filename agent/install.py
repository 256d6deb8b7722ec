"""`edgefleet agent install`: put an enrolled device's config under ``/etc/edgefleet`` and a hardened systemd unit
in place, so that ``systemctl enable --now edgefleet-agent`` runs the agent as a dedicated, unprivileged user.

What it writes (under ``--root``, ``/`` by default; an image build or a test passes another directory):

- ``etc/edgefleet/agent.toml``: the config that ``edgefleet agent enroll`` wrote, with every file it references
  (CA, client certificate and key, MQTT password, SuperNode key) copied next to it under a fixed name and the paths
  rewritten relative to it, so that the installed config does not depend on where enrolment ran;
- ``etc/systemd/system/edgefleet-agent.service``: the unit (:func:`render_unit`).

Every file is written atomically (:mod:`agent.fsutil`): running it again, e.g. after a re-enrolment, replaces the
files whole. It never calls ``systemctl``; it prints the next step. Standard library only: it runs on the device.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from agent._errors import ConfigError
from agent.fsutil import write_atomic

__all__ = ["CONFIG_PATH", "DATA_DIR", "DEFAULT_USER", "UNIT_PATH", "InstalledFile", "add_parser", "install",
           "render_unit", "run"]

# Paths on the device (absolute, as the unit names them); the files land under --root.
CONFIG_PATH = PurePosixPath("/etc/edgefleet/agent.toml")
UNIT_PATH = PurePosixPath("/etc/systemd/system/edgefleet-agent.service")
DATA_DIR = PurePosixPath("/var/lib/edgefleet")  # systemd's StateDirectory=edgefleet
DEFAULT_USER = "edgefleet"
UNIT_NAME = UNIT_PATH.name

_SECRET_MODE = 0o600
_PUBLIC_MODE = 0o644
_CONFIG_MODE = 0o640  # root:<group>: the agent reads it, other users do not learn the device's identity
_DIR_MODE = 0o750


@dataclass(frozen=True)
class _Reference:
    table: str | None  # None: a top-level key
    key: str
    name: str  # the copy's file name next to the installed config
    secret: bool


# The files a config from `edgefleet agent enroll` references. A `*_file` key not listed here is copied too, as a
# secret (the careful guess), so that a key enrolment adds later still leaves a self-contained config.
_REFERENCES = (
    _Reference(None, "ca_file", "ca.pem", secret=False),
    _Reference("tls", "cert_file", "device.crt", secret=False),
    _Reference("tls", "key_file", "device.key", secret=True),
    _Reference("mqtt", "password_file", "mqtt-password", secret=True),
    _Reference("flower", "auth_key_file", "supernode.key", secret=True),
)


@dataclass(frozen=True)
class InstalledFile:
    """One file `install` wrote: where (under the root), its mode, and whether it holds a secret."""

    path: Path
    mode: int
    secret: bool = False


# The hardening, directive by directive; each one was checked with `systemd-analyze verify` (tests) but the unit
# has not run under a real systemd here (none runs in these containers): see deploy/agent/README.md.
_UNIT = """\
# Written by `edgefleet agent install`; running it again rewrites this file.
[Unit]
Description=EdgeFleet device agent
Wants=network-online.target
# TLS certificates and Flower's signed requests (within ~300 s of the SuperLink's clock) need the time set.
After=network-online.target time-sync.target
# A crash loop (bad config, broken upgrade) keeps retrying every RestartSec rather than giving up for good: a device
# in the field has nobody to run `systemctl restart`.
StartLimitIntervalSec=0

[Service]
# The agent tells systemd it is ready once inference runs, and pings the watchdog from every turn of its main loop
# (at most ~10 s apart, a broker connect's timeout): a hung agent is killed and restarted, which Restart= alone
# never notices.
Type=notify
NotifyAccess=main
WatchdogSec=60s
User={user}
Group={group}
ExecStart={edgefleet} agent run --config {config} --data-dir {data_dir}
Restart=on-failure
RestartSec=10s
# `edgefleet devices restart`: the agent acks, stops cleanly and exits 75: a clean exit for systemd, restarted.
SuccessExitStatus=75
RestartForceExitStatus=75
TimeoutStopSec=30s
Environment=PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# /var/lib/edgefleet (the agent's --data-dir, also the user's home, so Flower's and Python's caches land there) and
# /var/log/edgefleet, created and owned by the user; everything else is read-only or hidden.
StateDirectory=edgefleet
StateDirectoryMode=0700
LogsDirectory=edgefleet
LogsDirectoryMode=0750
UMask=0077
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
NoNewPrivileges=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
# Other users' processes are hidden; /proc/stat and /proc/meminfo (psutil's telemetry) stay readable.
ProtectProc=invisible
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
# MQTT, HTTPS and Flower over IP; AF_UNIX for the resolver; AF_NETLINK for psutil's network figures.
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX AF_NETLINK
CapabilityBoundingSet=
AmbientCapabilities=
LockPersonality=yes
RemoveIPC=yes
PrivateMounts=yes
SystemCallArchitectures=native
# systemd's list for ordinary services (it holds every syscall the agent made under strace on x86-64, see below);
# a call outside it fails with EPERM instead of killing the agent.
SystemCallFilter=@system-service
SystemCallErrorNumber=EPERM
# MemoryDenyWriteExecute= is left out on purpose: an strace of the agent on x86-64 (LiteRT/XNNPACK inference, MQTT,
# telemetry) showed no writable+executable mapping, but model deployments, a training device's Flower ClientApp
# (torch) and aarch64 builds of LiteRT were not checked; a refused mapping would fail inference at run time.

[Install]
WantedBy=multi-user.target
"""


def render_unit(*, edgefleet: PurePosixPath, user: str = DEFAULT_USER, group: str | None = None,
                config: PurePosixPath = CONFIG_PATH, data_dir: PurePosixPath = DATA_DIR) -> str:
    """The systemd unit that runs ``edgefleet agent run`` as ``user``.

    Parameters
    ----------
    edgefleet
        Absolute path of the ``edgefleet`` script of the venv the agent runs from (on the device).
    user, group
        The dedicated system user and its group (default: the group named like the user).
    config, data_dir
        The installed config and the agent's state directory (systemd's ``StateDirectory=``).
    """
    for what, path in (("edgefleet", edgefleet), ("config", config), ("data_dir", data_dir)):
        # systemd splits ExecStart= on whitespace and expands %/$ specifiers: refuse rather than quote.
        if not path.is_absolute() or re.search(r"[\s%$\\\"']", str(path)):
            raise ConfigError(f"{what} path {str(path)!r} must be absolute, without spaces, quotes, % or $")
    for what, name in (("user", user), ("group", group or user)):
        if not re.fullmatch(r"[a-z_][a-z0-9_-]*", name):
            raise ConfigError(f"{what} {name!r} is not a valid system user/group name")
    return _UNIT.format(user=user, group=group or user, edgefleet=edgefleet, config=config, data_dir=data_dir)


# -- the config ----------------------------------------------------------------------------------------------------
def _load_config(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc


def _references(config: Mapping[str, Any]) -> Iterator[tuple[_Reference, str]]:
    """Each file the config names, with the path as written."""
    known = {(r.table, r.key): r for r in _REFERENCES}
    tables: list[tuple[str | None, Mapping[str, Any]]] = [(None, config)]
    tables += [(name, value) for name, value in config.items() if isinstance(value, dict)]
    for table, values in tables:
        for key, value in values.items():
            if not key.endswith("_file"):
                continue
            where = f"{table}.{key}" if table else key
            if not isinstance(value, str) or not value:
                raise ConfigError(f"config key {where} must be a file path, got {value!r}")
            ref = known.get((table, key)) or _Reference(table, key, where.removesuffix("_file"), secret=True)
            yield ref, value


# TOML has no writer in the standard library; the config holds only strings, numbers, booleans, arrays and tables,
# and the caller checks that what is written reads back equal.
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _toml_value(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):  # a JSON string is a TOML basic string, but for DEL, which TOML wants escaped
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise ConfigError(f"cannot write {type(value).__name__} value {value!r} back to the config")


def _dump_toml(config: Mapping[str, Any], header: str) -> str:
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    tables = []
    for key, value in config.items():
        if isinstance(value, dict):
            tables.append((key, value))
        else:
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    for name, values in tables:
        if any(isinstance(v, dict) for v in values.values()):
            raise ConfigError(f"config table [{name}] nests tables, which the installer does not write back")
        lines += ["", f"[{_toml_key(name)}]"] + [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


# -- users ---------------------------------------------------------------------------------------------------------
def _lookup(root: Path, user: str, group: str) -> tuple[int, int] | None:
    """(uid, gid) of ``user`` and ``group`` in the root's own account files (not the host's when root is not /)."""
    if root == Path("/"):
        import grp
        import pwd

        try:
            return pwd.getpwnam(user).pw_uid, grp.getgrnam(group).gr_gid
        except KeyError:
            return None
    try:
        uid = _field(root / "etc/passwd", user)
        gid = _field(root / "etc/group", group)
    except FileNotFoundError:
        return None
    return None if uid is None or gid is None else (uid, gid)


def _field(path: Path, name: str) -> int | None:
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split(":")
        if len(parts) > 2 and parts[0] == name:
            return int(parts[2])
    return None


def _create_user(root: Path, user: str) -> None:
    command = ["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", str(DATA_DIR),
               "--shell", "/usr/sbin/nologin", "--comment", "EdgeFleet agent"]
    if root != Path("/"):
        command += ["--prefix", str(root)]  # the root's /etc/passwd and /etc/group, not the host's
    try:
        result = subprocess.run([*command, user], capture_output=True, text=True, check=False, timeout=60)
    except FileNotFoundError:
        raise ConfigError("useradd not found: create the user yourself and pass --no-create-user") from None
    if result.returncode != 0:
        raise ConfigError(f"useradd {user} failed ({result.returncode}): {result.stderr.strip()}")


# -- install -------------------------------------------------------------------------------------------------------
def _under(root: Path, path: PurePosixPath) -> Path:
    return root / str(path).lstrip("/")


def _write(root: Path, path: PurePosixPath, data: bytes, mode: int, owner: tuple[int, int] | None) -> Path:
    target = _under(root, path)
    write_atomic(target, data, mode=mode)
    if owner is not None:
        os.chown(target, *owner)
    return target


def install(config_file: Path, *, edgefleet: PurePosixPath, root: Path = Path("/"), user: str = DEFAULT_USER,
            create_user: bool = True) -> list[InstalledFile]:
    """Install the agent config and its systemd unit under ``root``; returns what was written.

    Parameters
    ----------
    config_file
        The config ``edgefleet agent enroll`` wrote; paths in it are relative to its directory.
    edgefleet
        The device's ``edgefleet`` script the unit runs (it must exist under ``root``).
    root
        The device's file system root (``/``, or an image/test directory).
    user
        The dedicated system user the agent runs as, with a group of the same name.
    create_user
        Create ``user`` with ``useradd --system`` when it does not exist (needs root).

    Raises
    ------
    ConfigError
        The config or a file it references cannot be read, the script is missing, or the user cannot be had.
    """
    root = Path(root)
    config_file = Path(config_file)
    if not _under(root, edgefleet).is_file():
        raise ConfigError(f"{edgefleet} does not exist{'' if root == Path('/') else f' under {root}'}: "
                          "pass --python, the interpreter of the venv edgefleet[agent] is installed in")
    unit = render_unit(edgefleet=edgefleet, user=user).encode()
    config = _load_config(config_file)
    if not isinstance(config.get("device_id"), str):
        raise ConfigError(f"config file {config_file} has no device_id: is it the one `edgefleet agent enroll` wrote?")

    # Read every referenced file before writing anything: a missing one leaves the device as it was.
    copies: list[tuple[_Reference, bytes]] = []
    for ref, named in _references(config):
        source = config_file.parent / named
        try:
            copies.append((ref, source.read_bytes()))
        except OSError as exc:
            where = f"{ref.table}.{ref.key}" if ref.table else ref.key
            raise ConfigError(f"{where} = {named!r} in {config_file}: cannot read {source} "
                              f"({exc.strerror or exc})") from exc
        (config[ref.table] if ref.table else config)[ref.key] = ref.name
    # No source path in the header: installing again from the installed config itself (an upgrade) changes nothing.
    text = _dump_toml(config, "Written by `edgefleet agent install`; file paths are relative to this file's directory.")
    if tomllib.loads(text) != config:  # the hand-written TOML must read back as what it was meant to say
        raise ConfigError(f"config file {config_file} did not survive being written back; please report this")

    owner: tuple[int, int] | None = None
    if os.geteuid() == 0:
        owner = _lookup(root, user, user)
        if owner is None and create_user:
            _create_user(root, user)
            owner = _lookup(root, user, user)
        if owner is None:
            raise ConfigError(f"system user/group {user!r} does not exist"
                              + (f" under {root}" if root != Path("/") else "")
                              + ("" if create_user else "; drop --no-create-user to create it"))
    elif root == Path("/"):
        raise ConfigError("installing into / needs root: run it with sudo")
    group_read = None if owner is None else (0, owner[1])

    etc = _under(root, CONFIG_PATH.parent)
    etc.mkdir(parents=True, exist_ok=True)
    etc.chmod(_DIR_MODE)
    if group_read is not None:
        os.chown(etc, *group_read)
    written: list[InstalledFile] = []
    for ref, data in copies:
        mode = _SECRET_MODE if ref.secret else _PUBLIC_MODE
        path = _write(root, CONFIG_PATH.parent / ref.name, data, mode, owner if ref.secret else None)
        written.append(InstalledFile(path, mode, secret=ref.secret))
    path = _write(root, CONFIG_PATH, text.encode(), _CONFIG_MODE, group_read)
    written.append(InstalledFile(path, _CONFIG_MODE))
    _under(root, UNIT_PATH.parent).mkdir(parents=True, exist_ok=True)
    path = _write(root, UNIT_PATH, unit, _PUBLIC_MODE, None)
    written.append(InstalledFile(path, _PUBLIC_MODE))
    return written


# -- the command ---------------------------------------------------------------------------------------------------
def _default_python() -> Path:
    # Not resolved: a venv's bin/python is a symlink out of the venv, and the venv's bin/ is what we want.
    return Path(os.path.abspath(sys.executable))


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``install`` to the ``edgefleet agent`` subcommands (``subparsers``: from ``add_subparsers``)."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "install", help="Install the agent's config under /etc/edgefleet and a hardened systemd unit.",
        description="Copy the config written by `edgefleet agent enroll` (and every file it references) to "
                    f"{CONFIG_PATH.parent}, write {UNIT_PATH} running the agent as a dedicated system user, and "
                    f"print the next step (`systemctl enable --now {UNIT_NAME}`). Needs root.")
    parser.add_argument("--config", type=Path, required=True,
                        help="the agent config file `edgefleet agent enroll` wrote")
    parser.add_argument("--user", default=DEFAULT_USER,
                        help=f"the system user (and group) the agent runs as (default: {DEFAULT_USER})")
    parser.add_argument("--no-create-user", dest="create_user", action="store_false",
                        help="fail if the user does not exist instead of creating it with useradd --system")
    parser.add_argument("--root", type=Path, default=Path("/"),
                        help="file system root to install under, e.g. a mounted device image (default: /)")
    parser.add_argument("--python", type=Path, default=None,
                        help="the interpreter (or venv directory) whose `edgefleet` the unit runs, as a path on "
                             "the device (default: this interpreter's venv)")
    parser.set_defaults(handler=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run ``edgefleet agent install`` with parsed ``args``; returns the exit code (errors go to stderr)."""
    python = Path(os.path.abspath(args.python)) if args.python is not None else _default_python()
    bin_dir = python / "bin" if _under(args.root, PurePosixPath(python)).is_dir() else python.parent
    edgefleet = PurePosixPath(bin_dir / "edgefleet")
    try:
        written = install(args.config, edgefleet=edgefleet, root=args.root, user=args.user,
                          create_user=args.create_user)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except PermissionError as exc:
        print(f"error: {exc} (run it as root: sudo edgefleet agent install ...)", file=sys.stderr)
        return 2
    for item in written:
        print(f"wrote {item.path} ({item.mode:04o}{', secret' if item.secret else ''})")
    print(f"\nNext: systemctl daemon-reload && systemctl enable --now {UNIT_NAME}\n"
          f"Logs: journalctl -u {UNIT_NAME} -f")
    return 0
