"""The agent daemon: one loop that owns the MQTT connection, the outbox, telemetry and commands.

Reconnection is this loop's job, not the client's: every connection attempt gets a fresh paho client, so
nothing is buffered anywhere but the on-disk outbox, which is the single source of truth for what the control
plane has not yet acknowledged.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent import __version__, _deploy, trust
from agent import protocol as wire
from agent._active_model import ActiveModel
from agent._errors import ConfigError
from agent._logring import LogRing, LogsArgsError, logs_result, parse_logs_args
from agent._outbox import Outbox
from agent._restart import ACK_WAIT_S, RestartLog, refusal
from agent._settings import AgentSettings
from agent._telemetry import PowerSensor, SystemSensor
from agent.commands import CommandContext, CommandHandler
from agent.fsutil import write_atomic
from agent.join_round import Rounds
from agent.logsetup import get_logger
from agent.mqtt import MqttProtocol, make_client
from agent.sdnotify import Notifier

__all__ = ["Agent", "AgentSettings", "LifecycleState"]

log = get_logger("edgefleet.agent")

# How long a stopping agent waits for its running commands (a round stopping its SuperNode takes up to 10 s).
COMMAND_STOP_WAIT_S = 15.0

# What `set_config` may change, with the accepted range.
_TUNABLE: dict[str, tuple[float, float]] = {
    "telemetry_interval_s": (0.1, 86_400.0),
    "inference_rate_hz": (0.0, 1000.0),
}


class LifecycleState(enum.StrEnum):
    STARTING = "starting"
    CONNECTING = "connecting"
    ONLINE = "online"
    BACKOFF = "backoff"
    STOPPING = "stopping"
    STOPPED = "stopped"


class Agent:
    """A device agent. `run()` blocks until `stop()` is called (e.g. from a SIGTERM handler).

    It owns the MQTT connection, the outbox, telemetry, configuration and command dispatch; the model it runs is
    :attr:`models`' (an :class:`agent._active_model.ActiveModel`), its part in federated rounds :attr:`rounds`'.
    Long-running command handlers see it as a :class:`agent.commands.CommandContext`.

    ``log_ring``: the process's recent log (attached to logging by the entry point), which the ``logs`` command
    answers from; without one, ``logs`` is acked as an error. After a ``restart`` command, :meth:`run` returns with
    :attr:`restart_requested` set, and the entry point exits or re-executes (agent._restart).
    """

    def __init__(self, settings: AgentSettings, *, log_ring: LogRing | None = None) -> None:
        wire.validate_device_id(settings.device_id)
        self.settings = settings
        self.device_id = settings.device_id
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self._log = log.bind(device_id=self.device_id)
        self._config_path = settings.data_dir / "config.json"
        self.config = self._load_config()
        self.outbox = Outbox(settings.data_dir / "outbox.db", settings.outbox_max_bytes)
        self._stop = threading.Event()
        self.state = LifecycleState.STARTING
        self._system = SystemSensor(settings.data_dir)
        self._power = PowerSensor(self.device_id, settings.power_mode, settings.profile.power_source)
        self._client: mqtt.Client | None = None
        self._protocol = (
            MqttProtocol.V5 if settings.broker.protocol is MqttProtocol.AUTO else settings.broker.protocol
        )
        self._connected = False
        self._connect_failed: str | None = None
        self._inflight: dict[int, int] = {}  # paho mid -> outbox id
        self._last_sent_id = 0
        self._seen_commands: OrderedDict[str, wire.Ack] = OrderedDict()
        self._log_ring = log_ring
        self._started = time.monotonic()
        # Restarts already executed, from before this process: a redelivered one gets its first ack, nothing more.
        self._restarts = RestartLog(settings.data_dir / "restart.json")
        for ack in self._restarts.acks():
            self._seen_commands[ack.command_id] = ack
        self.restart_requested = False
        self._restart_ack_entry: int | None = None
        self._restart_deadline = 0.0
        self._running_commands: set[str] = set()
        self._command_threads: set[threading.Thread] = set()
        self.connects = 0
        self.models = ActiveModel(settings, on_change=self.publish_state)  # the model runs from run()
        self.rounds = Rounds()
        # Long-running commands (downloads and rounds take minutes): each runs on its own thread, acked when it
        # returns. Anything else is answered inside the loop by handle_command.
        self._long_running: dict[str, CommandHandler] = {
            wire.CommandKind.DEPLOY_MODEL: _deploy.handle,
            wire.CommandKind.JOIN_ROUND: self.rounds.handle,
        }

    # -- what command handlers see (agent.commands.CommandContext) ------------------------------------------
    def wait_for_stop(self, timeout: float) -> bool:
        return self._stop.wait(timeout)

    @property
    def model_version(self) -> str | None:
        return self.models.version

    @property
    def active_variant(self) -> str | None:
        return self.models.variant

    @property
    def runtime_name(self) -> str | None:
        return self.models.runtime_name

    @property
    def runtime_version(self) -> str | None:
        return self.models.runtime_version

    # -- lifecycle -------------------------------------------------------------------------------------------
    def set_state(self, state: LifecycleState) -> None:
        if state is not self.state:
            self._log.info("agent.state", state=str(state), previous=str(self.state))
            self.state = state

    def stop(self) -> None:
        self._stop.set()

    @property
    def telemetry_interval_s(self) -> float:
        value = self.config.get("telemetry_interval_s")
        if value is not None:
            return float(value)
        return self.settings.telemetry_interval_s or self.settings.profile.telemetry.interval_s

    def run(self, notifier: Notifier | None = None) -> None:
        """Run until :meth:`stop`. ``notifier``: systemd's notify socket (``Type=notify``, ``WatchdogSec=``):
        ready once inference runs (the broker may still be away: the outbox keeps telemetry), a watchdog ping
        from every turn of this loop (each turn is at most ~0.2 s, a broker connect at most its 10 s timeout),
        stopping when the shutdown begins."""
        notifier = notifier or Notifier()
        self._start_inference()
        notifier.ready()
        backoff = self.settings.backoff_initial_s
        next_attempt = 0.0
        next_telemetry = time.monotonic()
        try:
            while not self._stop.is_set():
                notifier.watchdog_if_due()
                if self.restart_requested and self._restart_ack_sent():
                    self._log.info("agent.restarting", mode=str(self.settings.restart_mode))
                    self._stop.set()
                    break
                now = time.monotonic()
                if now >= next_telemetry:
                    self._enqueue_telemetry()
                    interval = self.telemetry_interval_s
                    next_telemetry = max(next_telemetry + interval, now + interval / 10)
                if self._client is None and now >= next_attempt:
                    if self._connect():
                        backoff = self.settings.backoff_initial_s
                    else:
                        self.set_state(LifecycleState.BACKOFF)
                        next_attempt = now + backoff * random.uniform(0.5, 1.0)
                        backoff = min(backoff * 2, self.settings.backoff_max_s)
                if self._client is not None:
                    self._pump()
                    rc = self._client.loop(timeout=min(0.2, max(0.0, next_telemetry - time.monotonic())))
                    if rc != mqtt.MQTT_ERR_SUCCESS or not self._connected:
                        self._log.warning("mqtt.disconnected", rc=mqtt.error_string(rc))
                        self._drop_client()
                        self.set_state(LifecycleState.BACKOFF)
                        next_attempt = time.monotonic() + backoff * random.uniform(0.5, 1.0)
                else:
                    self._stop.wait(min(0.2, max(0.0, min(next_telemetry, next_attempt) - time.monotonic())))
        finally:
            notifier.stopping()
            self._shutdown()

    def _restart_ack_sent(self) -> bool:
        """Whether the restart's ack reached the broker (or waited long enough: it stays in the outbox)."""
        entry = self._restart_ack_entry
        return not entry or not self.outbox.has(entry) or time.monotonic() >= self._restart_deadline

    def _shutdown(self) -> None:
        self.set_state(LifecycleState.STOPPING)
        # Running commands see the stop (wait_for_stop): a round stops its SuperNode (SIGKILL after 10 s), a
        # download gives up. Wait for them, up to a bound, so that no SuperNode outlives its agent and their acks
        # reach the outbox; a daemon thread still running after that ends with the process.
        deadline = time.monotonic() + COMMAND_STOP_WAIT_S
        for thread in list(self._command_threads):
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                self._log.warning("command.still_running_at_stop", thread=thread.name)
        self.models.stop()
        client = self._client
        if client is not None and self._connected:
            # A clean disconnect suppresses the Last Will, so say "offline" ourselves; give queued
            # messages a moment to be acknowledged (what isn't stays in the outbox for next time).
            info = client.publish(
                wire.topic(self.device_id, wire.Channel.STATE), self._state_payload(online=False), 1, True
            )
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline and (self._inflight or not info.is_published()):
                self._pump()
                if client.loop(timeout=0.05) != mqtt.MQTT_ERR_SUCCESS:
                    break
            client.disconnect()
        self._drop_client()
        self.outbox.close()
        self.set_state(LifecycleState.STOPPED)

    # -- connection ------------------------------------------------------------------------------------------
    def _connect(self) -> bool:
        self.set_state(LifecycleState.CONNECTING)
        address = self.settings.broker
        # A persistent session: commands sent while the device is offline wait at the broker for it.
        client = make_client(
            address, self.device_id, protocol=self._protocol, max_inflight=self.settings.inflight_window,
            persistent=True,
        )
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        client.will_set(
            wire.topic(self.device_id, wire.Channel.STATE), self._state_payload(online=False), qos=1, retain=True
        )
        self._connected = False
        self._connect_failed = None
        try:
            if self._protocol is MqttProtocol.V5:
                props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
                props.SessionExpiryInterval = self.settings.session_expiry_s
                client.connect(address.host, address.port, keepalive=self.settings.keepalive_s, clean_start=False,
                               properties=props)
            else:
                client.connect(address.host, address.port, keepalive=self.settings.keepalive_s)
        except (OSError, ValueError) as exc:
            self._log.info("mqtt.connect_failed", broker=address.url, error=str(exc))
            return False
        deadline = time.monotonic() + 10.0
        while not self._connected and self._connect_failed is None and time.monotonic() < deadline:
            if client.loop(timeout=0.1) != mqtt.MQTT_ERR_SUCCESS:
                self._connect_failed = self._connect_failed or "connection closed before CONNACK"
                break
        if not self._connected:
            reason = self._connect_failed or "no CONNACK within 10 s"
            self._log.warning("mqtt.connect_failed", broker=address.url, protocol=str(self._protocol), reason=reason)
            client.disconnect()
            # Brokers that speak only 3.1.1 close the connection on an MQTT 5 CONNECT or refuse it.
            refused_v5 = "protocol" in reason.lower() or "before CONNACK" in reason
            if self.settings.broker.protocol is MqttProtocol.AUTO and self._protocol is MqttProtocol.V5 and refused_v5:
                self._log.info("mqtt.fallback", protocol="3.1.1")
                self._protocol = MqttProtocol.V311
            return False
        self._client = client
        self.connects += 1
        self._inflight.clear()
        self._last_sent_id = 0
        client.subscribe(wire.topic(self.device_id, wire.Channel.CMD), qos=1)
        client.publish(wire.topic(self.device_id, wire.Channel.STATE), self._state_payload(online=True), 1, True)
        self.set_state(LifecycleState.ONLINE)
        self._log.info("mqtt.connected", broker=address.url, protocol=str(self._protocol))
        return True

    def _drop_client(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):  # the socket may already be gone
                self._client.disconnect()
        self._client = None
        self._connected = False
        self._inflight.clear()
        self._last_sent_id = 0

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            self._connect_failed = str(reason)
        else:
            self._connected = True

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self._connected = False
        if reason.is_failure and self._connect_failed is None:
            self._connect_failed = str(reason)

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        entry_id = self._inflight.pop(mid, None)
        if entry_id is not None:
            if reason.is_failure:
                # The broker refused it (e.g. not authorised on MQTT 5): keeping it would block forever.
                self._log.error("mqtt.publish_refused", reason=str(reason), outbox_id=entry_id)
            self.outbox.remove(entry_id)

    # -- outgoing --------------------------------------------------------------------------------------------
    def _pump(self) -> None:
        client = self._client
        if client is None or not self._connected:
            return
        room = self.settings.inflight_window - len(self._inflight)
        if room <= 0:
            return
        for entry in self.outbox.peek(room, after_id=self._last_sent_id):
            info = client.publish(entry.topic, entry.payload, entry.qos, entry.retain)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                break  # back-pressure: try again after the next loop()
            self._inflight[info.mid] = entry.id
            self._last_sent_id = entry.id

    def _enqueue_telemetry(self) -> None:
        power, network = self._power.read()
        inference = self.models.telemetry()
        message = wire.Telemetry(
            device_id=self.device_id,
            seq=self.outbox.next_seq(),
            ts=time.time(),
            system=self._system.read(),
            power=power,
            network=network,
            inference=inference,
            outbox=wire.OutboxStats(
                pending=self.outbox.pending,
                pending_bytes=self.outbox.pending_bytes,
                dropped_total=self.outbox.dropped,
                rejected_total=self.outbox.rejected,
            ),
        )
        self.outbox.put(wire.topic(self.device_id, wire.Channel.TELEMETRY), wire.encode(message))

    def _state_payload(self, *, online: bool) -> bytes:
        return wire.encode(
            wire.State(
                device_id=self.device_id,
                online=online,
                ts=time.time(),
                profile=self.settings.profile.name,
                agent_version=__version__,
                runtime=self.runtime_name,
                runtime_version=self.runtime_version,
                active_model=self.model_version,
                active_variant=self.active_variant,
                config=dict(self.config),
            )
        )

    def publish_state(self) -> None:
        if self._client is not None and self._connected:
            self._client.publish(
                wire.topic(self.device_id, wire.Channel.STATE), self._state_payload(online=True), 1, True
            )

    # -- commands --------------------------------------------------------------------------------------------
    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            command = wire.decode(bytes(message.payload), wire.Command)
        except wire.ProtocolError as exc:
            self._log.warning("command.malformed", error=str(exc))
            return
        ack = self._seen_commands.get(command.command_id)
        if ack is not None:  # QoS 1 may deliver a command twice: answer the repeat with the first result
            self._send_ack(ack)
            return
        if command.command_id in self._running_commands:
            return  # still working on it; its ack comes when it is done
        handler = self._long_running.get(command.kind)
        if handler is None:
            ack = self.handle_command(command)
            if command.kind == wire.CommandKind.LOGS:
                # Read-only, and up to ~60 KiB: answered again on a redelivery rather than kept 256 times over.
                self._send_ack(ack)
                return
            entry = self._remember(ack)
            if command.kind == wire.CommandKind.RESTART and ack.ok:
                # Stop once the broker has the ack (PUBACK), at most ACK_WAIT_S from now: see run().
                self.restart_requested = True
                self._restart_ack_entry = entry
                self._restart_deadline = time.monotonic() + ACK_WAIT_S
            return
        # Downloads and rounds take minutes: run them beside the loop (which must keep the connection alive).
        self._running_commands.add(command.command_id)
        thread = threading.Thread(
            target=self._run_long_command, args=(handler, command), name=f"cmd-{command.kind}", daemon=True
        )
        self._command_threads = {t for t in self._command_threads if t.is_alive()} | {thread}
        thread.start()

    def _run_long_command(self, handler: CommandHandler, command: wire.Command) -> None:
        context: CommandContext = self
        try:
            ok, reason, result = handler(context, command)
        except Exception as exc:  # noqa: BLE001 - a failed command is acked as an error, the agent lives on
            self._log.exception("command.failed", command_id=command.command_id, kind=command.kind)
            ok, reason, result = False, f"{type(exc).__name__}: {exc}", {}
        self._log.info("command.ack", command_id=command.command_id, kind=command.kind, ok=ok, reason=reason)
        self._remember(wire.Ack(device_id=self.device_id, command_id=command.command_id, ok=ok, reason=reason,
                                result=result, ts=time.time()))
        self._running_commands.discard(command.command_id)

    def _remember(self, ack: wire.Ack) -> int:
        self._seen_commands[ack.command_id] = ack
        while len(self._seen_commands) > 256:
            self._seen_commands.popitem(last=False)
        return self._send_ack(ack)

    def _send_ack(self, ack: wire.Ack) -> int:
        """Queue the ack; its outbox id (0: refused by the contract, never sent)."""
        return self.outbox.put(wire.topic(self.device_id, wire.Channel.ACK), wire.encode(ack))

    def handle_command(self, command: wire.Command) -> wire.Ack:
        """Quick commands, answered inside the loop."""
        log = self._log.bind(command_id=command.command_id, kind=command.kind)

        def ack(ok: bool, reason: str | None = None, **result: Any) -> wire.Ack:
            log.info("command.ack", ok=ok, reason=reason)
            return wire.Ack(
                device_id=self.device_id, command_id=command.command_id, ok=ok, reason=reason,
                result=result, ts=time.time(),
            )

        if command.kind == wire.CommandKind.PING:
            return ack(True, pong=time.time(), state=str(self.state), agent_version=__version__)
        if command.kind == wire.CommandKind.SET_CONFIG:
            try:
                changed = self.apply_config(command.args)
            except ConfigError as exc:
                return ack(False, str(exc))
            return ack(True, config=changed)
        if command.kind in (wire.CommandKind.TRUST_SIGNING_KEY, wire.CommandKind.RETIRE_SIGNING_KEY):
            ok, reason, result = trust.handle_key_command(self, command)
            return ack(ok, reason, **result)
        if command.kind in trust.CA_COMMANDS:
            ok, reason, result = trust.handle_ca_command(self, command)
            return ack(ok, reason, **result)
        if command.kind == wire.CommandKind.LOGS:
            if self._log_ring is None:
                return ack(False, "this agent keeps no log in memory (started without a log ring)")
            try:
                lines = parse_logs_args(command.args)
            except LogsArgsError as exc:
                return ack(False, str(exc))
            return ack(True, **logs_result(self._log_ring, lines))
        if command.kind == wire.CommandKind.RESTART:
            return self._restart(command, ack)
        return ack(False, f"unknown command kind {command.kind!r}")

    def _restart(self, command: wire.Command, ack: Callable[..., wire.Ack]) -> wire.Ack:
        """Accept or refuse a restart; an accepted one is recorded before it is acked (it runs at most once)."""
        if self.restart_requested:
            return ack(False, "a restart is already under way")
        why = refusal(command, time.time(), self._restarts.last)
        if why is not None:
            return ack(False, why)
        accepted: wire.Ack = ack(True, restarting=True, mode=str(self.settings.restart_mode), pid=os.getpid(),
                                 uptime_s=round(time.monotonic() - self._started, 1))
        self._restarts.record(accepted)
        return accepted

    # -- configuration ---------------------------------------------------------------------------------------
    def _load_config(self) -> dict[str, Any]:
        try:
            loaded = json.loads(self._config_path.read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("config.unreadable", path=str(self._config_path), error=str(exc))
            return {}
        return {k: v for k, v in loaded.items() if k in _TUNABLE} if isinstance(loaded, dict) else {}

    def apply_config(self, values: dict[str, Any]) -> dict[str, Any]:
        """Validate and persist tunables; all-or-nothing."""
        if not values:
            raise ConfigError(f"set_config needs at least one of: {', '.join(sorted(_TUNABLE))}")
        for key, value in values.items():
            if key not in _TUNABLE:
                raise ConfigError(f"unknown setting {key!r} (known: {', '.join(sorted(_TUNABLE))})")
            low, high = _TUNABLE[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise ConfigError(f"setting {key!r} must be a number in [{low}, {high}], got {value!r}")
        self.config.update({k: float(v) for k, v in values.items()})
        write_atomic(self._config_path, json.dumps(self.config).encode())
        if "inference_rate_hz" in values:
            self.models.set_rate(float(values["inference_rate_hz"]))
        self.publish_state()
        return dict(self.config)

    # -- inference -------------------------------------------------------------------------------------------
    def _start_inference(self) -> None:
        self.models.start(rate_hz=float(self.config.get("inference_rate_hz", self.settings.inference_rate_hz)))
