"""API shapes of federated rounds."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Final

import msgspec

from controlplane._bounds import Name, TaskName
from controlplane.burst.schemas import BurstStep
from controlplane.rounds.eligibility import EligibilityRule
from controlplane.statuses import RoundStatus
from federated.flower.config import Strategy  # the strategy registry

__all__ = ["MAX_CLIENTS", "RoundCreate", "RoundDrop", "RoundRead", "Strategy"]

MAX_CLIENTS: Final = 100_000


class RoundCreate(msgspec.Struct, forbid_unknown_fields=True):
    """One federated run of `rounds` Flower rounds among the devices eligible now."""

    task: TaskName = "digits"
    strategy: Strategy = Strategy.FEDAVG
    rounds: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 3
    min_clients: Annotated[int, msgspec.Meta(ge=1, le=MAX_CLIENTS)] = 2
    # Invite every eligible device up to this many (None: all), over-selecting past it by the observed dropout
    # rate so that at least `min_clients` remain.
    max_clients: Annotated[int, msgspec.Meta(ge=1, le=MAX_CLIENTS)] | None = None
    eligibility: EligibilityRule = msgspec.field(default_factory=EligibilityRule)
    local_epochs: Annotated[int, msgspec.Meta(ge=1, le=100)] = 2
    learning_rate: Annotated[float, msgspec.Meta(gt=0, le=10)] = 0.01
    proximal_mu: Annotated[float, msgspec.Meta(ge=0, le=1000)] = 0.1  # FedProx only
    round_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=86_400)] = 120.0
    # A burst job (e.g. {"kind": "qat"}) run on the federated result before the build: the model built, signed
    # and rolled out is then the job's.
    burst: BurstStep | None = None
    build: bool = True  # build, gate and sign TFLite variants of the result
    deploy: bool = False  # then roll the new model out to every device that can run it
    # Warm start: the registered model version (of this task) whose weights the run starts from. None: a fresh
    # model for a round started now; for a schedule's round, the task's latest released model at each firing
    # (the newest version with a published variant), else a fresh model.
    initial_model: Name | None = None


class RoundDrop(msgspec.Struct):
    """Why a device left a run before its end: the server round it dropped out of last, and the reason."""

    round: int  # the Flower round (1-based) it dropped out of, and never contributed to a later one
    reason: str  # e.g. "no update within 30s", "clock skew: ...", "error: ..." (its ClientApp raised)
    contributed: list[int]  # the earlier Flower rounds its update went into (empty: none)


class RoundRead(msgspec.Struct):
    id: int
    schedule_id: str | None
    task: str
    strategy: Strategy
    status: RoundStatus
    reason: str | None
    config: dict[str, Any]
    invited: list[str]
    participants: list[str]
    skipped: dict[str, str]  # device id -> why it was not invited (or dropped out before contributing)
    # device id -> the round it dropped out of last and why, for every invited device that did not finish the
    # run (also those that had contributed, and are therefore among the participants)
    dropped: dict[str, RoundDrop]
    # per Flower round: round, accuracy, loss, participants, dropped, drop_reasons (device id -> why)
    metrics: list[dict[str, Any]]
    model_version: str | None
    initial_model: str | None  # the model version it started from (None: a fresh model)
    job_id: int | None  # the burst step's job, when the round has one
    created_at: datetime
    finished_at: datetime | None
