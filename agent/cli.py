"""`edgefleet agent run`: argparse only, so the device process does not carry the operator CLI's typer/click/rich
(about 8.6 MB of RSS, measured by bench/agent_footprint.py)."""

from __future__ import annotations

import argparse
import base64
import os
import signal
import sys
from pathlib import Path

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    env = os.environ.get
    parser = argparse.ArgumentParser(prog="edgefleet agent", description="The EdgeFleet device agent.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="Run the device agent until SIGTERM/SIGINT.",
                         description="Run the device agent until SIGTERM/SIGINT. Every option also reads the "
                                     "environment variable named in brackets.")
    run.add_argument("--device-id", default=env("EDGEFLEET_DEVICE_ID"), help="this device's id [EDGEFLEET_DEVICE_ID]")
    run.add_argument("--profile", default=env("EDGEFLEET_PROFILE"), help="firmware profile name [EDGEFLEET_PROFILE]")
    run.add_argument("--broker", default=env("EDGEFLEET_BROKER_URL", "mqtt://127.0.0.1:1883"),
                     help="mqtt[s]://host:port[?protocol=5|3.1.1] [EDGEFLEET_BROKER_URL]")
    run.add_argument("--username", default=env("EDGEFLEET_MQTT_USERNAME"),
                     help="broker username, default: the device id [EDGEFLEET_MQTT_USERNAME]")
    run.add_argument("--password", default=env("EDGEFLEET_MQTT_PASSWORD"),
                     help="broker password; prefer the variable [EDGEFLEET_MQTT_PASSWORD]")
    run.add_argument("--controlplane", default=env("EDGEFLEET_CONTROLPLANE_URL"),
                     help="the control plane this device was enrolled with; models are downloaded only from "
                          "its scheme, host and port [EDGEFLEET_CONTROLPLANE_URL]")
    run.add_argument("--task", default=env("EDGEFLEET_TASK", "digits"),
                     help="the task this device runs; models released for another task are refused "
                          "(default: digits, the shipped starter model's) [EDGEFLEET_TASK]")
    run.add_argument("--data-dir", type=Path, default=Path(env("EDGEFLEET_DATA_DIR", "./edgefleet-agent")),
                     help="agent state directory [EDGEFLEET_DATA_DIR]")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse `agent ...` arguments (without the leading `agent`) and run; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    given = sys.argv[1:] if argv is None else argv
    if any(a == "--password" or a.startswith("--password=") for a in given) or _url_has_password(args.broker):
        print("warning: the broker password is on the command line, where other users see it in the process "
              "list; use EDGEFLEET_MQTT_PASSWORD instead", file=sys.stderr)
    for name in ("device_id", "profile"):
        if not getattr(args, name):
            parser.error(f"--{name.replace('_', '-')} is required (or EDGEFLEET_{name.upper()})")
    try:
        from agent._daemon import Agent
        from agent._settings import AgentSettings
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
    configure_logging(args.log_level, structlog=False)  # the device process never imports structlog
    address = address.with_credentials(args.username or address.username or args.device_id,
                                       args.password or address.password)
    settings = AgentSettings(
        device_id=args.device_id, profile=profile, broker=address, data_dir=args.data_dir,
        controlplane_url=args.controlplane, task=args.task, telemetry_interval_s=args.telemetry_interval,
        inference_rate_hz=args.inference_rate, power_mode=PowerMode(args.power_source), model_path=args.model,
        data_path=args.data, train_data_path=Path(args.train_data) if args.train_data else None,
        superlink_host=args.superlink_host, outbox_max_bytes=int(args.outbox_max_mb * 2**20), signing_key=signing_key,
    )
    try:
        agent = Agent(settings)
    except (ValueError, OSError) as exc:
        parser.exit(2, f"error: {exc}\n")
    signal.signal(signal.SIGTERM, lambda *_: agent.stop())
    signal.signal(signal.SIGINT, lambda *_: agent.stop())
    agent.run()
    return 0


def _url_has_password(url: str | None) -> bool:
    from urllib.parse import urlsplit

    try:
        return bool(url and urlsplit(url).password)
    except ValueError:
        return False


if __name__ == "__main__":
    sys.exit(main())
