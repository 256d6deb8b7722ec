"""HTTP API of the model registry, with resumable (HTTP Range) artifact downloads for operators and devices."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import Any, ClassVar, Final

import msgspec
from litestar import Controller, Request, Response, get
from litestar.di import NamedDependency
from litestar.exceptions import NotAuthorizedException
from litestar.openapi import ResponseSpec
from litestar.response import Stream

from controlplane._bounds import NameParam
from controlplane._openapi import BEARER
from controlplane.auth import Role
from controlplane.auth._guards import requires
from controlplane.db import ModelArtifactRecord
from controlplane.models.schemas import ModelRead
from controlplane.models.service import ModelService

__all__ = ["ARTIFACT_RESPONSES", "DownloadController", "ModelController", "bearer_secret", "parse_range",
           "serve_artifact"]

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
# What serve_artifact answers besides the whole file (200).
ARTIFACT_RESPONSES: Final = {
    206: ResponseSpec(bytes, media_type="application/octet-stream", generate_examples=False,
                      description="The byte range asked for (`Range: bytes=start-end`)"),
    416: ResponseSpec(None, description="The range asked for is not in the file"),
}


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
    """The build's manifest and artifact, ``/models/{version}/variants/{variant}/...``, for API tokens (any role).

    What a deployment sends (its signed release and the artifact, for that deployment's download tokens) is served
    by :class:`controlplane.deployments.controller.ReleaseDownloadController`, with :func:`serve_artifact`.
    """

    path = "/api/v1"
    tags: ClassVar[list[str]] = ["models"]  # type: ignore[misc]
    security: ClassVar[list[dict[str, list[str]]]] = [{BEARER: []}]  # type: ignore[misc]

    @get("/models/{version:str}/variants/{variant:str}/manifest", sync_to_thread=True, exclude_from_auth=True)
    def manifest(self, request: Request[Any, Any, Any], version: NameParam, variant: NameParam,
                 model_service: NamedDependency[ModelService]) -> Response[Any]:
        authorize_bearer(request)
        signed = model_service.signed_manifest(version, variant)
        return Response(msgspec.json.encode(signed), media_type="application/json")

    @get("/models/{version:str}/variants/{variant:str}/artifact", sync_to_thread=True, exclude_from_auth=True,
         media_type="application/octet-stream", responses=ARTIFACT_RESPONSES)
    def artifact(self, request: Request[Any, Any, Any], version: NameParam, variant: NameParam,
                 model_service: NamedDependency[ModelService]) -> Response[Any]:
        authorize_bearer(request)
        return serve_artifact(request, model_service.artifact(version, variant))


_CHUNK = 256 * 1024


def serve_artifact(request: Request[Any, Any, Any], record: ModelArtifactRecord) -> Response[Any]:
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


def bearer_secret(request: Request[Any, Any, Any]) -> str:
    """The bearer token of a download request; 401 without one."""
    header = request.headers.get("authorization", "")
    scheme, _, secret = header.partition(" ")
    secret = secret.strip() if scheme.lower() == "bearer" else ""
    if not secret:
        raise NotAuthorizedException("downloads need a bearer token (an API token or a deployment's download token)")
    return secret


def authorize_bearer(request: Request[Any, Any, Any]) -> None:
    """Passes an API token of any role; 401 otherwise (no token, or a deployment's download token)."""
    from controlplane.auth import verify_token

    if verify_token(request.app.state.engine, bearer_secret(request)) is not None:
        return
    raise NotAuthorizedException("model downloads need an API token (devices download through their deployment)")
