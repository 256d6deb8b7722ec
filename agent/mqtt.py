"""MQTT connection details shared by the agent and the control plane (paho-mqtt 2.x)."""

from __future__ import annotations

import enum
import ssl
from dataclasses import dataclass, field, replace
from urllib.parse import parse_qs, unquote, urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

__all__ = ["BrokerAddress", "MqttProtocol", "make_client", "parse_broker_url"]


class MqttProtocol(enum.StrEnum):
    AUTO = "auto"  # MQTT 5, falling back to 3.1.1 for brokers that refuse it (e.g. the embedded amqtt broker)
    V5 = "5"
    V311 = "3.1.1"


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    protocol: MqttProtocol = MqttProtocol.AUTO
    # TLS (mqtts://): the CA file the broker is verified against (default: the system store), and a client
    # certificate and key proving the device's identity (then no password is needed).
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    # Off only for a client on loopback to a listener whose certificate need not name 127.0.0.1 (the chain is
    # still verified).
    check_hostname: bool = True
    # Trust the system store as well as ``ca_file`` (the control plane with a broker of its own CA or a public one).
    trust_system: bool = False

    @property
    def url(self) -> str:
        """The URL without credentials (safe to log and to hand to devices)."""
        scheme = "mqtts" if self.tls else "mqtt"
        query = "" if self.protocol is MqttProtocol.AUTO else f"?protocol={self.protocol}"
        return f"{scheme}://{self.host}:{self.port}{query}"

    def with_credentials(self, username: str | None, password: str | None) -> BrokerAddress:
        return replace(self, username=username, password=password)

    def with_tls(self, *, ca_file: str | None = None, cert_file: str | None = None,
                 key_file: str | None = None) -> BrokerAddress:
        """This address with the given TLS files (None keeps the current one)."""
        return replace(self, ca_file=ca_file or self.ca_file, cert_file=cert_file or self.cert_file,
                       key_file=key_file or self.key_file)

    def ssl_context(self) -> ssl.SSLContext:
        """A client TLS context: the broker verified against ``ca_file`` (else the system store), our certificate
        presented when one is configured.

        Raises
        ------
        ValueError
            A TLS file that cannot be read or does not belong together, named.
        """
        try:
            context = ssl.create_default_context(cafile=self.ca_file)
            if self.ca_file and self.trust_system:
                context.load_default_certs()
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"CA file {self.ca_file}: {exc}") from None
        context.check_hostname = self.check_hostname
        if self.cert_file or self.key_file:
            if not (self.cert_file and self.key_file):
                raise ValueError("a client certificate needs both its certificate and its key file")
            try:
                context.load_cert_chain(self.cert_file, self.key_file)
            except (OSError, ssl.SSLError) as exc:
                # A certificate renewal interrupted between writing the new certificate and its key: the new key
                # still waits beside the old one (agent.trust.pending_key_file).
                try:
                    context.load_cert_chain(self.cert_file, f"{self.key_file}.pending")
                except (OSError, ssl.SSLError):
                    raise ValueError(f"client certificate {self.cert_file} / key {self.key_file}: {exc}") from None
        return context


def parse_broker_url(url: str) -> BrokerAddress:
    """Parse ``mqtt[s]://[user:pass@]host[:port][?protocol=5|3.1.1|auto]``.

    Raises
    ------
    ValueError
        With the reason, for any other scheme, a missing host or an unknown protocol.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        raise ValueError(f"broker URL {url!r}: scheme must be mqtt:// or mqtts://")
    if not parts.hostname:
        raise ValueError(f"broker URL {url!r}: no host")
    tls = parts.scheme in ("mqtts", "ssl")
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError as exc:
        raise ValueError(f"broker URL {url!r}: {exc}") from None
    query = parse_qs(parts.query)
    try:
        protocol = MqttProtocol(query.get("protocol", ["auto"])[0])
    except ValueError:
        raise ValueError(f"broker URL {url!r}: protocol must be one of 5, 3.1.1, auto") from None
    return BrokerAddress(
        host=parts.hostname,
        port=port,
        tls=tls,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        protocol=protocol,
    )


def make_client(
    address: BrokerAddress,
    client_id: str,
    *,
    protocol: MqttProtocol,
    manual_ack: bool = False,
    max_inflight: int = 100,
    persistent: bool = False,
) -> mqtt.Client:
    """A configured paho client; connecting and reconnecting are the caller's job.

    ``persistent`` asks for a broker session that outlives the connection (MQTT 3.1.1 clean_session=False;
    for MQTT 5 pass ``clean_start=False`` and a SessionExpiryInterval to ``connect()``), so QoS 1 messages
    that were delivered but not acknowledged are delivered again after a reconnect.
    """
    if protocol is MqttProtocol.AUTO:
        raise ValueError("resolve AUTO to a concrete protocol before creating a client")
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5 if protocol is MqttProtocol.V5 else mqtt.MQTTv311,
        clean_session=None if protocol is MqttProtocol.V5 else not persistent,
        manual_ack=manual_ack,
    )
    if address.username is not None:
        client.username_pw_set(address.username, address.password)
    if address.tls:
        client.tls_set_context(address.ssl_context())
    client.max_inflight_messages_set(max_inflight)
    # paho's own queue is not our durability: the outbox is. Keep paho from buffering unboundedly.
    client.max_queued_messages_set(0)
    return client
