"""What every command group shares: the error exit, settings, the API client and the option enums."""

from __future__ import annotations

import enum
import os
from typing import Annotated, Any

import typer


# The strategy, job kind and placement options are the domain enums themselves (federated.flower.config.Strategy,
# federated.burst.spec.JobKind, controlplane.burst.placement.Placement: leaf modules). These two stay copies: the
# domain's Role and BrokerAuthMode live beside the database and settings, which the CLI imports only when a command
# needs them (so that a device install's `edgefleet` can say which extra is missing).
class RoleOption(enum.StrEnum):  # typer 0.15 rejects Literal options: use enums
    admin = "admin"
    operator = "operator"
    viewer = "viewer"


class BrokerAuthOption(enum.StrEnum):
    embedded = "embedded"
    dynsec = "dynsec"
    none = "none"


class TlsOption(enum.StrEnum):
    auto = "auto"
    on = "on"
    off = "off"


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
    # An https:// control plane with the fleet's own CA: verify it against that CA (EDGEFLEET_CA_FILE, e.g.
    # $DATA_DIR/pki/ca-bundle.pem), else the system store.
    verify: Any = True
    ca_file = os.environ.get("EDGEFLEET_CA_FILE")
    if ca_file:
        import ssl

        try:
            verify = ssl.create_default_context(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            fail(f"EDGEFLEET_CA_FILE={ca_file}: {exc}")
    class _OneLineErrors(httpx.HTTPTransport):
        """A control plane that cannot be reached, or not trusted, is one line, not a traceback."""

        def handle_request(self, request: httpx.Request) -> httpx.Response:
            try:
                return super().handle_request(request)
            except httpx.TransportError as exc:
                hint = ""
                if "CERTIFICATE_VERIFY_FAILED" in str(exc):
                    hint = " (a fleet CA's server: set EDGEFLEET_CA_FILE to its ca-bundle.pem)"
                fail(f"cannot reach the control plane at {request.url.scheme}://{request.url.netloc.decode()}: "
                     f"{exc}{hint}", 1)
                raise  # unreachable: fail() exits

    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60,
                        transport=_OneLineErrors(verify=verify))


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

