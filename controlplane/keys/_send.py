"""One statement to one device, as a command the registry remembers: what the rotation and CA-renewal sweeps
both send."""

from __future__ import annotations

import time
import uuid
from typing import Any

import structlog
from sqlalchemy import Engine
from sqlmodel import Session

from agent import protocol as wire
from controlplane.db import CommandRecord, utcnow
from controlplane.devices.publisher import CommandPublisher

__all__ = ["send_statement"]

log = structlog.get_logger("edgefleet.controlplane.keys")


def send_statement(engine: Engine, publisher: CommandPublisher, device_id: str, kind: str,
                   args: dict[str, Any], event: str) -> bool:
    """Record the command, then publish it; False (and the record forgotten, so that the next sweep sends it
    again) when the broker did not take it. ``event`` prefixes the log line of a failure (``keys``, ``ca``)."""
    command_id = uuid.uuid4().hex
    with Session(engine) as session:
        session.add(CommandRecord(command_id=command_id, device_id=device_id, kind=kind, args=args,
                                  created_at=utcnow()))
        session.commit()
    payload = wire.encode(wire.Command(command_id=command_id, kind=kind, args=args, ts=time.time()))
    try:
        publisher.publish(wire.topic(device_id, wire.Channel.CMD), payload)
    except Exception as exc:  # noqa: BLE001 - forget the command: the next sweep sends it again
        log.warning(f"{event}.send_failed", device_id=device_id, kind=kind, error=str(exc))
        with Session(engine) as session:
            row = session.get(CommandRecord, command_id)
            if row is not None:
                session.delete(row)
                session.commit()
        return False
    return True
