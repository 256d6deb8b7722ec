"""App factory: routes, dependency injection, error mapping and lifespan — nothing else."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
from litestar import Litestar, Request, Response, get
from litestar.di import Provide
from litestar.logging import LoggingConfig
from litestar.middleware.base import DefineMiddleware
from litestar.openapi import OpenAPIConfig, ResponseSpec
from litestar.openapi.plugins import ScalarRenderPlugin, SwaggerRenderPlugin
from litestar.openapi.spec import Components, SecurityScheme
from litestar.static_files import create_static_files_router

from agent import __version__
from controlplane._bounds import MAX_BODY_BYTES
from controlplane._http import exception_handlers, limit_json_nesting
from controlplane._openapi import ApiContract
from controlplane.auth import Role
from controlplane.auth._guards import BearerTokenMiddleware, requires
from controlplane.burst.controller import JobController
from controlplane.burst.service import JobService
from controlplane.console import (
    CONSOLE_PUBLIC,
    console_csrf,
    console_errors,
    console_router,
    console_templates,
    root,
)
from controlplane.deployments import DeploymentController, DeploymentService, ReleaseDownloadController
from controlplane.devices import DeviceController, DeviceService
from controlplane.ingest import read_stats
from controlplane.keys import KeyController, KeyService
from controlplane.metrics import AppMetrics, metrics_endpoint
from controlplane.models import DownloadController, ModelController, ModelService
from controlplane.provisioning import EnrollController, ProvisioningController, ProvisioningService
from controlplane.rounds.controller import RoundController
from controlplane.rounds.service import RoundService
from controlplane.schedules import ScheduleController, ScheduleService
from controlplane.settings import Settings
from controlplane.wiring import Fleet

__all__ = ["create_app"]

_STATIC = Path(__file__).parent / "static"
_OPENAPI_ASSETS = "/schema/assets"


@get("/healthz", sync_to_thread=False, exclude_from_auth=True, tags=["ops"],
     responses={503: ResponseSpec(dict[str, Any], description="degraded: `ingest.reason` says why")})
def healthz(request: Request[Any, Any, Any]) -> Response[dict[str, Any]]:
    """`ok`, or 503 `degraded` while an ingest worker is dead, disconnected, failing to write or restarting for
    more than a few seconds (`ingest.reason` says which and why)."""
    fleet: Fleet = request.app.state.fleet
    problems = [p for p in (w.health() for w in fleet.workers) if p]
    ingest: dict[str, Any] = {"ok": not problems, "workers": len(fleet.workers)}
    if problems:
        ingest["reason"] = "; ".join(problems)
    body = {
        "status": "degraded" if problems else "ok",
        "version": __version__,
        "broker": fleet.broker.url,
        "ingest_workers": len(fleet.workers),
        "ingest": ingest,
    }
    return Response(body, status_code=503 if problems else 200)


@get("/api/v1/ingest/stats", guards=[requires(Role.VIEWER)], sync_to_thread=True, tags=["ingest"])
def ingest_stats(request: Request[Any, Any, Any]) -> dict[str, Any]:
    """`received`, `stored`, `duplicates` and `dead_letters` by reason, across all workers; `workers`: this
    process's ingest workers (alive, connected, state, restarts, last_error)."""
    return {**read_stats(request.app.state.engine), "workers": [w.status() for w in request.app.state.fleet.workers]}


@get("/api/v1/signing-key", guards=[requires(Role.VIEWER)], sync_to_thread=False, tags=["models"])
def signing_key(request: Request[Any, Any, Any]) -> dict[str, str]:
    """The ed25519 public key devices verify model manifests with (`edgefleet agent run --signing-key`)."""
    signer = request.app.state.fleet.signer
    return {"public_key": signer.public_key_b64, "key_id": signer.key_id, "algorithm": "ed25519"}


def create_app(settings: Settings | None = None, *, fleet: Fleet | None = None, stop_fleet: bool = False) -> Litestar:
    """The control-plane ASGI app. Pass a started `fleet` to share it (tests, demo; `stop_fleet`: stop it when the
    app shuts down, as `controlplane serve` needs: uvicorn re-raises SIGTERM once it has shut down, so code after
    `uvicorn.run` never runs); else one is started and stopped with the app."""
    owns_fleet = fleet is None
    the_fleet = fleet or Fleet(settings or Settings.from_env())
    metrics = AppMetrics(the_fleet)  # this app's own registry

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        if owns_fleet:
            await anyio.to_thread.run_sync(the_fleet.start)
        app.state.fleet = the_fleet
        app.state.metrics = metrics
        app.state.engine = the_fleet.engine
        app.state.key_service = KeyService(the_fleet.engine, the_fleet.signer, the_fleet.publisher,
                                           pki=the_fleet.pki).start()
        try:
            yield
        finally:
            app.state.key_service.stop()
            if owns_fleet or stop_fleet:
                await anyio.to_thread.run_sync(the_fleet.stop)

    def provide_devices(request: Request[Any, Any, Any]) -> DeviceService:
        return request.app.state.fleet.devices  # type: ignore[no-any-return]

    def provide_models(request: Request[Any, Any, Any]) -> ModelService:
        return request.app.state.fleet.models  # type: ignore[no-any-return]

    def provide_deployments(request: Request[Any, Any, Any]) -> DeploymentService:
        return request.app.state.fleet.deployments  # type: ignore[no-any-return]

    def provide_jobs(request: Request[Any, Any, Any]) -> JobService:
        return request.app.state.fleet.jobs  # type: ignore[no-any-return]

    def provide_rounds(request: Request[Any, Any, Any]) -> RoundService:
        return request.app.state.fleet.rounds  # type: ignore[no-any-return]

    def provide_schedules(request: Request[Any, Any, Any]) -> ScheduleService:
        return request.app.state.fleet.schedules  # type: ignore[no-any-return]

    def provide_keys(request: Request[Any, Any, Any]) -> KeyService:
        return request.app.state.key_service  # type: ignore[no-any-return]

    def provide_provisioning(request: Request[Any, Any, Any]) -> ProvisioningService:
        fleet: Fleet = request.app.state.fleet
        return ProvisioningService(fleet.engine, fleet.devices, fleet.pki)

    openapi = OpenAPIConfig(
        title="EdgeFleet control plane",
        version=__version__,
        path="/schema",
        # Their JavaScript and CSS come from the control plane (controlplane/static/openapi, taken from npm), not a
        # CDN: the docs must work on an offline network. No favicon: Litestar's default is on GitHub.
        render_plugins=[
            ScalarRenderPlugin(js_url=f"{_OPENAPI_ASSETS}/scalar/standalone.js",
                               css_url=f"{_OPENAPI_ASSETS}/scalar/theme.css", favicon="",
                               options={"withDefaultFonts": False}),  # else its fonts come from fonts.scalar.com
            SwaggerRenderPlugin(path="/swagger", js_url=f"{_OPENAPI_ASSETS}/swagger-ui/swagger-ui-bundle.js",
                                css_url=f"{_OPENAPI_ASSETS}/swagger-ui/swagger-ui.css",
                                standalone_preset_js_url=f"{_OPENAPI_ASSETS}/swagger-ui/swagger-ui-standalone-preset.js",
                                favicon=""),
        ],
        components=Components(
            security_schemes={
                "bearer": SecurityScheme(type="http", scheme="bearer", description="API token"),
                "provisioning": SecurityScheme(type="http", scheme="bearer",
                                               description="provisioning token (edgefleet provisioning create)"),
                "download": SecurityScheme(type="http", scheme="bearer", description="a deployment's download "
                                           "token, sent to the device in its deploy_model command"),
            }
        ),
        security=[{"bearer": []}],
    )
    auth = DefineMiddleware(BearerTokenMiddleware, exclude=["^/schema", "^/healthz", *CONSOLE_PUBLIC])
    return Litestar(
        route_handlers=[healthz, metrics_endpoint, ingest_stats, signing_key, DeviceController, ModelController, DownloadController,
                        DeploymentController, ReleaseDownloadController, RoundController, ScheduleController, JobController,
                        ProvisioningController, EnrollController, KeyController,
                        # public like the /schema pages (the auth middleware excludes ^/schema)
                        create_static_files_router(_OPENAPI_ASSETS, directories=[_STATIC / "openapi"],
                                                   include_in_schema=False),
                        root, console_router()],
        # Named *_service so that no dependency shadows a body, query or path field (a request
        # field named like a dependency turns its validation errors into 500s).
        dependencies={
            "device_service": Provide(provide_devices, sync_to_thread=False),
            "model_service": Provide(provide_models, sync_to_thread=False),
            "deployment_service": Provide(provide_deployments, sync_to_thread=False),
            "round_service": Provide(provide_rounds, sync_to_thread=False),
            "job_service": Provide(provide_jobs, sync_to_thread=False),
            "schedule_service": Provide(provide_schedules, sync_to_thread=False),
            "key_service": Provide(provide_keys, sync_to_thread=False),
            "provisioning_service": Provide(provide_provisioning, sync_to_thread=False),
        },
        middleware=[metrics.middleware, auth],  # outermost: times what auth refuses too
        lifespan=[lifespan],
        openapi_config=openapi,
        plugins=[ApiContract()],  # each operation's error answers and security, from its route (_openapi)
        template_config=console_templates(),
        csrf_config=console_csrf(secure=the_fleet.settings.tls_enabled),
        # structlog is configured by the entry point; errors are answered and logged by controlplane._http only
        # (a client error as one line, a server fault with its traceback), so Litestar logs none itself.
        logging_config=LoggingConfig(configure_root_logger=False, log_exceptions="never"),
        exception_handlers=console_errors(exception_handlers()),  # type: ignore[arg-type]
        request_max_body_size=MAX_BODY_BYTES,
        before_request=limit_json_nesting,
    )
