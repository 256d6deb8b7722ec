"""federated.burst: the burst worker's kinds, checkpoints and resume, time budget, cancel, CLI, cost estimate."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

from federated.burst.spec import JobKind, JobSpec, estimate_cost
from federated.tasks.digits import DigitsTask

REPO_ROOT = Path(__file__).resolve().parents[2]
_MISSING = [m for m in ("torch", "sklearn") if importlib.util.find_spec(m) is None]
pytestmark = pytest.mark.skipif(bool(_MISSING), reason=f"needs the train extra ({', '.join(_MISSING)} missing)")

# Small enough for 2 shared cores, large enough to clear the accuracy bars with margin.
FINETUNE_EPOCHS = 20


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Any:
    """Tiny models on 2 shared cores: a second intra-op thread only spins (100x slower when a core is busy)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(name="task", scope="module")
def fx_task() -> DigitsTask:
    return DigitsTask()


@pytest.fixture(name="finetuned", scope="module")
def fx_finetuned(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    """One finetune run shared by the tests that only read its outputs."""
    from federated.burst.worker import run_job

    out = tmp_path_factory.mktemp("finetune")
    events: list[dict[str, Any]] = []
    result = run_job(
        JobSpec(job_id="ft-1", kind="finetune", epochs=FINETUNE_EPOCHS, device="cpu"), out, progress=events.append
    )
    (out / "events.json").write_text(json.dumps(events))
    return result, out


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as arrays:
        return {name: arrays[name].copy() for name in arrays.files}


def _model_from(task: DigitsTask, weights: Path) -> Any:
    import torch

    model = task.model()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in _load_npz(weights).items()}, strict=True)
    return model


def _stop_after(n: int) -> Any:
    calls = 0

    def should_stop() -> bool:
        nonlocal calls
        calls += 1
        return calls >= n

    return should_stop


# ------------------------------------------------------------------------------------------------ kinds


def test_finetune_reaches_accuracy_and_exports_loadable_weights(
    task: DigitsTask, finetuned: tuple[dict[str, Any], Path]
) -> None:
    # Prepare
    result, out = finetuned

    # Execute
    model = _model_from(task, out / "weights.npz")
    evaluated = task.evaluate(model, task.heldout())

    # Assert
    assert result["status"] == "succeeded", result["error"]
    assert result["metrics"]["accuracy"] >= 0.9
    assert evaluated["accuracy"] == pytest.approx(result["metrics"]["accuracy"])
    assert result["device"] == "cpu" and result["dtype"] == "float32"
    assert result["epochs_done"] == FINETUNE_EPOCHS and result["steps"] == FINETUNE_EPOCHS * 23
    assert result["samples_per_s"] > 0 and result["resumed_from_step"] is None
    assert all(a.dtype == np.float32 for a in _load_npz(out / "weights.npz").values())
    assert json.loads((out / "result.json").read_text()) == result
    assert (out / "checkpoint.pt").exists()


def test_progress_goes_to_callback_and_stdout(
    finetuned: tuple[dict[str, Any], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    from federated.burst.worker import PROGRESS_PREFIX, run_job

    _, out = finetuned
    events: list[dict[str, Any]] = json.loads((out / "events.json").read_text())

    # Execute: a 2-epoch job, stdout captured
    run_job(JobSpec(job_id="progress", kind="finetune", epochs=2, device="cpu"), out.parent / "progress")
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(PROGRESS_PREFIX)]

    # Assert
    epochs = [e for e in events if e["event"] == "epoch"]
    assert [e["epoch"] for e in epochs] == list(range(1, FINETUNE_EPOCHS + 1))
    assert {"epoch", "step", "loss", "samples_per_s"} <= set(epochs[0])
    assert epochs[-1]["loss"] < epochs[0]["loss"]
    assert events[-1]["event"] == "finished" and events[-1]["status"] == "succeeded"
    parsed = [json.loads(ln[len(PROGRESS_PREFIX) :]) for ln in lines]
    assert [p["event"] for p in parsed] == ["started", "epoch", "epoch", "finished"]


def test_distill_trains_teacher_then_student(task: DigitsTask, tmp_path: Path) -> None:
    # Prepare
    from federated.burst.worker import run_job

    spec = JobSpec(job_id="distill-1", kind="distill", epochs=12, teacher_hidden=256, device="cpu")

    # Execute
    result = run_job(spec, tmp_path)

    # Assert
    assert result["status"] == "succeeded", result["error"]
    assert result["metrics"]["teacher_accuracy"] >= 0.9
    assert result["metrics"]["accuracy"] >= 0.9
    assert result["epochs_done"] == 24 and result["steps"] == 24 * 23
    model = _model_from(task, tmp_path / "weights.npz")  # the edge model's layout, not the teacher's
    assert task.evaluate(model, task.heldout())["accuracy"] == pytest.approx(result["metrics"]["accuracy"])


def test_qat_from_base_weights_exports_int8_grid_float_weights(
    task: DigitsTask, finetuned: tuple[dict[str, Any], Path], tmp_path: Path
) -> None:
    # Prepare
    from federated.burst.worker import run_job

    _, ft_out = finetuned
    spec = JobSpec(job_id="qat-1", kind="qat", epochs=5, lr=2e-3, device="cpu",
                   base_weights=str(ft_out / "weights.npz"))

    # Execute
    result = run_job(spec, tmp_path)

    # Assert
    assert result["status"] == "succeeded", result["error"]
    assert result["metrics"]["accuracy"] >= 0.85
    assert result["metrics"]["fake_quant_accuracy"] >= 0.85
    weights = _load_npz(tmp_path / "weights.npz")
    assert set(weights) == set(task.model().state_dict())  # plain layout: no parametrizations.*, no observers
    for name in ("0.weight", "2.weight"):
        w = weights[name].astype(np.float64)
        steps = w / (np.abs(w).max() / 127.0)
        np.testing.assert_allclose(steps, np.round(steps), atol=1e-3)  # on the per-tensor int8 grid
    model = _model_from(task, tmp_path / "weights.npz")
    assert task.evaluate(model, task.heldout())["accuracy"] == pytest.approx(result["metrics"]["accuracy"])


# ------------------------------------------------------------------------------------- stop and resume


def test_cancel_then_resume_continues_where_it_stopped(tmp_path: Path) -> None:
    # Prepare
    from federated.burst.worker import run_job

    # decoded as the worker's entrypoint decodes it (kind: a JobKind), which the checkpoint must store as plain data
    spec = JobSpec.from_json(
        JobSpec(job_id="resume-1", kind=JobKind.FINETUNE, epochs=6, checkpoint_every_steps=10, device="cpu").to_json())
    reference = run_job(spec, tmp_path / "reference")

    # Execute: cancelled after 30 steps (mid-epoch 2), then run again
    first = run_job(spec, tmp_path / "job", should_stop=_stop_after(30))
    weights_after_cancel = (tmp_path / "job" / "weights.npz").exists()
    second = run_job(spec, tmp_path / "job")

    # Assert
    assert first["status"] == "cancelled" and first["steps"] == 30 and first["epochs_done"] == 1
    assert first["checkpoint"] and not weights_after_cancel
    assert second["status"] == "succeeded", second["error"]
    assert second["resumed_from_step"] == 30 and second["steps"] == reference["steps"] == 6 * 23
    resumed, uninterrupted = _load_npz(tmp_path / "job" / "weights.npz"), _load_npz(
        tmp_path / "reference" / "weights.npz"
    )
    for name, value in uninterrupted.items():  # same batches, same optimiser state: same weights
        np.testing.assert_allclose(resumed[name], value, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_a_second_worker_on_the_same_job_waits_then_resumes(tmp_path: Path) -> None:
    # Prepare: another worker (here: this test) holds the job directory, as an orphan of a lost Ray head would
    import fcntl
    import threading

    from federated.burst.worker import LOCK_NAME, run_job

    spec = JobSpec(job_id="sole-1", kind="finetune", epochs=3, device="cpu")
    out = tmp_path / "job"
    out.mkdir()
    holder = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT)
    fcntl.flock(holder, fcntl.LOCK_EX)
    os.pwrite(holder, b"4242@elsewhere", 0)
    events: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    # Execute
    worker = threading.Thread(target=lambda: results.append(run_job(spec, out, progress=events.append)))
    worker.start()
    worker.join(2.0)
    waited = worker.is_alive() and not (out / "result.json").exists()
    os.close(holder)  # the other worker ends
    worker.join(60)
    stopped = run_job(spec, tmp_path / "other", should_stop=lambda: True)  # free directory: runs, stops at once
    # Assert
    assert waited and events[0]["event"] == "waiting" and "pid 4242@elsewhere" in events[0]["reason"]
    assert results[0]["status"] == "succeeded", results[0]["error"]
    assert stopped["status"] == "cancelled"


def test_a_worker_cancelled_while_waiting_writes_nothing(tmp_path: Path) -> None:
    # Prepare
    import fcntl

    from federated.burst.worker import LOCK_NAME, run_job

    out = tmp_path / "job"
    out.mkdir()
    holder = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT)
    fcntl.flock(holder, fcntl.LOCK_EX)
    polls = iter(range(3))
    # Execute
    try:
        result = run_job(JobSpec(job_id="sole-2", kind="finetune", epochs=3, device="cpu"), out,
                         should_stop=lambda: next(polls, 3) >= 2)
    finally:
        os.close(holder)
    # Assert
    assert result["status"] == "cancelled" and "another worker" in result["error"]
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]


def test_distill_resumes_in_teacher_phase(tmp_path: Path) -> None:
    # Prepare
    from federated.burst.worker import run_job

    spec = JobSpec(job_id="resume-d", kind="distill", epochs=3, teacher_hidden=64, device="cpu")

    # Execute
    first = run_job(spec, tmp_path, should_stop=_stop_after(40))
    second = run_job(spec, tmp_path)

    # Assert
    assert first["status"] == "cancelled" and first["steps"] == 40
    assert second["status"] == "succeeded" and second["resumed_from_step"] == 40
    assert second["steps"] == 2 * 3 * 23 and second["epochs_done"] == 6


def test_time_budget_times_out_with_checkpoint_and_counts_over_attempts(tmp_path: Path) -> None:
    # Prepare
    from federated.burst.worker import run_job

    spec = JobSpec(job_id="budget-1", kind="finetune", epochs=5, time_budget_s=1e-6, device="cpu")

    # Execute
    first = run_job(spec, tmp_path)
    again = run_job(spec, tmp_path)  # the budget is spent: nothing more runs
    extended = run_job(msgspec.structs.replace(spec, time_budget_s=600.0), tmp_path)

    # Assert
    assert first["status"] == "timed_out" and first["steps"] == 1
    assert (tmp_path / "checkpoint.pt").exists() and first["checkpoint"]
    assert again["status"] == "timed_out" and again["steps"] == 1 and again["resumed_from_step"] == 1
    assert extended["status"] == "succeeded" and extended["resumed_from_step"] == 1
    assert extended["steps"] == 5 * 23


def test_checkpoint_of_same_job_with_other_batch_size_fails(tmp_path: Path) -> None:
    # Prepare
    from federated.burst.worker import run_job

    spec = JobSpec(job_id="clash", kind="finetune", epochs=1, device="cpu")
    run_job(spec, tmp_path, should_stop=_stop_after(3))

    # Execute
    result = run_job(msgspec.structs.replace(spec, batch_size=32), tmp_path)

    # Assert
    assert result["status"] == "failed"
    assert "batch_size" in result["error"] and not (tmp_path / "weights.npz").exists()


def test_checkpoint_of_other_job_is_not_resumed(tmp_path: Path) -> None:
    # Prepare
    from federated.burst.worker import run_job

    run_job(JobSpec(job_id="old", kind="finetune", epochs=1, device="cpu"), tmp_path, should_stop=_stop_after(3))

    # Execute
    result = run_job(JobSpec(job_id="new", kind="finetune", epochs=1, device="cpu"), tmp_path)

    # Assert
    assert result["status"] == "succeeded" and result["resumed_from_step"] is None and result["steps"] == 23


# -------------------------------------------------------------------------------------------- errors, CLI


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs torch")
def test_cuda_requested_without_cuda_fails_cleanly(tmp_path: Path) -> None:
    # Prepare
    import torch

    from federated.burst.worker import run_job

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")

    # Execute
    result = run_job(JobSpec(job_id="no-gpu", kind="finetune", epochs=1, device="cuda"), tmp_path)

    # Assert
    assert result["status"] == "failed" and "cuda" in result["error"]
    assert json.loads((tmp_path / "result.json").read_text())["status"] == "failed"


def test_bad_base_weights_fail_with_error(tmp_path: Path) -> None:
    # Prepare
    from federated.burst.worker import run_job

    bad = tmp_path / "bad.npz"
    np.savez(bad, **{"0.weight": np.zeros((3, 3), np.float32)})

    # Execute
    result = run_job(JobSpec(job_id="bad", kind="qat", epochs=1, base_weights=str(bad)), tmp_path / "out")

    # Assert
    assert result["status"] == "failed" and "state_dict" in result["error"]


@pytest.mark.slow
def test_cli_runs_a_job_and_prints_progress_lines(tmp_path: Path) -> None:
    # Prepare
    spec_path = tmp_path / "spec.json"
    spec_path.write_bytes(JobSpec(job_id="cli-1", kind="finetune", epochs=2, device="cpu").to_json())
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}

    # Execute
    proc = subprocess.run(
        [sys.executable, "-m", "federated.burst.worker", "--spec", str(spec_path), "--out-dir", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=120, cwd=REPO_ROOT, env=env, check=False,
    )

    # Assert
    assert proc.returncode == 0, proc.stderr
    progress = [ln for ln in proc.stdout.splitlines() if ln.startswith("EDGEFLEET_PROGRESS ")]
    assert len(progress) == 4  # started, 2 epochs, finished
    assert json.loads((tmp_path / "o" / "result.json").read_text())["status"] == "succeeded"
    assert (tmp_path / "o" / "weights.npz").exists()


@pytest.mark.slow
def test_cli_rejects_a_bad_spec(tmp_path: Path) -> None:
    # Prepare
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps({"job_id": "x", "kind": "pretrain"}))

    # Execute
    proc = subprocess.run(
        [sys.executable, "-m", "federated.burst.worker", "--spec", str(spec_path), "--out-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=REPO_ROOT, check=False,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"},
    )

    # Assert
    assert proc.returncode == 2 and "kind" in proc.stderr


# ------------------------------------------------------------------------------------------------- spec


def test_spec_round_trips_and_validates() -> None:
    # Prepare
    spec = JobSpec(job_id="j-1", kind="distill", base_weights="/w.npz", teacher_hidden=512)

    # Execute
    decoded = JobSpec.from_json(spec.to_json())

    # Assert
    assert decoded == spec
    with pytest.raises(msgspec.ValidationError):
        JobSpec.from_json(b'{"job_id": "j", "kind": "finetune", "epochs": 0}')
    with pytest.raises(msgspec.ValidationError):
        JobSpec.from_json(b'{"job_id": "../etc", "kind": "finetune"}')


def test_estimate_cost(task: DigitsTask) -> None:
    # Prepare
    finetune = JobSpec(job_id="c", kind="finetune", epochs=10)
    distill = JobSpec(job_id="c", kind="distill", epochs=10, teacher_hidden=512)

    # Execute
    ft = estimate_cost(task, finetune)
    ds = estimate_cost("digits", distill)

    # Assert
    params = 64 * 64 + 64 + 64 * 10 + 10
    assert ft["parameters"] == params and ft["samples"] == 1437 and ft["epochs"] == 10
    assert ft["flops"] == params * 1437 * 10 * 6
    assert ft["steps"] == 230 and ds["steps"] == 460
    assert ds["teacher_parameters"] == 64 * 512 + 512 + 512 * 512 + 512 + 512 * 10 + 10
    assert ds["flops"] > ft["flops"] * 50 and ds["memory_mb"] > ft["memory_mb"]
    assert ft["memory_mb"] == pytest.approx(sum(ft["memory_breakdown_mb"].values()), abs=0.01)


# --------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_finetune_on_cuda_uses_bf16(task: DigitsTask, tmp_path: Path) -> None:
    # Prepare
    import torch

    from federated.burst.worker import run_job

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    spec = JobSpec(job_id="gpu-1", kind="finetune", epochs=FINETUNE_EPOCHS, device="cuda")

    # Execute
    result = run_job(spec, tmp_path)

    # Assert
    assert result["status"] == "succeeded", result["error"]
    assert result["device"] == "cuda" and result["dtype"] == "bfloat16"
    assert result["metrics"]["accuracy"] >= 0.9
    model = _model_from(task, tmp_path / "weights.npz")  # fp32 master weights, loadable on CPU
    assert task.evaluate(model, task.heldout())["accuracy"] == pytest.approx(result["metrics"]["accuracy"])


def test_finetune_trains_a_standardised_task_through_its_input_contract(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: tabular features spanning 0.001 .. 4254, standardised by the task's input contract
    from federated.burst.worker import run_job
    from tests.controlplane.test_input_contract_e2e import TASK_NAME

    monkeypatch.setenv("EDGEFLEET_TASKS", f"{TASK_NAME}=tests.controlplane.test_input_contract_e2e:BreastCancerTask")
    # Execute
    result = run_job(JobSpec(job_id="bc-1", kind="finetune", task=TASK_NAME, epochs=30, device="cpu"), tmp_path)
    # Assert: trained on what the model will see on a device (raw features leave it near the majority class)
    assert result["status"] == "succeeded", result["error"]
    assert result["metrics"]["accuracy"] >= 0.93
