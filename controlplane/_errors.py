"""Errors of the control plane; the app factory maps them to HTTP in one place.

ControlPlaneError
├── NotFound              -> 404
├── Conflict              -> 409
├── InvalidInput          -> 400
│   └── pki.CsrError      -> 400
├── BrokerUnavailable     -> 503
├── DatabaseError         -> 503
└── pki.PkiError          -> 500 (the PKI files: an operator's problem, named in the message)
"""

from __future__ import annotations

__all__ = ["BrokerUnavailable", "Conflict", "ControlPlaneError", "DatabaseError", "InvalidInput", "NotFound"]


class ControlPlaneError(Exception):
    status_code = 500


class NotFound(ControlPlaneError):
    status_code = 404


class Conflict(ControlPlaneError):
    status_code = 409


class InvalidInput(ControlPlaneError):
    status_code = 400


class BrokerUnavailable(ControlPlaneError):
    status_code = 503


class DatabaseError(ControlPlaneError):
    status_code = 503
