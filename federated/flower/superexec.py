"""``python -m federated.flower.superexec``: Flower 1.41's ``flower-superexec``; run tokens stay off command lines.

Flower's subprocess executor starts every ServerApp and ClientApp as ``flwr-serverapp ... --token <token>``
(``flwr/supercore/superexec/executor/subprocess_executor.py``): the token that lets a process act for the run on
the Runtime API is then readable by every user of the machine (``ps``, ``/proc/<pid>/cmdline``). The apps also
accept ``--token-file PATH``: here each one gets its token in an anonymous in-memory file (``memfd``) passed as
an inherited descriptor, ``--token-file /dev/fd/N``. Nothing touches the disk and the descriptor is readable
only by the app's own user (as its environment is).

Everything else is Flower's own ``flower-superexec`` (argument parsing, task polling, TLS, the parent-pid
watch): only the executor it builds is replaced. Run where ``flwr`` is installed; :func:`agent.supernode.
token_hiding_bin` makes the SuperLink and SuperNodes start this instead of ``flower-superexec``.
"""

from __future__ import annotations

import os
import subprocess
from typing import Any

__all__ = ["main"]


def _token_file_executor() -> Any:
    from flwr.supercore.constant import TASK_TYPE_TO_APPIO_API_ADDRESS_ARG, TASK_TYPE_TO_COMMAND
    from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
    from flwr.supercore.superexec.executor.types import ExecutionSpec, LaunchResult

    class TokenFileExecutor(SubprocessExecutor):
        """Flower's SubprocessExecutor.launch with ``--token-file /dev/fd/N`` for ``--token``."""

        def launch(self, spec: ExecutionSpec) -> LaunchResult:
            fd = os.memfd_create("flwr-token", 0)
            try:
                os.write(fd, spec.token.encode("ascii"))
                args = [
                    TASK_TYPE_TO_COMMAND[spec.task_type],
                    TASK_TYPE_TO_APPIO_API_ADDRESS_ARG[spec.task_type], spec.runtime_api_address,
                    "--token-file", f"/dev/fd/{fd}",
                ]
                if spec.insecure:
                    args.append("--insecure")
                elif spec.root_certificates_path is not None:
                    args += ["--root-certificates", spec.root_certificates_path]
                if spec.parent_pid is not None:
                    args += ["--parent-pid", str(spec.parent_pid)]
                if spec.runtime_dependency_install:
                    args.append("--allow-runtime-dependency-installation")
                output = subprocess.DEVNULL if spec.suppress_output else None
                # Not waited for, as in Flower's executor: the app outlives this call and exits by itself.
                subprocess.Popen(args, pass_fds=(fd,), stdout=output, stderr=output)
            finally:
                os.close(fd)
            return LaunchResult.accepted()

    return TokenFileExecutor()


def main() -> None:
    """Run ``flower-superexec`` (same arguments) with the token-file executor for the subprocess executor."""
    from flwr.supercore.cli.flower_superexec import flower_superexec
    from flwr.supercore.constant import ExecutorType
    from flwr.supercore.superexec import run_superexec as superexec_module

    flower_get_executor = superexec_module.get_executor  # type: ignore[attr-defined]

    def get_executor(executor_type: Any, *args: Any, **kwargs: Any) -> Any:
        if executor_type == ExecutorType.SUBPROCESS:
            return _token_file_executor()
        return flower_get_executor(executor_type, *args, **kwargs)

    superexec_module.get_executor = get_executor  # type: ignore[attr-defined]  # run_superexec looks it up
    flower_superexec()


if __name__ == "__main__":
    main()
