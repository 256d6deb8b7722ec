"""Broker accounts on mosquitto (2.0.x) through its dynamic-security plugin.

Commands are JSON published to ``$CONTROL/dynamic-security/v1``; replies arrive on
``$CONTROL/dynamic-security/v1/response`` and are matched by ``correlationData``.

Layout on the broker (all created on first use, idempotently):

* role ``edgefleet-service``: publish/receive/subscribe/unsubscribe ``edgefleet/#``, given to the service
  account (by default the admin user the control plane connects as, e.g. ``edgefleet-admin``);
* per device: client ``<device_id>`` with role ``edgefleet-device-<device_id>`` allowing exactly: publish its own
  ``telemetry``, ``state``, ``ack``; subscribe to / receive its own ``cmd``; receive nothing else.

mosquitto 2.0.11's dynsec does not substitute ``%u``/``%c`` in ACL topics (tested: such ACLs match nothing), hence
one role per device.

Identity: each device client is bound to its device id as MQTT client id (dynsec ``clientid``): mosquitto refuses
a CONNECT of the device's account with any other client id ("Not authorized") before it looks at sessions, so a
device can neither resume nor wipe another client's session. Device clients created before this binding get it
when the control plane starts (:meth:`MosquittoDynsecAuth.prepare`).

mosquitto disconnects a client's live connections when its password or roles change (``modifyClient``,
``setClientPassword``) and when it is deleted, but it keeps the client id's persistent session (2.0.11, tested):
a device rotated or deleted and enrolled again would be handed the commands queued for the old credential. So
after every such change the admin connects once with that client id and a clean start (session expiry 0), which
discards the session, its subscriptions and its queue. :meth:`MosquittoDynsecAuth.ensure_device` returns (and the
new password is handed out) only after that.
"""

from __future__ import annotations

import contextlib
import json
import ssl
import threading
import time
import uuid
from collections.abc import Mapping
from typing import Any, Final, Self
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.protocol import TOPIC_PREFIX, Channel, validate_device_id

from ._auth import check_device_username, reserved_reason
from ._errors import BrokerAuthError

__all__ = ["MosquittoDynsecAuth"]

CONTROL_TOPIC: Final = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC: Final = "$CONTROL/dynamic-security/v1/response"
SERVICE_ROLE: Final = "edgefleet-service"
DEVICE_ROLE_PREFIX: Final = "edgefleet-device-"
_ROOT: Final = TOPIC_PREFIX.split("/", 1)[0]


def service_role_acls() -> list[dict[str, Any]]:
    pattern = f"{_ROOT}/#"
    return [
        {"acltype": acltype, "topic": pattern, "priority": 0, "allow": True}
        for acltype in ("publishClientSend", "publishClientReceive", "subscribePattern", "unsubscribePattern")
    ]


def device_role_acls(device_id: str) -> list[dict[str, Any]]:
    """Exactly the device ACL rule; ``publishClientReceive`` of anything else is denied (the broker default
    allows it)."""
    base = f"{TOPIC_PREFIX}/{validate_device_id(device_id)}"
    acls: list[dict[str, Any]] = [
        {"acltype": "publishClientSend", "topic": f"{base}/{channel}", "priority": 10, "allow": True}
        for channel in (Channel.TELEMETRY, Channel.STATE, Channel.ACK)
    ]
    cmd = f"{base}/{Channel.CMD}"
    acls += [
        {"acltype": "subscribeLiteral", "topic": cmd, "priority": 10, "allow": True},
        {"acltype": "publishClientReceive", "topic": cmd, "priority": 10, "allow": True},
        {"acltype": "publishClientReceive", "topic": "#", "priority": 0, "allow": False},
    ]
    return acls


def device_role(device_id: str) -> str:
    return DEVICE_ROLE_PREFIX + device_id


class MosquittoDynsecAuth:
    """:class:`~controlplane.broker.BrokerAuth` for mosquitto with the dynamic-security plugin.

    Connects lazily (MQTT 5) as the dynsec admin on first use. Thread-safe.
    """

    def __init__(
        self,
        host: str,
        port: int = 1883,
        username: str = "edgefleet-admin",
        password: str = "",
        *,
        service_username: str | None = None,
        tls: bool | ssl.SSLContext = False,
        timeout: float = 10.0,
    ) -> None:
        self._host = host
        self._port = port
        self._username = username
        self._password = password
        # The account the control plane itself publishes/subscribes with; by default the admin it connects as.
        self._service_username = service_username if service_username is not None else username
        self._tls = tls
        self._timeout = timeout
        self._lock = threading.Lock()  # connection setup and first-use initialisation
        self._pending_lock = threading.Lock()
        self._pending: dict[str, tuple[threading.Event, list[dict[str, Any]]]] = {}
        self._client: mqtt.Client | None = None
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._subscribe_mid: int | None = None
        self._connect_error: str | None = None
        self._initialised = False
        self._closed = False

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> MosquittoDynsecAuth:
        """From ``mqtt://ADMIN:PASSWORD@host:1883`` (``mqtts://`` for TLS with the system CAs)."""
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
            raise ValueError(f"unsupported broker URL scheme {parts.scheme!r} in {_redact(url)!r}")
        if not parts.hostname:
            raise ValueError(f"broker URL without host: {_redact(url)!r}")
        if not parts.username:
            raise ValueError(
                "dynsec needs the broker admin's credentials in the URL: mqtt://ADMIN:PASSWORD@host:1883"
            )
        tls = parts.scheme in ("mqtts", "ssl")
        kwargs.setdefault("tls", tls)
        return cls(
            parts.hostname,
            parts.port or (8883 if tls else 1883),
            unquote(parts.username),
            unquote(parts.password or ""),
            **kwargs,
        )

    def __repr__(self) -> str:
        return f"MosquittoDynsecAuth({self._username}@{self._host}:{self._port})"

    # -- BrokerAuth -------------------------------------------------------------------------------------------

    def reserved(self, device_id: str) -> str | None:
        if device_id in (self._username, self._service_username):
            return f"device id '{device_id}' is reserved: it is the broker's admin/service account"
        return reserved_reason(device_id)

    def ensure_device(self, device_id: str, password: str) -> None:
        validate_device_id(device_id)
        if not password:
            raise BrokerAuthError(f"dynsec: empty password for device {device_id!r}")
        if device_id in (self._username, self._service_username):
            raise BrokerAuthError(
                f"dynsec: {device_id!r} is the broker's admin/service account, not a device"
            )
        check_device_username(device_id)
        self._ensure_initialised()
        role = device_role(device_id)
        self._ensure_role(role, device_role_acls(device_id))
        roles = [{"rolename": role, "priority": 0}]
        client = {"username": device_id, "clientid": device_id, "password": password, "roles": roles}
        reply = self._execute_one({"command": "createClient", **client}, ok_errors=("Client already exists",))
        if reply.get("error"):
            # Existing client: new password, exactly our role, bound to its id (mosquitto disconnects it).
            self._execute_one({"command": "modifyClient", **client})
        # Nothing queued for an earlier credential of this id may reach the new one.
        self._drop_session(device_id)

    def remove_device(self, device_id: str) -> None:
        validate_device_id(device_id)
        if device_id in (self._username, self._service_username):
            raise BrokerAuthError(
                f"dynsec: refusing to remove the broker's admin/service account {device_id!r}"
            )
        # deleteClient disconnects the device's live connections.
        self._execute_one({"command": "deleteClient", "username": device_id}, ok_errors=("Client not found",))
        self._execute_one(
            {"command": "deleteRole", "rolename": device_role(device_id)}, ok_errors=("Role not found",)
        )
        self._drop_session(device_id)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            client, self._client = self._client, None
            self._connected.clear()
        if client is not None:
            try:
                client.disconnect()
            finally:
                client.loop_stop()
        with self._pending_lock:
            for event, _ in self._pending.values():
                event.set()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def prepare(self) -> None:
        """Connect, create the ``edgefleet-service`` role and grant it to the service account, and bind device
        clients created before client-id binding to their device id. Done on first :meth:`ensure_device` anyway
        (but for the binding); call it at start-up to fail early and let the control plane publish commands
        before any device is enrolled."""
        self._ensure_initialised()
        self._bind_client_ids()

    def _bind_client_ids(self) -> None:
        reply = self._execute_one({"command": "listClients", "verbose": True})
        for client in (reply.get("data") or {}).get("clients") or ():
            username = client.get("username")
            if not isinstance(username, str) or client.get("clientid") == username:
                continue
            if not any(r.get("rolename") == device_role(username) for r in client.get("roles") or ()):
                continue  # not one of our devices
            # mosquitto disconnects the device; it comes back with its own id at once (the agent uses it).
            self._execute_one({"command": "setClientId", "username": username, "clientid": username})

    def _drop_session(self, client_id: str) -> None:
        """Discard ``client_id``'s persistent session (subscriptions, queued messages): connect as the admin with
        that client id and a clean start, and leave (session expiry 0)."""
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        client.username_pw_set(self._username, self._password)
        if isinstance(self._tls, ssl.SSLContext):
            client.tls_set_context(self._tls)
        elif self._tls:
            client.tls_set()
        result: list[ReasonCode] = []
        client.on_connect = lambda _c, _u, _f, reason, _p: result.append(reason)
        where = f"mosquitto at {self._host}:{self._port}"
        try:
            client.connect(self._host, self._port, keepalive=10, clean_start=True,
                           properties=Properties(PacketTypes.CONNECT))  # type: ignore[no-untyped-call]
            deadline = time.monotonic() + self._timeout
            while not result and time.monotonic() < deadline:
                if client.loop(timeout=0.1) != mqtt.MQTT_ERR_SUCCESS:
                    break
        except OSError as exc:
            raise BrokerAuthError(f"dynsec: cannot drop the session of {client_id!r} on {where}: {exc}") from exc
        finally:
            with contextlib.suppress(Exception):
                client.disconnect()
                client.loop(timeout=0.1)
            with contextlib.suppress(OSError):
                sock = client.socket()
                if sock is not None:
                    sock.close()
        if not result:
            raise BrokerAuthError(f"dynsec: no CONNACK within {self._timeout:g} s dropping the session of "
                                  f"{client_id!r} on {where}")
        if result[0].is_failure:
            raise BrokerAuthError(f"dynsec: cannot drop the session of {client_id!r} on {where}: {result[0]} "
                                  f"(may {self._username!r} connect with any client id?)")

    # -- setup ------------------------------------------------------------------------------------------------

    def _ensure_initialised(self) -> None:
        with self._lock:
            if self._initialised:
                return
        self._ensure_role(SERVICE_ROLE, service_role_acls())
        if not self._service_has_role():
            # mosquitto disconnects every connection of the account whose roles change, this one included when
            # the service account is the admin: the reply is lost and paho re-sends the command on reconnect,
            # which then answers "Internal error" (2.0.11's reply to adding a role a client already has).
            reply = self._execute_one(
                {"command": "addClientRole", "username": self._service_username, "rolename": SERVICE_ROLE},
                ok_errors=("Internal error",),
            )
            if reply.get("error") and not self._service_has_role():
                raise BrokerAuthError(
                    f"dynsec: addClientRole {self._service_username!r} {SERVICE_ROLE!r} failed: {reply['error']}"
                )
        with self._lock:
            self._initialised = True

    def _service_has_role(self) -> bool:
        reply = self._execute_one(
            {"command": "getClient", "username": self._service_username}, ok_errors=("Client not found",)
        )
        client = (reply.get("data") or {}).get("client")
        if reply.get("error") or not client:
            raise BrokerAuthError(
                f"dynsec: service account {self._service_username!r} does not exist on the broker"
            )
        return any(r.get("rolename") == SERVICE_ROLE for r in client.get("roles") or ())

    def _ensure_role(self, rolename: str, acls: list[dict[str, Any]]) -> None:
        reply = self._execute_one(
            {"command": "createRole", "rolename": rolename, "acls": acls}, ok_errors=("Role already exists",)
        )
        if reply.get("error"):
            # modifyRole replaces the ACL list in place (no disconnects); it repairs a role edited by hand.
            self._execute_one({"command": "modifyRole", "rolename": rolename, "acls": acls})

    def _connect(self) -> mqtt.Client:
        with self._lock:
            if self._closed:
                raise BrokerAuthError("dynsec: MosquittoDynsecAuth is closed")
            if self._client is not None:
                client = self._client
            else:
                client = self._client = self._new_client()
        where = f"mosquitto at {self._host}:{self._port} as {self._username!r}"
        ready = self._connected.wait(self._timeout) and self._subscribed.wait(self._timeout)
        error = self._connect_error
        if error is not None:
            self._drop_client(client)
            raise BrokerAuthError(f"dynsec: cannot connect to {where}: {error}")
        if not ready:
            raise BrokerAuthError(f"dynsec: no connection to {where} within {self._timeout:g} s")
        return client

    def _new_client(self) -> mqtt.Client:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"edgefleet-dynsec-{uuid.uuid4().hex[:12]}",
            protocol=mqtt.MQTTv5,
        )
        client.username_pw_set(self._username, self._password)
        # mosquitto disconnects us when our own roles change (see _ensure_initialised): come back quickly.
        client.reconnect_delay_set(min_delay=0.1, max_delay=10)  # type: ignore[arg-type]  # floats work
        if isinstance(self._tls, ssl.SSLContext):
            client.tls_set_context(self._tls)
        elif self._tls:
            client.tls_set()
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        self._connect_error = None
        self._connected.clear()
        self._subscribed.clear()
        try:
            client.connect(self._host, self._port, keepalive=30)
        except OSError as exc:
            self._client = None
            raise BrokerAuthError(
                f"dynsec: cannot connect to mosquitto at {self._host}:{self._port}: {exc}"
            ) from exc
        client.loop_start()
        return client

    def _drop_client(self, client: mqtt.Client) -> None:
        with self._lock:
            if self._client is client:
                self._client = None
        client.disconnect()
        client.loop_stop()

    # -- paho callbacks (network thread) ------------------------------------------------------------------------

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, properties: Any
    ) -> None:
        if reason.is_failure:
            self._connect_error = str(reason)
            # Wrong credentials do not get better by retrying: stop paho's reconnect loop.
            self._connected.set()
            self._subscribed.set()
            client.disconnect()
            return
        self._connect_error = None
        self._subscribed.clear()
        result, mid = client.subscribe(RESPONSE_TOPIC, qos=1)
        if result != mqtt.MQTT_ERR_SUCCESS:
            self._connect_error = f"subscribe to {RESPONSE_TOPIC} failed ({mqtt.error_string(result)})"
            self._subscribed.set()
        self._subscribe_mid = mid
        self._connected.set()

    def _on_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, reasons: list[ReasonCode], properties: Any
    ) -> None:
        if mid != self._subscribe_mid:
            return
        if any(r.is_failure for r in reasons):
            self._connect_error = (
                f"not allowed to subscribe to {RESPONSE_TOPIC} ({reasons[0]}): "
                f"is {self._username!r} the dynsec admin?"
            )
        self._subscribed.set()

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, properties: Any
    ) -> None:
        if self._connect_error is None:
            # paho reconnects by itself; commands in flight time out (mosquitto answers nothing twice).
            self._connected.clear()
            self._subscribed.clear()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            data = json.loads(message.payload)
            responses = data.get("responses") or []
        except (ValueError, AttributeError):
            return
        for response in responses:
            if not isinstance(response, dict):
                continue
            with self._pending_lock:
                waiter = self._pending.get(str(response.get("correlationData")))
            if waiter is not None:
                waiter[1].append(response)
                waiter[0].set()

    # -- commands -----------------------------------------------------------------------------------------------

    def _execute_one(self, command: Mapping[str, Any], *, ok_errors: tuple[str, ...] = ()) -> dict[str, Any]:
        """Run one dynsec command; a reply with an ``error`` not in ``ok_errors`` raises BrokerAuthError."""
        client = self._connect()
        correlation = uuid.uuid4().hex
        payload = dict(command)
        payload["correlationData"] = correlation
        event = threading.Event()
        replies: list[dict[str, Any]] = []
        with self._pending_lock:
            self._pending[correlation] = (event, replies)
        try:
            info = client.publish(CONTROL_TOPIC, json.dumps({"commands": [payload]}), qos=1)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                raise BrokerAuthError(
                    f"dynsec: {_describe(command)}: publish failed ({mqtt.error_string(info.rc)})"
                )
            if not event.wait(self._timeout) or not replies:
                raise BrokerAuthError(
                    f"dynsec: no reply to {_describe(command)} from mosquitto at {self._host}:{self._port} within "
                    f"{self._timeout:g} s (is the dynamic-security plugin loaded, and is {self._username!r} its admin?)"
                )
        finally:
            with self._pending_lock:
                self._pending.pop(correlation, None)
        reply = replies[0]
        error = reply.get("error")
        if error and error not in ok_errors:
            raise BrokerAuthError(f"dynsec: {_describe(command)} failed: {error}")
        return reply


def _describe(command: Mapping[str, Any]) -> str:
    name = command.get("command", "?")
    target = command.get("username") or command.get("rolename")
    return f"{name} {target!r}" if target else str(name)


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()
