"""The EdgeFleet ClientApp: what a device's SuperNode runs for each message of a round.

Node config (``flower-supernode --node-config``, set by :class:`federated.flower.runtime.SuperNodeProcess`):

``device-id``
    The device's id; the ServerApp learns node id -> device id from the answer to its ``identify`` query.
``data-path``
    The device's local partition (``.npz`` with ``x`` raw and ``y`` labels, see :mod:`federated.tasks`).
``round-id`` (optional)
    The control plane's round this SuperNode was started for: it then takes part only in the run of that round
    (the ServerApp of another run sees the mismatch in the ``identify`` answer and leaves the node alone).
``status-path`` (optional)
    A JSON file the ClientApp keeps up to date for the agent: the run, the rounds this device trained and
    whether the ServerApp has said the run is over (see :mod:`agent.round_status`).

Messages:

* ``query`` with ``{"action": "identify"}``: reply ``{"device-id", "num-examples"}``;
  ``{"action": "finish", "status": ...}``: the run is over, record it in the status file;
* ``train``: load the global weights (``arrays``), train on the local partition with the task (FedProx when
  the config carries ``proximal-mu`` > 0), reply ``arrays`` + ``metrics`` (``num-examples``, ``train-loss``);
* ``evaluate``: evaluate the global weights on the local partition, reply ``num-examples``, ``eval-loss``,
  ``eval-acc``.

Each message runs in a fresh ``flwr-clientapp`` process, so torch is imported only by the handlers that need it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from agent.round_status import update_status
from federated.flower.config import QUERY_ACTION_KEY, QUERY_FINISH, QUERY_IDENTIFY

__all__ = ["app"]

app = ClientApp()


def _update_status(context: Context, message: Message, **changes: Any) -> None:
    raw = context.node_config.get("status-path")
    if not raw:
        return
    update_status(
        Path(str(raw)),
        run_id=int(message.metadata.run_id),
        round_id=str(context.run_config.get("round-id", "") or ""),
        device_id=str(context.node_config.get("device-id", "")),
        **changes,
    )


# ------------------------------------------------------------------------------------------------ handlers


def _device_id(context: Context) -> str:
    device_id = context.node_config.get("device-id")
    if not device_id:
        raise ValueError("this SuperNode has no 'device-id' in its node config")
    return str(device_id)


def _data_path(context: Context) -> Path:
    raw = context.node_config.get("data-path")
    if not raw:
        raise ValueError("this SuperNode has no 'data-path' in its node config")
    return Path(str(raw))


def _config(message: Message) -> ConfigRecord:
    config = message.content.get("config")
    return config if isinstance(config, ConfigRecord) else ConfigRecord()


def _number(config: ConfigRecord, key: str, default: float) -> float:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"config {key!r} must be a number, got {value!r}")
    return float(value)


def _prepare(message: Message, context: Context) -> tuple[Any, Any, Any]:
    """(task, model loaded with the global weights, local data)."""
    import torch

    from federated.tasks import get_task

    torch.set_num_threads(1)  # several ClientApps may share a small CPU
    task = get_task(str(context.run_config.get("task", "digits")))
    model = task.model()
    arrays = message.content["arrays"]
    if not isinstance(arrays, ArrayRecord):
        raise TypeError("the message carries no 'arrays' ArrayRecord")
    model.load_state_dict(arrays.to_torch_state_dict())
    data = task.load_partition(_data_path(context))
    return task, model, data


def _other_round(context: Context) -> bool:
    """True when this SuperNode was started for another round than the run's (then it stays out of it)."""
    mine = str(context.node_config.get("round-id", "") or "")
    theirs = str(context.run_config.get("round-id", "") or "")
    return bool(mine and theirs and mine != theirs)


@app.query()
def query(message: Message, context: Context) -> Message:
    action = str(message.content["query"].get(QUERY_ACTION_KEY, ""))
    if action == QUERY_FINISH:
        if not _other_round(context):
            status = str(message.content["query"].get("status", ""))
            _update_status(context, message, finished=True, status=status)
        return Message(RecordDict({"reply": ConfigRecord({"ok": True})}), reply_to=message)
    if action != QUERY_IDENTIFY:
        raise ValueError(f"unknown query action {action!r}")
    device_id = _device_id(context)
    path = _data_path(context)
    num_examples = 0
    if path.is_file():
        import numpy as np

        with np.load(path, allow_pickle=False) as npz:
            num_examples = int(npz["y"].shape[0]) if "y" in npz.files else 0
    if not _other_round(context):
        _update_status(context, message)
    reply = ConfigRecord(
        {
            "device-id": device_id,
            "round-id": str(context.node_config.get("round-id", "") or ""),
            "num-examples": num_examples,
        }
    )
    return Message(RecordDict({"reply": reply}), reply_to=message)


@app.train()
def train(message: Message, context: Context) -> Message:
    task, model, data = _prepare(message, context)
    config = _config(message)
    global_state = {k: v.detach().clone().numpy() for k, v in model.state_dict().items()}
    proximal_mu = _number(config, "proximal-mu", 0.0)
    result = task.train(
        model,
        data,
        epochs=int(_number(config, "local-epochs", 1)),
        lr=_number(config, "lr", 0.01),
        batch_size=int(_number(config, "batch-size", 32)),
        proximal_mu=proximal_mu,
        global_params=global_state if proximal_mu > 0.0 else None,
    )
    metrics = MetricRecord({"num-examples": len(data), "train-loss": float(result["loss"])})
    _update_status(context, message, trained=int(_number(config, "server-round", 0)))
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics})
    return Message(content, reply_to=message)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    task, model, data = _prepare(message, context)
    result = task.evaluate(model, data)
    metrics = MetricRecord(
        {
            "num-examples": len(data),
            "eval-loss": float(result["loss"]),
            "eval-acc": float(result["accuracy"]),
        }
    )
    _update_status(context, message, evaluated=int(_number(_config(message), "server-round", 0)))
    return Message(RecordDict({"metrics": metrics}), reply_to=message)
