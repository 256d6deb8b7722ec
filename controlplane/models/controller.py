"""HTTP API of the model registry, with resumable (HTTP Range) artifact downloads."""

from __future__ import annotations

import re
from typing import Any, ClassVar

import msgspec
from litestar import Controller, Request, Response, get
from litestar.exceptions import NotAuthorizedException

from controlplane.auth import Role
from controlplane.auth._guards import requires
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
    def list_models(self, models: ModelService) -> list[ModelRead]:
        return models.list_all()

    @get("/{version:str}", guards=[requires(Role.VIEWER)], sync_to_thread=True)
    def get_model(self, version: str, models: ModelService) -> ModelRead:
        return models.get(version)


class DownloadController(Controller):
    """Manifest and artifact downloads: for operators (API token) and devices (a deployment's download token)."""

    path = "/api/v1/models/{version:str}/variants/{variant:str}"
    tags: ClassVar[list[str]] = ["models"]  # type: ignore[misc]

    @get("/manifest", sync_to_thread=True, exclude_from_auth=True)
    def manifest(self, request: Request[Any, Any, Any], version: str, variant: str,
                 models: ModelService) -> Response[bytes]:
        _authorize_download(request, version)
        signed = models.signed_manifest(version, variant)
        return Response(msgspec.json.encode(signed), media_type="application/json")

    @get("/artifact", sync_to_thread=True, exclude_from_auth=True)
    def artifact(self, request: Request[Any, Any, Any], version: str, variant: str,
                 models: ModelService) -> Response[bytes]:
        _authorize_download(request, version)
        record = models.artifact(version, variant)
        assert record.path is not None
        with open(record.path, "rb") as fh:
            data = fh.read()
        headers = {"Accept-Ranges": "bytes", "ETag": f'"{record.sha256}"'}
        try:
            wanted = parse_range(request.headers.get("range"), len(data))
        except ValueError:
            return Response(b"", status_code=416, headers={**headers, "Content-Range": f"bytes */{len(data)}"})
        if wanted is None:
            return Response(data, media_type="application/octet-stream", headers=headers)
        start, end = wanted
        return Response(data[start : end + 1], status_code=206, media_type="application/octet-stream",
                        headers={**headers, "Content-Range": f"bytes {start}-{end}/{len(data)}"})


def _authorize_download(request: Request[Any, Any, Any], version: str) -> None:
    """An operator token of any role, or the download token of a deployment of this model version."""
    from controlplane.auth import verify_token
    from controlplane.deployments.service import download_token_valid

    header = request.headers.get("authorization", "")
    scheme, _, secret = header.partition(" ")
    secret = secret.strip() if scheme.lower() == "bearer" else ""
    if not secret:
        raise NotAuthorizedException("downloads need a bearer token (an API token or a deployment's download token)")
    engine = request.app.state.engine
    if verify_token(engine, secret) is not None or download_token_valid(engine, version, secret):
        return
    raise NotAuthorizedException("token not valid for this model version")
