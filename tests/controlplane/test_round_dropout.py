"""A device that contributed to a run and then dropped out: the round record says which round it left and why.

Real parts: a control plane on mosquitto and each database, its Flower SuperLink, agents as processes that start
SuperNodes on invitation (one is killed, with its SuperNode, like a power loss); a TLS SuperLink refusing a stale
timestamp for the clock-skew reason.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import msgspec
import psutil
import pytest
from sqlmodel import Session

pytest.importorskip("flwr")
pytest.importorskip("torch")

from controlplane.devices.schemas import DeviceCreate
from controlplane.rounds.schemas import RoundDrop
from controlplane.rounds.service import RoundOutcome, final_drops
from controlplane.wiring import Fleet
from tests._services import fx_fleet, wait_for  # noqa: F401 - fx_fleet
from tests.controlplane.test_fleet_e2e import stop
from tests.controlplane.test_round_release import _agents, _round


def test_final_drops_lists_who_did_not_finish_with_the_reason_of_their_last_drop() -> None:
    # Prepare: round 0 (the starting model); a left in round 2 after contributing to 1; b dropped in round 1 and
    # came back in 2; c never contributed; d is from a round recorded before drop reasons were kept
    metrics: list[dict[str, Any]] = [
        {"round": 0, "accuracy": 0.1, "participants": []},
        {"round": 1, "participants": ["a"], "dropped": ["b", "c"],
         "drop_reasons": {"b": "error: boom", "c": "no update within 30s"}},
        {"round": 2, "participants": ["b"], "dropped": ["a", "d"], "drop_reasons": {"a": "no update within 30s"}},
    ]
    # Execute
    drops = final_drops(metrics)
    # Assert
    assert drops == {
        "a": RoundDrop(round=2, reason="no update within 30s", contributed=[1]),
        "c": RoundDrop(round=1, reason="no update within 30s", contributed=[]),
        "d": RoundDrop(round=2, reason="no reason recorded", contributed=[]),
    }
    assert final_drops([]) == {}


# ------------------------------------------------------------------------------ through the runner and service


def _progress(fleet: Fleet, round_id: int) -> dict[str, Any]:
    """The ServerApp's progress report of this round's Flower run ({} before it writes one)."""
    assert fleet.runner is not None
    for path in fleet.runner.results_dir.glob("*.json"):
        try:
            report: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError):  # written atomically, but a previous test's may linger half-read
            continue
        if report.get("round_id") == str(round_id):
            return report
    return {}


def _kill_tree(proc: Any) -> None:
    """SIGKILL an agent and its SuperNode (and ClientApps) at once, like a power loss."""
    root = psutil.Process(proc.pid)
    for process in [*root.children(recursive=True), root]:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(10)


@pytest.mark.integration
@pytest.mark.slow
def test_a_device_killed_after_its_first_update_is_in_the_round_record_with_its_reason(fleet: Fleet,
                                                                                       tmp_path: Path) -> None:
    # Prepare: three agents with data, a run of 2 Flower rounds, min_clients 2
    procs = _agents(fleet, tmp_path, with_data=["drop-a", "drop-b", "drop-c"], without_data=[])
    try:
        started = fleet.rounds.start(_round(rounds=2, round_timeout_s=20.0))
        assert started.invited == ["drop-a", "drop-b", "drop-c"], started
        # Execute: once round 1 is aggregated with drop-c's update (round 2 has started), drop-c loses power
        wait_for(lambda: _progress(fleet, started.id).get("current_round", 0) >= 2, timeout=240,
                 what="round 2 of the run to start")
        assert "drop-c" in _progress(fleet, started.id)["rounds"][0]["participants"]
        _kill_tree(procs.pop("drop-c"))
        wait_for(lambda: fleet.rounds.get(started.id).status in ("succeeded", "failed"), timeout=240,
                 what="the round to end")
        # Assert: the run completed with the two others; the record keeps drop-c among the participants (its update
        # is in the model) and says which round it dropped out of, and why
        record = fleet.rounds.get(started.id)
        assert record.status == "succeeded", (record.reason, record.skipped, record.metrics)
        assert record.participants == ["drop-a", "drop-b", "drop-c"]
        assert "drop-c" not in record.skipped, record.skipped
        last = record.metrics[-1]
        assert last["round"] == 2 and last["participants"] == ["drop-a", "drop-b"] and last["dropped"] == ["drop-c"]
        assert last["drop_reasons"] == {"drop-c": "no update within 20s"}, last
        assert record.dropped == {"drop-c": RoundDrop(round=2, reason="no update within 20s", contributed=[1])}
        # ... as the API and `edgefleet rounds show` print it (JSON)
        shown = json.loads(msgspec.json.encode(record))
        assert shown["dropped"] == {"drop-c": {"round": 2, "reason": "no update within 20s", "contributed": [1]}}
    finally:
        for proc in procs.values():
            stop(proc)


@pytest.mark.integration
@pytest.mark.slow
def test_clock_skew_is_the_reason_of_a_contributor_s_last_drop(fleet: Fleet, tmp_path: Path) -> None:
    """A device that contributed to round 1 and then was refused for its clock: its round-2 drop reason is the
    clock skew (not "no update within ..."), while a device that contributed to the last round keeps none."""
    from controlplane.db import Device
    from controlplane.rounds.runner import FlowerRoundRunner
    from tests.federated.test_flower_shielded import _key, _stale_request

    # Prepare: two devices with SuperNode keys, a TLS SuperLink that registered them
    keys: dict[str, Path] = {}
    for device_id in ("skew-a", "skew-b"):
        fleet.devices.enroll(DeviceCreate(device_id=device_id, profile="raspberry-pi-5"))
        keys[device_id] = tmp_path / f"{device_id}.key"
        public = _key(keys[device_id])
        with Session(fleet.engine) as session:
            device = session.get(Device, device_id)
            assert device is not None
            device.flower_public_key = public
            session.add(device)
            session.commit()
    runner = FlowerRoundRunner(tmp_path / "flower", fleet.devices, tls=fleet.pki.server, supernode_auth=True)
    try:
        link = runner._ensure_superlink()
        pems = {runner._register(link, d): d for d in keys}
        since = time.time()
        # Execute: both are refused once for a stale clock; a dropped out of round 2, b contributed to it
        for key_file in keys.values():
            assert _stale_request(link, fleet.pki.server.ca_file, key_file).status_code == 401
        outcome = RoundOutcome(ok=True, participants=["skew-a", "skew-b"], metrics=[
            {"round": 1, "participants": ["skew-a", "skew-b"], "dropped": [], "drop_reasons": {}},
            {"round": 2, "participants": ["skew-b"], "dropped": ["skew-a"],
             "drop_reasons": {"skew-a": "no update within 30s"}},
        ])
        runner._add_clock_skews(link, outcome, pems, since)
        # Assert
        reason = outcome.metrics[1]["drop_reasons"]["skew-a"]
        assert reason.startswith("clock skew: the device's clock is -600 s"), reason
        assert final_drops(outcome.metrics)["skew-a"].reason == reason
        assert "skew-b" not in final_drops(outcome.metrics)
        assert outcome.dropped == {} and outcome.metrics[0]["drop_reasons"] == {}  # contributors: not "skipped"
    finally:
        runner.stop()
