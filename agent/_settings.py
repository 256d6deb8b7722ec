"""What one agent is configured with: its identity, broker, control plane, files and tuning (plain data)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent._restart import RestartMode
from agent._telemetry import PowerMode
from agent.mqtt import BrokerAddress
from firmware_profiles import Profile

__all__ = ["AgentSettings", "DownloadPolicy", "WatchdogPolicy"]


@dataclass(frozen=True)
class DownloadPolicy:
    """How a model download retries and gives up."""

    stall_timeout_s: float = 30.0  # no byte received for this long: the attempt fails
    total_timeout_s: float = 3600.0  # the whole artifact download, retries included
    attempts: int = 5  # consecutive failed attempts that made no progress before giving up
    backoff_s: float = 0.5  # first retry delay, doubled per failure
    backoff_max_s: float = 8.0
    manifest_max_bytes: int = 1 << 20
    chunk_bytes: int = 64 * 1024
    ca_file: str | None = None  # HTTPS: the CA the control plane is verified against (default: the system store)


@dataclass(frozen=True)
class WatchdogPolicy:
    """How long and how strictly a freshly activated model is watched before it is trusted."""

    window_s: float = 30.0  # how long a freshly activated model is watched
    error_ratio: float = 0.5  # roll back when more than this share of its inferences fail
    min_inferences: int = 5  # before the window ends, decide only on at least this many inferences
    poll_s: float = 0.2


@dataclass
class AgentSettings:
    device_id: str
    profile: Profile
    broker: BrokerAddress
    data_dir: Path
    # The control plane this device was enrolled with: model downloads come only from this origin.
    controlplane_url: str | None = None
    task: str = "digits"  # the task this device runs (the shipped starter model's): releases for others are refused
    telemetry_interval_s: float | None = None  # default: the profile's
    inference_rate_hz: float = 5.0
    power_mode: PowerMode = PowerMode.AUTO
    outbox_max_bytes: int = 16 * 1024 * 1024
    model_path: Path | None = None  # default: the shipped starter model
    data_path: Path | None = None  # default: the shipped digits sample
    # This device's training data for federated rounds (.npz, x raw and y labels, as the task's load_partition
    # reads it): one setting of the device, never chosen by a command. Default: <data_dir>/data/partition.npz.
    train_data_path: Path | None = None
    # The only host whose Flower SuperLink a join_round may name (a SuperLink runs its ClientApp code here).
    # Default: the control plane's host (controlplane_url), else the broker's.
    superlink_host: str | None = None
    # The CA (bundle) the broker, the control plane and the SuperLink are verified against (--ca-file); None:
    # the system store. The broker address and the download policy carry it too.
    ca_file: Path | None = None
    # The device's Flower SuperNode key (EC P-384, from enrolment) for SuperLink node authentication.
    supernode_auth_key_file: Path | None = None
    inflight_window: int = 100
    # The control plane's ed25519 public key (raw 32 bytes): only models signed with it are accepted.
    signing_key: bytes | None = None
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    keepalive_s: int = 30
    session_expiry_s: int = 7 * 24 * 3600  # how long the broker keeps commands for an offline device
    download: DownloadPolicy = field(default_factory=DownloadPolicy)  # model downloads (deploy_model)
    watchdog: WatchdogPolicy = field(default_factory=WatchdogPolicy)  # a freshly activated model
    # How a `restart` command brings the agent back (agent._restart): resolved from AUTO by the entry point.
    restart_mode: RestartMode = RestartMode.EXEC
    extra: dict[str, Any] = field(default_factory=dict)
