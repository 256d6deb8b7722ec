"""``join_round``: take part in one federated round by running a Flower SuperNode for as long as the round lasts.

Command args::

    {"superlink": "host:port",        # the SuperLink's Fleet API
     "round_id": "...",              # the control plane's round (also the run's `round-id` run config)
     "timeout_s": 3600,              # optional: give up (stop the SuperNode) after this long
     "tls": true}                    # optional: the SuperLink speaks TLS (verified with the agent's fleet CA)

With ``tls`` the SuperNode verifies the SuperLink with the agent's ``ca_file`` (``--root-certificates``; without
one, the system store) and signs with the device's own EC P-384 key when it has one (``supernode_auth_key_file``,
created at enrolment; the control plane registered its public key). An agent with a CA file refuses a plaintext
SuperLink beyond loopback. Flower refuses signed Fleet requests whose
timestamp is more than 5 s ahead of or 305 s behind the SuperLink's clock: the ack carries ``clock_skew_s`` (this
device's clock minus the command's timestamp) and names clock skew as the reason when the SuperNode could not
connect and the skew is outside that window.

The device trains on its own data: the file its agent was started with (``--train-data`` /
``EDGEFLEET_TRAIN_DATA``, default ``<data_dir>/data/partition.npz``), never a path a command names (a ``data_path``
argument is refused: no API input chooses a file on a device).

``{"round_id": "...", "leave": true}`` is the control plane saying that the round is over (its run failed, was
stopped, or ended before this device heard so from the ServerApp): the agent stops that round's SuperNode at once
and acks ``{"round_id", "left": bool}``; a later invitation to that round is refused. It rides on ``join_round``
(not a kind of its own) so that the handler that owns the device's round answers it.

The SuperNode (``flower-supernode``, a subprocess: ~260 MB, so only while a round is on) gets the device id,
the data path, the round id and a status-file path in its node config. The ClientApp writes the status file
(:mod:`agent.round_status`) after each message; when the ServerApp says the run is over, the agent stops
the SuperNode and acks ``{"round_id", "joined": true, "participated": bool, "trained_rounds": [...],
"run_status"}``. It also stops it when the control plane ends the round, when the SuperNode exits, when
``timeout_s`` passes or when the agent stops (then ok is false).

Refused (ok false, ``"joined": false``: the control plane records the reason as the device's skip reason) when
the firmware profile may not train, when flwr is not installed (``pip install
'edgefleet[train]'``), without data, or while another round is running. Importing this module imports neither
flwr nor torch: the SuperNode is a subprocess.

Each agent keeps its round state in its own :class:`Rounds` (nothing per agent at module level); the agent's
command registry maps ``join_round`` to that object's :meth:`Rounds.handle`.
"""

from __future__ import annotations

import importlib.util
import math
import shutil
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from agent.logsetup import get_logger

if TYPE_CHECKING:
    from agent import protocol as wire
    from agent.commands import CommandContext, CommandResult

__all__ = ["DEFAULT_TIMEOUT_S", "MAX_TIMEOUT_S", "Rounds", "parse_superlink"]

log = get_logger("edgefleet.agent.supernode")

DEFAULT_TIMEOUT_S: Final = 3600.0
MAX_TIMEOUT_S: Final = 7 * 24 * 3600.0
_POLL_S: Final = 0.5
_REPLY_GRACE_S: Final = 3.0

_SKEW_AHEAD_S: Final = 5.0  # flwr 1.41: a signed Fleet request may be this far ahead of the SuperLink's clock
_SKEW_BEHIND_S: Final = 305.0  # ... and this far behind
_LEAVE_WAIT_S: Final = 20.0  # a leave waits this long for the SuperNode to stop (it is SIGKILLed after 10 s)
_ENDED_KEPT: Final = 32


@dataclass
class _Participation:
    round_id: str
    leave: threading.Event = field(default_factory=threading.Event)  # the control plane ended the round
    done: threading.Event = field(default_factory=threading.Event)  # the SuperNode is stopped


def parse_superlink(value: object) -> str:
    """Validate ``host:port`` (``[v6]:port`` too); returns it unchanged."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError("'superlink' must be 'host:port'")
    host, sep, port = value.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"'superlink' must be 'host:port', got {value!r}")
    if any(c.isspace() or c in "'\"/" for c in host):
        raise ValueError(f"'superlink' has an invalid host: {value!r}")
    return value.strip()


_LOOPBACK: Final = frozenset({"127.0.0.1", "localhost", "::1"})


def _host_of(address: str) -> str:
    return address.rpartition(":")[0].strip("[]").lower()


def own_superlink_hosts(settings: Any) -> frozenset[str]:
    """The hosts whose SuperLink this device may join: its ``superlink_host``, else its control plane's host, else
    its broker's (the loopback names count as one)."""
    from urllib.parse import urlsplit

    host = settings.superlink_host
    if not host and settings.controlplane_url:
        host = urlsplit(settings.controlplane_url).hostname
    if not host:
        host = settings.broker.host
    host = str(host).strip("[]").lower()
    return _LOOPBACK if host in _LOOPBACK else frozenset({host})


def _text_arg(value: object, name: str) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int) or not str(value).strip():
        raise ValueError(f"'{name}' must be a non-empty string")
    text = str(value).strip()
    if len(text) > 200 or any(c in text for c in "'\"\n\r"):
        raise ValueError(f"'{name}' is too long or contains quotes or line breaks")
    return text


def _timeout_arg(value: object) -> float:
    if value is None:
        return DEFAULT_TIMEOUT_S
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"'timeout_s' must be a positive number, got {value!r}")
    return min(float(value), MAX_TIMEOUT_S)


class Rounds:
    """One agent's part in federated rounds: the round it takes part in (one at a time) and the rounds the
    control plane ended (a late invitation to one of them is refused). :meth:`handle` is the ``join_round``
    handler; each agent has its own ``Rounds``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active: _Participation | None = None
        self._ended: deque[str] = deque(maxlen=_ENDED_KEPT)

    @property
    def current_round(self) -> str | None:
        """The round this agent takes part in now, if any."""
        with self._lock:
            return self._active.round_id if self._active is not None else None

    def was_ended(self, round_id: str) -> bool:
        """Whether the control plane told this agent that ``round_id`` is over."""
        with self._lock:
            return round_id in self._ended

    def handle(self, ctx: CommandContext, command: wire.Command) -> CommandResult:
        args = command.args
        if args.get("leave") is True:
            return self._leave(ctx, args.get("round_id"))
        result: dict[str, Any] = {"round_id": str(args.get("round_id", "")), "joined": False,
                                  "participated": False}
        try:
            round_id = _text_arg(args.get("round_id"), "round_id")
            result["round_id"] = round_id
            superlink = parse_superlink(args.get("superlink"))
            own = own_superlink_hosts(ctx.settings)
            if _host_of(superlink) not in own:
                raise ValueError(
                    f"superlink {superlink} is not this device's control plane ({', '.join(sorted(own))}): a "
                    f"device joins only the SuperLink of the control plane it was enrolled with (its agent's "
                    f"--superlink-host names another)")
            timeout_s = _timeout_arg(args.get("timeout_s"))
            if "data_path" in args:
                raise ValueError("data_path is not accepted: a device trains on its own data (its agent's "
                                 "--train-data / EDGEFLEET_TRAIN_DATA), never on a file a command names")
            data_path = ctx.settings.train_data_path or ctx.settings.data_dir / "data" / "partition.npz"
            tls = args.get("tls", False)
            if not isinstance(tls, bool):
                raise ValueError("'tls' must be true or false")  # noqa: TRY004 - one error type for bad args
        except ValueError as exc:
            return False, f"bad join_round args: {exc}", result
        ca_file = _path_setting(ctx.settings, "ca_file")
        key_file = _path_setting(ctx.settings, "supernode_auth_key_file")
        if not tls and ca_file is not None and _host_of(superlink) not in _LOOPBACK:
            return False, (f"refusing a plaintext SuperLink at {superlink}: this agent has a fleet CA, its "
                           f"control plane speaks TLS beyond loopback"), result
        if ts := getattr(command, "ts", 0.0):
            # The command's timestamp is the control plane's clock when it sent it (MQTT delivery adds a little).
            result["clock_skew_s"] = round(time.time() - float(ts), 1)

        profile = ctx.settings.profile
        if not profile.training.allowed:
            return False, f"firmware profile {profile.name!r} may not train", result
        if importlib.util.find_spec("flwr") is None:
            return False, "flwr is not installed on this device (install edgefleet[train])", result
        from agent.supernode import FlowerNotInstalled, flower_executable

        try:
            flower_executable("flower-supernode")
        except FlowerNotInstalled as exc:
            return False, str(exc), result
        if not data_path.is_file():
            return False, (f"no training data at {data_path} (set it with edgefleet agent run --train-data or "
                           f"EDGEFLEET_TRAIN_DATA)"), result

        deadline = time.monotonic() + _LEAVE_WAIT_S
        while True:
            with self._lock:
                if round_id in self._ended:
                    return False, f"round {round_id} is already over (the control plane ended it)", result
                current = self._active
                if current is None:
                    participation = self._active = _Participation(round_id)
                    break
                if current.round_id == round_id:
                    return False, f"already taking part in round {round_id} (a repeated invitation)", result
                if not current.leave.is_set():
                    return False, f"already taking part in round {current.round_id}", result
            # The previous round is being left (its SuperNode stopping): this invitation waits for that.
            if not current.done.wait(max(0.0, deadline - time.monotonic())):
                return False, f"still leaving round {current.round_id} after {_LEAVE_WAIT_S:g}s", result
        try:
            result["joined"] = True
            return _take_part(ctx, superlink, round_id, timeout_s, data_path, result, participation.leave,
                              tls, ca_file if tls else None, key_file if tls else None)
        finally:
            with self._lock:
                self._active = None
            participation.done.set()

    def _leave(self, ctx: CommandContext, raw_round_id: object) -> CommandResult:
        """The control plane ended the round: stop its SuperNode now (and wait, up to a bound, until it is)."""
        try:
            round_id = _text_arg(raw_round_id, "round_id")
        except ValueError as exc:
            return False, f"bad join_round args: {exc}", {"round_id": str(raw_round_id or ""), "left": False}
        with self._lock:
            self._ended.append(round_id)
            current = self._active
            if current is None or current.round_id != round_id:
                return True, None, {"round_id": round_id, "left": False}  # not (or no longer) in it: nothing to do
            current.leave.set()
        log.info("round.leaving", device_id=ctx.device_id, round_id=round_id)
        if not current.done.wait(_LEAVE_WAIT_S):
            return False, f"the SuperNode of round {round_id} did not stop within {_LEAVE_WAIT_S:g}s", \
                {"round_id": round_id, "left": False}
        return True, None, {"round_id": round_id, "left": True}


def _path_setting(settings: Any, name: str) -> Path | None:
    """An optional file setting of the agent (``ca_file``, ``supernode_auth_key_file``): None if unset or
    missing."""
    value = getattr(settings, name, None)
    if not value:
        return None
    path = Path(value)
    return path if path.is_file() else None


def _skew_reason(result: dict[str, Any]) -> str | None:
    skew = result.get("clock_skew_s")
    if isinstance(skew, int | float) and not -_SKEW_BEHIND_S < skew < _SKEW_AHEAD_S:
        return (f"clock skew: this device's clock is {skew:+.0f} s off the control plane's (the SuperLink accepts "
                f"-{_SKEW_BEHIND_S:g} s to +{_SKEW_AHEAD_S:g} s; run NTP on the device)")
    return None


def _take_part(
    ctx: CommandContext, superlink: str, round_id: str, timeout_s: float, data_path: Path, result: dict[str, Any],
    leave: threading.Event, tls: bool = False, ca_file: Path | None = None, key_file: Path | None = None,
) -> CommandResult:
    from agent.round_status import read_status
    from agent.supernode import SuperNodeProcess

    work = ctx.settings.data_dir / "round"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    status_path = work / "status.json"
    node = SuperNodeProcess(
        superlink,
        device_id=ctx.device_id,
        data_path=data_path,
        flwr_home=work / "flwr-home",
        round_id=round_id,
        status_path=status_path,
        log_path=ctx.settings.data_dir / "supernode.log",
        max_wait_time_s=timeout_s,
        tls=tls,
        root_certificates=ca_file,
        auth_key_file=key_file,
    )
    bound = log.bind(device_id=ctx.device_id, round_id=round_id, superlink=superlink)
    started = time.monotonic()
    status: dict[str, Any] = {}
    outcome = "timeout"
    node.start()
    bound.info("round.joined", pid=node.pid)
    try:
        while True:
            current = read_status(status_path)
            if current.get("round_id") in (round_id, "", None) and current:
                status = current
            if status.get("finished"):
                outcome = "finished"
                # The ClientApp wrote the file before its reply left: give the SuperNode a moment to deliver
                # it (a reply cut off half-way makes the ServerApp wait for it).
                node.wait(_REPLY_GRACE_S)
                break
            if leave.is_set():
                outcome = "ended"
                break
            if not node.alive:
                outcome = "exited"
                break
            if time.monotonic() - started >= timeout_s:
                outcome = "timeout"
                break
            if ctx.wait_for_stop(_POLL_S):
                outcome = "stopped"
                break
    finally:
        code = node.returncode
        node.stop()
        shutil.rmtree(work, ignore_errors=True)
    trained = [int(r) for r in status.get("trained", [])]
    result.update(
        participated=bool(trained),
        trained_rounds=trained,
        run_status=status.get("status"),
        duration_s=round(time.monotonic() - started, 3),
    )
    bound.info("round.left", outcome=outcome, trained_rounds=trained)
    if outcome == "finished":
        return True, None, result
    if outcome == "exited":
        if not trained and (skew := _skew_reason(result)):
            return False, skew, result
        return False, f"the SuperNode exited with code {code} (see {ctx.settings.data_dir / 'supernode.log'})", result
    if outcome == "stopped":
        return False, "the agent is stopping", result
    if outcome == "ended":
        return False, f"the control plane ended round {round_id} before its run told this device", result
    return False, f"the round did not finish within {timeout_s:g}s", result
