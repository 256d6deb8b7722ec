"""federated.signing.Signer: the key on disk and signatures that agent.manifest verifies."""

from __future__ import annotations

import base64
import os
import stat
import threading
from pathlib import Path

import msgspec
import pytest

from agent.manifest import (
    Golden,
    ManifestError,
    ModelManifest,
    ModelSource,
    Release,
    SignedRelease,
    decode_signed,
    decode_signed_release,
    key_id,
    verify_release,
    verify_signature,
)
from federated.signing import PRIVATE_KEY_FILE, PUBLIC_KEY_FILE, Signer, SigningKeyError

pytest.importorskip("cryptography")


def _manifest(**changes: object) -> ModelManifest:
    manifest = ModelManifest(
        model_version="digits-3",
        task="digits",
        variant="fp32",
        file_name="digits-3-fp32.tflite",
        sha256="0" * 64,
        size_bytes=1234,
        runtimes={"ai-edge-litert": "2.3.0"},
        source=ModelSource(kind="round", id="round-3"),
        metrics={"accuracy": 0.97, "loss": 0.1},
        input_scale=1 / 16,
        golden=Golden(input=[[0.0, 0.5]], output=[[1.0, -1.0]], tolerance=1e-4),
        created_at="2026-11-30T12:00:00+00:00",
    )
    return msgspec.structs.replace(manifest, **changes)


@pytest.fixture(name="signer")
def fx_signer(tmp_path: Path) -> Signer:
    return Signer(tmp_path / "keys")


def test_key_is_created_on_first_use_only(signer: Signer) -> None:
    # Assert: constructing a signer touches nothing
    assert not signer.key_dir.exists()

    # Execute
    raw = signer.public_key_raw

    # Assert
    private = signer.key_dir / PRIVATE_KEY_FILE
    public = signer.key_dir / PUBLIC_KEY_FILE
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert private.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert len(raw) == 32
    assert base64.b64decode(public.read_text().strip(), validate=True) == raw
    assert signer.public_key_b64 == public.read_text().strip()
    assert signer.key_id == key_id(raw)
    assert sorted(p.name for p in signer.key_dir.iterdir()) == [PRIVATE_KEY_FILE, PUBLIC_KEY_FILE]


def test_key_is_kept_across_instances(signer: Signer) -> None:
    # Prepare
    first = signer.public_key_raw
    (signer.key_dir / PUBLIC_KEY_FILE).unlink()

    # Execute
    again = Signer(signer.key_dir)

    # Assert
    assert again.public_key_raw == first
    assert (signer.key_dir / PUBLIC_KEY_FILE).read_text().strip() == again.public_key_b64  # rewritten


def test_concurrent_first_use_agrees_on_one_key(tmp_path: Path) -> None:
    # Prepare
    signers = [Signer(tmp_path / "keys") for _ in range(4)]
    barrier = threading.Barrier(len(signers))
    keys: list[bytes] = []

    def use(s: Signer) -> None:
        barrier.wait()
        keys.append(s.public_key_raw)

    threads = [threading.Thread(target=use, args=(s,)) for s in signers]

    # Execute
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)

    # Assert
    assert len(keys) == 4 and len(set(keys)) == 1
    assert Signer(tmp_path / "keys").public_key_raw == keys[0]
    assert not [p for p in (tmp_path / "keys").iterdir() if p.name.startswith(".")]  # no temporary file left


def test_signed_manifest_verifies_and_round_trips(signer: Signer) -> None:
    # Prepare
    manifest = _manifest()

    # Execute
    signed = signer.sign(manifest)
    decoded = decode_signed(msgspec.json.encode(signed))

    # Assert
    assert signed.key_id == signer.key_id
    assert verify_signature(decoded, signer.public_key_raw) == manifest


def test_changed_manifest_fails_verification(signer: Signer) -> None:
    # Prepare
    signed = signer.sign(_manifest())
    tampered = msgspec.structs.replace(signed, manifest=_manifest(sha256="1" * 64))

    # Execute / Assert
    with pytest.raises(ManifestError, match="bad signature"):
        verify_signature(tampered, signer.public_key_raw)


def test_manifest_signed_by_another_key_fails(signer: Signer, tmp_path: Path) -> None:
    # Prepare
    intruder = Signer(tmp_path / "other-keys")
    signed = intruder.sign(_manifest())
    disguised = msgspec.structs.replace(signed, key_id=signer.key_id)  # claims to come from the trusted key

    # Execute / Assert
    with pytest.raises(ManifestError, match="this device trusts"):
        verify_signature(signed, signer.public_key_raw)
    with pytest.raises(ManifestError, match="bad signature"):
        verify_signature(disguised, signer.public_key_raw)


def _release(**changes: object) -> Release:
    release = Release(release=3, model_version="digits-3", variant="fp32", task="digits",
                      device_classes=["raspberry-pi-5"], deployment_id=7, issued_at=1_800_000_000,
                      expires_at=1_800_003_600, artifact=_manifest())
    return msgspec.structs.replace(release, **changes)


def test_signed_release_verifies_and_round_trips(signer: Signer) -> None:
    # Execute
    signed = signer.sign_release(_release(rollback=True, rollback_from=5))
    decoded = decode_signed_release(msgspec.json.encode(signed))

    # Assert
    assert verify_release(decoded, signer.public_key_raw) == _release(rollback=True, rollback_from=5)


@pytest.mark.parametrize("change", [{"release": 4}, {"expires_at": 1_900_000_000}, {"rollback": True},
                                    {"device_classes": ["raspberry-pi-5", "coral-dev-board"]},
                                    {"deployment_id": 8}, {"task": "kws"}])
def test_changed_release_fails_verification(signer: Signer, change: dict[str, object]) -> None:
    # Prepare
    signed = signer.sign_release(_release())
    tampered = msgspec.structs.replace(signed, release=_release(**change))

    # Execute / Assert
    with pytest.raises(ManifestError, match="bad signature"):
        verify_release(tampered, signer.public_key_raw)


def test_a_build_signature_is_no_release_signature(signer: Signer) -> None:
    # Prepare: a release carrying the signature of its own artifact's build manifest
    build = signer.sign(_manifest())
    forged = SignedRelease(release=_release(), signature=build.signature, key_id=build.key_id)

    # Execute / Assert: refused as a release, and a build manifest does not decode as one
    with pytest.raises(ManifestError, match="bad signature"):
        verify_release(forged, signer.public_key_raw)
    with pytest.raises(ManifestError, match="a build manifest, not a release"):
        decode_signed_release(msgspec.json.encode(build))


def test_release_of_another_artifact_is_refused(signer: Signer) -> None:
    # Prepare: validly signed, but the embedded artifact is another version's
    signed = signer.sign_release(_release(artifact=_manifest(model_version="digits-1")))

    # Execute / Assert
    with pytest.raises(ManifestError, match="its artifact for digits-1"):
        verify_release(signed, signer.public_key_raw)


@pytest.mark.skipif(os.name != "posix", reason="POSIX file permissions")
def test_key_readable_by_others_is_refused(signer: Signer) -> None:
    # Prepare
    _ = signer.key_id
    (signer.key_dir / PRIVATE_KEY_FILE).chmod(0o644)

    # Execute / Assert
    with pytest.raises(SigningKeyError, match="chmod 600"):
        Signer(signer.key_dir).sign(_manifest())


def test_garbage_key_file_is_refused(tmp_path: Path) -> None:
    # Prepare
    key_dir = tmp_path / "keys"
    key_dir.mkdir()
    fd = os.open(key_dir / PRIVATE_KEY_FILE, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"not a key")
    os.close(fd)

    # Execute / Assert
    with pytest.raises(SigningKeyError, match="not a readable unencrypted PEM"):
        _ = Signer(key_dir).public_key_raw
