"""`edgefleet agent run`: argparse only, so the device process does not carry the operator CLI's typer/click/rich
(about 8.6 MB of RSS, measured by bench/agent_footprint.py)."""

from __future__ import annotations

import argparse
import base64
import importlib
import importlib.util
import os
import signal
import sys
from pathlib import Path
from typing import Any

__all__ = ["main"]


# Subcommands other modules provide (``add_parser(subparsers)``, ``run(args) -> int``), imported only when present:
# this parser works on an install that lacks one.
_PLUGGED: tuple[tuple[str, str], ...] = (("enroll", "agent.enroll"), ("install", "agent.install"))


def _parser(command: str | None = None) -> tuple[argparse.ArgumentParser, dict[str, Any]]:
    """The parser; the plugged subcommands' modules are imported unless ``command`` is ``run`` (the device process
    carries none of enrolment's imports)."""
    env = os.environ.get
    parser = argparse.ArgumentParser(prog="edgefleet agent", description="The EdgeFleet device agent.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="Run the device agent until SIGTERM/SIGINT.",
                         description="Run the device agent until SIGTERM/SIGINT. Every option also reads the "
                                     "environment variable named in brackets; flags and variables override "
                                     "--config.")
    run.add_argument("--config", type=Path, default=env("EDGEFLEET_AGENT_CONFIG"),
                     help="the device config (TOML) `edgefleet agent enroll` wrote; its relative paths are relative "
                          "to its directory [EDGEFLEET_AGENT_CONFIG]")
    run.add_argument("--device-id", default=env("EDGEFLEET_DEVICE_ID"), help="this device's id [EDGEFLEET_DEVICE_ID]")
    run.add_argument("--profile", default=env("EDGEFLEET_PROFILE"), help="firmware profile name [EDGEFLEET_PROFILE]")
    run.add_argument("--broker", default=env("EDGEFLEET_BROKER_URL"),
                     help="mqtt[s]://host:port[?protocol=5|3.1.1] [EDGEFLEET_BROKER_URL; default "
                          f"{_DEFAULT_BROKER}]")
    run.add_argument("--username", default=env("EDGEFLEET_MQTT_USERNAME"),
                     help="broker username, default: the device id [EDGEFLEET_MQTT_USERNAME]")
    run.add_argument("--password", default=env("EDGEFLEET_MQTT_PASSWORD"),
                     help="broker password; prefer the variable [EDGEFLEET_MQTT_PASSWORD]")
    run.add_argument("--ca-file", type=Path, default=env("EDGEFLEET_CA_FILE"),
                     help="the CA (the fleet CA from enrolment) the broker and the control plane are verified "
                          "against [EDGEFLEET_CA_FILE; default: the system store]")
    run.add_argument("--tls-cert", type=Path, default=env("EDGEFLEET_TLS_CERT"),
                     help="this device's client certificate (CN = device id): its identity on an mqtts:// broker, "
                          "no password needed [EDGEFLEET_TLS_CERT]")
    run.add_argument("--tls-key", type=Path, default=env("EDGEFLEET_TLS_KEY"),
                     help="the client certificate's private key [EDGEFLEET_TLS_KEY]")
    run.add_argument("--controlplane", default=env("EDGEFLEET_CONTROLPLANE_URL"),
                     help="the control plane this device was enrolled with; models are downloaded only from "
                          "its scheme, host and port [EDGEFLEET_CONTROLPLANE_URL]")
    run.add_argument("--task", default=env("EDGEFLEET_TASK"),
                     help="the task this device runs; models released for another task are refused "
                          "(default: digits, the shipped starter model's) [EDGEFLEET_TASK]")
    run.add_argument("--data-dir", type=Path, default=env("EDGEFLEET_DATA_DIR"),
                     help="agent state directory (outbox, models, trust store) [EDGEFLEET_DATA_DIR; default: "
                          "state/ beside the --config file, else ./edgefleet-agent]")
    run.add_argument("--telemetry-interval", type=float, default=None, help="seconds (default: the profile's)")
    run.add_argument("--inference-rate", type=float, default=5.0, help="inferences per second (default 5)")
    run.add_argument("--power-source", choices=["auto", "os", "simulated"], default="auto",
                     help="battery/network figures: OS, simulated, or auto (OS battery, else the profile's power "
                          "source)")
    run.add_argument("--signing-key", default=env("EDGEFLEET_SIGNING_KEY"),
                     help="the control plane's model-signing public key, base64 (from enrolment) "
                          "[EDGEFLEET_SIGNING_KEY]")
    run.add_argument("--model", type=Path, default=None, help="TFLite model (default: the shipped starter model)")
    run.add_argument("--data", type=Path, default=None, help="local data (.npz with x[, y]) to run inference over")
    run.add_argument("--train-data", type=Path, default=env("EDGEFLEET_TRAIN_DATA"),
                     help="this device's training data for federated rounds (.npz: x raw, y labels) "
                          "[EDGEFLEET_TRAIN_DATA; default <data-dir>/data/partition.npz]")
    run.add_argument("--superlink-host", default=env("EDGEFLEET_SUPERLINK_HOST"),
                     help="the only host whose Flower SuperLink a join_round may name "
                          "[EDGEFLEET_SUPERLINK_HOST; default: the --controlplane host, else the broker's]")
    run.add_argument("--outbox-max-mb", type=float, default=16.0, help="outbox bound in MiB, oldest dropped first")
    run.add_argument("--log-level", default=env("EDGEFLEET_LOG_LEVEL", "info"), help="[EDGEFLEET_LOG_LEVEL]")
    run.add_argument("--on-restart", choices=["auto", "exit", "exec"], default=env("EDGEFLEET_AGENT_RESTART", "auto"),
                     help="what a `restart` command does after its ack: exit with code 75 for the supervisor to "
                          "start the agent again (systemd's Restart=on-failure, a container's restart policy), exec "
                          "the same command line again, or auto: exit under systemd ($NOTIFY_SOCKET), else exec "
                          "[EDGEFLEET_AGENT_RESTART; default auto]")
    plugged: dict[str, Any] = {}
    for name, module_name in _PLUGGED:
        if command == "run" or importlib.util.find_spec(module_name) is None:
            continue
        module = importlib.import_module(module_name)
        module.add_parser(sub)
        plugged[name] = module
    return parser, plugged


_DEFAULT_BROKER = "mqtt://127.0.0.1:1883"


def main(argv: list[str] | None = None) -> int:
    """Parse `agent ...` arguments (without the leading `agent`) and run; returns the exit code."""
    words = sys.argv[1:] if argv is None else argv
    parser, plugged = _parser(next((w for w in words if not w.startswith("-")), None))
    args = parser.parse_args(argv)
    if args.command in plugged:
        return int(plugged[args.command].run(args))
    given = sys.argv[1:] if argv is None else argv
    if any(a == "--password" or a.startswith("--password=") for a in given) or _url_has_password(args.broker):
        print("warning: the broker password is on the command line, where other users see it in the process "
              "list; use EDGEFLEET_MQTT_PASSWORD instead", file=sys.stderr)
    password: str | None = args.password
    auth_key_file: Path | None = None
    if args.config is not None:
        from agent._errors import ConfigError
        from agent.config import load_device_config

        try:
            config = load_device_config(args.config)
            if password is None and args.username is None:  # a flag-given user brings its own password
                password = config.mqtt_password()
        except ConfigError as exc:
            parser.exit(2, f"error: {exc}\n")
        for key in config.unknown:
            print(f"warning: config file {config.path}: unknown key {key} ignored", file=sys.stderr)
        # Flags and variables win over the file.
        for name, value in (("device_id", config.device_id), ("profile", config.profile),
                            ("broker", config.broker), ("controlplane", config.controlplane),
                            ("task", config.task), ("signing_key", config.signing_key),
                            ("superlink_host", config.superlink_host), ("ca_file", config.ca_file),
                            ("tls_cert", config.tls_cert_file), ("tls_key", config.tls_key_file),
                            ("username", config.mqtt_username)):
            if getattr(args, name) is None:
                setattr(args, name, value)
        auth_key_file = config.flower_auth_key_file
        if args.data_dir is None:  # one enrolment, one state: two agents started from one directory never share it
            args.data_dir = config.path.parent / "state"
    args.data_dir = Path(args.data_dir) if args.data_dir is not None else Path("./edgefleet-agent")
    args.broker = args.broker or _DEFAULT_BROKER
    args.task = args.task or "digits"
    for name in ("device_id", "profile"):
        if not getattr(args, name):
            parser.error(f"--{name.replace('_', '-')} is required (or EDGEFLEET_{name.upper()}, or --config)")
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    try:
        from agent._daemon import Agent
        from agent._logring import LogRing
        from agent._restart import RestartMode, resolve_mode
        from agent._settings import AgentSettings, DownloadPolicy
        from agent._telemetry import PowerMode
        from agent.logsetup import configure_logging
        from agent.mqtt import parse_broker_url
    except ImportError as exc:
        parser.exit(2, f"error: the agent needs `pip install edgefleet[agent]` ({exc})\n")
    from firmware_profiles import ProfileError, get_profile

    try:
        profile = get_profile(args.profile)
        address = parse_broker_url(args.broker)
    except (ProfileError, ValueError) as exc:
        parser.exit(2, f"error: {exc}\n")
    if not profile.runtime.python_agent:
        parser.exit(2, f"error: profile '{profile.name}' has no Python agent ({profile.runtime.name}); "
                       "it is an export target only\n")
    signing_key = None
    if args.signing_key:
        try:
            signing_key = base64.b64decode(args.signing_key, validate=True)
        except ValueError:
            signing_key = b""
        if len(signing_key) != 32:
            parser.exit(2, "error: --signing-key must be a base64 ed25519 public key (32 bytes)\n")
    ca_file = str(args.ca_file) if args.ca_file is not None else None
    address = address.with_tls(ca_file=ca_file, cert_file=_str(args.tls_cert), key_file=_str(args.tls_key))
    if address.tls:
        try:  # a missing or mismatched TLS file is one line now, not a reconnect loop later
            address.ssl_context()
        except ValueError as exc:
            parser.exit(2, f"error: {exc}\n")
    elif args.tls_cert is not None:
        parser.exit(2, f"error: --tls-cert needs an mqtts:// broker (got {address.url})\n")
    if args.on_restart not in ("auto", "exit", "exec"):  # from the variable: argparse checks only the flag
        parser.exit(2, f"error: EDGEFLEET_AGENT_RESTART must be auto, exit or exec, got {args.on_restart!r}\n")
    # With a client certificate the broker takes the identity from it (CN = device id): no password.
    address = address.with_credentials(args.username or address.username or args.device_id,
                                       password or address.password)
    # The newest log entries, redacted, for the `logs` command; the broker password is redacted wherever it appears.
    ring = LogRing()
    ring.add_secret(address.password)
    configure_logging(args.log_level, structlog=False, ring=ring)  # the device process never imports structlog
    settings = AgentSettings(
        device_id=args.device_id, profile=profile, broker=address, data_dir=args.data_dir,
        controlplane_url=args.controlplane, task=args.task, telemetry_interval_s=args.telemetry_interval,
        inference_rate_hz=args.inference_rate, power_mode=PowerMode(args.power_source), model_path=args.model,
        data_path=args.data, train_data_path=Path(args.train_data) if args.train_data else None,
        superlink_host=args.superlink_host, outbox_max_bytes=int(args.outbox_max_mb * 2**20), signing_key=signing_key,
        ca_file=args.ca_file, supernode_auth_key_file=auth_key_file, download=DownloadPolicy(ca_file=ca_file),
        restart_mode=resolve_mode(RestartMode(args.on_restart), os.environ),
    )
    try:
        agent = Agent(settings, log_ring=ring)
    except (ValueError, OSError) as exc:
        parser.exit(2, f"error: {exc}\n")
    signal.signal(signal.SIGTERM, lambda *_: agent.stop())
    signal.signal(signal.SIGINT, lambda *_: agent.stop())
    from agent.sdnotify import Notifier

    agent.run(Notifier.from_env(os.environ))  # systemd's notify socket, when run by the installed unit
    if agent.restart_requested:
        return _restart(settings.restart_mode)
    return 0


def _restart(mode: Any) -> int:
    """After a `restart` command (agent._restart): the exit code for the supervisor, or this process replaced by
    the same command line."""
    from agent._restart import RESTART_EXIT_CODE, RestartMode
    from agent.logsetup import get_logger

    log = get_logger("edgefleet.agent")
    if mode is RestartMode.EXEC:
        argv = [sys.executable, *sys.orig_argv[1:]]
        log.info("agent.reexec", argv0=argv[0])
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        try:
            os.execv(sys.executable, argv)
        except OSError as exc:  # e.g. the interpreter was replaced by an upgrade: let a supervisor try
            log.error("agent.reexec_failed", error=str(exc), exit_code=RESTART_EXIT_CODE)
    return RESTART_EXIT_CODE


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)


def _url_has_password(url: str | None) -> bool:
    from urllib.parse import urlsplit

    try:
        return bool(url and urlsplit(url).password)
    except ValueError:
        return False


if __name__ == "__main__":
    sys.exit(main())
