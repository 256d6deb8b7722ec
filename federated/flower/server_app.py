"""The EdgeFleet ServerApp: one federated run among the invited devices, results handed back to the control plane.

What a run does (run config: :mod:`federated.flower.config`):

1. **Discovery.** Flower's node ids are random and a node's ``node_config`` is visible to its ClientApp only,
   so the ServerApp sends an ``identify`` query to every connected SuperNode and learns node id -> device id
   from the replies. Only nodes of invited devices (``devices``) are ever sampled; it waits up to
   ``discovery-timeout-s`` for all invited devices (nodes that connect later are identified at the start of
   each round and join from the next one).
2. **Rounds.** For each round: sample among the available invited devices (``fraction``, ``over-selection``),
   let the strategy (Flower's built-in ``FedAvg`` / ``FedProx`` / ``FedAdam``) build the train messages for
   exactly those nodes, wait for replies up to ``round-timeout-s`` (closing early once ``target`` updates are
   in), aggregate with the strategy, optionally ask some devices for a local evaluation, and evaluate the
   global model centrally on the task's held-out set. A round with fewer than ``min-clients`` updates fails the
   run with a reason naming the devices that dropped and why. A device that did not answer is left out of
   later rounds unless it answers an ``identify`` query again (a round short of ``min-clients`` available
   devices waits up to ``round-timeout-s`` for that before failing).
3. **Results.** ``<results-dir>/<run_id>.json`` is rewritten as the run progresses (``current_round``) and at
   the end, with the final weights in ``<results-dir>/<run_id>.npz`` (state dict, one array per key): the control
   plane reads both from there. Every identified SuperNode is then told that the run is over (``finish``
   query), so device agents can stop their SuperNode.

Result JSON::

    {"run_id", "round_id", "status": "completed" | "failed", "reason", "task", "strategy", "num_rounds",
     "current_round", "initial": {"accuracy", "loss"},
     "rounds": [{"round", "accuracy", "loss", "train_loss", "participants", "dropped", "drop_reasons",
                 "sampled", "duration_s", "federated_evaluation"?}],
     "participants": [...], "skipped": {device_id: reason}, "ignored": [...], "weights_path",
     "started_at", "finished_at", "duration_s"}

The ServerApp runs in a process of its own, started by the SuperLink; when the run fails it raises after
writing its results, so that Flower records the run as failed too.
"""

from __future__ import annotations

import io
import json
import os
import random
import tempfile
import threading
import time
from collections.abc import Iterable
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.exception import AggregationError, InconsistentMessageReplies
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, Strategy

from federated.flower.config import (
    QUERY_ACTION_KEY,
    QUERY_FINISH,
    QUERY_IDENTIFY,
    RunReportStatus,
    RunSettings,
    parse_run_config,
)
from federated.flower.config import Strategy as StrategyName

__all__ = ["RoundFailed", "app", "make_strategy"]

app = ServerApp()

_REPLY_TTL_SLACK_S = 30.0
_PULL_GRACE_S = 5.0  # how long past a deadline a pull may take before it is deemed stuck


class RoundFailed(RuntimeError):
    """The run could not complete (too few updates, no devices, ...): the message is the reason."""


def make_strategy(settings: RunSettings) -> Strategy:
    """Flower's built-in strategy for ``settings.strategy``.

    The strategy samples whatever the grid it is given lists: the ServerApp hands it a grid that lists exactly
    the nodes it picked for the round, so sampling knobs are set to "all of them".
    """
    common: dict[str, Any] = {
        "fraction_train": 1.0,
        "fraction_evaluate": settings.fraction_evaluate,
        "min_train_nodes": 1,
        "min_evaluate_nodes": 1,
        "min_available_nodes": 1,
    }
    match settings.strategy:
        case StrategyName.FEDAVG:
            return FedAvg(**common)
        case StrategyName.FEDPROX:
            return FedProx(**common, proximal_mu=settings.proximal_mu)
        case StrategyName.FEDADAM:
            return FedAdam(**common, eta=settings.server_lr)
    raise ValueError(f"unknown strategy {settings.strategy!r}")


class _SelectedGrid(Grid):
    """Flower's grid, listing only the nodes chosen for the current step, with a faster ``send_and_receive``."""

    def __init__(self, grid: Grid, poll_interval_s: float) -> None:
        self._grid = grid
        self._poll_interval_s = poll_interval_s
        self.node_ids: list[int] = []

    def set_run(self, run: Any) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Any:
        return self._grid.run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies, _ = exchange(self._grid, list(messages), timeout or 3600.0, self._poll_interval_s)
        return list(replies.values())


def pull_bounded(grid: Grid, message_ids: list[str], timeout: float) -> list[Message] | None:
    """``grid.pull_messages`` that gives up after ``timeout`` seconds (None then).

    Flower's pull blocks, retrying for up to two hours, on a reply whose content never arrives, which is what a
    SuperNode that dies between pushing its reply and pushing the reply's content leaves behind. The pull goes
    on in a daemon thread; replies it would have returned are lost, and Flower's SuperLink has already
    forgotten them, so the caller counts them as missing.
    """
    done = threading.Event()
    box: list[Any] = []

    def work() -> None:
        try:
            box.append(list(grid.pull_messages(message_ids)))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            box.append(exc)
        finally:
            done.set()

    threading.Thread(target=work, name="pull-messages", daemon=True).start()
    if not done.wait(timeout):
        log(WARNING, "pull_messages did not return within %.1fs: a reply's content is missing", timeout)
        return None
    result = box[0]
    if isinstance(result, BaseException):
        raise result
    replies: list[Message] = result
    return replies


def exchange(
    grid: Grid,
    messages: list[Message],
    timeout: float,
    poll_interval_s: float,
    *,
    enough: int | None = None,
) -> tuple[dict[int, Message], set[int]]:
    """Push ``messages`` and collect replies: ``({node_id: reply}, {node ids that did not reply})``.

    Stops when every node replied, when ``enough`` error-free replies are in, or after ``timeout`` seconds
    (a pull that hangs past that is abandoned, see :func:`pull_bounded`). Replies carrying an error count as
    replies (the caller tells them apart with ``has_error()``).
    """
    if not messages:
        return {}, set()
    for message in messages:
        message.metadata.ttl = timeout + _REPLY_TTL_SLACK_S
    destinations = [m.metadata.dst_node_id for m in messages]
    ids = list(grid.push_messages(messages))
    pending: dict[str, int] = {}
    missing: set[int] = set()
    for msg_id, node_id in zip(ids, destinations, strict=True):
        if msg_id:
            pending[msg_id] = node_id
        else:
            missing.add(node_id)  # the SuperLink refused it
    replies: dict[int, Message] = {}
    deadline = time.monotonic() + timeout
    while pending:
        pulled = pull_bounded(grid, list(pending), max(deadline - time.monotonic(), 0.0) + _PULL_GRACE_S)
        if pulled is None:
            break
        for reply in pulled:
            msg_id = reply.metadata.reply_to_message_id
            if msg_id in pending:
                replies[pending.pop(msg_id)] = reply
        good = sum(1 for r in replies.values() if not r.has_error())
        if not pending or (enough is not None and good >= enough) or time.monotonic() >= deadline:
            break
        time.sleep(min(poll_interval_s, max(0.0, deadline - time.monotonic())))
    missing.update(pending.values())
    return replies, missing


def _query(action: str, **values: Any) -> RecordDict:
    return RecordDict({"query": ConfigRecord({QUERY_ACTION_KEY: action, **values})})


class _Run:
    """One run: discovery, rounds, results. ``execute()`` never raises; the report says what happened."""

    def __init__(self, grid: Grid, settings: RunSettings, run_id: int) -> None:
        self.grid = grid
        self.settings = settings
        self.run_id = run_id
        self.invited = set(settings.devices)  # empty: anyone
        self.rng = random.Random(settings.seed)
        self.device_of: dict[int, str] = {}  # identified nodes (this run's devices and others)
        self.node_of: dict[str, int] = {}  # candidate device -> its node
        self.ignored: set[str] = set()  # connected, answered, not invited (or another round's node)
        self.queried: set[int] = set()  # nodes we sent an identify query to
        self.pending_identify: dict[str, int] = {}  # message id -> node id
        self.out: dict[str, str] = {}  # device -> why it is left out (did not answer a round)
        self.ever_sampled: set[str] = set()
        self.participants: set[str] = set()
        self.last_drop: dict[str, str] = {}
        self.started = time.time()
        self.report: dict[str, Any] = {
            "run_id": run_id,
            "round_id": settings.round_id,
            "status": RunReportStatus.RUNNING,
            "reason": None,
            "task": settings.task,
            "strategy": settings.strategy,
            "num_rounds": settings.num_rounds,
            "current_round": 0,
            "initial": None,
            "rounds": [],
            "participants": [],
            "skipped": {},
            "ignored": [],
            "started_at": self.started,
        }

    # ------------------------------------------------------------------------------------------ discovery

    def _wanted(self, device_id: str) -> bool:
        return not self.invited or device_id in self.invited

    def _push_identify(self, live: set[int]) -> None:
        new = sorted(live - self.queried - set(self.device_of))
        if not new:
            return
        messages = [Message(_query(QUERY_IDENTIFY), dst_node_id=n, message_type=MessageType.QUERY) for n in new]
        for message in messages:
            message.metadata.ttl = self.settings.discovery_timeout_s + self.settings.round_timeout_s
        for msg_id, node_id in zip(self.grid.push_messages(messages), new, strict=True):
            if msg_id:
                self.pending_identify[msg_id] = node_id
        self.queried.update(new)

    def _collect_identify(self) -> None:
        if not self.pending_identify:
            return
        pulled = pull_bounded(self.grid, list(self.pending_identify), _PULL_GRACE_S)
        if pulled is None:  # an answer is stuck half-way; the SuperLink has forgotten the others: ask again
            for node_id in self.pending_identify.values():
                self.queried.discard(node_id)
            self.pending_identify.clear()
            return
        for reply in pulled:
            msg_id = reply.metadata.reply_to_message_id
            if msg_id not in self.pending_identify:
                continue
            node_id = self.pending_identify.pop(msg_id)
            if reply.has_error():
                log(WARNING, "identify: node %s answered with an error: %s", node_id, reply.error.reason)
                continue
            answer = reply.content["reply"]
            device_id = str(answer.get("device-id", ""))
            node_round = str(answer.get("round-id", ""))
            self.device_of[node_id] = device_id
            if not device_id or not self._wanted(device_id) or (
                node_round and self.settings.round_id and node_round != self.settings.round_id
            ):
                self.ignored.add(device_id or f"node-{node_id}")
                continue
            previous = self.node_of.get(device_id)
            if previous is not None and previous != node_id:
                log(WARNING, "device %s answered from node %s (was node %s): using the new one",
                    device_id, node_id, previous)
            self.node_of[device_id] = node_id
            if self.out.pop(device_id, None) is not None:
                log(INFO, "device %s is back", device_id)

    def _refresh(self) -> set[int]:
        """Identify new nodes (and re-query nodes left out); returns the connected node ids."""
        live = set(self.grid.get_node_ids())
        for device_id in list(self.out):  # give left-out devices a chance to come back
            node_id = self.node_of.get(device_id)
            if node_id is not None and node_id in live and node_id not in self.pending_identify.values():
                self.queried.discard(node_id)
                self.device_of.pop(node_id, None)
        self._push_identify(live)
        self._collect_identify()
        return live

    def _discover(self) -> None:
        settings = self.settings
        deadline = time.monotonic() + settings.discovery_timeout_s
        while True:
            self._refresh()
            if self.invited and set(self.node_of) >= self.invited:
                break
            if not self.invited and len(self.node_of) >= settings.min_clients and not self.pending_identify:
                break
            if time.monotonic() >= deadline:
                break
            time.sleep(settings.poll_interval_s)
        log(INFO, "discovery: %d device(s) ready: %s; ignored: %s", len(self.node_of),
            ", ".join(sorted(self.node_of)) or "-", ", ".join(sorted(self.ignored)) or "-")

    def _available(self, live: set[int]) -> dict[str, int]:
        return {d: n for d, n in sorted(self.node_of.items()) if n in live and d not in self.out}

    # --------------------------------------------------------------------------------------- evaluation

    def _central_evaluation(self, task: Any, arrays: ArrayRecord) -> dict[str, float]:
        model = task.model()
        model.load_state_dict(arrays.to_torch_state_dict())
        result = task.evaluate(model, task.heldout())
        return {"accuracy": float(result["accuracy"]), "loss": float(result["loss"])}

    # ------------------------------------------------------------------------------------------- rounds

    def _round(self, rnd: int, task: Any, strategy: Strategy, arrays: ArrayRecord) -> ArrayRecord:
        settings = self.settings
        started = time.monotonic()
        self.report["current_round"] = rnd
        self._save()
        live = self._refresh()
        available = self._available(live)
        wait_until = time.monotonic() + settings.round_timeout_s
        while len(available) < settings.min_clients and time.monotonic() < wait_until:
            time.sleep(settings.poll_interval_s)  # left-out devices may answer `identify` again, new ones join
            live = self._refresh()
            available = self._available(live)
        if len(available) < settings.min_clients:
            left_out = ", ".join(f"{d} ({why})" for d, why in sorted(self.out.items())) or "none"
            raise RoundFailed(
                f"round {rnd}: only {len(available)} invited device(s) available, min_clients is "
                f"{settings.min_clients} (left out: {left_out})"
            )
        target, size = settings.sample_sizes(len(available))
        sampled = sorted(self.rng.sample(sorted(available), size))
        self.ever_sampled.update(sampled)
        selected = _SelectedGrid(self.grid, settings.poll_interval_s)
        selected.node_ids = [available[d] for d in sampled]
        train_config = ConfigRecord(
            {"local-epochs": settings.local_epochs, "lr": settings.lr, "batch-size": settings.batch_size}
        )
        messages = list(strategy.configure_train(rnd, arrays, train_config, selected))
        for message in messages:
            message.metadata.group_id = str(rnd)
        log(INFO, "round %d: training on %s (closes at %d update(s) or after %.0fs)", rnd, ", ".join(sampled),
            target, settings.round_timeout_s)
        replies, missing = exchange(
            self.grid, messages, settings.round_timeout_s, settings.poll_interval_s, enough=target
        )
        good: list[Message] = []
        participants: list[str] = []
        drop_reasons: dict[str, str] = {}
        closed_early = len(missing) > 0 and sum(1 for r in replies.values() if not r.has_error()) >= target
        for node_id, reply in replies.items():
            device_id = self.device_of.get(node_id, f"node-{node_id}")
            if reply.has_error():
                drop_reasons[device_id] = f"error: {reply.error.reason}"
            else:
                good.append(reply)
                participants.append(device_id)
        for node_id in missing:
            device_id = self.device_of.get(node_id, f"node-{node_id}")
            if closed_early:
                drop_reasons[device_id] = "straggler: the round closed with enough updates"
            else:
                drop_reasons[device_id] = f"no update within {settings.round_timeout_s:g}s"
        for device_id, reason in drop_reasons.items():
            self.last_drop[device_id] = reason
            if not reason.startswith("straggler"):
                self.out[device_id] = reason
        record: dict[str, Any] = {
            "round": rnd,
            "sampled": sampled,
            "participants": sorted(participants),
            "dropped": sorted(drop_reasons),
            "drop_reasons": dict(sorted(drop_reasons.items())),
        }
        self.report["rounds"].append(record)
        if len(good) < settings.min_clients:
            reasons = "; ".join(f"{d}: {why}" for d, why in sorted(drop_reasons.items())) or "none"
            raise RoundFailed(
                f"round {rnd}: {len(good)} update(s) from {len(sampled)} sampled device(s), min_clients is "
                f"{settings.min_clients} (dropped: {reasons})"
            )
        try:
            new_arrays, train_metrics = strategy.aggregate_train(rnd, good)
        except (InconsistentMessageReplies, AggregationError) as exc:
            raise RoundFailed(f"round {rnd}: cannot aggregate the updates: {exc}") from exc
        if new_arrays is None:
            raise RoundFailed(f"round {rnd}: the strategy produced no model")
        self.participants.update(participants)
        if train_metrics is not None and "train-loss" in train_metrics:
            record["train_loss"] = float(train_metrics["train-loss"])  # type: ignore[arg-type]
        if settings.fraction_evaluate > 0.0:
            record["federated_evaluation"] = self._federated_evaluation(rnd, strategy, new_arrays, available)
        record.update(self._central_evaluation(task, new_arrays))
        record["duration_s"] = round(time.monotonic() - started, 3)
        log(INFO, "round %d: accuracy %.4f, loss %.4f, %d update(s), dropped: %s (%.1fs)", rnd,
            record["accuracy"], record["loss"], len(good), ", ".join(sorted(drop_reasons)) or "none",
            record["duration_s"])
        return new_arrays

    def _federated_evaluation(
        self, rnd: int, strategy: Strategy, arrays: ArrayRecord, available: dict[str, int]
    ) -> dict[str, Any]:
        settings = self.settings
        selected = _SelectedGrid(self.grid, settings.poll_interval_s)
        selected.node_ids = [n for d, n in available.items() if d not in self.out]
        messages = list(strategy.configure_evaluate(rnd, arrays, ConfigRecord(), selected))
        replies, _ = exchange(self.grid, messages, settings.round_timeout_s, settings.poll_interval_s)
        good = [r for r in replies.values() if not r.has_error()]
        metrics: MetricRecord | None = strategy.aggregate_evaluate(rnd, good) if good else None
        result: dict[str, Any] = {"devices": sorted(self.device_of.get(r.metadata.src_node_id, "?") for r in good)}
        if metrics is not None:
            result.update({k: float(v) for k, v in metrics.items() if isinstance(v, int | float)})
        return result

    # ------------------------------------------------------------------------------------------ results

    def _results_dir(self) -> Path | None:
        return Path(self.settings.results_dir) if self.settings.results_dir else None

    def _save(self) -> None:
        directory = self._results_dir()
        if directory is None:
            return
        _write_atomic(directory / f"{self.run_id}.json", json.dumps(self.report, indent=1).encode())

    def _finish(self, status: RunReportStatus, reason: str | None, arrays: ArrayRecord | None) -> None:
        report = self.report
        try:
            self._collect_identify()  # late answers: who else connected
        except Exception as exc:  # noqa: BLE001 - only for the report
            log(WARNING, "identify: %r", exc)
        report["status"] = status
        report["reason"] = reason
        report["participants"] = sorted(self.participants)
        skipped: dict[str, str] = {}
        for device_id in sorted(self.invited - self.participants):
            if device_id not in self.node_of:
                skipped[device_id] = (
                    f"no SuperNode identified as this device within {self.settings.discovery_timeout_s:g}s"
                )
            elif device_id in self.last_drop:
                skipped[device_id] = self.last_drop[device_id]
            elif device_id not in self.ever_sampled:
                skipped[device_id] = "not sampled"
            else:
                skipped[device_id] = "did not contribute"
        report["skipped"] = skipped
        report["ignored"] = sorted(self.ignored)
        directory = self._results_dir()
        if arrays is not None and status is RunReportStatus.COMPLETED and directory is not None:
            state = {k: np.asarray(v) for k, v in arrays.to_torch_state_dict().items()}
            buffer = io.BytesIO()
            np.savez(buffer, **state)  # type: ignore[arg-type]
            path = directory / f"{self.run_id}.npz"
            _write_atomic(path, buffer.getvalue())
            report["weights_path"] = str(path)
        report["finished_at"] = time.time()
        report["duration_s"] = round(report["finished_at"] - self.started, 3)
        self._save()

    def _tell_nodes(self, status: str) -> None:
        """Tell every connected SuperNode that the run is over (agents stop their SuperNode then).

        Also the ones that connected too late to be identified: a SuperNode started for another round ignores
        it (its ``round-id`` differs). Devices left out after a round they sent no answer to are not waited for:
        most likely gone. Those that answered with an error (their ClientApp raised) are alive and told too.
        """
        live = set(self.grid.get_node_ids())
        gone = {self.node_of[d] for d, why in self.out.items() if d in self.node_of and not why.startswith("error:")}
        nodes = sorted(live - gone)
        if not nodes or self.settings.finish_wait_s <= 0:
            return
        messages = [
            Message(_query(QUERY_FINISH, status=str(status)), dst_node_id=n, message_type=MessageType.QUERY)
            for n in nodes
        ]
        _, missing = exchange(self.grid, messages, self.settings.finish_wait_s, self.settings.poll_interval_s)
        if missing:
            log(INFO, "finish: %d node(s) did not confirm", len(missing))

    # ----------------------------------------------------------------------------------------------- run

    def execute(self) -> dict[str, Any]:
        settings = self.settings
        arrays: ArrayRecord | None = None
        try:
            from federated.tasks import get_task

            task = get_task(settings.task)
            self._refresh()  # identify queries out first: the nodes answer while torch loads here
            arrays = ArrayRecord(_initial_model(task, settings.initial_weights).state_dict())
            self.report["initial"] = self._central_evaluation(task, arrays)
            self._discover()
            strategy = make_strategy(settings)
            for rnd in range(1, settings.num_rounds + 1):
                arrays = self._round(rnd, task, strategy, arrays)
                self._save()
        except RoundFailed as exc:
            log(WARNING, "run %s failed: %s", self.run_id, exc)
            self._finish(RunReportStatus.FAILED, str(exc), None)
        except Exception as exc:  # noqa: BLE001 - whatever went wrong is reported back, then re-raised
            log(WARNING, "run %s crashed: %r", self.run_id, exc)
            self._finish(RunReportStatus.FAILED, f"{type(exc).__name__}: {exc}", None)
        else:
            self._finish(RunReportStatus.COMPLETED, None, arrays)
        try:
            self._tell_nodes(self.report["status"])
        except Exception as exc:  # noqa: BLE001 - the results are in; telling the nodes is a courtesy
            log(WARNING, "finish: could not tell the nodes: %r", exc)
        return self.report


def _initial_model(task: Any, weights_path: str) -> Any:
    """The task's model, fresh or (warm start) with the weights of a registered model version."""
    model = task.model()
    if not weights_path:
        return model
    import torch

    try:
        with np.load(weights_path, allow_pickle=False) as npz:
            state = {k: torch.from_numpy(npz[k]) for k in npz.files}
        model.load_state_dict(state)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise RoundFailed(f"cannot start from the weights at {weights_path}: {exc}") from exc
    log(INFO, "starting from the weights at %s", weights_path)
    return model


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_id = int(context.run_id)
    try:
        settings = parse_run_config(context.run_config)
    except ValueError as exc:
        raise RoundFailed(f"bad run config: {exc}") from exc
    log(INFO, "EdgeFleet run %s (round %s): %s, %d round(s), devices: %s", run_id, settings.round_id or "-",
        settings.strategy, settings.num_rounds, ", ".join(settings.devices) or "any")
    report = _Run(grid, settings, run_id).execute()
    if report["status"] != RunReportStatus.COMPLETED:
        raise RoundFailed(str(report["reason"]))
