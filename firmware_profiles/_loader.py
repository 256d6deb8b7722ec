"""Load and validate profile files; errors name the file and the field."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

import msgspec

from firmware_profiles._schema import ModelVariant, Profile, RuntimeName

__all__ = [
    "ProfileError",
    "ProfileNotFound",
    "get_profile",
    "load_profile",
    "load_profiles",
    "profile_dir",
    "variant_unsupported",
]


class ProfileError(Exception):
    """A profile file is missing, unreadable or invalid.

    ProfileError
    └── ProfileNotFound
    """

    def __init__(self, message: str, *, path: Path | None = None, field: str | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.field = field


class ProfileNotFound(ProfileError):
    """No profile of that name exists."""


_FIELD_RE = re.compile(r"\s*-\s*at `\$\.?([^`]*)`")
# msgspec names the *parent* object for these two errors; the field itself is in the message.
_NAMED_FIELD_RE = re.compile(r"(?:missing required|unknown) field `([^`]+)`")


def profile_dir() -> Path:
    """The directory of the profiles shipped with the package."""
    return Path(str(resources.files("firmware_profiles") / "data"))


def load_profile(path: Path) -> Profile:
    """Load one profile file.

    Raises
    ------
    ProfileError
        The message names the file and, for schema errors, the dotted field path.
    """
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ProfileError(f"{path}: cannot read profile file: {exc}", path=path) from exc
    try:
        profile = msgspec.toml.decode(raw, type=Profile)
    except msgspec.ValidationError as exc:
        field, reason = _field_of(str(exc))
        where = f" field '{field}':" if field else ""
        raise ProfileError(f"{path}:{where} {reason}", path=path, field=field) from exc
    except msgspec.DecodeError as exc:
        raise ProfileError(f"{path}: not valid TOML: {exc}", path=path) from exc
    except UnicodeDecodeError as exc:
        raise ProfileError(f"{path}: not valid TOML: not UTF-8 text: {exc}", path=path) from exc
    if profile.name != path.stem:
        raise ProfileError(
            f"{path}: field 'name': '{profile.name}' must match the file name '{path.stem}'",
            path=path,
            field="name",
        )
    for variant in profile.variants:
        why = variant_unsupported(profile.runtime.name, profile.runtime.version, variant)
        if why:
            raise ProfileError(f"{path}: field 'variants': {variant} is not allowed: {why}", path=path,
                               field="variants")
    return profile


def variant_unsupported(runtime: RuntimeName, version: str, variant: ModelVariant) -> str | None:
    """Why a runtime cannot be trusted with a model variant (measured), or None."""
    if runtime is RuntimeName.TFLITE_RUNTIME and version.startswith("2.14") and variant is ModelVariant.DYNAMIC_INT8:
        return ("tflite-runtime 2.14 cannot load PT2E dynamic-range models and returns wrong answers without an "
                "error on ai-edge-quantizer dynamic-range models")
    if runtime is RuntimeName.TFLITE_MICRO and variant is not ModelVariant.FULL_INT8:
        return "TFLite Micro runs full-integer models only"
    return None


def _field_of(message: str) -> tuple[str | None, str]:
    """The dotted field path a msgspec validation message points at, and the message without it."""
    match = _FIELD_RE.search(message)
    parent = match.group(1) if match else ""
    reason = _FIELD_RE.sub("", message).strip()
    named = _NAMED_FIELD_RE.search(reason)
    if named:
        parent = f"{parent}.{named.group(1)}" if parent else named.group(1)
    return parent or None, reason


def load_profiles(directory: Path | None = None) -> dict[str, Profile]:
    """All profiles in a directory (the shipped ones by default), by name."""
    directory = directory or profile_dir()
    return {p.name: p for p in (load_profile(f) for f in sorted(directory.glob("*.toml")))}


def get_profile(name: str, directory: Path | None = None) -> Profile:
    """One profile by name."""
    directory = directory or profile_dir()
    path = directory / f"{name}.toml"
    # A name is a file stem, never a path: "../x" or "a/b" must not reach outside the directory.
    if not name or len(name) > 128 or Path(name).name != name or not path.is_file():
        known = ", ".join(sorted(p.stem for p in directory.glob("*.toml"))) or "none"
        raise ProfileNotFound(f"unknown profile '{name}' (known: {known})", path=path)
    return load_profile(path)
