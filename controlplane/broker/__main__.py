"""``python -m controlplane.broker``: run the embedded MQTT broker (what :class:`EmbeddedBroker` starts)."""

from __future__ import annotations

import argparse
import sys

from ._embedded import READY_LINE, configure_logging, run_embedded_broker


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m controlplane.broker",
        description="EdgeFleet embedded MQTT 3.1.1 broker (amqtt) with credentials-file auth and device ACLs.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=1883, help="TCP port (default: %(default)s)")
    parser.add_argument(
        "--credentials", required=True, help="JSON credentials file (re-read when it changes)"
    )
    parser.add_argument("--log-level", default="WARNING", help="Python logging level (default: %(default)s)")
    args = parser.parse_args(argv)
    configure_logging(args.log_level)

    def ready() -> None:
        sys.stdout.buffer.write(READY_LINE)
        sys.stdout.flush()

    run_embedded_broker(args.host, args.port, args.credentials, on_ready=ready)


if __name__ == "__main__":
    main()
