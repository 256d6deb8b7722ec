"""Errors of the broker integration."""

from __future__ import annotations

__all__ = ["BrokerAuthError"]


class BrokerAuthError(Exception):
    """Creating, updating or removing a broker account failed; the message says what and why."""
