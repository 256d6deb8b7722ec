"""controlplane.deployments._quality: when do a device's predictions with a new model look wrong?"""

from __future__ import annotations

import json
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlmodel import Session

from controlplane.db import TelemetryRecord, utcnow
from controlplane.deployments._quality import MIN_INFERENCES, judge, suspect_reason
from tests._services import fx_engine  # noqa: F401 - the engine fixture


def inference(model: str = "v2", *, count: int = 20, histogram: dict[str, int] | None = None,
              confidence: float = 0.9, labelled: int = 0, correct: int = 0) -> dict[str, Any]:
    return {"model_version": model, "count": count, "mean_confidence": confidence, "errors": 0,
            "class_histogram": histogram if histogram is not None else {"0": count // 2, "1": count - count // 2},
            "labelled": labelled, "correct": correct, "latency_p50_ms": 0.1, "latency_p95_ms": 0.2}


def test_one_class_at_full_confidence_is_collapsed() -> None:
    # Execute
    reason = judge([inference(histogram={"1": 20}, confidence=1.0)] * 3, gate_accuracy=None)

    # Assert
    assert reason is not None and reason.startswith("collapsed predictions: all 60 inferences predict class 1")


def test_labelled_accuracy_far_below_the_gate_is_suspect_and_close_to_it_is_not() -> None:
    # Execute
    far = judge([inference(labelled=20, correct=10)] * 3, gate_accuracy=0.96)
    close = judge([inference(labelled=20, correct=19)] * 3, gate_accuracy=0.96)

    # Assert
    assert far is not None and "on-device accuracy 0.500" in far and "0.960" in far
    assert close is None


@pytest.mark.parametrize("case", [
    [inference(histogram={"1": 20}, confidence=1.0)] * 2,  # too few inferences for a verdict
    [inference(histogram={"1": 20}, confidence=0.9)] * 3,  # one class, but not saturated: a device that sees one
    [inference(histogram={"0": 30, "1": 30}, count=60, confidence=1.0)],  # confident, in both classes
])
def test_no_verdict_without_evidence(case: list[dict[str, Any]]) -> None:
    # Execute / Assert
    assert judge(case, gate_accuracy=0.96) is None




def test_suspect_reason_reads_only_the_new_models_telemetry(engine: Engine) -> None:
    # Prepare: a collapsed old model, then a healthy new one, on one device; another device collapsed on v2
    rows = [("d1", inference("v1", histogram={"3": 20}, confidence=1.0)) for _ in range(3)]
    rows += [("d1", inference("v2")) for _ in range(3)]
    rows += [("d2", inference("v2", histogram={"3": 20}, confidence=1.0)) for _ in range(3)]
    with Session(engine) as session:
        for seq, (device, payload) in enumerate(rows, start=1):
            session.add(TelemetryRecord(device_id=device, seq=seq, ts=float(seq), received_at=utcnow(),
                                        payload=json.dumps({"inference": payload})))
        session.commit()

        # Execute
        d1 = suspect_reason(session, "d1", "v2", gate_accuracy=0.9)
        d2 = suspect_reason(session, "d2", "v2", gate_accuracy=0.9)
        d1_old = suspect_reason(session, "d1", "v1", gate_accuracy=0.9)

    # Assert
    assert 3 * 20 >= MIN_INFERENCES
    assert d1 is None
    assert d2 is not None and "collapsed" in d2
    assert d1_old is not None and "class 3" in d1_old
