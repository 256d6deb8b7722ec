"""The burst worker: one training job (:class:`~federated.burst.spec.JobSpec`) on a GPU/TPU/CPU worker.

Run in-process with :func:`run_job`, or as a Ray job's entrypoint::

    python -m federated.burst.worker --spec spec.json --out-dir DIR

Kinds (all on the task's whole training pool, the operator's central data):

* ``finetune``: the task model, from ``base_weights`` or its seeded initial weights, Adam on cross-entropy;
* ``distill``: a wider MLP teacher (``teacher_hidden`` units, two hidden layers) trained first, then the task
  model on ``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE``;
* ``qat``: the task model with int8 fake-quant on weights and activations (:mod:`federated.burst._qat`),
  exported as plain float weights on the int8 grid, in the task model's layout.

Device: CUDA when ``torch.cuda.is_available()`` and ``spec.device`` allows it, with bf16 autocast (fp32 master
weights and optimiser); CPU in fp32. Held-out metrics are always computed on CPU in fp32, as the build does.

Files in ``out_dir``:

* ``checkpoint.pt``: models, optimisers, position (phase, epoch, batch, step), elapsed training time and RNG
  state; written atomically every ``checkpoint_every_steps`` steps, at the end of every epoch and when the job
  stops early. A new run of the same ``job_id`` resumes from it (``resumed_from_step``); mini-batch order is a
  function of (seed, phase, epoch), so a resumed job computes what an uninterrupted one would have.
* ``weights.npz``: the task model's state dict, float arrays as float32 (only when the job succeeded; the
  control plane builds from it as from a federated round's weights).
* ``result.json``: status (succeeded | timed_out | cancelled | failed), held-out metrics, steps, epochs_done,
  device, dtype, samples_per_s (training steps only), duration_s (this attempt), resumed_from_step, error.

Progress goes to the ``progress`` callback and, as JSON lines prefixed ``EDGEFLEET_PROGRESS ``, to stdout (the
Ray job log is how the control plane follows a job). ``time_budget_s`` counts training time over all attempts;
``should_stop`` is polled after every optimiser step (the CLI sets it on SIGTERM/SIGINT: ``ray job stop``).
Exit status of the CLI: 0 succeeded, 1 failed, 2 bad spec, 75 (EX_TEMPFAIL) timed_out or cancelled (resumable).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import msgspec
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from federated.burst._qat import QATModel, export_float_state_dict
from federated.burst.spec import JobKind, JobSpec, WorkerOutcome, load_spec
from federated.tasks import evaluate_classifier, get_task, input_contract_of

if TYPE_CHECKING:
    from federated.tasks import Dataset, Task

__all__ = [
    "CHECKPOINT_NAME",
    "PROGRESS_PREFIX",
    "RESULT_NAME",
    "WEIGHTS_NAME",
    "main",
    "pick_device",
    "run_job",
]

PROGRESS_PREFIX: Final = "EDGEFLEET_PROGRESS "
RESULT_PREFIX: Final = "EDGEFLEET_RESULT "
CHECKPOINT_NAME: Final = "checkpoint.pt"
LOCK_NAME: Final = ".worker.lock"
WEIGHTS_NAME: Final = "weights.npz"
RESULT_NAME: Final = "result.json"
CHECKPOINT_FORMAT: Final = 1
EXIT_TEMPFAIL: Final = 75
# A checkpoint of the same job_id is only resumed when these spec fields are the same.
_RESUME_KEYS: Final = ("kind", "task", "batch_size", "teacher_hidden", "seed")


def _resume_spec(spec: JobSpec) -> dict[str, Any]:
    """What a checkpoint must match to be resumed, as plain values (``torch.load(weights_only=True)`` refuses
    anything else, e.g. the JobKind enum)."""
    resume: dict[str, Any] = msgspec.to_builtins({k: getattr(spec, k) for k in _RESUME_KEYS})
    return resume

ProgressFn = Callable[[dict[str, Any]], None]
StopFn = Callable[[], bool]


class _Stopped(Exception):
    def __init__(self, status: WorkerOutcome) -> None:
        super().__init__(status)
        self.status = status


@dataclass
class _Position:
    phase: int = 0
    epoch: int = 0  # within the phase
    batch: int = 0  # next batch of the epoch
    step: int = 0  # optimiser steps over all phases and attempts
    elapsed_s: float = 0.0  # training time over all attempts (the time budget's clock)
    loss_sum: float = 0.0  # current epoch so far
    loss_n: int = 0


@dataclass
class _Phase:
    name: str
    module: nn.Module
    optimizer: torch.optim.Optimizer
    loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, labels, batch idx)


def pick_device(choice: str) -> tuple[torch.device, str]:
    """(device, compute dtype name): CUDA + ``"bfloat16"`` (fp32 if the GPU lacks bf16) or CPU + ``"float32"``."""
    cuda = torch.cuda.is_available()
    if choice == "cuda" and not cuda:
        raise RuntimeError("device 'cuda' requested but torch.cuda.is_available() is False")
    if choice in ("auto", "cuda") and cuda:
        return torch.device("cuda"), "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    return torch.device("cpu"), "float32"


# ------------------------------------------------------------------------------------------------- files


@contextmanager
def _atomic(path: Path) -> Iterator[Any]:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    with _atomic(path) as fh:
        fh.write(json.dumps(payload, indent=2, sort_keys=True).encode() + b"\n")


def _write_weights(path: Path, state_dict: dict[str, torch.Tensor]) -> None:
    arrays: dict[str, Any] = {}
    for name, tensor in state_dict.items():
        value = tensor.detach().to("cpu")
        arrays[name] = value.float().numpy() if value.is_floating_point() else value.numpy()
    with _atomic(path) as fh:
        np.savez(fh, allow_pickle=False, **arrays)  # a file object: no ".npz" appended


def _load_weights(path: str, model: nn.Module) -> None:
    with np.load(path, allow_pickle=False) as arrays:
        state = {name: torch.from_numpy(arrays[name].copy()) for name in arrays.files}
    model.load_state_dict(state, strict=True)


# ------------------------------------------------------------------------------------------------- the job


def _teacher(task: Task, hidden: int, seed: int) -> nn.Module:
    features = math.prod(task.input_shape)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, task.num_classes),
        )


class _Job:
    def __init__(
        self, spec: JobSpec, out_dir: Path, task: Task, progress: ProgressFn | None, should_stop: StopFn | None
    ) -> None:
        self.spec = spec
        self.out_dir = out_dir
        self.task = task
        self.progress = progress
        self.should_stop = should_stop
        self.device, self.dtype = pick_device(spec.device)
        self.autocast = self.dtype == "bfloat16"
        self.started = time.monotonic()
        self.samples_done = 0  # this attempt
        self.train_s = 0.0  # this attempt, training steps only
        self.checkpoint_s = 0.0
        self.resumed_from_step: int | None = None
        self.pos = _Position()
        self.teacher_logits: torch.Tensor | None = None
        self.phases: list[_Phase] = []
        self.steps_per_epoch = 0

    # ---------------------------------------------------------------------------------------- reporting

    def emit(self, event: str, **fields: Any) -> None:
        _emit(self.spec, self.progress, event, **fields)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ---------------------------------------------------------------------------------------- set-up

    def _build(self) -> None:
        spec = self.spec
        pool_fn = getattr(self.task, "train_pool", None)
        if pool_fn is None:
            raise TypeError(f"task {self.task.name!r} has no train_pool(): burst jobs train on the whole pool")
        pool: Dataset = pool_fn()
        self.xs = torch.from_numpy(pool.model_input(input_contract_of(self.task))).to(self.device)
        self.ys = torch.from_numpy(pool.y.astype(np.int64)).to(self.device)
        self.steps_per_epoch = math.ceil(len(pool) / spec.batch_size)

        student = self.task.model()
        if spec.base_weights is not None:
            _load_weights(spec.base_weights, student)
        self.student = student.to(self.device)
        self.qat: QATModel | None = None
        self.teacher: nn.Module | None = None
        if spec.kind == JobKind.DISTILL:
            self.teacher = _teacher(self.task, spec.teacher_hidden, spec.seed).to(self.device)
            self.phases.append(self._phase("teacher", self.teacher, self._hard_loss))
            self.phases.append(self._phase("student", self.student, self._distill_loss))
        elif spec.kind == JobKind.QAT:
            self.qat = QATModel(self.student).to(self.device)
            self.phases.append(self._phase("qat", self.qat, self._hard_loss))
        else:
            self.phases.append(self._phase("finetune", self.student, self._hard_loss))

    def _phase(self, name: str, module: nn.Module, loss: Any) -> _Phase:
        return _Phase(name, module, torch.optim.Adam(module.parameters(), lr=self.spec.lr), loss)

    @staticmethod
    def _hard_loss(logits: torch.Tensor, labels: torch.Tensor, _idx: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, labels)

    def _distill_loss(self, logits: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        assert self.teacher_logits is not None
        t = self.spec.temperature
        soft = F.kl_div(
            F.log_softmax(logits / t, dim=1),
            F.log_softmax(self.teacher_logits[idx] / t, dim=1),
            reduction="batchmean",
            log_target=True,
        )
        alpha = self.spec.distill_alpha
        return alpha * t * t * soft + (1.0 - alpha) * F.cross_entropy(logits, labels)

    def _prepare_phase(self, phase: _Phase) -> None:
        if phase.name == "student" and self.teacher is not None:
            self.teacher.eval()
            with torch.no_grad():
                self.teacher_logits = self.teacher(self.xs).float()

    # ---------------------------------------------------------------------------------------- checkpoints

    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / CHECKPOINT_NAME

    def _save_checkpoint(self) -> None:
        self._sync()
        started = time.monotonic()
        state = {
            "format": CHECKPOINT_FORMAT,
            "job_id": self.spec.job_id,
            "spec": _resume_spec(self.spec),
            "position": asdict(self.pos),
            "models": {p.name: p.module.state_dict() for p in self.phases},
            "optimizers": {p.name: p.optimizer.state_dict() for p in self.phases},
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            },
            "saved_at": time.time(),
        }
        with _atomic(self.checkpoint_path) as fh:
            torch.save(state, fh)
        self.checkpoint_s += time.monotonic() - started

    def _resume(self) -> None:
        if not self.checkpoint_path.exists():
            return
        state = torch.load(self.checkpoint_path, map_location="cpu", weights_only=True)
        if state.get("job_id") != self.spec.job_id:
            self.emit("checkpoint_ignored", reason=f"checkpoint of job {state.get('job_id')!r}")
            return
        if state.get("format") != CHECKPOINT_FORMAT:
            raise RuntimeError(f"{self.checkpoint_path}: checkpoint format {state.get('format')!r} unsupported")
        expected = _resume_spec(self.spec)
        if state["spec"] != expected:
            raise RuntimeError(
                f"{self.checkpoint_path}: written for job {self.spec.job_id!r} with {state['spec']}, "
                f"this spec has {expected}; use a new job_id or remove the checkpoint"
            )
        for phase in self.phases:
            phase.module.load_state_dict(state["models"][phase.name])
            phase.optimizer.load_state_dict(state["optimizers"][phase.name])
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.pos = _Position(**state["position"])
        self.resumed_from_step = self.pos.step
        self.emit("resumed", step=self.pos.step, phase=self._phase_name(), epoch=self.pos.epoch)

    def _phase_name(self) -> str:
        return self.phases[min(self.pos.phase, len(self.phases) - 1)].name

    # ---------------------------------------------------------------------------------------- training

    def _stop_status(self) -> WorkerOutcome | None:
        if self.should_stop is not None and self.should_stop():
            return WorkerOutcome.CANCELLED
        if self.pos.elapsed_s >= self.spec.time_budget_s:
            return WorkerOutcome.TIMED_OUT
        return None

    def _order(self) -> torch.Tensor:
        seed = (self.spec.seed * 1_000_003 + self.pos.phase * 10_007 + self.pos.epoch) % (2**63)
        generator = torch.Generator().manual_seed(seed)
        return torch.randperm(len(self.xs), generator=generator).to(self.device)

    def _rate(self) -> float:
        return self.samples_done / self.train_s if self.train_s > 0 else 0.0

    def train(self) -> WorkerOutcome:
        """Runs the remaining steps; returns WorkerOutcome.SUCCEEDED or raises :class:`_Stopped`."""
        if self.pos.elapsed_s >= self.spec.time_budget_s:
            raise _Stopped(WorkerOutcome.TIMED_OUT)
        bs = self.spec.batch_size
        while self.pos.phase < len(self.phases):
            phase = self.phases[self.pos.phase]
            self._prepare_phase(phase)
            phase.module.train()
            while self.pos.epoch < self.spec.epochs:
                order = self._order()
                loss_sum = torch.tensor(self.pos.loss_sum, device=self.device)
                segment_start = time.monotonic()
                segment_samples = 0
                while self.pos.batch < self.steps_per_epoch:
                    idx = order[self.pos.batch * bs : (self.pos.batch + 1) * bs]
                    with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                        logits = phase.module(self.xs[idx])
                    loss = phase.loss(logits.float(), self.ys[idx], idx)
                    phase.optimizer.zero_grad(set_to_none=True)
                    loss.backward()  # type: ignore[no-untyped-call]
                    phase.optimizer.step()
                    loss_sum += loss.detach() * len(idx)
                    self.pos.loss_n += len(idx)
                    self.pos.batch += 1
                    self.pos.step += 1
                    segment_samples += len(idx)
                    now = time.monotonic()
                    self.pos.elapsed_s += now - segment_start
                    self.train_s += now - segment_start
                    self.samples_done += len(idx)
                    segment_start = now
                    stop = self._stop_status()
                    end_of_epoch = self.pos.batch == self.steps_per_epoch
                    if end_of_epoch or stop or self.pos.step % self.spec.checkpoint_every_steps == 0:
                        self._sync()
                        self.pos.loss_sum = float(loss_sum)
                        mean = self.pos.loss_sum / max(self.pos.loss_n, 1)
                        if end_of_epoch:
                            self.pos.epoch += 1
                            self.pos.batch = 0
                            self.pos.loss_sum, self.pos.loss_n = 0.0, 0
                        self._save_checkpoint()
                        self.emit(
                            "epoch" if end_of_epoch else "checkpoint",
                            phase=phase.name,
                            epoch=self.pos.epoch if end_of_epoch else self.pos.epoch + 1,
                            epochs=self.spec.epochs,
                            step=self.pos.step,
                            loss=round(mean, 6),
                            samples_per_s=round(self._rate(), 1),
                            elapsed_s=round(self.pos.elapsed_s, 3),
                        )
                        segment_start = time.monotonic()  # checkpoint time is not training time
                        if stop:
                            raise _Stopped(stop)
                        if end_of_epoch:
                            break
            self.pos.phase += 1
            self.pos.epoch = 0
        return WorkerOutcome.SUCCEEDED

    # ---------------------------------------------------------------------------------------- results

    def exported_state_dict(self) -> dict[str, torch.Tensor]:
        if self.qat is not None:
            return export_float_state_dict(self.qat, self.task.model())
        return {k: v.detach().to("cpu", copy=True) for k, v in self.student.state_dict().items()}

    def metrics(self, state_dict: dict[str, torch.Tensor]) -> dict[str, float]:
        heldout = self.task.heldout()
        model = self.task.model()
        model.load_state_dict(state_dict)
        result = self.task.evaluate(model, heldout)
        metrics = {"accuracy": result["accuracy"], "loss": result["loss"]}
        if self.teacher is not None:
            teacher = self.teacher.to("cpu")
            metrics["teacher_accuracy"] = evaluate_classifier(
                teacher, heldout, input_scale=input_contract_of(self.task)
            )["accuracy"]
        if self.qat is not None:
            metrics["fake_quant_accuracy"] = self.task.evaluate(self.qat.to("cpu"), heldout)["accuracy"]
        return metrics

    def epochs_done(self) -> int:
        if not self.phases:
            return 0
        return min(self.pos.phase * self.spec.epochs + self.pos.epoch, len(self.phases) * self.spec.epochs)


def _emit(spec: JobSpec, progress: ProgressFn | None, event: str, **fields: Any) -> None:
    payload = {"job_id": spec.job_id, "event": event, **fields}
    print(PROGRESS_PREFIX + json.dumps(payload, sort_keys=True), flush=True)
    if progress is not None:
        progress(payload)


@contextmanager
def _sole_worker(out: Path, spec: JobSpec, progress: ProgressFn | None,
                 should_stop: StopFn | None) -> Iterator[bool]:
    """One worker at a time per job directory. A worker whose Ray head was lost (a control plane killed with its
    local head still up) may still be running when the job is re-submitted: wait for it to end, then resume from
    its last checkpoint instead of both writing the same files. Yields False when stopped while waiting."""
    # fcntl by hand, not the filelock library: filelock opens the lock file with O_TRUNC on every try, which would
    # erase the holder's pid@host that a waiting worker reports; flock's lock also ends with the process (kill -9).
    fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        waiting = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if should_stop is not None and should_stop():
                    yield False
                    return
                if not waiting:
                    holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                    _emit(spec, progress, "waiting", reason=f"another worker (pid {holder}) holds this job's directory")
                    waiting = True
                time.sleep(0.5)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}@{os.uname().nodename}".encode(), 0)
        yield True
    finally:
        os.close(fd)  # releases the lock


def run_job(
    spec: JobSpec,
    out_dir: str | Path,
    *,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    task: Task | None = None,
) -> dict[str, Any]:
    """Run (or resume) ``spec`` with files in ``out_dir``; returns what ``result.json`` holds.

    ``task`` overrides ``get_task(spec.task)`` (a benchmark's wider model; tests). Never raises for a training
    failure: that is ``status="failed"`` with ``error``.
    """
    started = time.monotonic()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with _sole_worker(out, spec, progress, should_stop) as sole:
        if sole:
            return _run_job(spec, out, progress, should_stop, task, started)
    # Cancelled while another worker held the directory: its files are its own, nothing is written here.
    _emit(spec, progress, "finished", status=WorkerOutcome.CANCELLED, steps=0, accuracy=None, error=None)
    return {"job_id": spec.job_id, "kind": spec.kind, "status": WorkerOutcome.CANCELLED, "metrics": {}, "steps": 0,
            "error": "cancelled while another worker held the job's directory", "weights": None, "checkpoint": None}


def _run_job(spec: JobSpec, out: Path, progress: ProgressFn | None, should_stop: StopFn | None, task: Task | None,
             started: float) -> dict[str, Any]:
    (out / WEIGHTS_NAME).unlink(missing_ok=True)  # present only after this attempt succeeds
    result: dict[str, Any] = {
        "job_id": spec.job_id,
        "kind": spec.kind,
        "task": spec.task if task is None else task.name,
        "status": WorkerOutcome.FAILED,
        "metrics": {},
        "steps": 0,
        "epochs_done": 0,
        "epochs_planned": spec.epochs * (2 if spec.kind == JobKind.DISTILL else 1),
        "device": None,
        "dtype": None,
        "samples_per_s": 0.0,
        "duration_s": 0.0,
        "train_s": 0.0,
        "checkpoint_s": 0.0,
        "resumed_from_step": None,
        "error": None,
        "weights": None,
        "checkpoint": None,
    }
    job: _Job | None = None
    try:
        job = _Job(spec, out, task if task is not None else get_task(spec.task), progress, should_stop)
        result["device"], result["dtype"] = job.device.type, job.dtype
        job._build()
        job._resume()
        job.emit("started", device=job.device.type, dtype=job.dtype, resumed_from_step=job.resumed_from_step,
                 steps_per_epoch=job.steps_per_epoch)
        try:
            status = job.train()
        except _Stopped as stopped:
            status = stopped.status
        state_dict = job.exported_state_dict()
        result["metrics"] = job.metrics(state_dict)
        if status is WorkerOutcome.SUCCEEDED:
            _write_weights(out / WEIGHTS_NAME, state_dict)
            result["weights"] = str(out / WEIGHTS_NAME)
        result["status"] = status
    except Exception as exc:  # noqa: BLE001 - reported in result.json, which is what the control plane reads
        result["error"] = f"{type(exc).__name__}: {exc}"
    if job is not None:
        result.update(
            steps=job.pos.step,
            epochs_done=job.epochs_done(),
            samples_per_s=round(job._rate(), 1),
            train_s=round(job.train_s, 4),
            checkpoint_s=round(job.checkpoint_s, 4),
            resumed_from_step=job.resumed_from_step,
            elapsed_s=round(job.pos.elapsed_s, 4),
        )
        if job.checkpoint_path.exists():
            result["checkpoint"] = str(job.checkpoint_path)
    result["duration_s"] = round(time.monotonic() - started, 4)
    _write_json(out / RESULT_NAME, result)
    payload = {"job_id": spec.job_id, "event": "finished", "status": result["status"],
               "steps": result["steps"], "accuracy": result["metrics"].get("accuracy"),
               "error": result["error"]}
    print(PROGRESS_PREFIX + json.dumps(payload, sort_keys=True), flush=True)
    if progress is not None:
        progress(payload)
    return result


# ------------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m federated.burst.worker", description=__doc__.split("\n")[0])
    parser.add_argument("--spec", required=True, type=Path, help="JobSpec as JSON")
    parser.add_argument("--out-dir", required=True, type=Path, help="checkpoint, weights.npz, result.json")
    args = parser.parse_args(argv)
    try:
        spec = load_spec(args.spec)
    except (OSError, msgspec.DecodeError) as exc:  # ValidationError is a DecodeError
        print(f"bad spec {args.spec}: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        print(f"signal {signum}: stopping after the current step", file=sys.stderr, flush=True)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    result = run_job(spec, args.out_dir, should_stop=stop.is_set)
    print(RESULT_PREFIX + json.dumps(result, sort_keys=True), flush=True)
    if result["status"] == WorkerOutcome.SUCCEEDED:
        return 0
    if result["status"] in (WorkerOutcome.TIMED_OUT, WorkerOutcome.CANCELLED):
        return EXIT_TEMPFAIL
    return 1


if __name__ == "__main__":
    sys.exit(main())
