"""After a rollout: do the devices' predictions with the new model look like the model the gate measured?

A device that installed a model and passed its golden self-test can still predict garbage on its own data (its
raw samples are not what the task's input contract expects: other units, another sensor, a task written
wrongly). Its telemetry shows it: every inference one class at confidence ~1.0, or, where its data is labelled,
an on-device accuracy far below the build gate's held-out figure. For a while after a deployment succeeds
(:data:`WATCH_S`), the deployment service reads each updated device's inference statistics of the new model
and reports such a device as ``suspect`` with the reason, and the deployment with it, instead of as a success.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any, Final

from sqlmodel import Session, col, select

from controlplane.db import TelemetryRecord

__all__ = ["MIN_INFERENCES", "WATCH_S", "judge", "suspect_reason"]

WATCH_S: Final = 300.0  # how long after a deployment succeeds the devices' predictions are watched
MIN_INFERENCES: Final = 50  # no verdict on fewer inferences of the new model
COLLAPSED_CONFIDENCE: Final = 0.99  # one class at least this confident on every inference: collapsed
MAX_ACCURACY_GAP: Final = 0.10  # labelled on-device accuracy this far below the gate's figure: suspect
_RECENT_RECORDS: Final = 500  # telemetry records read per device and check (newest first)


def judge(inferences: Iterable[Mapping[str, Any]], *, gate_accuracy: float | None) -> str | None:
    """Why the inference statistics of one model on one device look wrong; None when they do not (or too few).

    ``inferences`` are telemetry ``inference`` objects of that model (count, class_histogram, mean_confidence,
    labelled, correct).
    """
    count = labelled = correct = 0
    confidence = 0.0
    histogram: dict[str, int] = {}
    for inference in inferences:
        n = int(inference.get("count") or 0)
        count += n
        confidence += float(inference.get("mean_confidence") or 0.0) * n
        labelled += int(inference.get("labelled") or 0)
        correct += int(inference.get("correct") or 0)
        for cls, k in (inference.get("class_histogram") or {}).items():
            histogram[cls] = histogram.get(cls, 0) + int(k)
    if count < MIN_INFERENCES:
        return None
    mean_confidence = confidence / count
    seen = {cls: k for cls, k in histogram.items() if k > 0}
    if len(seen) == 1 and mean_confidence >= COLLAPSED_CONFIDENCE:
        (only,) = seen
        return (f"collapsed predictions: all {count} inferences predict class {only} with mean confidence "
                f"{mean_confidence:.3f} (wrong input preprocessing or data on the device?)")
    if gate_accuracy is not None and labelled >= MIN_INFERENCES:
        accuracy = correct / labelled
        if accuracy < gate_accuracy - MAX_ACCURACY_GAP:
            return (f"on-device accuracy {accuracy:.3f} over {labelled} labelled inferences is far below the "
                    f"build gate's held-out {gate_accuracy:.3f}")
    return None


def suspect_reason(session: Session, device_id: str, model_version: str, *,
                   gate_accuracy: float | None) -> str | None:
    """:func:`judge` on the device's recent telemetry of ``model_version``."""
    rows = session.exec(select(TelemetryRecord.payload).where(TelemetryRecord.device_id == device_id)
                        .order_by(col(TelemetryRecord.seq).desc()).limit(_RECENT_RECORDS))
    inferences = []
    for payload in rows:
        try:
            inference = json.loads(payload).get("inference")
        except (ValueError, AttributeError):
            continue  # validated at ingest; a row that does not parse says nothing about the model
        if isinstance(inference, dict) and inference.get("model_version") == model_version:
            inferences.append(inference)
    return judge(inferences, gate_accuracy=gate_accuracy)
