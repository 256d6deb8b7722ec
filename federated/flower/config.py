"""The run configuration of an EdgeFleet round, shared by the ServerApp, the ClientApp and the runtime.

Pure Python (no flwr, no torch): the control plane builds run configs with it, the apps parse them with it.

Run-config keys (defaults in ``federated/flower/app/pyproject.toml``, the single source of truth):

``round-id``
    The control plane's id of the round, echoed in the results and in the devices' status files.
``task``
    A registered task name (:func:`federated.tasks.get_task`): the ServerApp resolves it with the SuperLink's
    registry and each device's ClientApp with its agent's (``EDGEFLEET_TASKS``, entry points), never by import.
``strategy``
    ``fedavg`` | ``fedprox`` | ``fedadam`` (Flower's built-in ``FedAvg``, ``FedProx``, ``FedAdam``).
``num-rounds``, ``min-clients``
    Rounds to run; a round fails (and with it the run) when fewer than ``min-clients`` devices return an update.
``fraction``, ``over-selection``
    Each round trains ``target = max(min-clients, ceil(fraction x available invited devices))`` devices; it
    samples ``ceil(target x (1 + over-selection))`` of them (capped at what is available) and closes as soon as
    ``target`` updates have arrived, so over-selected stragglers do not hold the round up.
``fraction-evaluate``
    Share of the devices asked for a local evaluation after each round (0: none; the global model is always
    evaluated centrally on the task's held-out set).
``devices``
    Comma-separated invited device ids. Only these are ever sampled; empty means "any device that connects".
``discovery-timeout-s``
    How long to wait for the invited devices' SuperNodes to connect and identify themselves before round 1
    (it starts earlier once all invited devices are there).
``round-timeout-s``
    The most a round waits for updates; then it goes on with what arrived (or fails below ``min-clients``).
``local-epochs``, ``lr``, ``batch-size``, ``proximal-mu``
    Local training (``proximal-mu``: FedProx's mu, used by ``fedprox`` only).
``server-lr``
    FedAdam's server learning rate (``eta``).
``seed``
    Seeds device sampling and the initial global model.
``initial-weights``
    A state-dict ``.npz`` on the SuperLink's machine (a registered model version's weights) the run starts
    from instead of a freshly initialised model (empty: fresh). The control plane sets it from the round's
    ``initial_model``; the ServerApp refuses weights that do not fit the task's model.
``poll-interval-s``
    How often the ServerApp polls the SuperLink for replies (Flower's own ``send_and_receive`` sleeps 3 s).
``finish-wait-s``
    At the end the ServerApp tells every SuperNode of the run that it is over (so agents can stop their
    SuperNode) and waits this long for them to confirm.
``results-dir``
    Where the ServerApp writes ``<run_id>.json`` and the final weights ``<run_id>.npz`` (empty: nowhere).
"""

from __future__ import annotations

import enum
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

__all__ = [
    "APP_DIR",
    "DEFAULT_RUN_CONFIG",
    "QUERY_ACTION_KEY",
    "QUERY_FINISH",
    "QUERY_IDENTIFY",
    "STRATEGIES",
    "RunReportStatus",
    "RunSettings",
    "Strategy",
    "parse_device_list",
    "parse_run_config",
]

APP_DIR: Final = Path(__file__).resolve().parent / "app"


class Strategy(enum.StrEnum):
    """The strategy registry: every aggregation strategy a round may ask for, declared here once (the control
    plane's API schema and CLI derive their choices from it; the ServerApp maps each to Flower's built-in one)."""

    FEDAVG = "fedavg"
    FEDPROX = "fedprox"
    FEDADAM = "fedadam"


STRATEGIES: Final = tuple(s.value for s in Strategy)


class RunReportStatus(enum.StrEnum):
    """The ``status`` of the ServerApp's result report (``<results-dir>/<run_id>.json``)."""

    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"

# The query messages the ServerApp sends (config record "query", key "action").
QUERY_ACTION_KEY: Final = "action"
QUERY_IDENTIFY: Final = "identify"
QUERY_FINISH: Final = "finish"


def _load_defaults() -> dict[str, Any]:
    with open(APP_DIR / "pyproject.toml", "rb") as fh:
        config: dict[str, Any] = tomllib.load(fh)["tool"]["flwr"]["app"]["config"]
    return config


DEFAULT_RUN_CONFIG: Final[Mapping[str, Any]] = _load_defaults()


def parse_device_list(value: str) -> tuple[str, ...]:
    """``"a, b,,c"`` -> ``("a", "b", "c")`` (order kept, duplicates dropped)."""
    seen: dict[str, None] = {}
    for part in value.split(","):
        part = part.strip()
        if part:
            seen.setdefault(part, None)
    return tuple(seen)


@dataclass(frozen=True)
class RunSettings:
    round_id: str
    task: str
    strategy: Strategy
    num_rounds: int
    min_clients: int
    fraction: float
    over_selection: float
    fraction_evaluate: float
    devices: tuple[str, ...]
    discovery_timeout_s: float
    round_timeout_s: float
    local_epochs: int
    lr: float
    batch_size: int
    proximal_mu: float
    server_lr: float
    seed: int
    poll_interval_s: float
    finish_wait_s: float
    results_dir: str
    initial_weights: str = ""

    def sample_sizes(self, available: int) -> tuple[int, int]:
        """``(target, sampled)`` for a round with ``available`` invited devices connected (see module doc)."""
        if available <= 0:
            return 0, 0
        target = min(available, max(self.min_clients, math.ceil(self.fraction * available)))
        sampled = min(available, math.ceil(target * (1.0 + self.over_selection)))
        return target, sampled


def parse_run_config(run_config: Mapping[str, Any]) -> RunSettings:
    """Validate a (fused) run config; missing keys take the app's defaults.

    Raises
    ------
    ValueError
        An unknown strategy or an out-of-range value, naming the key.
    """
    merged = {**DEFAULT_RUN_CONFIG, **run_config}

    def text(key: str) -> str:
        return str(merged[key]).strip()

    def integer(key: str, minimum: int) -> int:
        value = merged[key]
        if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
            raise ValueError(f"run config {key!r} must be an integer, got {value!r}")
        if int(value) < minimum:
            raise ValueError(f"run config {key!r} must be >= {minimum}, got {value!r}")
        return int(value)

    def number(key: str, minimum: float, maximum: float = math.inf, *, strict_min: bool = False) -> float:
        value = merged[key]
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"run config {key!r} must be a number, got {value!r}")
        low_ok = value > minimum if strict_min else value >= minimum
        if not low_ok or value > maximum:
            bound = ">" if strict_min else ">="
            raise ValueError(f"run config {key!r} must be {bound} {minimum} and <= {maximum}, got {value!r}")
        return float(value)

    name = text("strategy").lower()
    if name not in STRATEGIES:
        raise ValueError(f"run config 'strategy' must be one of {', '.join(STRATEGIES)}, got {name!r}")
    strategy = Strategy(name)
    task = text("task")
    if not task:
        raise ValueError("run config 'task' must not be empty")
    devices = parse_device_list(text("devices"))
    min_clients = integer("min-clients", 1)
    if devices and min_clients > len(devices):
        raise ValueError(f"run config 'min-clients' ({min_clients}) exceeds the {len(devices)} invited devices")
    return RunSettings(
        round_id=text("round-id"),
        task=task,
        strategy=strategy,
        num_rounds=integer("num-rounds", 1),
        min_clients=min_clients,
        fraction=number("fraction", 0.0, 1.0, strict_min=True),
        over_selection=number("over-selection", 0.0, 10.0),
        fraction_evaluate=number("fraction-evaluate", 0.0, 1.0),
        devices=devices,
        discovery_timeout_s=number("discovery-timeout-s", 0.0),
        round_timeout_s=number("round-timeout-s", 0.0, strict_min=True),
        local_epochs=integer("local-epochs", 1),
        lr=number("lr", 0.0, strict_min=True),
        batch_size=integer("batch-size", 1),
        proximal_mu=number("proximal-mu", 0.0),
        server_lr=number("server-lr", 0.0, strict_min=True),
        seed=integer("seed", 0),
        poll_interval_s=number("poll-interval-s", 0.01, 10.0),
        finish_wait_s=number("finish-wait-s", 0.0, 600.0),
        results_dir=text("results-dir"),
        initial_weights=text("initial-weights"),
    )
