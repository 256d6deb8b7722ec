"""The device's trust store: which model-signing keys it accepts, and the signing-key rotation commands.

``<data_dir>/trust.json`` (written atomically, 0600)::

    {"version": 1, "rotation": 2,
     "keys":    {"<key id>": {"public_key": "<base64>", "rotation": 2}},
     "retired": {"<key id>": 1}}

``rotation`` is the highest rotation number the device has accepted a key transition for: a statement with a
number not above it is a replay and is refused (unless it is exactly the one already applied, which a re-sent
command repeats: acked ok again, nothing changes). Each trusted key records the rotation that introduced it (0:
the enrolment key); ``retired`` maps each retired key id to the rotation that retired it, so that a release signed
by it is refused with a reason that names it.

The store starts from the enrolment key (``AgentSettings.signing_key``). The agent's configuration keeps naming
that key after it is retired, so a configured key that the store already knows, trusted or retired, adds nothing;
a configured key the store has never seen is trusted too (the device was re-enrolled by whoever writes its
configuration, the same authority as this file).

Commands (quick, answered in the agent's loop, in order, so a retirement sent right after its transition finds the
new key trusted): ``trust_signing_key`` takes a :class:`agent.manifest.SignedKeyTransition` signed by a key the
device trusts now; ``retire_signing_key`` a :class:`agent.manifest.SignedKeyRetirement` signed by the new key of
the rotation it ends. Both ack with ``trusted_key_ids``, ``retired_key_ids`` and ``rotation``: the control plane
stores the ack's result as what the device trusts.

The active model is not re-verified against the trust store at start-up (the start-up pick checks the sha256 the
pointer recorded when the release was verified and installed), so retiring the key that signed it does not stop it.
"""

from __future__ import annotations

import base64
import json
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import msgspec

from agent import protocol as wire
from agent.fsutil import write_atomic
from agent.logsetup import get_logger
from agent.manifest import (
    ManifestError,
    SignedKeyRetirement,
    SignedKeyTransition,
    TrustedKeys,
    key_id,
    verify_key_retirement,
    verify_key_transition,
)

if TYPE_CHECKING:
    from agent.commands import CommandContext, CommandResult

__all__ = ["TRUST_FILE", "TrustStore", "TrustStoreError", "apply_key_command", "handle_key_command",
           "trust_store_for"]

log = get_logger("edgefleet.agent.trust")

TRUST_FILE: Final = "trust.json"
_VERSION: Final = 1


class TrustStoreError(ValueError):
    """A key statement was refused (the message says why), or the trust store file is unreadable."""


class TrustStore:
    """The keys one device trusts, kept in ``path`` and seeded with its enrolment key (see the module docstring).

    Safe to use from several threads of one agent (the loop answers rotation commands, a deployment verifies).
    """

    def __init__(self, path: Path, enrolment_key: bytes | None) -> None:
        self.path = Path(path)
        self._enrolment_key = enrolment_key
        self._lock = threading.Lock()

    # -- reading -----------------------------------------------------------------------------------------------
    def _load(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            data = {"version": _VERSION, "rotation": 0, "keys": {}, "retired": {}}
        except (OSError, ValueError) as exc:
            # Never fall back to "trust the enrolment key": that would undo a retirement.
            raise TrustStoreError(f"unreadable trust store {self.path}: {exc}") from exc
        if not isinstance(data, dict) or not isinstance(data.get("keys"), dict) \
                or not isinstance(data.get("retired"), dict) or not isinstance(data.get("rotation"), int):
            raise TrustStoreError(f"malformed trust store {self.path}")
        enrolment = self._enrolment_key
        if enrolment is not None:
            kid = key_id(enrolment)
            if kid not in data["keys"] and kid not in data["retired"]:
                data["keys"][kid] = {"public_key": base64.b64encode(enrolment).decode("ascii"), "rotation": 0}
        return data

    def _save(self, data: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, json.dumps(data, sort_keys=True, indent=1).encode(), mode=0o600)

    def trusted(self) -> TrustedKeys:
        """The keys signatures are checked against now (and the retired ids, for the refusal's reason)."""
        with self._lock:
            return _trusted(self._load())

    def summary(self) -> dict[str, Any]:
        """What the device reports in its acks: trusted and retired key ids and the highest rotation accepted."""
        with self._lock:
            return self._summary(self._load())

    @staticmethod
    def _summary(data: dict[str, Any]) -> dict[str, Any]:
        return {"trusted_key_ids": sorted(data["keys"]), "retired_key_ids": sorted(data["retired"]),
                "rotation": data["rotation"]}

    # -- changing ----------------------------------------------------------------------------------------------
    def apply_transition(self, signed: SignedKeyTransition) -> dict[str, Any]:
        """Trust the statement's new key. TrustStoreError when it is not signed by a trusted key (the old key it
        names), or is not newer than every transition accepted before."""
        with self._lock:
            data = self._load()
            trusted = _trusted(data)
            statement = signed.statement
            known = data["keys"].get(statement.new_key_id)
            if known is not None and known.get("rotation") == statement.number == data["rotation"]:
                return self._summary(data)  # the latest statement again (a re-sent command): nothing changes
            try:
                statement, new_key = verify_key_transition(signed, trusted)
            except ManifestError as exc:
                raise TrustStoreError(f"key transition refused: {exc}") from exc
            if statement.number <= data["rotation"]:
                raise TrustStoreError(f"key transition refused: rotation {statement.number} is not newer than "
                                      f"rotation {data['rotation']}, which this device already accepted (replay)")
            if statement.new_key_id in data["retired"]:
                raise TrustStoreError(f"key transition refused: key {statement.new_key_id} was retired")
            data["keys"][statement.new_key_id] = {"public_key": base64.b64encode(new_key).decode("ascii"),
                                                  "rotation": statement.number}
            data["rotation"] = statement.number
            self._save(data)
            return self._summary(data)

    def apply_retirement(self, signed: SignedKeyRetirement) -> dict[str, Any]:
        """Drop the statement's retired key. TrustStoreError unless signed by the (trusted) new key of the
        rotation it names."""
        with self._lock:
            data = self._load()
            statement = signed.statement
            if data["retired"].get(statement.retired_key_id) == statement.number \
                    and statement.new_key_id in data["keys"]:
                return self._summary(data)  # already applied
            try:
                statement = verify_key_retirement(signed, _trusted(data))
            except ManifestError as exc:
                raise TrustStoreError(f"key retirement refused: {exc}") from exc
            introduced = data["keys"][statement.new_key_id].get("rotation")
            if introduced != statement.number:
                raise TrustStoreError(f"key retirement refused: it is for rotation {statement.number}, key "
                                      f"{statement.new_key_id} came with rotation {introduced}")
            data["keys"].pop(statement.retired_key_id, None)
            data["retired"][statement.retired_key_id] = statement.number
            self._save(data)
            return self._summary(data)


def _trusted(data: dict[str, Any]) -> TrustedKeys:
    return TrustedKeys({kid: base64.b64decode(entry["public_key"]) for kid, entry in data["keys"].items()},
                       {kid: int(number) for kid, number in data["retired"].items()})


def trust_store_for(data_dir: Path, enrolment_key: bytes | None) -> TrustStore:
    """The trust store of the agent whose data directory is ``data_dir``."""
    return TrustStore(Path(data_dir) / TRUST_FILE, enrolment_key)


def handle_key_command(ctx: CommandContext, command: wire.Command) -> CommandResult:
    """``trust_signing_key`` / ``retire_signing_key``: ``(ok, reason, result)`` with what the device trusts."""
    settings = ctx.settings
    return apply_key_command(trust_store_for(settings.data_dir, settings.signing_key), command, ctx.device_id)


def apply_key_command(store: TrustStore, command: wire.Command, device_id: str | None = None) -> CommandResult:
    """A signing-key command applied to ``store``: ``(ok, reason, result)``, the result saying what the device
    trusts afterwards (also when the statement is refused)."""
    bound = log.bind(device_id=device_id, command_id=command.command_id)
    try:
        if command.kind == wire.CommandKind.TRUST_SIGNING_KEY:
            result = store.apply_transition(_statement(command, SignedKeyTransition))
        elif command.kind == wire.CommandKind.RETIRE_SIGNING_KEY:
            result = store.apply_retirement(_statement(command, SignedKeyRetirement))
        else:
            return False, f"not a signing-key command: {command.kind!r}", {}
    except TrustStoreError as exc:
        bound.warning("trust.refused", kind=command.kind, reason=str(exc))
        try:
            summary = store.summary()
        except TrustStoreError:
            summary = {}
        return False, str(exc), summary
    bound.info("trust.changed", kind=command.kind, **result)
    return True, None, result


def _statement(command: wire.Command, kind: type[SignedKeyTransition | SignedKeyRetirement]) -> Any:
    try:
        return msgspec.convert(command.args.get("statement"), kind)
    except msgspec.ValidationError as exc:
        raise TrustStoreError(f"malformed {command.kind} statement: {exc}") from exc
