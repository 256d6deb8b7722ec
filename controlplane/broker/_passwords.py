"""Password hashes for broker accounts (and device credentials in the registry).

Format (self-describing, ``$``-separated, base64 without padding)::

    $pbkdf2-sha512$<iterations>$<salt>$<hash>

Standard library only: the embedded broker plugin and the registry share it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from typing import Final

__all__ = ["DEFAULT_ITERATIONS", "hash_password", "verify_password"]

_SCHEME: Final = "pbkdf2-sha512"
DEFAULT_ITERATIONS: Final = 100_000
_SALT_BYTES: Final = 16
_HASH_BYTES: Final = 64  # the digest size of sha512
# A stored hash cannot make verification arbitrarily expensive (a corrupt or hostile file).
_MAX_ITERATIONS: Final = 10_000_000


def _b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _b64decode(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def hash_password(password: str, *, iterations: int = DEFAULT_ITERATIONS) -> str:
    """Hash ``password`` with PBKDF2-HMAC-SHA512 and a random 16-byte salt."""
    if not isinstance(password, str):
        raise TypeError("password must be a str")
    if not 1 <= iterations <= _MAX_ITERATIONS:
        raise ValueError(f"iterations must be between 1 and {_MAX_ITERATIONS}")
    salt = os.urandom(_SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations, _HASH_BYTES)
    return f"${_SCHEME}${iterations}${_b64encode(salt)}${_b64encode(digest)}"


def verify_password(password: str, hashed: str) -> bool:
    """Whether ``password`` matches ``hashed`` (from :func:`hash_password`).

    A malformed or foreign hash never matches; this function does not raise for bad input.
    """
    if not isinstance(password, str) or not isinstance(hashed, str):
        return False
    parts = hashed.split("$")
    # "", scheme, iterations, salt, hash
    if len(parts) != 5 or parts[0] != "" or parts[1] != _SCHEME:
        return False
    try:
        iterations = int(parts[2])
        salt = _b64decode(parts[3])
        expected = _b64decode(parts[4])
    except (ValueError, binascii.Error):
        return False
    if not 1 <= iterations <= _MAX_ITERATIONS or not salt or not expected:
        return False
    try:
        secret = password.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: hash_password could not have produced a match
        return False
    actual = hashlib.pbkdf2_hmac("sha512", secret, salt, iterations, len(expected))
    return hmac.compare_digest(actual, expected)
