"""HTTP API of the model-signing keys: the keys and the rotation's progress, and the admin's rotation actions."""

from __future__ import annotations

from typing import Annotated, ClassVar

from litestar import Controller, get, post
from litestar.di import NamedDependency
from litestar.params import JSONBody, Parameter
from litestar.status_codes import HTTP_200_OK, HTTP_201_CREATED

from controlplane._errors import Conflict
from controlplane._openapi import errors
from controlplane.auth import Role
from controlplane.auth._guards import requires
from controlplane.keys.ca import CaRenewalService
from controlplane.keys.schemas import CaRead, CaStep, KeysRead, RotationComplete
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
          summary="Begin a signing-key rotation", responses=errors(400, 409))
    def rotate(self, key_service: NamedDependency[KeyService]) -> KeysRead:
        """Creates a new signing key and sends every device a statement, signed by the current key, to trust it.
        The current key keeps signing until the rotation is completed. 409 while a rotation is in progress."""
        return key_service.rotate()

    @post("/rotate/complete", guards=[requires(Role.ADMIN)], sync_to_thread=True, status_code=HTTP_200_OK,
          summary="Complete the signing-key rotation", responses=errors(409))
    def complete(self, key_service: NamedDependency[KeyService],
                 data: JSONBody[RotationComplete | None] = None) -> KeysRead:
        """Signs with the new key from now on, re-signs stored manifests and active releases, and retires the old
        key on the devices. 409 while devices have not acknowledged the new key (up to 20 listed), unless
        `force`."""
        return key_service.complete(force=bool(data and data.force))

    # -- fleet CA renewal ------------------------------------------------------------------------------------------
    @get("/ca", guards=[requires(Role.VIEWER)], sync_to_thread=True, summary="Fleet CA and its renewal",
         responses=errors(409))
    def get_ca(self, key_service: NamedDependency[KeyService],
               limit: Annotated[int, Parameter(ge=0, le=5000)] = PENDING_SHOWN) -> CaRead:
        """The CAs devices and the TLS listeners trust (ca-bundle.pem), the one that issues, the latest renewal and
        up to `limit` devices with a step of it left."""
        return _ca(key_service).status(limit)

    @post("/ca/renew", guards=[requires(Role.ADMIN)], sync_to_thread=True, status_code=HTTP_201_CREATED,
          summary="Begin a fleet CA renewal", responses=errors(400, 409))
    def renew_ca(self, key_service: NamedDependency[KeyService]) -> CaRead:
        """Creates a new CA beside the current one (which keeps issuing), puts both in the bundle and sends every
        device the bundle (signed by the model-signing key), then asks devices with a client certificate for a CSR
        and installs a certificate of the new CA on them. 409 while a renewal is in progress."""
        return _ca(key_service).renew()

    @post("/ca/complete", guards=[requires(Role.ADMIN)], sync_to_thread=True, status_code=HTTP_200_OK,
          summary="Complete the fleet CA renewal", responses=errors(409))
    def complete_ca(self, key_service: NamedDependency[KeyService],
                    data: JSONBody[CaStep | None] = None) -> CaRead:
        """The new CA issues from now on and the server certificate is re-issued under it (served from the control
        plane's next start). 409 while devices have not acknowledged the bundle with the new CA, unless `force`."""
        return _ca(key_service).complete(force=bool(data and data.force))

    @post("/ca/retire-old", guards=[requires(Role.ADMIN)], sync_to_thread=True, status_code=HTTP_200_OK,
          summary="Retire the old fleet CA", responses=errors(409))
    def retire_old_ca(self, key_service: NamedDependency[KeyService],
                      data: JSONBody[CaStep | None] = None) -> CaRead:
        """Drops the old CA from the bundle and sends devices the bundle without it: its certificates are refused
        from the listeners' next start. 409 while devices still need it (no bundle with the new CA, or a client
        certificate of the old one), unless `force`."""
        return _ca(key_service).retire_old(force=bool(data and data.force))


def _ca(key_service: KeyService) -> CaRenewalService:
    if key_service.ca is None:
        raise Conflict("this control plane's key service has no fleet PKI")
    return key_service.ca
