"""What every command group shares: the error exit, settings, the API client and the option enums."""

from __future__ import annotations

import enum
import os
from typing import Annotated, Any

import typer


class RoleOption(enum.StrEnum):  # typer 0.15 rejects Literal options: use enums
    admin = "admin"
    operator = "operator"
    viewer = "viewer"


class StrategyOption(enum.StrEnum):
    fedavg = "fedavg"
    fedprox = "fedprox"
    fedadam = "fedadam"


class BrokerAuthOption(enum.StrEnum):
    embedded = "embedded"
    dynsec = "dynsec"
    none = "none"


class JobKindOption(enum.StrEnum):
    finetune = "finetune"
    distill = "distill"
    qat = "qat"


class PlacementOption(enum.StrEnum):
    auto = "auto"
    burst = "burst"
    local = "local"


def fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)



def load_settings(**overrides: Any) -> Any:
    from controlplane.settings import Settings

    try:
        return Settings.from_env(**overrides)
    except ValueError as exc:
        fail(str(exc))


UrlOpt = Annotated[str, typer.Option("--url", envvar="EDGEFLEET_URL", help="Control-plane URL.")]
TokenOpt = Annotated[str, typer.Option("--token", envvar="EDGEFLEET_TOKEN", help="API token (operator to submit).")]


def api(url: str, token: str) -> Any:
    import httpx

    if not token:
        fail("an API token is needed: --token or EDGEFLEET_TOKEN (edgefleet tokens create --role operator)")
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60)


def call(response: Any) -> Any:
    if response.status_code >= 400:
        try:
            detail = response.json().get("detail")
        except ValueError:
            detail = response.text
        fail(f"{response.status_code}: {detail}", 1)
    return response.json()


def register_tasks(extra: list[str]) -> list[str]:
    """Add the --task entries to EDGEFLEET_TASKS, which this process and its children (the Flower ServerApp, burst
    workers) resolve task names with, and load the whole registry now: a bad entry is one clear line at start."""
    from federated.tasks import TASKS_ENV, TaskRegistry

    if extra:
        os.environ[TASKS_ENV] = ",".join(v for v in (os.environ.get(TASKS_ENV, ""), *extra) if v.strip())
    names: list[str] = []
    try:
        names = TaskRegistry.from_env().names()
    except ValueError as exc:
        fail(str(exc))
    return names
