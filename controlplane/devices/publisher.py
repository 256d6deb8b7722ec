"""The control plane's MQTT publisher for commands (QoS 1)."""

from __future__ import annotations

import secrets
import threading
from typing import Any

import paho.mqtt.client as mqtt
import structlog

from agent.mqtt import BrokerAddress, MqttProtocol, make_client
from controlplane._errors import BrokerUnavailable

__all__ = ["CommandPublisher"]

log = structlog.get_logger("edgefleet.publisher")


class CommandPublisher:
    def __init__(self, broker: BrokerAddress, protocol: MqttProtocol = MqttProtocol.V5) -> None:
        self.broker = broker
        self.protocol = MqttProtocol.V5 if protocol is MqttProtocol.AUTO else protocol
        self._connected = threading.Event()
        # Random and long: whoever connects with this id disconnects the publisher (a clean session, so it need
        # not survive restarts).
        self.client_id = f"edgefleet-cp-{secrets.token_hex(12)}"
        self._client = make_client(broker, self.client_id, protocol=self.protocol)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = lambda *a: self._connected.clear()
        self._client.reconnect_delay_set(1, 10)

    def start(self, timeout_s: float = 15.0) -> None:
        self._client.connect_async(self.broker.host, self.broker.port, keepalive=30)
        self._client.loop_start()
        if not self._connected.wait(timeout_s):
            raise BrokerUnavailable(f"cannot connect to the broker at {self.broker.url}")

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            log.error("publisher.connect_failed", reason=str(reason))
        else:
            self._connected.set()

    def publish(self, topic: str, payload: bytes, *, retain: bool = False, timeout_s: float = 10.0) -> None:
        """Publish with QoS 1 and wait for the broker's PUBACK."""
        if not self._connected.is_set():
            raise BrokerUnavailable(f"not connected to the broker at {self.broker.url}")
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise BrokerUnavailable(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")
        try:
            info.wait_for_publish(timeout_s)
        except (RuntimeError, ValueError) as exc:
            raise BrokerUnavailable(f"publish to {topic} failed: {exc}") from exc
        if not info.is_published():
            raise BrokerUnavailable(f"no PUBACK for {topic} within {timeout_s} s")

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
