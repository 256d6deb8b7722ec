"""HTTP API of the model-signing keys: the keys and the rotation's progress, and the admin's rotation actions."""

from __future__ import annotations

from typing import Annotated, ClassVar

from litestar import Controller, get, post
from litestar.di import NamedDependency
from litestar.params import JSONBody, Parameter
from litestar.status_codes import HTTP_200_OK, HTTP_201_CREATED

from controlplane.auth import Role
from controlplane.auth._guards import requires
from controlplane.keys.schemas import KeysRead, RotationComplete
from controlplane.keys.service import PENDING_SHOWN, KeyService

__all__ = ["KeyController"]


class KeyController(Controller):
    path = "/api/v1/keys"
    tags: ClassVar[list[str]] = ["keys"]  # type: ignore[misc]

    @get("/", guards=[requires(Role.VIEWER)], sync_to_thread=True, summary="Signing keys and rotation")
    def get_keys(self, key_service: NamedDependency[KeyService],
                 limit: Annotated[int, Parameter(ge=0, le=5000)] = PENDING_SHOWN) -> KeysRead:
        """The model-signing keys (active, next, retired), the latest rotation and up to `limit` devices that
        have not acknowledged it."""
        return key_service.keys(limit)

    @post("/rotate", guards=[requires(Role.ADMIN)], sync_to_thread=True, status_code=HTTP_201_CREATED,
          summary="Begin a signing-key rotation")
    def rotate(self, key_service: NamedDependency[KeyService]) -> KeysRead:
        """Creates a new signing key and sends every device a statement, signed by the current key, to trust it.
        The current key keeps signing until the rotation is completed. 409 while a rotation is in progress."""
        return key_service.rotate()

    @post("/rotate/complete", guards=[requires(Role.ADMIN)], sync_to_thread=True, status_code=HTTP_200_OK,
          summary="Complete the signing-key rotation")
    def complete(self, key_service: NamedDependency[KeyService],
                 data: JSONBody[RotationComplete | None] = None) -> KeysRead:
        """Signs with the new key from now on, re-signs stored manifests and active releases, and retires the old
        key on the devices. 409 while devices have not acknowledged the new key (up to 20 listed), unless
        `force`."""
        return key_service.complete(force=bool(data and data.force))
