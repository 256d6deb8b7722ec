"""Federated rounds on a real Flower 1.41 deployment: a SuperLink and SuperNodes as subprocesses, no mocks.

Each integration test gets its own SuperLink (``federated.flower.runtime.SuperLinkProcess``); devices are
SuperNodes on digits partitions, started directly or through the agent's ``join_round`` handler.
Flower's SuperNodes poll every 3 s and every message starts a ClientApp process, so a round takes ~10 s here.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

pytest.importorskip("flwr")
pytest.importorskip("torch")
pytest.importorskip("sklearn")

from agent import protocol as wire
from agent.join_round import Rounds
from agent.round_status import read_status
from federated.flower.config import parse_run_config
from federated.flower.runtime import SuperLinkProcess, SuperNodeProcess, node_config_arg
from federated.tasks import get_task
from firmware_profiles import get_profile

RUN_TIMEOUT_S = 120.0


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def partitions(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three non-IID digits partitions (Dirichlet alpha=1) as the devices store them."""
    task = get_task("digits")
    directory = tmp_path_factory.mktemp("partitions")
    paths = []
    for i, part in enumerate(task.partition(3, 1.0, 0)):
        path = directory / f"part{i}.npz"
        task.write_partition(part, path)
        paths.append(path)
    return paths


@pytest.fixture
def superlink(tmp_path: Path) -> Iterator[SuperLinkProcess]:
    # The token travels in the SuperLink's environment (inherited by the ServerApp), not in the run config
    # that every SuperNode can read.
    link = SuperLinkProcess(tmp_path / "superlink")
    link.start()
    try:
        yield link
    finally:
        link.stop()


def _start_nodes(link: SuperLinkProcess, root: Path, names: list[str], partitions: list[Path]) -> list[SuperNodeProcess]:
    nodes = []
    for name, data_path in zip(names, partitions, strict=True):
        node = SuperNodeProcess(
            link.address,
            device_id=name,
            data_path=data_path,
            flwr_home=root / name,
            status_path=root / name / "status.json",
            log_path=root / f"{name}.log",
        )
        nodes.append(node.start())
    return nodes


def _run_config(results: Path, devices: list[str], **extra: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "devices": ",".join(devices),
        "num-rounds": 2,
        "min-clients": 2,
        "local-epochs": 5,
        "lr": 0.01,
        "batch-size": 32,
        "discovery-timeout-s": 30.0,
        "round-timeout-s": 60.0,
        "results-dir": str(results),
    }
    config.update(extra)
    return config


def _wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


# ------------------------------------------------------------------------------------------ fast unit tests


def test_run_config_defaults_and_validation() -> None:
    settings = parse_run_config({"devices": "a, b,,a", "min-clients": 2})
    assert settings.devices == ("a", "b")
    assert settings.strategy == "fedavg"
    assert settings.sample_sizes(3) == (3, 3)
    over = parse_run_config({"fraction": 0.5, "over-selection": 0.5, "min-clients": 1})
    assert over.sample_sizes(4) == (2, 3)  # train 2, sample 3, close at 2 updates
    with pytest.raises(ValueError, match="strategy"):
        parse_run_config({"strategy": "fedsgd"})
    with pytest.raises(ValueError, match="min-clients"):
        parse_run_config({"devices": "a", "min-clients": 2})


def test_node_config_quoting() -> None:
    assert node_config_arg({"device-id": "d1", "data-path": "/a b/c.npz", "n": 3}) == (
        "device-id='d1' data-path='/a b/c.npz' n=3"
    )
    with pytest.raises(ValueError):
        node_config_arg({"data-path": "/it's.npz"})


def _fake_agent(tmp_path: Path, device_id: str, profile: str = "raspberry-pi-5",
                train_data: Path | None = None) -> Any:
    """The parts of an agent's agent.commands.CommandContext that the join_round handler uses."""
    settings = SimpleNamespace(data_dir=tmp_path / device_id, profile=get_profile(profile),
                               train_data_path=train_data, superlink_host=None, controlplane_url=None,
                               broker=SimpleNamespace(host="127.0.0.1"))
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return SimpleNamespace(settings=settings, device_id=device_id, wait_for_stop=threading.Event().wait)


def handle_join_round(agent: Any, command: wire.Command, rounds: Rounds | None = None) -> Any:
    """The join_round handler of an agent with round state ``rounds`` (a fresh agent's by default)."""
    return (rounds or Rounds()).handle(agent, command)


def test_join_round_refusals(tmp_path: Path) -> None:
    command = wire.Command(command_id="c1", kind="join_round",
                           args={"superlink": "127.0.0.1:9092", "round_id": "r1"})
    ok, reason, result = handle_join_round(_fake_agent(tmp_path, "coral", "coral-dev-board"), command)
    assert not ok and reason is not None and "may not train" in reason
    assert result == {"round_id": "r1", "joined": False, "participated": False}
    ok, reason, _ = handle_join_round(_fake_agent(tmp_path, "pi"), command)  # no partition file
    assert not ok and reason is not None and "no training data" in reason
    bad = wire.Command(command_id="c2", kind="join_round", args={"superlink": "nope", "round_id": "r1"})
    ok, reason, _ = handle_join_round(_fake_agent(tmp_path, "pi"), bad)
    assert not ok and reason is not None and "superlink" in reason
    # A command cannot send the device to another server's SuperLink (it would run that server's ClientApp code)
    elsewhere_link = wire.Command(command_id="c4", kind="join_round",
                                  args={"superlink": "203.0.113.7:9092", "round_id": "r1"})
    ok, reason, _ = handle_join_round(_fake_agent(tmp_path, "pi"), elsewhere_link)
    assert not ok and reason is not None and "superlink 203.0.113.7:9092 is not this device's control plane" in reason
    enrolled_there = _fake_agent(tmp_path, "pi2")
    enrolled_there.settings.controlplane_url = "https://cp.example:8443"
    ok, reason, _ = handle_join_round(enrolled_there, command)  # 127.0.0.1 is not cp.example
    assert not ok and reason is not None and "(cp.example)" in reason
    # A command cannot point the device at a file: the training data is the device's own setting
    secret = tmp_path / "secret.npz"
    secret.write_bytes(b"not for the control plane to choose")
    pointed = wire.Command(command_id="c3", kind="join_round",
                           args={"superlink": "127.0.0.1:9092", "round_id": "r1", "data_path": str(secret)})
    ok, reason, _ = handle_join_round(_fake_agent(tmp_path, "pi"), pointed)
    assert not ok and reason is not None and "data_path is not accepted" in reason
    # The device's own setting is where it looks (absent here: named in the refusal)
    elsewhere = tmp_path / "mnt" / "train.npz"
    ok, reason, _ = handle_join_round(_fake_agent(tmp_path, "pi", train_data=elsewhere), command)
    assert not ok and reason is not None and f"no training data at {elsewhere}" in reason


def test_a_round_the_control_plane_ended_is_left_and_not_joined_again(tmp_path: Path) -> None:
    """The leave itself, while in the round, is tested with real agents in tests/controlplane/test_round_release."""
    agent = _fake_agent(tmp_path, "pi")
    partition = agent.settings.data_dir / "data" / "partition.npz"
    partition.parent.mkdir(parents=True)
    partition.write_bytes(b"present")
    leave = wire.Command(command_id="l1", kind="join_round", args={"round_id": "r7", "leave": True})
    join = wire.Command(command_id="j1", kind="join_round", args={"superlink": "127.0.0.1:9092", "round_id": "r7"})
    # Execute: the end of round r7 reaches the device before (or instead of) its invitation
    rounds = Rounds()
    left = handle_join_round(agent, leave, rounds)
    ok, reason, result = handle_join_round(agent, join, rounds)
    # Assert
    assert left == (True, None, {"round_id": "r7", "left": False})  # it was not in it: nothing to stop
    assert not ok and reason == "round r7 is already over (the control plane ended it)"
    assert result["joined"] is False
    bad = wire.Command(command_id="l2", kind="join_round", args={"round_id": "", "leave": True})
    assert handle_join_round(agent, bad, rounds)[0] is False


# ----------------------------------------------------------------------------------- real Flower deployment


@pytest.mark.integration
@pytest.mark.slow
def test_fedavg_two_rounds_three_nodes(superlink: SuperLinkProcess, partitions: list[Path], tmp_path: Path) -> None:
    devices = ["dev-a", "dev-b", "dev-c"]
    nodes = _start_nodes(superlink, tmp_path / "nodes", devices, partitions)
    results = tmp_path / "results"
    try:
        config = _run_config(results, devices, **{"round-id": "round-a"})
        config["finish-wait-s"] = 0.0  # plain SuperNodes: nobody waits for the end-of-run notice
        run_id = superlink.submit_run(None, config)
        status = superlink.wait_run(run_id, RUN_TIMEOUT_S)
        assert status.completed, status
    finally:
        for node in nodes:
            node.stop()

    report = json.loads((results / f"{run_id}.json").read_text())
    assert report["run_id"] == run_id and report["round_id"] == "round-a"
    assert report["status"] == "completed", report["reason"]
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    for record in report["rounds"]:
        assert record["participants"] == devices and record["dropped"] == []
    assert report["participants"] == devices and report["skipped"] == {}
    assert report["rounds"][-1]["accuracy"] >= 0.8, report["rounds"]
    assert report["rounds"][-1]["accuracy"] > report["initial"]["accuracy"]
    assert Path(report["weights_path"]) == results / f"{run_id}.npz"

    # The final weights load into the task's model and reproduce the reported accuracy.
    import torch

    task = get_task("digits")
    model = task.model()
    with np.load(report["weights_path"]) as npz:
        model.load_state_dict({k: torch.from_numpy(npz[k]) for k in npz.files})
    accuracy = task.evaluate(model, task.heldout())["accuracy"]
    assert accuracy == pytest.approx(report["rounds"][-1]["accuracy"], abs=1e-6)
    for device in devices:  # what each ClientApp recorded for its agent
        status_file = read_status(tmp_path / "nodes" / device / "status.json")
        assert status_file["run_id"] == run_id and status_file["round_id"] == "round-a"
        assert status_file["trained"] == [1, 2]


@pytest.mark.integration
@pytest.mark.slow
def test_only_invited_devices_train(superlink: SuperLinkProcess, partitions: list[Path], tmp_path: Path) -> None:
    """Three devices join through the agent's join_round handler; two are invited, the third never trains.

    All three agents stop their SuperNode when the ServerApp says the run is over."""
    (tmp_path / "results").mkdir()
    devices = ["dev-a", "dev-b", "dev-c"]
    invited = devices[:2]
    acks: dict[str, tuple[bool, str | None, dict[str, Any]]] = {}
    threads = []
    for device, data_path in zip(devices, partitions, strict=True):
        agent = _fake_agent(tmp_path / "agents", device, train_data=data_path)
        command = wire.Command(
            command_id=f"join-{device}",
            kind="join_round",
            args={"superlink": superlink.address, "round_id": "round-b", "timeout_s": RUN_TIMEOUT_S},
        )
        thread = threading.Thread(
            target=lambda a=agent, c=command, d=device: acks.__setitem__(d, handle_join_round(a, c))
        )
        thread.start()
        threads.append(thread)
    superlink.wait_for_nodes(3, 30)  # so that the ServerApp's discovery sees the uninvited one too

    run_id = superlink.submit_run(
        None, _run_config(tmp_path / "results", invited, **{"num-rounds": 1, "round-id": "round-b"})
    )
    status = superlink.wait_run(run_id, RUN_TIMEOUT_S)
    for thread in threads:
        thread.join(timeout=30)
    assert status.completed, status
    report = json.loads((tmp_path / "results" / f"{run_id}.json").read_text())
    assert report["status"] == "completed", report["reason"]
    assert report["rounds"][0]["sampled"] == invited
    assert report["participants"] == invited
    assert report["ignored"] == ["dev-c"]
    # The agents: the invited ones took part, the third one did not, and all left when the run ended.
    assert acks["dev-a"] == (True, None, acks["dev-a"][2]) and acks["dev-a"][2]["participated"] is True
    assert acks["dev-b"][0] is True and acks["dev-b"][2]["trained_rounds"] == [1]
    assert acks["dev-c"][0] is True, acks["dev-c"]
    assert acks["dev-c"][2]["participated"] is False and acks["dev-c"][2]["trained_rounds"] == []


@pytest.mark.integration
@pytest.mark.slow
def test_dropout_mid_round_completes(superlink: SuperLinkProcess, partitions: list[Path], tmp_path: Path) -> None:
    """A SuperNode killed (SIGKILL, like a power loss) once round 1 has started: the round closes at its timeout
    with the two updates it got, the run completes, the device is recorded as dropped and left out of round 2."""
    devices = ["dev-x", "dev-y", "dev-z"]
    nodes = _start_nodes(superlink, tmp_path / "nodes", devices, partitions)
    results = tmp_path / "results"
    try:
        run_id = superlink.submit_run(
            None, _run_config(results, devices, **{"round-timeout-s": 15.0, "finish-wait-s": 0.0})
        )
        progress = results / f"{run_id}.json"
        _wait_for(
            lambda: progress.is_file() and json.loads(progress.read_text()).get("current_round", 0) >= 1,
            60, "round 1 to start",
        )
        nodes[2].kill()
        status = superlink.wait_run(run_id, RUN_TIMEOUT_S)
    finally:
        for node in nodes:
            node.stop()
    assert status.completed, status
    report = json.loads(progress.read_text())
    assert report["status"] == "completed", report["reason"]
    first, second = report["rounds"]
    assert first["sampled"] == devices
    assert first["participants"] == ["dev-x", "dev-y"] and first["dropped"] == ["dev-z"]
    assert "no update within 15s" in first["drop_reasons"]["dev-z"]
    assert second["sampled"] == ["dev-x", "dev-y"] and second["dropped"] == []
    assert report["participants"] == ["dev-x", "dev-y"]
    assert set(report["skipped"]) == {"dev-z"}


@pytest.mark.integration
@pytest.mark.slow
def test_run_without_enough_devices_fails_clearly(superlink: SuperLinkProcess, tmp_path: Path) -> None:
    """No invited device connects: the run fails, says why, and still hands its results back."""
    config = _run_config(tmp_path / "results", ["ghost-1", "ghost-2"])
    config.update({"discovery-timeout-s": 1.0, "round-timeout-s": 1.0})
    run_id = superlink.submit_run(None, config)
    status = superlink.wait_run(run_id, RUN_TIMEOUT_S)
    assert status.finished and status.sub_status == "failed", status
    report = json.loads((tmp_path / "results" / f"{run_id}.json").read_text())
    assert report["status"] == "failed"
    assert report["reason"].startswith("round 1: only 0 invited device(s) available, min_clients is 2")
    assert set(report["skipped"]) == {"ghost-1", "ghost-2"}
    assert "no SuperNode identified" in report["skipped"]["ghost-1"]
    assert "weights_path" not in report and not (tmp_path / "results" / f"{run_id}.npz").exists()
