"""The devices' door to the SuperLink: a TLS reverse proxy that forwards the Flower Fleet API and nothing else.

Flower 1.41 serves the Fleet API (``/v1/fleet/*``, SuperNodes), the Control API (``/v1/control/*``: start runs,
register SuperNode keys; no authentication in the open-source SuperLink) and the Runtime API on ONE port. The
SuperLink therefore listens on loopback only, and devices reach this proxy instead: it terminates TLS with the
fleet's server certificate, forwards requests whose path is a Fleet API route to the SuperLink (over TLS, verified
against the fleet CA) and answers everything else 404 without contacting the SuperLink.

It is an ASGI app served by uvicorn (h11: HTTP/1.1 keep-alive, request bodies, chunked responses parsed by a
maintained parser, not ours) in a thread of the control plane, forwarding with an httpx connection pool. The
SuperNode's own client is ``httpx.Client`` (HTTP/1.1, unary protobuf bodies with a Content-Length).

It also watches what the SuperLink says to devices: a Fleet request refused 401 whose signed timestamp is outside
the SuperLink's window (``-5 s < age < 305 s`` in flwr 1.41) is recorded as clock skew for that public key
(:meth:`FleetProxy.clock_skews`), so that a round can say why a device dropped out.
"""

from __future__ import annotations

import base64
import datetime as dt
import logging
import re
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

__all__ = ["CLOCK_SKEW_AHEAD_S", "CLOCK_SKEW_BEHIND_S", "FleetProxy", "is_fleet_path"]

log = logging.getLogger("edgefleet.federated.fleet_proxy")

# flwr 1.41 (superlink/routers/fleet/node_auth.py): -SYSTEM_TIME_TOLERANCE < age < TIMESTAMP_TOLERANCE +
# SYSTEM_TIME_TOLERANCE, age = SuperLink now - signed timestamp.
CLOCK_SKEW_AHEAD_S: Final = 5.0  # a device clock this far ahead of the SuperLink's is refused
CLOCK_SKEW_BEHIND_S: Final = 305.0  # ... and this far behind

# Exact Fleet API routes, lower-case letters and dashes only: no dot segments, no percent-encoding, no query
# tricks reach the SuperLink's router.
_FLEET_PATH: Final = re.compile(r"/v1/fleet/[a-z][a-z-]{0,63}")
_HOP_BY_HOP: Final = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "host", "content-length",
})
_TIMESTAMP_HEADER: Final = "flwr-timestamp"
_PUBLIC_KEY_HEADER: Final = "flwr-public-key"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def is_fleet_path(raw_path: bytes | str) -> bool:
    """Whether a request target may pass: exactly ``/v1/fleet/<route>``, nothing else (no query either)."""
    path = raw_path.decode("latin-1") if isinstance(raw_path, bytes) else raw_path
    return _FLEET_PATH.fullmatch(path) is not None


class FleetProxy:
    """Serve ``listen_host:listen_port`` with TLS (``cert_file``/``key_file``) and forward Fleet API requests to
    ``upstream`` (``host:port`` of the SuperLink on loopback, TLS verified with ``ca_file``).

    ``listen_port=None`` picks a free port. :meth:`start` returns once the port accepts connections.
    """

    def __init__(self, upstream: str, *, listen_host: str, listen_port: int | None = None, cert_file: Path,
                 key_file: Path, ca_file: Path, upstream_tls: bool = True) -> None:
        from agent.supernode import free_port

        self.upstream = upstream
        self.listen_host = listen_host
        self.listen_port = listen_port or free_port("127.0.0.1" if listen_host in ("0.0.0.0", "") else listen_host)
        self.cert_file = Path(cert_file)
        self.key_file = Path(key_file)
        self.ca_file = Path(ca_file)
        self.upstream_tls = upstream_tls
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._client: Any = None
        self._skews: dict[str, tuple[float, float]] = {}  # public key (base64 PEM) -> (skew s, when)
        self._skew_lock = threading.Lock()
        self.forwarded = 0
        self.refused = 0

    @property
    def address(self) -> str:
        host = "127.0.0.1" if self.listen_host in ("0.0.0.0", "::", "") else self.listen_host
        return f"[{host}]:{self.listen_port}" if ":" in host else f"{host}:{self.listen_port}"

    # -- clock skew ---------------------------------------------------------------------------------------
    def clock_skews(self, since: float = 0.0) -> dict[bytes, float]:
        """Public keys (PEM, as registered with the SuperLink) refused for their timestamps since ``since``
        (``time.time()``), with the device clock's offset in seconds (positive: ahead of the SuperLink's)."""
        with self._skew_lock:
            items = list(self._skews.items())
        out: dict[bytes, float] = {}
        for key_b64, (skew, when) in items:
            if when >= since:
                try:
                    out[base64.b64decode(key_b64, validate=True)] = skew
                except ValueError:
                    continue
        return out

    def _note_refusal(self, headers: dict[str, str]) -> None:
        stamp, key = headers.get(_TIMESTAMP_HEADER), headers.get(_PUBLIC_KEY_HEADER)
        if not stamp or not key:
            return
        try:
            signed_at = dt.datetime.fromisoformat(stamp)
            skew = (signed_at - dt.datetime.now(dt.UTC)).total_seconds()
        except (ValueError, TypeError):
            return
        if -CLOCK_SKEW_BEHIND_S < skew < CLOCK_SKEW_AHEAD_S:
            return  # refused for another reason (unknown key, bad signature)
        with self._skew_lock:
            if len(self._skews) > 10_000:  # bounded: keys are attacker-chosen
                self._skews.clear()
            self._skews[key] = (skew, time.time())
        log.warning("fleet_proxy.clock_skew skew_s=%.0f", skew)

    # -- ASGI ---------------------------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    self._client = self._new_client()  # in the server's event loop, where it is used
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    if self._client is not None:
                        await self._client.aclose()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode("latin-1")
        if scope["method"] != "POST" or scope.get("query_string") or not is_fleet_path(raw_path):
            self.refused += 1
            await _answer(send, 404, b"not found\n")
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        forward = [(k, v) for k, v in headers.items() if k not in _HOP_BY_HOP]
        import httpx

        scheme = "https" if self.upstream_tls else "http"
        try:
            request = self._client.build_request("POST", f"{scheme}://{self.upstream}{raw_path.decode('latin-1')}",
                                                 headers=forward, content=bytes(body))
            response = await self._client.send(request, stream=True)
        except httpx.HTTPError as exc:
            log.warning("fleet_proxy.upstream_error error=%s", exc)
            await _answer(send, 502, b"SuperLink unreachable\n")
            return
        self.forwarded += 1
        try:
            if response.status_code == 401:
                self._note_refusal(headers)
            out = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in response.headers.multi_items()
                   if k.lower() not in _HOP_BY_HOP]
            await send({"type": "http.response.start", "status": response.status_code, "headers": out})
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await response.aclose()

    # -- lifecycle ----------------------------------------------------------------------------------------
    def _new_client(self) -> Any:
        import httpx

        verify: ssl.SSLContext | bool = False
        if self.upstream_tls:
            verify = ssl.create_default_context(cafile=str(self.ca_file))
        return httpx.AsyncClient(verify=verify, timeout=httpx.Timeout(60.0, connect=10.0),
                                 limits=httpx.Limits(max_connections=256, max_keepalive_connections=64))

    def start(self, timeout: float = 15.0) -> Self:
        import uvicorn

        config = uvicorn.Config(
            self, host=self.listen_host, port=self.listen_port, ssl_certfile=str(self.cert_file),
            ssl_keyfile=str(self.key_file), log_level="warning", access_log=False, lifespan="on",
            server_header=False, date_header=True, timeout_keep_alive=30, h11_max_incomplete_event_size=16 * 1024,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="fleet-proxy", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the Fleet API proxy did not start on {self.address}")
            time.sleep(0.05)
        log.info("fleet_proxy.started address=%s upstream=%s", self.address, self.upstream)
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is not None:
            server.should_exit = True
        if thread is not None:
            thread.join(timeout=10)
        self._server = self._thread = self._client = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


async def _answer(send: Send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body, "more_body": False})
