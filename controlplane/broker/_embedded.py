"""The embedded MQTT broker (amqtt 0.11, MQTT 3.1.1 only) for development and small single-node deployments.

:func:`run_embedded_broker` runs it in the current process (blocking); :class:`EmbeddedBroker` runs that in a
subprocess (``python -m controlplane.broker``) so the broker's event loop never competes with the control plane.

Clients must connect with MQTT 3.1.1 (paho: ``protocol=MQTTv311``); amqtt refuses MQTT 5 CONNECTs with CONNACK
return code 1 ("unacceptable protocol version"), which paho 2.x reports as reason code 132 "Unsupported protocol
version". amqtt has no shared subscriptions (``$share/...``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final, Self

# The attribute of an amqtt Session that holds the CN of the client certificate the TLS handshake verified against
# the fleet CA (None without one); set before the auth plugin runs. Defined once, in the plugin, which reads it.
from ._amqtt_plugin import CERT_CN_ATTR

__all__ = ["CERT_CN_ATTR", "EmbeddedBroker", "ListenerTls", "peer_certificate_cn", "run_embedded_broker"]

_PLUGIN: Final = "controlplane.broker._amqtt_plugin.EdgeFleetAuthPlugin"
_STDERR_TAIL: Final = 4000
# What ``python -m controlplane.broker`` prints on stdout once it listens.
READY_LINE: Final = b"edgefleet-broker-ready\n"


def _bind_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True, slots=True)
class ListenerTls:
    """The files of a TLS (MQTTS) listener: its certificate and key, and the CA bundle client certificates must
    chain to (a client certificate is asked for, not required: password clients connect without one)."""

    cert_file: Path
    key_file: Path
    ca_file: Path


def broker_config(host: str, port: int, credentials_file: str | os.PathLike[str],
                  tls: ListenerTls | None = None) -> dict[str, Any]:
    """The amqtt config: one TCP listener (MQTTS with ``tls``: then it speaks nothing else), our auth/ACL plugin
    only (no anonymous access, no $SYS, no websockets)."""
    listener: dict[str, Any] = {"type": "tcp", "bind": _bind_address(host, port)}
    if tls is not None:
        # amqtt: create_default_context(CLIENT_AUTH, cafile) + CERT_OPTIONAL; a certificate that does not chain to
        # the bundle fails the handshake, no certificate at all leaves the password to decide.
        listener.update(ssl=True, certfile=os.fspath(tls.cert_file), keyfile=os.fspath(tls.key_file),
                        cafile=os.fspath(tls.ca_file))
    return {
        "listeners": {"default": listener},
        "plugins": {_PLUGIN: {"credentials_file": os.fspath(credentials_file)}},
    }


def peer_certificate_cn(ssl_object: Any) -> str | None:
    """The common name of the client certificate a TLS connection verified against the fleet CA, or None
    (plaintext, or no certificate presented)."""
    if ssl_object is None:
        return None
    try:
        peer = ssl_object.getpeercert()
    except (ValueError, AttributeError):
        return None
    if not peer:
        return None
    names = [value for rdn in peer.get("subject", ()) for key, value in rdn if key == "commonName"]
    return names[0] if len(names) == 1 else None


_CONNECT: Final = 0x10
_MQTT_311: Final = (b"MQTT", 4)
# CONNACK, remaining length 2, no session present, return code 1: unacceptable protocol version.
_CONNACK_UNACCEPTABLE_PROTOCOL: Final = b"\x20\x02\x00\x01"


async def _peek_connect_protocol(
    reader: asyncio.StreamReader, consumed: bytearray
) -> tuple[bytes, int] | None:
    """(protocol name, level) of a CONNECT at the start of ``reader``; None for another packet. The bytes read
    are appended to ``consumed``."""

    async def take(n: int) -> bytes:
        data = await reader.readexactly(n)
        consumed.extend(data)
        return data

    if (await take(1))[0] != _CONNECT:
        return None
    for _ in range(4):  # remaining length: variable byte integer
        if not (await take(1))[0] & 0x80:
            break
    name_length = int.from_bytes(await take(2), "big")
    name = await take(name_length)
    level = (await take(1))[0]
    return name, level


# Set on the protocol handler of a connection whose persistent session another connection takes over (fix 6).
_TAKEN_OVER_ATTR: Final = "edgefleet_taken_over"
_NEW: Final = "new"
_CONNECTED: Final = "connected"
_DISCONNECTED: Final = "disconnected"
# Set on the protocol handler of a connection closed for silence past its read timeout (fix 7).
_EXPIRED_ATTR: Final = "edgefleet_expired"


class _SessionState:
    """The connection state of one amqtt session: amqtt 0.11.4's ``Session._init_states`` machine without
    ``transitions.Machine`` (fix 5 of :func:`_make_broker`).

    States ``new`` (initial), ``connected``, ``disconnected``. ``connect()``: new or disconnected -> connected,
    and from connected it raises ``transitions.MachineError`` as the Machine does: the broker's CONNECT of a
    client id whose session is still connected relies on that to take the old connection over.
    ``disconnect()``: from any state -> disconnected (a reflexive transition from disconnected: its enter hook
    runs again, as in the Machine). The enter hooks are the session's ``_on_enter_connected`` /
    ``_on_enter_disconnected`` (they stamp ``last_connect_time`` / ``last_disconnect_time``, which the session
    expiry monitor reads). What amqtt and this module call is all there is: ``state``, ``connect()``,
    ``disconnect()``, ``is_new()``, ``is_connected()``, ``is_disconnected()``.
    """

    __slots__ = ("_on_connected", "_on_disconnected", "_state")

    def __init__(self, on_connected: Callable[[], None], on_disconnected: Callable[[], None]) -> None:
        self._on_connected = on_connected
        self._on_disconnected = on_disconnected
        self._state: str = _NEW

    @property
    def state(self) -> str:
        return self._state

    def connect(self) -> bool:
        if self._state == _CONNECTED:
            from transitions import MachineError

            # transitions' own wording (transitions/core.py, Event._trigger).
            raise MachineError(f"Can't trigger event connect from state {self._state}!")
        self._state = _CONNECTED
        self._on_connected()
        return True

    def disconnect(self) -> bool:
        self._state = _DISCONNECTED
        self._on_disconnected()
        return True

    def is_new(self) -> bool:
        return self._state == _NEW

    def is_connected(self) -> bool:
        return self._state == _CONNECTED

    def is_disconnected(self) -> bool:
        return self._state == _DISCONNECTED

    def __repr__(self) -> str:
        return f"_SessionState({self._state!r})"


@functools.cache
def _session_class() -> type[Any]:
    """amqtt's ``Session`` with a :class:`_SessionState` instead of its ``transitions.Machine``."""
    from amqtt.session import Session

    class _EdgeFleetSession(Session):  # type: ignore[misc]
        def _init_states(self) -> None:
            self.transitions = _SessionState(self._on_enter_connected, self._on_enter_disconnected)

    _EdgeFleetSession.__name__ = _EdgeFleetSession.__qualname__ = "Session"  # amqtt's logs name the class
    return _EdgeFleetSession


def _use_light_sessions() -> None:
    """Make the broker side of amqtt (in this process) create :func:`_session_class` sessions: the CONNECT path
    creates every session through the ``Session`` name of ``amqtt.mqtt.protocol.broker_handler``
    (``BrokerProtocolHandler.init_from_connect``); the broker's offline sessions are made by
    ``_EdgeFleetBroker.create_offline_session``. amqtt's client (``amqtt.client``) keeps its own."""
    from amqtt.mqtt.protocol import broker_handler

    broker_handler.Session = _session_class()


def _make_broker(config: dict[str, Any]) -> Any:
    """An amqtt Broker with fixes for amqtt 0.11.4 (checked by tests/controlplane/test_broker_auth.py).

    0. amqtt parses an MQTT 5 CONNECT as 3.1.1 before looking at the protocol level; with a password it then
       waits for bytes that never come, and the client only gives up at its keep-alive timeout. Here any CONNECT
       but MQTT 3.1.1 gets CONNACK return code 1 (unacceptable protocol version) at once, which paho's MQTT 5
       client reports as reason code 132 "Unsupported protocol version": the cue to fall back to 3.1.1.

    1. Retained messages sent on SUBSCRIBE/reconnect skip the RECEIVE topic check, and on reconnect amqtt sends
       the retained messages of *every* subscription on the broker, not only the client's: a device would get
       other devices' retained state. Here they go only to the session's own subscriptions, through the check.
    2. A refused CONNECT just closes the socket; here the client first gets CONNACK 5 (not authorised), as
       mosquitto does, so it can tell bad credentials from a network failure.
    3. amqtt looks the client id up in its sessions *before* authenticating: a clean-session CONNECT deleted that
       client's session (subscriptions, queue) even with a wrong password, and a persistent one resumed another
       client's session and received its queued messages. Here the CONNECT is authenticated first (the plugin
       also binds a device account to its own client id), then the session is looked up; a clean session that
       replaces a connected one closes that connection (MQTT-3.1.4-2) instead of leaving it subscribed to
       nothing; a persistent session of another credential (rotated, or removed and enrolled again) is dropped,
       not resumed.
    4. Changed credentials end sessions: a watcher re-reads the credentials file every ``reload_interval`` and
       closes the connection of, and drops (subscriptions, queued and in-flight messages), every session whose
       credential is no longer its user's current one. Its Last Will is not published.
    5. Speed, not behaviour: every CONNECT builds a ``Session``, and amqtt 0.11.4's builds a ``transitions.Machine``
       for its three states (the Machine, 5 ``add_transition`` and 2 enter hooks, each creating ``State``,
       ``Event`` and ``Transition`` objects and binding methods): profiled at ~45% of the broker's CPU per
       CONNECT (1.22-1.27 ms). Here sessions carry a :class:`_SessionState` with the same states, transitions,
       enter hooks and ``MachineError`` instead. Measured (bench/README.md, ``bench/enroll.py``, 2 shared cores):
       broker CPU per CONNECT 1.17-1.34 -> 0.61-0.80 ms; 10,000 devices reconnecting in 7.1-8.8 s instead of
       13.3-16.7 s (before: up to 30.6 s under heavier load), headroom under issue 10's 30 s target.
    6. A persistent session resumed by a new connection of the same client while its old connection is still
       up (a device rebooted before its old TCP connection timed out) is taken over: amqtt closes the old
       connection, whose teardown then marks the *shared* session disconnected: from then on the new, live
       connection got no message, each was queued until it reconnected once more (checked against stock amqtt
       0.11.4). Here the teardown of a taken-over connection only stops that connection.
    7. A client that sends nothing was never disconnected: amqtt reads each packet with the session's keep-alive
       as timeout, but ``BrokerProtocolHandler.handle_read_timeout`` is ``pass``, so a device whose link went
       down without a FIN/RST (a partition, a power cut) stayed connected, and counted online, until its host
       came back. MQTT-3.1.2-24: the server disconnects a client silent for 1.5 times its keep-alive, as a
       network failure. Here the read timeout is 1.5 x the keep-alive (keep-alive 0: none) and on it the
       connection is aborted as lost: amqtt's abnormal-disconnect path publishes the Last Will (the agent's is
       its retained offline state: how the control plane learns the device is gone).
    """
    from amqtt.adapters import StreamReaderAdapter, StreamWriterAdapter
    from amqtt.broker import Broker
    from amqtt.contexts import Action
    from amqtt.errors import AMQTTError, MQTTError, NoDataError
    from amqtt.mqtt.connack import NOT_AUTHORIZED, ConnackPacket
    from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
    from amqtt.utils import format_client_message, gen_client_id

    from ._amqtt_plugin import CREDENTIAL_ATTR, DENIAL_SUMMARY_INTERVAL, EdgeFleetAuthPlugin

    _use_light_sessions()  # fix 5

    class _EdgeFleetHandler(BrokerProtocolHandler):  # type: ignore[misc]
        """Closes a connection silent past its read timeout as lost (fix 7)."""

        def handle_read_timeout(self) -> None:
            # Called from amqtt's reader loop, which then reads on: the abort makes that read see the end of the
            # stream, and the loop ends the connection as it does any connection lost (Last Will published).
            if getattr(self, _EXPIRED_ATTR, False) or self.session is None:
                return
            setattr(self, _EXPIRED_ATTR, True)
            self.logger.info(
                f"{self.session.client_id!r} sent nothing for {self.session.keep_alive:g} s (1.5 x its "
                "keep-alive): closing the connection as lost"
            )
            # The transport, not the writer adapter's close(): that drains first, which a peer that is gone
            # (its receive window full) never lets finish. abort() also wakes a write blocked on drain.
            transport = getattr(getattr(self.writer, "_writer", None), "transport", None)
            if transport is not None:
                transport.abort()
            else:  # an adapter without a transport (amqtt's websockets, not used here): end it directly
                self._edgefleet_closing = asyncio.ensure_future(self.handle_connection_closed())

    class _PrefixedReader(StreamReaderAdapter):  # type: ignore[misc]
        """Serves the bytes already read (to peek at the CONNECT) before the rest of the stream."""

        def __init__(self, reader: asyncio.StreamReader, prefix: bytearray) -> None:
            super().__init__(reader)
            self._prefix = prefix

        async def read(self, n: int = -1) -> bytes:
            if not self._prefix:
                return bytes(await super().read(n))
            if n == -1:
                head = bytes(self._prefix)
                self._prefix.clear()
                return head + bytes(await self._reader.read(-1))
            head = bytes(self._prefix[:n])
            del self._prefix[:n]
            if len(head) < n:
                head += bytes(await self._reader.readexactly(n - len(head)))
            return head

    class _EdgeFleetBroker(Broker):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._edgefleet_authenticated: dict[int, Any] = {}
            plugins = [p for p in self.plugins_manager.plugins if isinstance(p, EdgeFleetAuthPlugin)]
            if not plugins:
                raise ValueError("the embedded broker needs the EdgeFleetAuthPlugin")
            self._edgefleet_auth: EdgeFleetAuthPlugin = plugins[0]
            self._edgefleet_watcher: asyncio.Task[None] | None = None

        def create_offline_session(self, client_id: str) -> tuple[Any, Any]:
            # amqtt 0.11.4's, with our session class (fix 5).
            session = _session_class()()
            session.client_id = client_id
            handler = _EdgeFleetHandler(self.plugins_manager, session)
            session.transitions.disconnect()
            return handler, session

        async def start(self) -> None:
            await super().start()
            self._edgefleet_watcher = asyncio.create_task(self._edgefleet_watch())

        async def shutdown(self) -> None:
            if self._edgefleet_watcher is not None:
                self._edgefleet_watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._edgefleet_watcher
            self._edgefleet_log_denials(final=True)
            await super().shutdown()

        async def stream_connected(
            self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str
        ) -> None:
            consumed = bytearray()
            try:
                protocol = await _peek_connect_protocol(reader, consumed)
            except (asyncio.IncompleteReadError, ConnectionError):
                writer.close()
                return
            if protocol is not None and protocol != _MQTT_311:
                self.logger.info(
                    f"refused a CONNECT of protocol {protocol[0]!r} level {protocol[1]}: not MQTT 3.1.1"
                )
                with contextlib.suppress(ConnectionError):
                    writer.write(_CONNACK_UNACCEPTABLE_PROTOCOL)
                    await writer.drain()
                writer.close()
                return
            await self._client_connected(
                listener_name, _PrefixedReader(reader, consumed), StreamWriterAdapter(writer)
            )

        # -- identity: authenticate before any session is touched (fix 3) ------------------------------------

        async def _initialize_client_session(
            self, reader: Any, writer: Any, remote_address: str, remote_port: int
        ) -> tuple[Any, Any]:
            # amqtt 0.11.4's, with authentication moved before the session lookup.
            peer = format_client_message(address=remote_address, port=remote_port)
            try:
                handler, session = await _EdgeFleetHandler.init_from_connect(  # fix 7: our handler class
                    reader, writer, self.plugins_manager
                )
            except AMQTTError as exc:
                self.logger.warning(f"[MQTT-3.1.0-1] {peer}: Can't read first packet as CONNECT: {exc}")
                raise AMQTTError(exc) from exc
            except MQTTError as exc:
                self.logger.warning(f"Invalid connection from {peer}: {exc}")
                await writer.close()
                raise MQTTError(exc) from exc
            except NoDataError as exc:
                self.logger.warning(f"No data from {peer}: {exc}")
                raise AMQTTError(exc) from exc

            # Verified by the handshake (CERT_OPTIONAL against the fleet CA): a presented certificate chains to it.
            setattr(session, CERT_CN_ATTR, peer_certificate_cn(getattr(session, "ssl_object", None)))
            if not await super()._authenticate(session, None):
                with contextlib.suppress(Exception):
                    await ConnackPacket.build(0, NOT_AUTHORIZED).to_stream(writer)
                with contextlib.suppress(Exception):
                    await writer.close()
                raise AMQTTError(f"{peer}: CONNECT of client {session.client_id!r} not authorised")

            client_id = session.client_id
            if session.clean_session:
                if client_id:
                    await self._edgefleet_drop(client_id, "replaced by a clean session")
                else:
                    session.client_id = gen_client_id()
                session.parent = 0
            elif client_id in self._sessions:
                existing = self._sessions[client_id][0]
                if getattr(existing, CREDENTIAL_ATTR, None) != getattr(session, CREDENTIAL_ATTR, None):
                    await self._edgefleet_drop(client_id, "a session of an older credential")
                    session.parent = 0
                else:
                    # The new connection can bring an updated will and keep-alive.
                    for attr in ("will_flag", "will_message", "will_topic", "will_qos", "keep_alive",
                                 "username", "password"):  # fmt: skip
                        setattr(existing, attr, getattr(session, attr))
                    _, live_handler = self._sessions[client_id]
                    if live_handler is not None and existing.transitions.is_connected():
                        setattr(live_handler, _TAKEN_OVER_ATTR, True)  # fix 6
                    session = existing
                    session.parent = 1
            else:
                session.parent = 0

            # amqtt's reader loop times each packet read out after the session's keep_alive (fix 7: 1.5 x the
            # client's, MQTT-3.1.2-24; 0 stays 0: no timeout). ``keep_alive`` was just set from this CONNECT, for
            # a resumed session too, so the factor is applied once.
            delay = self.config.get("timeout-disconnect-delay", 0)
            if session.keep_alive > 0:
                session.keep_alive = session.keep_alive * 3 / 2 + (delay if isinstance(delay, int) else 0)
            self._edgefleet_authenticated[id(session)] = session
            return handler, session

        async def _handle_client_session(
            self, reader: Any, writer: Any, client_session: Any, handler: Any, server: Any, listener_name: str
        ) -> None:
            try:
                await super()._handle_client_session(
                    reader, writer, client_session, handler, server, listener_name
                )
            finally:
                self._edgefleet_authenticated.pop(id(client_session), None)

        async def _handle_disconnect(self, client_session: Any, handler: Any, disconnect_waiter: Any) -> None:
            if getattr(handler, _TAKEN_OVER_ATTR, False):
                # fix 6: the session lives on with the connection that took it over.
                await self._stop_handler(handler)
                return
            await super()._handle_disconnect(client_session, handler, disconnect_waiter)

        async def _authenticate(self, session: Any, listener: Any) -> bool:
            # Done in _initialize_client_session; super() asks again for the same session.
            if self._edgefleet_authenticated.pop(id(session), None) is session:
                return True
            return bool(await super()._authenticate(session, listener))

        # -- changed credentials end sessions (fix 4) ---------------------------------------------------------

        async def _edgefleet_watch(self) -> None:
            seen = -1
            summarised_at = time.monotonic()
            while True:
                try:
                    if time.monotonic() - summarised_at >= DENIAL_SUMMARY_INTERVAL:
                        summarised_at = time.monotonic()
                        self._edgefleet_log_denials()
                    self._edgefleet_auth.refresh()
                    if self._edgefleet_auth.generation != seen:
                        seen = self._edgefleet_auth.generation
                        for client_id, (session, _) in list(self._sessions.items()):
                            if not self._edgefleet_auth.is_current(session):
                                await self._edgefleet_drop(client_id, "its credential was rotated or removed")
                except Exception:  # the watcher must outlive one bad round
                    self.logger.exception("credentials watcher")
                await asyncio.sleep(self._edgefleet_auth.reload_interval)

        def _edgefleet_log_denials(self, *, final: bool = False) -> None:
            # The operator's count of ACL denials (each one is also a rate-limited line of its own).
            self._edgefleet_auth.denials.log_summary(force=final)

        async def _edgefleet_drop(self, client_id: str, why: str) -> None:
            """Close the connection of ``client_id``'s session, if any, and drop the session: subscriptions,
            queued and in-flight messages. Its Last Will is not published."""
            session, handler = self._sessions.pop(client_id, (None, None))
            if session is None:
                return
            self.logger.info(f"dropped the session of {client_id!r} (user {session.username!r}): {why}")
            session.will_flag = False
            await self._del_all_subscriptions(session)
            if handler is not None and session.transitions.is_connected():
                await self._stop_handler(handler)
            session.clear_queues()
            session.inflight_out.clear()
            session.inflight_in.clear()

        async def _publish_retained_messages_for_subscription(
            self, subscription: tuple[str, int], session: Any
        ) -> None:
            topic_filter, qos = subscription
            if not any(
                s.client_id == session.client_id for s, _ in self._subscriptions.get(topic_filter, ())
            ):
                return
            handler = self._get_handler(session)
            if handler is None:
                return
            tasks = []
            for topic, retained in list(self._retained_messages.items()):
                if not self._matches(topic, topic_filter):
                    continue
                if not await self._topic_filtering(session, topic=topic, action=Action.RECEIVE):
                    continue
                tasks.append(
                    asyncio.ensure_future(
                        handler.mqtt_publish(topic, retained.data, min(qos, retained.qos or qos), retain=True)
                    )
                )
            if tasks:
                await asyncio.wait(tasks)

    return _EdgeFleetBroker(config)


def run_embedded_broker(
    host: str,
    port: int,
    credentials_file: str | os.PathLike[str],
    *,
    tls: ListenerTls | None = None,
    on_ready: Callable[[], None] | None = None,
) -> None:
    """Run the broker on ``host:port`` (MQTTS with ``tls``) until SIGTERM/SIGINT (blocking); ``on_ready`` is called
    once it listens."""

    async def main() -> None:
        broker = _make_broker(broker_config(host, port, credentials_file, tls))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        await broker.start()
        if on_ready is not None:
            on_ready()
        try:
            await stop.wait()
        finally:
            await broker.shutdown()

    asyncio.run(main())


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class EmbeddedBroker:
    """The embedded broker in a subprocess.

    >>> with EmbeddedBroker("creds.json") as broker:   # doctest: +SKIP
    ...     broker.url                                  # 'mqtt://127.0.0.1:41234'
    """

    def __init__(
        self,
        credentials_file: str | os.PathLike[str],
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        startup_timeout: float = 15.0,
        log_level: str = "WARNING",
        tls: Any = None,
    ) -> None:
        """``tls``: anything with ``cert_file``, ``key_file`` and ``ca_file`` (a :class:`ListenerTls`, the fleet
        PKI's server identity): the listener then speaks MQTTS only."""
        self._credentials_file = Path(credentials_file)
        self._tls = None if tls is None else ListenerTls(Path(tls.cert_file), Path(tls.key_file), Path(tls.ca_file))
        self._host = host
        self._port = port
        self._startup_timeout = startup_timeout
        self._log_level = log_level
        self._process: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None
        self._last_stderr = ""

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        return self._port

    @property
    def tls(self) -> ListenerTls | None:
        return self._tls

    @property
    def url(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"{'mqtts' if self._tls else 'mqtt'}://{host}:{self._port}"

    @property
    def credentials_file(self) -> Path:
        return self._credentials_file

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> Self:
        if self._process is not None:
            raise RuntimeError("embedded broker already started")
        if self._port == 0:
            self._port = free_port(self._host)
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop(); a file, not a pipe: a chatty broker never blocks on it
        cmd = [
            sys.executable, "-m", "controlplane.broker",
            "--host", self._host, "--port", str(self._port),
            "--credentials", os.fspath(self._credentials_file),
            "--log-level", self._log_level,
            "--parent-pid", str(os.getpid()),
        ]  # fmt: skip
        if self._tls is not None:
            cmd += ["--certfile", os.fspath(self._tls.cert_file), "--keyfile", os.fspath(self._tls.key_file),
                    "--cafile", os.fspath(self._tls.ca_file)]
        self._process = process = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._stderr
        )
        assert process.stdout is not None
        # Wait for the ready line (so a foreign listener on the port cannot pass for ours), then the port.
        stdout = process.stdout
        os.set_blocking(stdout.fileno(), False)
        seen = b""
        deadline = time.monotonic() + self._startup_timeout
        try:
            while True:
                if process.poll() is not None:
                    self._cleanup()
                    raise RuntimeError(
                        f"embedded broker exited with code {process.returncode}:\n{self._last_stderr}"
                    )
                with contextlib.suppress(BlockingIOError):
                    seen += stdout.read() or b""
                if READY_LINE in seen and _port_open(self._host, self._port):
                    return self
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"embedded broker did not listen on {self._host}:{self._port} within "
                        f"{self._startup_timeout:g} s:\n{self._stderr_tail()}"
                    )
                time.sleep(0.05)
        finally:
            stdout.close()

    def stop(self) -> None:
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._cleanup()

    def stderr_tail(self) -> str:
        """The end of the broker's log (stderr)."""
        return self._stderr_tail()

    def _stderr_tail(self) -> str:
        if self._stderr is None:
            return self._last_stderr
        try:
            self._stderr.seek(0, os.SEEK_END)
            size = self._stderr.tell()
            self._stderr.seek(max(0, size - _STDERR_TAIL))
            return self._stderr.read().decode("utf-8", errors="replace")
        except (OSError, ValueError):
            return ""

    def _cleanup(self) -> None:
        # Keep the process object (returncode) and the end of the log; close the log file.
        if self._stderr is not None:
            self._last_stderr = self._stderr_tail()
            with contextlib.suppress(OSError):
                self._stderr.close()
            self._stderr = None

    def __enter__(self) -> Self:
        return self.start() if self._process is None else self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"EmbeddedBroker({self.url}, {state})"


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
