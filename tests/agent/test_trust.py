"""The device's trust store and the signing-key rotation commands (agent.trust), with a real control-plane signer
(federated.signing.Signer): statements accepted only from trusted keys and in order, forged and replayed ones
refused, releases signed by a retired key refused with a reason naming it, the store kept across restarts."""

from __future__ import annotations

import base64
import os
import stat
import time
import uuid
from pathlib import Path
from typing import Any

import msgspec
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import protocol as wire
from agent._errors import DeployError
from agent._verify import verify_signed_release
from agent.manifest import (
    Golden,
    KeyTransition,
    ModelManifest,
    ModelSource,
    Release,
    SignedKeyRetirement,
    SignedKeyTransition,
    key_id,
    key_retirement_bytes,
    key_transition_bytes,
)
from agent.trust import TrustStoreError, apply_key_command, trust_store_for
from federated.signing import PRIVATE_KEY_FILE, Signer, SigningKeyError


def _release() -> Release:
    artifact = ModelManifest(model_version="m1", task="digits", variant="fp32", file_name="m1-fp32.tflite",
                             sha256="0" * 64, size_bytes=10, runtimes={"ai-edge-litert": "2.3.0"},
                             source=ModelSource(kind="round", id="1"),
                             golden=Golden(input=[[0.0]], output=[[0.0]], tolerance=1.0))
    now = int(time.time())
    return Release(release=1, model_version="m1", variant="fp32", task="digits", device_classes=["raspberry-pi-5"],
                   deployment_id=1, issued_at=now, expires_at=now + 600, artifact=artifact)


def _command(kind: wire.CommandKind, statement: Any) -> wire.Command:
    return wire.Command(command_id=uuid.uuid4().hex, kind=kind,
                        args={"rotation": statement.statement.number, "statement": msgspec.to_builtins(statement)})


def test_a_device_moves_to_the_new_key_and_refuses_the_retired_one_after_a_restart(tmp_path: Path) -> None:
    # Prepare: a device enrolled with the control plane's first key, a release signed by it
    signer = Signer(tmp_path / "keys")
    first = signer.public_key_raw
    old_release = msgspec.json.encode(signer.sign_release(_release()))
    store = trust_store_for(tmp_path / "device", first)
    assert verify_signed_release(old_release, store.trusted()).release == 1

    # Execute: the rotation's two statements
    rotation = signer.begin_rotation()
    ok, reason, during = apply_key_command(store, _command(wire.CommandKind.TRUST_SIGNING_KEY, rotation.transition))
    assert ok, reason
    rotation = signer.complete_rotation()
    new_release = msgspec.json.encode(signer.sign_release(_release()))
    ok, reason, after = apply_key_command(store, _command(wire.CommandKind.RETIRE_SIGNING_KEY, rotation.retirement))
    assert ok, reason

    # Assert: both keys while the rotation ran, then only the new one; what the old key signs is refused
    assert during == {"trusted_key_ids": sorted([key_id(first), rotation.new_key_id]), "retired_key_ids": [],
                      "rotation": 1}
    assert after == {"trusted_key_ids": [rotation.new_key_id], "retired_key_ids": [key_id(first)], "rotation": 1}
    restarted = trust_store_for(tmp_path / "device", first)  # the agent starts again, configured as enrolled
    assert verify_signed_release(new_release, restarted.trusted()).release == 1
    with pytest.raises(DeployError) as refused:
        verify_signed_release(old_release, restarted.trusted())
    assert refused.value.stage == "signature"
    assert f"signed by retired key {key_id(first)}" in refused.value.reason, refused.value.reason
    mode = stat.S_IMODE(os.stat(tmp_path / "device" / "trust.json").st_mode)
    assert mode == 0o600


def test_an_unreadable_trust_store_is_refused_not_replaced_by_the_enrolment_key(tmp_path: Path) -> None:
    # Prepare: a damaged trust store (which may have retired the enrolment key)
    signer = Signer(tmp_path / "keys")
    (tmp_path / "device").mkdir()
    (tmp_path / "device" / "trust.json").write_text("{not json")
    store = trust_store_for(tmp_path / "device", signer.public_key_raw)
    # Execute / Assert
    with pytest.raises(TrustStoreError, match="unreadable trust store"):
        store.trusted()
    ok, reason, _ = apply_key_command(store, _command(wire.CommandKind.TRUST_SIGNING_KEY,
                                                      signer.begin_rotation().transition))
    assert not ok and "unreadable trust store" in (reason or "")


def test_forged_and_replayed_statements_are_refused(tmp_path: Path) -> None:
    # Prepare: a control plane's key through two rotations, a device enrolled with the first key
    signer = Signer(tmp_path / "keys")
    first = signer.public_key_raw
    signer.begin_rotation()
    one = signer.complete_rotation()
    two = signer.begin_rotation()
    store = trust_store_for(tmp_path / "device", first)

    def answer(kind: wire.CommandKind, statement: Any) -> tuple[bool, str | None, dict[str, Any]]:
        command = wire.Command(command_id=uuid.uuid4().hex, kind=kind,
                               args={"rotation": statement.statement.number,
                                     "statement": msgspec.to_builtins(statement)})
        return apply_key_command(store, command, "rot-x")

    # Execute / Assert: rotation 2's statement is signed by key 1, which the device does not know yet
    ok, reason, _ = answer(wire.CommandKind.TRUST_SIGNING_KEY, two.transition)
    assert not ok and f"signed by key {one.new_key_id}" in (reason or ""), reason
    # ... a statement signed by an outsider's key, claiming to come from the trusted key
    outsider = Ed25519PrivateKey.generate()
    outsider_public = outsider.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    forged = KeyTransition(number=5, new_public_key=base64.b64encode(outsider_public).decode(),
                           new_key_id=key_id(outsider_public), old_key_id=key_id(first), issued_at=int(time.time()))
    signature = base64.b64encode(outsider.sign(key_transition_bytes(forged))).decode()
    for claimed in (key_id(outsider_public), key_id(first)):
        ok, reason, result = answer(wire.CommandKind.TRUST_SIGNING_KEY,
                                    SignedKeyTransition(statement=forged, signature=signature, key_id=claimed))
        assert not ok, claimed
        assert "signed by key" in (reason or "") or "bad signature" in (reason or ""), reason
        assert result["trusted_key_ids"] == [key_id(first)]
    # ... a retirement signed by the key it retires, not the new one
    assert one.retirement is not None
    first_private = serialization.load_pem_private_key((signer.key_dir / PRIVATE_KEY_FILE).read_bytes(), None)
    assert isinstance(first_private, Ed25519PrivateKey)
    by_old = SignedKeyRetirement(
        statement=one.retirement.statement, key_id=key_id(first),
        signature=base64.b64encode(first_private.sign(key_retirement_bytes(one.retirement.statement))).decode())
    ok, reason, _ = answer(wire.CommandKind.RETIRE_SIGNING_KEY, by_old)
    assert not ok and f"must be signed by the new key {one.new_key_id}" in (reason or ""), reason
    # the genuine statements, in order, are accepted
    assert answer(wire.CommandKind.TRUST_SIGNING_KEY, one.transition)[0]
    assert answer(wire.CommandKind.RETIRE_SIGNING_KEY, one.retirement)[0]
    assert answer(wire.CommandKind.TRUST_SIGNING_KEY, two.transition)[0]
    assert answer(wire.CommandKind.TRUST_SIGNING_KEY, two.transition)[0]  # a re-send: acked again, no change
    # ... and the older statement replayed is refused (its signer, the first key, is retired by now)
    ok, reason, result = answer(wire.CommandKind.TRUST_SIGNING_KEY, one.transition)
    assert not ok and f"retired key {key_id(first)}" in (reason or ""), reason
    assert result["rotation"] == 2
    assert sorted(result["trusted_key_ids"]) == sorted([one.new_key_id, two.new_key_id])
    # ... a retirement that was not signed by the new key of its rotation
    bad = SignedKeyRetirement(statement=msgspec.structs.replace(one.retirement.statement, number=2),
                              signature=one.retirement.signature, key_id=one.retirement.key_id)
    ok, reason, _ = answer(wire.CommandKind.RETIRE_SIGNING_KEY, bad)
    assert not ok and "bad signature" in (reason or ""), reason




def test_the_signer_keeps_every_key_and_signs_with_the_old_one_until_completion(tmp_path: Path) -> None:
    # Prepare
    signer = Signer(tmp_path / "keys")
    first_id = signer.key_id  # creates the first key
    first_pem = (signer.key_dir / PRIVATE_KEY_FILE).read_bytes()

    # Execute
    rotation = signer.begin_rotation()
    with pytest.raises(SigningKeyError, match="rotation 1 is in progress"):
        signer.begin_rotation()
    during = signer.sign_release(_release())
    another = Signer(tmp_path / "keys")  # e.g. the build pipeline's process: reads the same rotation state
    signer.complete_rotation()
    after = another.sign_release(_release())

    # Assert: the old key signs until completion, then the new one, in every process; no key file replaced
    assert (during.key_id, after.key_id) == (first_id, rotation.new_key_id)
    assert (signer.key_dir / PRIVATE_KEY_FILE).read_bytes() == first_pem
    for name in (PRIVATE_KEY_FILE, "signing-key.1.pem", "rotation.json"):
        assert stat.S_IMODE(os.stat(signer.key_dir / name).st_mode) == 0o600, name
    with pytest.raises(SigningKeyError, match="no signing-key rotation is in progress"):
        signer.complete_rotation()
    # ... and a rotation key that went missing is an error, not a fresh key that no device trusts
    (signer.key_dir / "signing-key.1.pem").rename(tmp_path / "elsewhere.pem")
    with pytest.raises(SigningKeyError, match="the key of signing-key rotation 1 is missing"):
        Signer(tmp_path / "keys").sign_release(_release())
