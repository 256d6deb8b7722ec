"""Federated round wall time: our Flower runtime against a bare Flower deployment of the same apps.

    python bench/round.py [--nodes 3] [--rounds 3] [--repeats 2] [--local-epochs 5] [--json PATH]

Both modes run the EdgeFleet ServerApp / ClientApp (``federated/flower/app``) with the same run config on N
SuperNodes holding the same digits partitions (Dirichlet alpha=1), alternated ``--repeats`` times:

* ``ours``: :class:`federated.flower.runtime.SuperLinkProcess` (supervised ``flower-superlink``), N
  :class:`~federated.flower.runtime.SuperNodeProcess`, the run submitted with
  :func:`~federated.flower.runtime.submit_run` and awaited with ``wait_run``.
* ``bare``: ``flower-superlink --insecure --disable-runtime-dependency-installation`` and N
  ``flower-supernode --insecure --superlink ... --node-config ...`` started by hand (``FLWR_HOME`` per
  process), the run submitted by Flower's own ``flwr run`` code (``flwr.cli.run.run._run_with_control_api``:
  the CLI itself does not start with typer 0.15) and awaited by polling ``ListRuns`` with Flower's client.

Per round: the ServerApp's own measure (``rounds[i].duration_s`` in its results file: sampling, train messages
out, replies in, aggregation, central evaluation). Per run: submit -> finished (what a caller waits), and the
ServerApp's start -> end. Figures are medians over repeats (and over rounds for the per-round time).
**Target**: ours <= 1.1 x bare per round. The machine is shared and noisy: compare the ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import ROOT, free_port

from federated.flower.config import APP_DIR
from federated.flower.runtime import (
    SuperLinkProcess,
    SuperNodeProcess,
    flower_env,
    flower_executable,
    node_config_arg,
)
from federated.tasks import get_task

TARGET = 1.1
RUN_TIMEOUT_S = 600.0


def _run_config(args: argparse.Namespace, devices: list[str], results: Path) -> dict[str, Any]:
    return {
        "devices": ",".join(devices),
        "num-rounds": args.rounds,
        "min-clients": len(devices),
        "local-epochs": args.local_epochs,
        "discovery-timeout-s": 60.0,
        "round-timeout-s": 120.0,
        "finish-wait-s": 0.0,  # plain SuperNodes: no agent waits for the end-of-run notice
        "results-dir": str(results),
    }


def _report(results: Path, run_id: int, submitted: float, finished: float) -> dict[str, Any]:
    report = json.loads((results / f"{run_id}.json").read_text())
    if report["status"] != "completed":
        raise RuntimeError(f"run {run_id} {report['status']}: {report['reason']}")
    return {
        "run_id": run_id,
        "round_s": [r["duration_s"] for r in report["rounds"]],
        "accuracy": report["rounds"][-1]["accuracy"],
        "submit_to_finished_s": round(finished - submitted, 3),
        "serverapp_s": report["duration_s"],
    }


def run_ours(args: argparse.Namespace, work: Path, partitions: list[Path]) -> dict[str, Any]:
    devices = [f"dev-{i}" for i in range(len(partitions))]
    results = work / "results"
    with SuperLinkProcess(work / "superlink") as link:
        nodes = [
            SuperNodeProcess(link.address, device_id=d, data_path=p, flwr_home=work / d, log_path=work / f"{d}.log")
            .start()
            for d, p in zip(devices, partitions, strict=True)
        ]
        try:
            link.wait_for_nodes(len(nodes), 60)
            submitted = time.monotonic()
            run_id = link.submit_run(None, _run_config(args, devices, results))
            status = link.wait_run(run_id, RUN_TIMEOUT_S)
            finished = time.monotonic()
        finally:
            for node in nodes:
                node.stop()
    if not status.completed:
        raise RuntimeError(f"ours: run {run_id} {status}")
    return _report(results, run_id, submitted, finished)


def _bare_client(address: str) -> Any:
    from flwr.supercore.control import ControlHttpClient
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor

    return ControlHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr CLI")],
    )


def _flwr_run(app: Path, address: str, overrides: dict[str, Any]) -> int:
    """Submit like `flwr run APP CONNECTION --run-config ...` does; the run id is in what it prints."""
    from flwr.cli.config_utils import load_and_validate
    from flwr.cli.run.run import _run_with_control_api
    from flwr.cli.typing import SuperLinkConnection

    config, _ = load_and_validate(app / "pyproject.toml")
    pairs = " ".join(f"{k}={json.dumps(v)}" for k, v in overrides.items())
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        _run_with_control_api(
            app, config, None, SuperLinkConnection("bench", address=address, insecure=True), [pairs], None,
            False, False, None,
        )
    match = re.search(r"Successfully started run (\d+)", out.getvalue())
    if match is None:
        raise RuntimeError(f"flwr run printed no run id: {out.getvalue()!r}")
    return int(match.group(1))


def run_bare(args: argparse.Namespace, work: Path, partitions: list[Path]) -> dict[str, Any]:
    from flwr.proto.control_pb2 import ListNodesRequest, ListRunsRequest

    devices = [f"dev-{i}" for i in range(len(partitions))]
    results = work / "results"
    port = free_port()
    address = f"127.0.0.1:{port}"
    procs: list[subprocess.Popen[bytes]] = []
    logs = []
    try:
        log = open(work / "superlink.log", "wb")  # noqa: SIM115
        logs.append(log)
        (work / "superlink-home").mkdir(parents=True)
        procs.append(subprocess.Popen(
            [flower_executable("flower-superlink"), "--insecure", "--port", str(port),
             "--disable-runtime-dependency-installation"],
            env=flower_env(work / "superlink-home"), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        ))
        client = _bare_client(address)
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(Exception):
                client.ListNodes(ListNodesRequest())
                break
            if time.monotonic() > deadline:
                raise RuntimeError("bare superlink did not start")
            time.sleep(0.1)
        for device, path in zip(devices, partitions, strict=True):
            home = work / device
            home.mkdir(parents=True)
            log = open(work / f"{device}.log", "wb")  # noqa: SIM115
            logs.append(log)
            procs.append(subprocess.Popen(
                [flower_executable("flower-supernode"), "--insecure", "--superlink", address, "--port",
                 str(free_port()), "--node-config", node_config_arg({"device-id": device, "data-path": str(path)})],
                env=flower_env(home), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            ))
        deadline = time.monotonic() + 60
        while len([n for n in client.ListNodes(ListNodesRequest()).nodes_info if n.status == "online"]) < len(devices):
            if time.monotonic() > deadline:
                raise RuntimeError("bare supernodes did not connect")
            time.sleep(0.2)
        submitted = time.monotonic()
        run_id = _flwr_run(APP_DIR, address, _run_config(args, devices, results))
        while True:
            run = client.ListRuns(ListRunsRequest(run_id=run_id)).run_dict[run_id]
            if run.status.status == "finished":
                break
            if time.monotonic() - submitted > RUN_TIMEOUT_S:
                raise RuntimeError(f"bare: run {run_id} not finished")
            time.sleep(0.5)
        finished = time.monotonic()
        client.close()
        if run.status.sub_status != "completed":
            raise RuntimeError(f"bare: run {run_id} {run.status.sub_status}: {run.status.details}")
    finally:
        for proc in reversed(procs):  # the SuperNodes first, then the SuperLink (its ServerApp watches it)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 15)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        for log in logs:
            log.close()
    return _report(results, run_id, submitted, finished)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--local-epochs", type=int, default=5)
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "round.json")
    args = parser.parse_args()

    import flwr
    import torch

    work_root = Path(tempfile.mkdtemp(prefix="bench-round-"))
    task = get_task("digits")
    partitions = []
    for i, part in enumerate(task.partition(args.nodes, 1.0, 0)):
        path = work_root / f"part{i}.npz"
        task.write_partition(part, path)
        partitions.append(path)

    runs: dict[str, list[dict[str, Any]]] = {"ours": [], "bare": []}
    load_before = os.getloadavg()
    try:
        for repeat in range(args.repeats):
            for mode, fn in (("bare", run_bare), ("ours", run_ours)) if repeat % 2 == 0 else (
                ("ours", run_ours), ("bare", run_bare)
            ):
                work = work_root / f"{mode}-{repeat}"
                work.mkdir()
                result = fn(args, work, partitions)
                runs[mode].append(result)
                print(f"{mode:5s} repeat {repeat}: rounds {result['round_s']} s, run {result['submit_to_finished_s']} s,"
                      f" accuracy {result['accuracy']:.3f}", flush=True)
    finally:
        shutil.rmtree(work_root, ignore_errors=True)

    summary: dict[str, dict[str, float]] = {}
    for mode, results in runs.items():
        summary[mode] = {
            "round_s_median": round(statistics.median(s for r in results for s in r["round_s"]), 3),
            "round_s_min": round(min(s for r in results for s in r["round_s"]), 3),
            "round_s_max": round(max(s for r in results for s in r["round_s"]), 3),
            "submit_to_finished_s_median": round(statistics.median(r["submit_to_finished_s"] for r in results), 3),
            "serverapp_s_median": round(statistics.median(r["serverapp_s"] for r in results), 3),
            "accuracy_median": round(statistics.median(r["accuracy"] for r in results), 4),
        }
    ratio = summary["ours"]["round_s_median"] / summary["bare"]["round_s_median"]
    run_ratio = summary["ours"]["submit_to_finished_s_median"] / summary["bare"]["submit_to_finished_s_median"]

    print()
    print(f"{'mode':6s} {'round median':>13s} {'round min':>10s} {'round max':>10s} {'run (submit->done)':>19s}"
          f" {'ServerApp':>10s} {'accuracy':>9s}")
    for mode in ("bare", "ours"):
        s = summary[mode]
        print(f"{mode:6s} {s['round_s_median']:12.2f}s {s['round_s_min']:9.2f}s {s['round_s_max']:9.2f}s"
              f" {s['submit_to_finished_s_median']:18.2f}s {s['serverapp_s_median']:9.2f}s {s['accuracy_median']:9.3f}")
    verdict = "PASS" if ratio <= TARGET else "FAIL"
    print(f"\nours / bare per round: {ratio:.3f} (target <= {TARGET}) {verdict}; per run: {run_ratio:.3f}")

    output = {
        "benchmark": "round",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_before": load_before, "load_after": os.getloadavg()},
        "versions": {"flwr": flwr.__version__, "torch": torch.__version__},
        "args": {"nodes": args.nodes, "rounds": args.rounds, "repeats": args.repeats,
                 "local_epochs": args.local_epochs},
        "runs": runs,
        "summary": summary,
        "ratio_round": round(ratio, 4),
        "ratio_run": round(run_ratio, 4),
        "target": TARGET,
        "pass": ratio <= TARGET,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(output, indent=2) + "\n")
    print(f"written {args.json}")
    if ratio > TARGET:
        sys.exit(1)


if __name__ == "__main__":
    main()
