"""HTTP API of the model registry, with resumable (HTTP Range) artifact downloads for operators and devices."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import Any, ClassVar

import msgspec
from litestar import Controller, Request, Response, get
from litestar.di import NamedDependency
from litestar.exceptions import NotAuthorizedException
from litestar.response import Stream

from controlplane._bounds import NameParam, RowId
from controlplane.auth import Role
from controlplane.auth._guards import requires
from controlplane.db import ModelArtifactRecord
from controlplane.deployments.service import DeploymentService
from controlplane.models.schemas import ModelRead
from controlplane.models.service import ModelService

__all__ = ["DownloadController", "ModelController", "parse_range"]

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(start, end inclusive) of a single `bytes=` range; None for the whole file. ValueError if unsatisfiable."""
    if not header:
        return None
    match = _RANGE.match(header.strip())
    if match is None:
        return None  # multi-range or another unit: answer with the whole file, as RFC 9110 allows
    first, last = match.groups()
    if first == "":
        if last == "" or int(last) == 0:
            raise ValueError(header)
        start, end = max(0, size - int(last)), size - 1
    else:
        start = int(first)
        end = min(int(last), size - 1) if last else size - 1
    if start >= size or start > end:
        raise ValueError(header)
    return start, end


class ModelController(Controller):
    path = "/api/v1/models"
    tags: ClassVar[list[str]] = ["models"]  # type: ignore[misc]

    @get("/", guards=[requires(Role.VIEWER)], sync_to_thread=True, summary="List model versions")
    def list_models(self, model_service: NamedDependency[ModelService]) -> list[ModelRead]:
        return model_service.list_all()

    @get("/{version:str}", guards=[requires(Role.VIEWER)], sync_to_thread=True)
    def get_model(self, version: NameParam, model_service: NamedDependency[ModelService]) -> ModelRead:
        return model_service.get(version)


class DownloadController(Controller):
    """Manifest and artifact downloads.

    ``/models/{version}/variants/{variant}/...``: the build's manifest and artifact, for API tokens (any role).
    ``/deployments/{id}/variants/{variant}/...``: what a deployment sends: its signed release and the artifact,
    for the download token of that deployment and variant (sent to each device in its command) or an API token.
    """

    path = "/api/v1"
    tags: ClassVar[list[str]] = ["models"]  # type: ignore[misc]

    @get("/models/{version:str}/variants/{variant:str}/manifest", sync_to_thread=True, exclude_from_auth=True)
    def manifest(self, request: Request[Any, Any, Any], version: NameParam, variant: NameParam,
                 model_service: NamedDependency[ModelService]) -> Response[Any]:
        _authorize(request, None)
        signed = model_service.signed_manifest(version, variant)
        return Response(msgspec.json.encode(signed), media_type="application/json")

    @get("/models/{version:str}/variants/{variant:str}/artifact", sync_to_thread=True, exclude_from_auth=True)
    def artifact(self, request: Request[Any, Any, Any], version: NameParam, variant: NameParam,
                 model_service: NamedDependency[ModelService]) -> Response[Any]:
        _authorize(request, None)
        return _serve_artifact(request, model_service.artifact(version, variant))

    @get("/deployments/{deployment_id:int}/variants/{variant:str}/manifest", sync_to_thread=True,
         exclude_from_auth=True)
    def release(self, request: Request[Any, Any, Any], deployment_id: RowId, variant: NameParam,
                deployment_service: NamedDependency[DeploymentService]) -> Response[Any]:
        _authorize(request, (deployment_id, variant))
        signed = deployment_service.signed_release(deployment_id, variant)
        return Response(msgspec.json.encode(signed), media_type="application/json")

    @get("/deployments/{deployment_id:int}/variants/{variant:str}/artifact", sync_to_thread=True,
         exclude_from_auth=True)
    def release_artifact(self, request: Request[Any, Any, Any], deployment_id: RowId, variant: NameParam,
                         deployment_service: NamedDependency[DeploymentService], model_service: NamedDependency[ModelService]) -> Response[Any]:
        _authorize(request, (deployment_id, variant))
        deployment_service.signed_release(deployment_id, variant)  # 404 unless the deployment sends this variant
        version = deployment_service.model_version_of(deployment_id)
        return _serve_artifact(request, model_service.artifact(version, variant))


_CHUNK = 256 * 1024


def _serve_artifact(request: Request[Any, Any, Any], record: ModelArtifactRecord) -> Response[Any]:
    """The whole file, or the single byte range asked for (resumable downloads), streamed from disk in 256 KiB
    chunks: a control plane serving many devices at once never holds an artifact in memory."""
    assert record.path is not None
    size = os.stat(record.path).st_size
    headers = {"Accept-Ranges": "bytes", "ETag": f'"{record.sha256}"'}
    try:
        wanted = parse_range(request.headers.get("range"), size)
    except ValueError:
        return Response(b"", status_code=416, headers={**headers, "Content-Range": f"bytes */{size}"})
    start, end = wanted if wanted is not None else (0, size - 1)
    headers["Content-Length"] = str(end - start + 1)
    if wanted is not None:
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    return Stream(_chunks(record.path, start, end), status_code=206 if wanted is not None else 200,
                  media_type="application/octet-stream", headers=headers)


def _chunks(path: str, start: int, end: int) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        fh.seek(start)
        left = end - start + 1
        while left > 0:
            chunk = fh.read(min(_CHUNK, left))
            if not chunk:  # the file shrank under us: end the body short, the client's size check catches it
                return
            left -= len(chunk)
            yield chunk


def _authorize(request: Request[Any, Any, Any], scope: tuple[int, str] | None) -> None:
    """An API token of any role; for a deployment's ``scope`` (id, variant) also its download token."""
    from controlplane.auth import verify_token
    from controlplane.deployments.service import download_authorized

    header = request.headers.get("authorization", "")
    scheme, _, secret = header.partition(" ")
    secret = secret.strip() if scheme.lower() == "bearer" else ""
    if not secret:
        raise NotAuthorizedException("downloads need a bearer token (an API token or a deployment's download token)")
    engine = request.app.state.engine
    if verify_token(engine, secret) is not None:
        return
    if scope is None:
        raise NotAuthorizedException("model downloads need an API token (devices download through their "
                                     "deployment)")
    why = download_authorized(engine, scope[0], scope[1], secret)
    if why is not None:
        raise NotAuthorizedException(f"download token refused for deployment {scope[0]} variant {scope[1]}: {why}")
