"""The status file a device's ClientApp keeps for its agent (no flwr, no torch: the agent reads it).

One JSON object, rewritten atomically after every message of a run::

    {"run_id": int, "round_id": str, "device_id": str, "trained": [server rounds], "evaluated": [server rounds],
     "finished": bool, "status": "completed" | "failed" | null, "updated": unix time}

``finished`` turns true when the ServerApp says the run is over; the agent then stops the SuperNode.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from agent.fsutil import write_atomic

__all__ = ["read_status", "update_status"]


def read_status(path: Path) -> dict[str, Any]:
    """The status as a dict; empty if the file is missing or unreadable."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def update_status(path: Path, *, run_id: int, round_id: str, device_id: str, **changes: Any) -> dict[str, Any]:
    """Apply ``changes`` (``trained=`` / ``evaluated=`` add a round number; other keys are set) and write.

    A different ``run_id`` than the file's starts a fresh status.
    """
    path = Path(path)
    status = read_status(path)
    if status.get("run_id") != run_id:
        status = {
            "run_id": run_id,
            "round_id": round_id,
            "device_id": device_id,
            "trained": [],
            "evaluated": [],
            "finished": False,
            "status": None,
        }
    for key, value in changes.items():
        if key in ("trained", "evaluated"):
            status[key] = sorted({*status.get(key, []), int(value)})
        else:
            status[key] = value
    status["updated"] = time.time()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(status).encode())
    return status
