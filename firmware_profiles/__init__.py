"""Firmware profiles: the device classes of the fleet and what each may run (leaf package)."""

from firmware_profiles._loader import (
    ProfileError,
    ProfileNotFound,
    get_profile,
    load_profile,
    load_profiles,
    profile_dir,
    variant_unsupported,
)
from firmware_profiles._schema import (
    Accelerator,
    Hardware,
    ModelVariant,
    PowerSource,
    Profile,
    Runtime,
    RuntimeName,
    Telemetry,
    Training,
)

__all__ = [
    "Accelerator",
    "Hardware",
    "ModelVariant",
    "PowerSource",
    "Profile",
    "ProfileError",
    "ProfileNotFound",
    "Runtime",
    "RuntimeName",
    "Telemetry",
    "Training",
    "get_profile",
    "load_profile",
    "load_profiles",
    "profile_dir",
    "variant_unsupported",
]
