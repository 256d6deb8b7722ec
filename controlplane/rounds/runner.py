"""Runs a round on Flower: a SuperLink supervised by the control plane, SuperNodes started by invited agents."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import structlog

from controlplane.devices.schemas import CommandCreate
from controlplane.devices.service import DeviceService
from controlplane.rounds.schemas import RoundCreate
from controlplane.rounds.service import RoundOutcome

__all__ = ["FlowerRoundRunner"]

log = structlog.get_logger("edgefleet.rounds")

DISCOVERY_TIMEOUT_S = 90.0  # SuperNodes start on invitation; the first ClientApp start is slow on small devices


class FlowerRoundRunner:
    """One SuperLink for the control plane (started on the first round); one Flower run per round."""

    def __init__(self, data_dir: Path, devices: DeviceService, *, superlink_host: str = "127.0.0.1",
                 device_superlink_address: str | None = None) -> None:
        self.data_dir = data_dir
        self.devices = devices
        self.superlink_host = superlink_host
        self.device_superlink_address = device_superlink_address
        self.results_dir = data_dir / "results"
        self._superlink: Any = None
        self._lock = threading.Lock()

    def _ensure_superlink(self) -> Any:
        with self._lock:
            if self._superlink is None:
                from federated.flower.runtime import SuperLinkProcess

                self.results_dir.mkdir(parents=True, exist_ok=True)
                self._superlink = SuperLinkProcess(self.data_dir / "superlink", host=self.superlink_host).start()
                log.info("superlink.started", address=self._superlink.address)
            return self._superlink

    def stop(self) -> None:
        with self._lock:
            if self._superlink is not None:
                self._superlink.stop()
                self._superlink = None

    def run(self, round_id: int, data: RoundCreate, invited: list[str]) -> RoundOutcome:
        superlink = self._ensure_superlink()
        budget = DISCOVERY_TIMEOUT_S + data.rounds * (data.round_timeout_s + 30.0)
        address = self.device_superlink_address or superlink.address
        for device_id in invited:
            # The agent starts a SuperNode for this round only and stops it when the run ends (or the budget).
            self.devices.send_command(device_id, CommandCreate(
                kind="join_round", args={"superlink": address, "round_id": str(round_id), "timeout_s": budget},
                wait_s=0))
        run_config: dict[str, str | int | float | bool] = {
            "round-id": str(round_id), "task": data.task, "strategy": str(data.strategy),
            "num-rounds": data.rounds, "min-clients": data.min_clients, "devices": ",".join(invited),
            "discovery-timeout-s": DISCOVERY_TIMEOUT_S, "round-timeout-s": data.round_timeout_s,
            "local-epochs": data.local_epochs, "lr": data.learning_rate,
            "proximal-mu": data.proximal_mu if str(data.strategy) == "fedprox" else 0.0,
            "results-dir": str(self.results_dir),
        }
        started = time.monotonic()
        run_id = superlink.submit_run(run_config=run_config)
        log.info("round.submitted", round_id=round_id, flower_run_id=run_id, invited=invited)
        try:
            superlink.wait_run(run_id, timeout=budget)
        except TimeoutError:
            superlink.stop_run(run_id)
            return RoundOutcome(ok=False, reason=f"the Flower run did not finish within {budget:.0f} s")
        return self._outcome(run_id, time.monotonic() - started)

    def _outcome(self, run_id: int, duration_s: float) -> RoundOutcome:
        path = self.results_dir / f"{run_id}.json"
        try:
            report: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            return RoundOutcome(ok=False, reason=f"the ServerApp left no readable results ({path}: {exc})")
        metrics = [{"round": r["round"], "accuracy": r.get("accuracy"), "loss": r.get("loss"),
                    "participants": r.get("participants", []), "dropped": r.get("dropped", []),
                    "duration_s": r.get("duration_s")} for r in report.get("rounds", [])]
        if report.get("initial"):
            metrics.insert(0, {"round": 0, **report["initial"], "participants": []})
        log.info("round.finished", flower_run_id=run_id, status=report.get("status"), duration_s=round(duration_s, 1))
        return RoundOutcome(
            ok=report.get("status") == "completed", reason=report.get("reason"), metrics=metrics,
            participants=list(report.get("participants", [])), dropped=dict(report.get("skipped", {})),
            weights_path=report.get("weights_path"),
        )
