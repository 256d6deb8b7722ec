"""Runs a round on Flower: a SuperLink supervised by the control plane, SuperNodes started by invited agents.

With TLS (the fleet's server identity) the SuperLink listens on loopback with ``--enable-supernode-auth`` (when
``supernode_auth``), devices reach its Fleet API through the path-filtering proxy on ``superlink_host``, and each
invited device's SuperNode public key (``Device.flower_public_key``, from enrolment) is registered with the
SuperLink before it is invited (the SuperLink keeps registrations in memory: every invitation re-registers).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from sqlmodel import Session

from controlplane._errors import ControlPlaneError
from controlplane.db import Device
from controlplane.devices.schemas import CommandCreate
from controlplane.devices.service import DeviceService
from controlplane.rounds.schemas import RoundCreate, Strategy
from controlplane.rounds.service import RoundOutcome, final_drops
from controlplane.statuses import CommandStatus
from federated.flower.config import RunReportStatus

if TYPE_CHECKING:
    from controlplane.pki import ServerIdentity

__all__ = ["FlowerRoundRunner"]

log = structlog.get_logger("edgefleet.rounds")

DISCOVERY_TIMEOUT_S = 90.0  # SuperNodes start on invitation; the first ClientApp start is slow on small devices
POLL_S = 1.0  # how often a running round looks at the run's status and the devices' answers
FINISH_GRACE_S = 15.0  # after a completed run: how long the devices get to leave on the ServerApp's notice


class FlowerRoundRunner:
    """One SuperLink for the control plane (started on the first round); one Flower run per round."""

    def __init__(self, data_dir: Path, devices: DeviceService, *, superlink_host: str = "127.0.0.1",
                 device_superlink_address: str | None = None, tls: ServerIdentity | None = None,
                 supernode_auth: bool = False, fleet_port: int | None = None,
                 device_host: str | None = None) -> None:
        """``superlink_host``: where devices reach the Fleet API (with ``tls`` the proxy listens there and the
        SuperLink itself on loopback); ``fleet_port``: the proxy's port (free one by default); ``tls``: the
        fleet's server identity (``FleetPKI.server``); ``supernode_auth``: only registered SuperNode keys may
        connect (needs ``tls``); ``device_host``: the name devices know this host by, when ``superlink_host`` is
        a wildcard address (the port is the Fleet API's)."""
        if supernode_auth and tls is None:
            raise ValueError("SuperNode authentication needs TLS")
        self.data_dir = data_dir
        self.devices = devices
        self.superlink_host = superlink_host
        self.device_superlink_address = device_superlink_address
        self.tls = tls
        self.supernode_auth = supernode_auth
        self.fleet_port = fleet_port
        self.device_host = device_host
        self.results_dir = data_dir / "results"
        self._superlink: Any = None
        self._lock = threading.Lock()
        self._stopping = threading.Event()  # release threads stop waiting for the devices and release them now
        self._releases: set[threading.Thread] = set()

    def _ensure_superlink(self) -> Any:
        with self._lock:
            if self._superlink is None:
                from federated.flower.runtime import SuperLinkProcess

                self.results_dir.mkdir(parents=True, exist_ok=True)
                if self.tls is None:
                    link = SuperLinkProcess(self.data_dir / "superlink", host=self.superlink_host)
                else:
                    link = SuperLinkProcess(self.data_dir / "superlink", host="127.0.0.1", tls=self.tls,
                                            supernode_auth=self.supernode_auth, fleet_host=self.superlink_host,
                                            fleet_port=self.fleet_port)
                self._superlink = link.start()
                log.info("superlink.started", address=self._superlink.address)
            return self._superlink

    @property
    def superlink(self) -> Any:
        """The running SuperLink (None before the first round)."""
        return self._superlink

    def stop(self) -> None:
        """Stop waiting to release the devices of completed rounds (they leave on the ServerApp's notice, or at the
        latest when their round's time budget ends), then stop the SuperLink."""
        self._stopping.set()
        for thread in list(self._releases):
            thread.join(timeout=10)
        with self._lock:
            if self._superlink is not None:
                self._superlink.stop()
                self._superlink = None

    def run(self, round_id: int, data: RoundCreate, invited: list[str],
            initial_weights: Path | None = None) -> RoundOutcome:
        """Invite, run, and whatever the outcome release the devices: every invited device that has not left the
        round by itself is told that it is over (so that the next round can invite it)."""
        superlink = self._ensure_superlink()
        budget = DISCOVERY_TIMEOUT_S + data.rounds * (data.round_timeout_s + 30.0)
        address = self.device_superlink_address or superlink.device_address
        if self.device_superlink_address is None and self.device_host is not None:
            address = f"{self.device_host}:{address.rsplit(':', 1)[1]}"
        joins: dict[str, str] = {}  # device -> its join_round command
        keys: dict[bytes, str] = {}  # registered SuperNode public key (PEM) -> device
        not_invited: dict[str, str] = {}
        completed = False
        started_wall = time.time()
        try:
            for device_id in invited:
                if self.supernode_auth:
                    try:
                        keys[self._register(superlink, device_id)] = device_id
                    except (ValueError, RuntimeError) as exc:
                        not_invited[device_id] = str(exc)
                        continue
                # The agent starts a SuperNode for this round only and stops it when the run ends (the ServerApp's
                # notice, or our leave below), or at the latest after the budget.
                args: dict[str, Any] = {"superlink": address, "round_id": str(round_id), "timeout_s": budget}
                if self.tls is not None:
                    args["tls"] = True
                joins[device_id] = self.devices.send_command(device_id, CommandCreate(
                    kind="join_round", args=args, wait_s=0)).command_id
            outcome = self._run(superlink, round_id, data, invited, joins, budget, initial_weights, not_invited)
            self._add_clock_skews(superlink, outcome, keys, started_wall)
            completed = outcome.ok
        finally:
            if completed:  # the devices are leaving on the ServerApp's notice: the build need not wait for them
                thread = threading.Thread(target=self._release_in_background, args=(round_id, joins),
                                          name=f"round-{round_id}-release", daemon=True)
                self._releases.add(thread)
                thread.start()
            else:
                self._release(round_id, joins, grace_s=0.0)
        return outcome

    # -- SuperNode keys -------------------------------------------------------------------------------------
    def _public_key(self, device_id: str) -> str | None:
        with Session(self.devices.engine) as session:
            device = session.get(Device, device_id)
            return getattr(device, "flower_public_key", None) if device is not None else None

    def _register(self, superlink: Any, device_id: str) -> bytes:
        """Register the device's SuperNode key with the SuperLink; returns it (PEM). ValueError without one."""
        from federated.flower.runtime import supernode_public_key_pem

        key = self._public_key(device_id)
        if not key:
            raise ValueError("no SuperNode key on record (enrol the device with `edgefleet agent enroll --train`)")
        pem = supernode_public_key_pem(key)
        node_id = superlink.register_supernode(key, name=device_id)
        log.info("supernode.registered", device_id=device_id, node_id=node_id)
        return pem

    def unregister(self, device_id: str, public_key: str | None = None) -> bool:
        """Withdraw a device's SuperNode key from the SuperLink (when the device is deleted: pass its key, read
        before the row goes). False if the SuperLink is not running or did not know the key; a SuperLink
        started later starts with no keys (it keeps them in memory)."""
        from federated.flower.runtime import FlowerControlError

        key = public_key if public_key is not None else self._public_key(device_id)
        with self._lock:
            superlink = self._superlink
        if not key or superlink is None or not self.supernode_auth:
            return False
        try:
            removed = bool(superlink.unregister_supernode(key))
        except (ValueError, FlowerControlError) as exc:
            log.warning("supernode.unregister_failed", device_id=device_id, error=str(exc))
            return False
        if removed:
            log.info("supernode.unregistered", device_id=device_id)
        return removed

    @staticmethod
    def _add_clock_skews(superlink: Any, outcome: RoundOutcome, keys: dict[bytes, str], since: float) -> None:
        """A device whose Fleet requests the SuperLink refused for their timestamps dropped out for clock skew:
        say so rather than "did not connect" or "no update within ..." (the reason of the round it dropped out
        of last, also when it had contributed to earlier ones). A device that contributed to the run's last
        rounds it was sampled for finished it: a refusal on the way does not make it a drop-out."""
        from federated.flower.fleet_proxy import CLOCK_SKEW_AHEAD_S, CLOCK_SKEW_BEHIND_S

        last_drops = final_drops(outcome.metrics)
        for pem, skew in superlink.clock_skews(since).items():
            device_id = keys.get(pem)
            if device_id is None or (device_id in outcome.participants and device_id not in last_drops):
                continue
            reason = (f"clock skew: the device's clock is {skew:+.0f} s off the control plane's (the SuperLink "
                      f"accepts -{CLOCK_SKEW_BEHIND_S:g} s to +{CLOCK_SKEW_AHEAD_S:g} s; run NTP on the device)")
            if device_id in last_drops:
                for entry in outcome.metrics:
                    if entry.get("round") == last_drops[device_id].round:
                        entry["drop_reasons"] = {**(entry.get("drop_reasons") or {}), device_id: reason}
            if device_id not in outcome.participants:
                outcome.refused.pop(device_id, None)
                outcome.dropped[device_id] = reason
            log.warning("round.clock_skew", device_id=device_id, skew_s=round(skew))

    def _run(self, superlink: Any, round_id: int, data: RoundCreate, invited: list[str], joins: dict[str, str],
             budget: float, initial_weights: Path | None, not_invited: dict[str, str]) -> RoundOutcome:
        run_config: dict[str, str | int | float | bool] = {
            "round-id": str(round_id), "task": data.task, "strategy": str(data.strategy),
            "num-rounds": data.rounds, "min-clients": data.min_clients, "devices": ",".join(invited),
            "discovery-timeout-s": DISCOVERY_TIMEOUT_S, "round-timeout-s": data.round_timeout_s,
            "local-epochs": data.local_epochs, "lr": data.learning_rate,
            "proximal-mu": data.proximal_mu if data.strategy is Strategy.FEDPROX else 0.0,
            "results-dir": str(self.results_dir),
        }
        if initial_weights is not None:
            run_config["initial-weights"] = str(initial_weights)
        started = time.monotonic()
        run_id = superlink.submit_run(run_config=run_config)
        log.info("round.submitted", round_id=round_id, flower_run_id=run_id, invited=invited)
        deadline = started + budget
        while True:
            status = superlink.run_status(run_id)
            refused = {**not_invited, **self._refusals(joins)}
            if status.finished:
                break
            if len(invited) - len(refused) < data.min_clients:
                # Waiting for the discovery timeout would only end in "0 devices available": stop now, say why.
                superlink.stop_run(run_id)
                return RoundOutcome(ok=False, refused=refused, reason=(
                    f"only {len(invited) - len(refused)} of {len(invited)} invited device(s) accepted the "
                    f"invitation, min_clients is {data.min_clients}"))
            if time.monotonic() >= deadline:
                superlink.stop_run(run_id)
                return RoundOutcome(ok=False, refused=refused,
                                    reason=f"the Flower run did not finish within {budget:.0f} s")
            time.sleep(POLL_S)
        outcome = self._outcome(run_id, time.monotonic() - started, status)
        outcome.refused = refused
        return outcome

    def _refusals(self, joins: dict[str, str]) -> dict[str, str]:
        """Devices that declined their invitation, with the reason their agent gave."""
        refused: dict[str, str] = {}
        for device_id, command_id in joins.items():
            try:
                command = self.devices.get_command(device_id, command_id)
            except ControlPlaneError:  # the device was deleted meanwhile
                continue
            if command.status is CommandStatus.ERROR and not (command.result or {}).get("joined", False):
                refused[device_id] = command.reason or "declined (no reason given)"
        return refused

    def _release_in_background(self, round_id: int, joins: dict[str, str]) -> None:
        try:
            self._release(round_id, joins, FINISH_GRACE_S)
        except Exception as exc:  # noqa: BLE001 - e.g. the database went away: the agents' own budget still ends it
            log.warning("round.release_failed", round_id=round_id, error=f"{type(exc).__name__}: {exc}")
        finally:
            self._releases.discard(threading.current_thread())

    def _release(self, round_id: int, joins: dict[str, str], grace_s: float) -> None:
        """Tell every device still in the round that it is over. After a completed run the ServerApp has told them
        already: give them ``grace_s`` to leave by themselves first."""
        deadline = time.monotonic() + grace_s
        while True:
            pending = [d for d, c in joins.items() if self._pending(d, c)]
            if not pending or time.monotonic() >= deadline:
                break
            if self._stopping.wait(POLL_S):
                # Shutting down: a leave now would wait in an offline device's broker session and could end a
                # later round that reuses this id (a new database); the device's own budget ends this one.
                return
        for device_id in pending:
            try:
                self.devices.send_command(device_id, CommandCreate(
                    kind="join_round", args={"round_id": str(round_id), "leave": True}, wait_s=0))
            except ControlPlaneError as exc:
                log.warning("round.release_failed", round_id=round_id, device_id=device_id, error=str(exc))
        if pending:
            log.info("round.released", round_id=round_id, devices=pending)

    def _pending(self, device_id: str, command_id: str) -> bool:
        try:
            return self.devices.get_command(device_id, command_id).status is CommandStatus.PENDING
        except ControlPlaneError:
            return False

    def _outcome(self, run_id: int, duration_s: float, status: Any) -> RoundOutcome:
        path = self.results_dir / f"{run_id}.json"
        flower = f"Flower run {status.sub_status or status.status}" + (f": {status.details}" if status.details else "")
        try:
            report: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            return RoundOutcome(ok=False, reason=f"the ServerApp left no readable results ({flower}; {path}: {exc})")
        if report.get("status") not in (RunReportStatus.COMPLETED, RunReportStatus.FAILED):
            # It wrote progress, then died (killed, out of memory) before it could write the end.
            return RoundOutcome(ok=False, reason=f"the ServerApp ended before the run did ({flower})")
        metrics = [{"round": r["round"], "accuracy": r.get("accuracy"), "loss": r.get("loss"),
                    "participants": r.get("participants", []), "dropped": r.get("dropped", []),
                    "drop_reasons": r.get("drop_reasons", {}), "duration_s": r.get("duration_s")} for r in report.get("rounds", [])]
        if report.get("initial"):
            metrics.insert(0, {"round": 0, **report["initial"], "participants": []})
        log.info("round.finished", flower_run_id=run_id, status=report.get("status"), duration_s=round(duration_s, 1))
        return RoundOutcome(
            ok=report.get("status") == RunReportStatus.COMPLETED, reason=report.get("reason"), metrics=metrics,
            participants=list(report.get("participants", [])), dropped=dict(report.get("skipped", {})),
            weights_path=report.get("weights_path"),
        )
