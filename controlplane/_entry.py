"""The `edgefleet` console script: `edgefleet agent ...` goes to the light argparse CLI of the device side,
everything else to the operator CLI (typer)."""

from __future__ import annotations

import sys

__all__ = ["main"]


def main() -> None:
    if sys.argv[1:2] == ["agent"]:
        from agent.cli import main as agent_main

        sys.exit(agent_main(sys.argv[2:]))
    try:
        from controlplane.cli import main as cli_main
    except ImportError as exc:  # a device install: only the agent's commands are there
        sys.exit(f"error: `edgefleet {' '.join(sys.argv[1:2])}` needs `pip install edgefleet[controlplane]` ({exc});"
                 " on a device, use `edgefleet agent run`")
    cli_main()


if __name__ == "__main__":
    main()
