"""``python -m controlplane.broker``: run the embedded MQTT broker (what :class:`EmbeddedBroker` starts)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path

from ._embedded import READY_LINE, ListenerTls, configure_logging, run_embedded_broker


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
    parser.add_argument("--certfile", help="TLS: the listener's certificate (then it speaks MQTTS only)")
    parser.add_argument("--keyfile", help="TLS: the certificate's key")
    parser.add_argument("--cafile", help="TLS: the CA bundle client certificates must chain to")
    parser.add_argument("--log-level", default="WARNING", help="Python logging level (default: %(default)s)")
    parser.add_argument("--parent-pid", type=int, default=None,
                        help="exit when this process is gone (a control plane killed -9 must not leave its broker "
                             "holding the port)")
    args = parser.parse_args(argv)
    given = [f for f in (args.certfile, args.keyfile, args.cafile) if f]
    if given and len(given) != 3:
        parser.error("TLS needs all three of --certfile, --keyfile and --cafile")
    tls = ListenerTls(Path(args.certfile), Path(args.keyfile), Path(args.cafile)) if given else None
    configure_logging(args.log_level)
    if args.parent_pid is not None:
        threading.Thread(target=_exit_with_parent, args=(args.parent_pid,), name="parent-watch", daemon=True).start()

    def ready() -> None:
        sys.stdout.buffer.write(READY_LINE)
        sys.stdout.flush()

    run_embedded_broker(args.host, args.port, args.credentials, tls=tls, on_ready=ready)


def _exit_with_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGTERM)


if __name__ == "__main__":
    main()
