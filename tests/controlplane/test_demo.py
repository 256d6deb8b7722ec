"""`edgefleet demo` end to end (smaller): the loop runs and its summary has the promised shape."""

from __future__ import annotations

from pathlib import Path

import pytest

from controlplane.demo import run_demo

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_demo_runs_the_whole_loop(tmp_path: Path) -> None:
    # Execute
    summary = run_demo(agents=4, rounds=1, duration_s=3, data_dir=tmp_path)
    # Assert
    assert summary["round_record"]["status"] == "succeeded", summary["round_record"]
    assert [r["round"] for r in summary["rounds"]] == [1]
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["participants"] for r in summary["rounds"])
    assert 0.5 < summary["centralized_accuracy"] <= 1.0
    assert {v["profile"] for v in summary["variants"]} >= {"coral-dev-board", "raspberry-pi-5"}
    assert {v["variant"] for v in summary["variants"] if v["profile"] == "coral-dev-board"} == {"full-int8"}
    version = summary["model_version"]
    for device in summary["devices"]:
        assert device["model_version"] == version, device
        assert device["variant"] in ("fp32", "fp16", "dynamic-int8", "full-int8")
        assert device["on_device_accuracy"] is None or 0.0 <= device["on_device_accuracy"] <= 1.0
        assert device["p50_latency_ms"] is not None
    assert "demo-02-coral-dev-board" in summary["round_record"]["skipped"]


def test_demo_with_a_qat_step_rolls_out_the_burst_jobs_model(tmp_path: Path) -> None:
    # Execute: the scheduled round runs QAT on its federated result before the build
    summary = run_demo(agents=3, rounds=1, duration_s=2, data_dir=tmp_path, burst="qat")
    # Assert: round → job → model version → on the devices
    record, job = summary["round_record"], summary["burst_job"]
    assert record["status"] == "succeeded", record
    assert job["id"] == record["job_id"] and job["kind"] == "qat" and job["status"] == "succeeded", job
    assert job["placement"] == "local" and "fit the fleet's on-device budgets" in job["placement_reason"]
    assert summary["model_version"] == job["model_version"] == f"round-{record['id']}-qat"
    assert 0.5 < job["metrics"]["accuracy"] <= 1.0
    for device in summary["devices"]:
        assert device["model_version"] == summary["model_version"], device
