"""Burst worker training-step throughput (samples/s) on CPU vs CUDA, and the Ray job overhead.

    python bench/burst.py [--hidden 2048] [--epochs 5] [--long-epochs 1000] [--batch-size 256] [--repeats 3]
                          [--threads N]
                          [--json bench/results/burst.json]

Rows: ``finetune`` jobs of :func:`federated.burst.worker.run_job` on the digits pool (1437 samples) for

* ``digits``: the task's own MLP (64 -> 64 -> 10, 4.8 k parameters);
* ``wide-H``: 64 -> H -> H -> 10 (``--hidden``, 4.3 M parameters at 2048), so a GPU has work to do;

on the CPU (fp32) and, when ``torch.cuda.is_available()``, on CUDA (bf16 autocast); without CUDA the table says
"no CUDA device here". samples/s is the worker's own figure: optimiser steps only (checkpoint writes and the
held-out evaluation excluded), median over ``--repeats``. ``wall`` is the whole ``run_job`` call.

Job overhead: the same digits finetune (a) in-process (``run_job``), (b) through the control plane's
``LocalBackend`` (a worker process), (c) through its ``RayBackend`` (Ray Jobs API on a local head started here, as
the control plane does): submit -> terminal status, polled every 50 ms (the control plane polls every second);
for a short job (``--epochs``: the fixed cost) and a longer one (``--long-epochs``).
Without ``ray`` that row is reported as unavailable (never estimated).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import ROOT

from federated.burst.spec import JobSpec
from federated.tasks.digits import DigitsTask


class WideDigitsTask(DigitsTask):
    """Digits with a wider model: 64 -> hidden -> hidden -> 10."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden

    def model(self) -> Any:
        import torch
        from torch import nn

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return nn.Sequential(
                nn.Linear(64, self.hidden), nn.ReLU(), nn.Linear(self.hidden, self.hidden), nn.ReLU(),
                nn.Linear(self.hidden, 10),
            )


def _run(spec: JobSpec, task: DigitsTask | None) -> dict[str, Any]:
    from federated.burst.worker import run_job

    with tempfile.TemporaryDirectory(prefix="burst-bench-") as tmp:
        started = time.perf_counter()
        result = run_job(spec, tmp, task=task, progress=None)
        result["wall_s"] = time.perf_counter() - started
    if result["status"] != "succeeded":
        raise RuntimeError(f"{spec.job_id}: {result['status']}: {result['error']}")
    return result


def _quiet(fn: Any, *args: Any) -> Any:
    """The worker prints a progress line per epoch: keep the bench's own output readable."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def _throughput(args: argparse.Namespace) -> tuple[list[dict[str, Any]], str | None]:
    import torch

    devices = ["cpu"]
    cuda_note = None
    if torch.cuda.is_available():
        devices.append("cuda")
    else:
        cuda_note = "no CUDA device here"
    models: list[tuple[str, DigitsTask | None]] = [("digits", None), (f"wide-{args.hidden}", WideDigitsTask(args.hidden))]
    rows = []
    for device in devices:
        for name, task in models:
            params = sum(p.numel() for p in (task or DigitsTask()).model().parameters())
            spec = JobSpec(job_id=f"bench-{name}-{device}", kind="finetune", epochs=args.epochs,
                           batch_size=args.batch_size, lr=1e-3, device=device, checkpoint_every_steps=10**9)
            _quiet(_run, spec, task)  # warm-up: first-use costs (CUDA context, kernels, allocator)
            runs = [_quiet(_run, spec, task) for _ in range(args.repeats)]
            rows.append({
                "model": name,
                "parameters": params,
                "device": device,
                "dtype": runs[0]["dtype"],
                "samples_per_s": statistics.median(r["samples_per_s"] for r in runs),
                "samples_per_s_all": [r["samples_per_s"] for r in runs],
                "train_s": statistics.median(r["train_s"] for r in runs),
                "checkpoint_s": statistics.median(r["checkpoint_s"] for r in runs),
                "wall_s": round(statistics.median(r["wall_s"] for r in runs), 3),
                "accuracy": runs[0]["metrics"]["accuracy"],
                "steps": runs[0]["steps"],
            })
            print(f"  {name} on {device}: {rows[-1]['samples_per_s']:,.0f} samples/s", file=sys.stderr)
    return rows, cuda_note


def _backend_job_s(backend: Any, spec: JobSpec, job_id: int, poll_s: float = 0.05) -> float:
    """Submit -> terminal state through a control-plane backend, the way JobService drives it."""
    import msgspec

    with tempfile.TemporaryDirectory(prefix="burst-bench-job-") as tmp:
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_bytes(msgspec.json.encode(spec))
        started = time.perf_counter()
        backend_id = backend.submit(job_id, spec_path, Path(tmp) / "out", {"cpus": 1.0, "memory_gb": 1.0})
        while (state := backend.status(backend_id)) in ("PENDING", "RUNNING"):
            time.sleep(poll_s)
        elapsed = time.perf_counter() - started
        result = json.loads((Path(tmp) / "out" / "result.json").read_text()) if state == "SUCCEEDED" else {}
        if result.get("status") != "succeeded":
            raise RuntimeError(f"{backend.name} job {backend_id}: {state}: {backend.logs(backend_id)[-1500:]}")
    return elapsed


def _job_overhead(args: argparse.Namespace) -> dict[str, Any]:
    """The same digits finetune in-process, as a local worker process, and as a Ray job (Jobs API), for a short
    job (``--epochs``: the fixed cost dominates) and a longer one (``--long-epochs``: what a real job pays)."""
    from controlplane.burst.backends import LocalBackend, RayBackend

    def spec_for(epochs: int) -> JobSpec:
        return JobSpec(job_id=f"bench-overhead-{epochs}", kind="finetune", epochs=epochs, batch_size=args.batch_size,
                       lr=1e-3, device="cpu", checkpoint_every_steps=10**9)

    def in_process(spec: JobSpec) -> float:
        started = time.perf_counter()
        _quiet(_run, spec, None)
        return time.perf_counter() - started

    sizes = [args.epochs, args.long_epochs]
    local = LocalBackend()
    rows: list[dict[str, Any]] = []
    for epochs in sizes:
        spec = spec_for(epochs)
        base = statistics.median(in_process(spec) for _ in range(args.repeats))
        local_s = statistics.median(_backend_job_s(local, spec, i) for i in range(args.repeats))
        rows.append({"epochs": epochs, "in_process_s": round(base, 3), "local_process_s": round(local_s, 3),
                     "local_overhead_s": round(local_s - base, 3), "local_ratio": round(local_s / base, 2)})
    if importlib.util.find_spec("ray") is None:
        return {"rows": rows, "ray": {"available": False,
                                      "reason": "ray is not importable (pip install 'edgefleet[burst]')"}}
    import ray

    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        backend = RayBackend(Path(tmp))
        try:
            started = time.perf_counter()
            backend._jobs()  # starts the local head, as the first burst job does
            head_start_s = time.perf_counter() - started
            first_job_s = _backend_job_s(backend, spec_for(args.epochs), 100)
            for row in rows:
                ray_s = [_backend_job_s(backend, spec_for(row["epochs"]), 101 + i) for i in range(args.repeats)]
                median = statistics.median(ray_s)
                row.update(ray_job_s=round(median, 3), ray_job_s_all=[round(x, 3) for x in ray_s],
                           ray_overhead_s=round(median - row["in_process_s"], 3),
                           ray_ratio=round(median / row["in_process_s"], 2))
        finally:
            backend.close()
    return {"rows": rows, "ray": {"available": True, "ray_version": ray.__version__,
                                  "head_start_s": round(head_start_s, 3), "first_job_s": round(first_job_s, 3)}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--long-epochs", type=int, default=1000, help="the longer job of the overhead table")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "burst.json")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    rows, cuda_note = _throughput(args)
    overhead = _job_overhead(args)

    print(f"\nfinetune, digits pool (1437 samples), {args.epochs} epochs, batch {args.batch_size}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    print(f"{'model':<12} {'params':>10} {'device':<6} {'dtype':<9} {'samples/s':>12} {'train':>8} "
          f"{'ckpt':>7} {'wall':>7} {'acc':>6}")
    for r in rows:
        print(f"{r['model']:<12} {r['parameters']:>10,} {r['device']:<6} {r['dtype']:<9} "
              f"{r['samples_per_s']:>12,.0f} {r['train_s']:>7.3f}s {r['checkpoint_s']:>6.3f}s "
              f"{r['wall_s']:>6.2f}s {r['accuracy']:>6.3f}")
    if cuda_note:
        print(f"cuda: {cuda_note}")
    by_key = {(r["model"], r["device"]): r["samples_per_s"] for r in rows}
    for model in dict.fromkeys(r["model"] for r in rows):
        if (model, "cuda") in by_key:
            print(f"{model}: cuda / cpu = {by_key[(model, 'cuda')] / by_key[(model, 'cpu')]:.1f}x")
    ray_info = overhead["ray"]
    print("\njob overhead: the digits finetune submitted -> finished (median seconds; x = vs in-process)")
    print(f"{'epochs':>7} {'in-process':>11} {'local process':>20} {'Ray job (warm head)':>22}")
    for row in overhead["rows"]:
        ray_cell = (f"{row['ray_job_s']:>8.2f}s {row['ray_ratio']:>6.2f}x (+{row['ray_overhead_s']:.2f}s)"
                    if "ray_job_s" in row else "unavailable")
        print(f"{row['epochs']:>7} {row['in_process_s']:>10.2f}s {row['local_process_s']:>8.2f}s "
              f"{row['local_ratio']:>6.2f}x (+{row['local_overhead_s']:.2f}s) {ray_cell}")
    if ray_info["available"]:
        print(f"ray {ray_info['ray_version']}: local head start {ray_info['head_start_s']:.2f}s (once), first job "
              f"on it {ray_info['first_job_s']:.2f}s")
    else:
        print(f"ray: unavailable ({ray_info['reason']})")

    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "loadavg": os.getloadavg(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "throughput": rows,
        "cuda_note": cuda_note,
        "job_overhead": overhead,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
