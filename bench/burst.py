"""Burst worker training-step throughput (samples/s) on CPU vs CUDA, and the Ray job overhead.

    python bench/burst.py [--hidden 2048] [--epochs 5] [--batch-size 256] [--repeats 3] [--threads N]
                          [--json bench/results/burst.json]

Rows: ``finetune`` jobs of :func:`federated.burst.worker.run_job` on the digits pool (1437 samples) for

* ``digits``: the task's own MLP (64 -> 64 -> 10, 4.8 k parameters);
* ``wide-H``: 64 -> H -> H -> 10 (``--hidden``, 4.3 M parameters at 2048), so a GPU has work to do;

on the CPU (fp32) and, when ``torch.cuda.is_available()``, on CUDA (bf16 autocast); without CUDA the table says
"no CUDA device here". samples/s is the worker's own figure: optimiser steps only (checkpoint writes and the
held-out evaluation excluded), median over ``--repeats``. ``wall`` is the whole ``run_job`` call.

Ray row: when ``ray`` is importable, the same digits job in-process vs as a Ray task (``ray.remote(run_job)``)
on a local Ray (``ray.init`` with ``--ray-cpus``): submit -> result wall time, the difference is the overhead.
Without ``ray`` the row is reported as unavailable (never estimated).
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


def _ray_overhead(args: argparse.Namespace) -> dict[str, Any]:
    if importlib.util.find_spec("ray") is None:
        return {"available": False, "reason": "ray is not importable in this environment"}
    import ray

    from federated.burst.worker import run_job

    spec = JobSpec(job_id="bench-ray", kind="finetune", epochs=args.epochs, batch_size=args.batch_size,
                   lr=1e-3, device="cpu", checkpoint_every_steps=10**9)

    def in_process() -> float:
        started = time.perf_counter()
        _quiet(_run, spec, None)
        return time.perf_counter() - started

    ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
    try:
        remote = ray.remote(num_cpus=1)(lambda s, d: run_job(s, d))

        def via_ray() -> float:
            with tempfile.TemporaryDirectory(prefix="burst-bench-ray-") as tmp:
                started = time.perf_counter()
                result = ray.get(remote.remote(spec, tmp))
                if result["status"] != "succeeded":
                    raise RuntimeError(f"ray task: {result['status']}: {result['error']}")
                return time.perf_counter() - started

        first_task_s = via_ray()  # cold: the first task starts a worker process and imports torch there
        local = [in_process() for _ in range(args.repeats)]
        ray_s = [via_ray() for _ in range(args.repeats)]
    finally:
        ray.shutdown()
    return {
        "available": True,
        "ray_version": ray.__version__,
        "in_process_s": round(statistics.median(local), 3),
        "ray_task_s": round(statistics.median(ray_s), 3),
        "overhead_s": round(statistics.median(ray_s) - statistics.median(local), 3),
        "first_task_s": round(first_task_s, 3),
        "note": "ray.remote(run_job) on a local Ray; first_task_s is a cold worker (process start, torch "
                "import); a Ray *job* (entrypoint python -m federated.burst.worker) also starts a driver process",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--ray-cpus", type=int, default=2)
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "burst.json")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    rows, cuda_note = _throughput(args)
    ray_row = _ray_overhead(args)

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
    if ray_row["available"]:
        print(f"ray {ray_row['ray_version']}: in-process {ray_row['in_process_s']}s, as a Ray task "
              f"{ray_row['ray_task_s']}s (warm worker), overhead {ray_row['overhead_s']}s; "
              f"first task on a cold worker {ray_row['first_task_s']}s")
    else:
        print(f"ray: unavailable ({ray_row['reason']})")

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
        "ray": ray_row,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
