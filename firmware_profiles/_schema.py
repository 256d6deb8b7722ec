"""Typed schema of a firmware profile: one device class of the fleet."""

from __future__ import annotations

import enum
from typing import Annotated

import msgspec

__all__ = [
    "Accelerator",
    "Hardware",
    "ModelVariant",
    "PowerSource",
    "Profile",
    "Runtime",
    "RuntimeName",
    "Telemetry",
    "Training",
]

PositiveInt = Annotated[int, msgspec.Meta(gt=0)]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]


class ModelVariant(enum.StrEnum):
    """TFLite model variants the build step can produce."""

    FP32 = "fp32"
    FP16 = "fp16"
    DYNAMIC_INT8 = "dynamic-int8"
    FULL_INT8 = "full-int8"


class RuntimeName(enum.StrEnum):
    """Inference runtimes a device class can run."""

    LITERT = "ai-edge-litert"
    TFLITE_RUNTIME = "tflite-runtime"
    TFLITE_MICRO = "tflite-micro"


class PowerSource(enum.StrEnum):
    MAINS = "mains"
    BATTERY = "battery"
    POE = "poe"
    USB = "usb"


class Accelerator(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """An inference accelerator and the TFLite delegate that drives it."""

    name: str
    delegate: str
    tops: PositiveFloat | None = None


class Hardware(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    soc: str
    cpu_arch: str
    cpu: str
    cpu_cores: PositiveInt
    ram_mb: PositiveInt
    storage_mb: PositiveInt
    accelerator: Accelerator | None = None


class Runtime(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """The inference runtime the device image ships."""

    name: RuntimeName
    version: str
    os_image: str
    python_agent: bool = True


class Training(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Whether and under which conditions the device may train locally."""

    allowed: bool
    ram_budget_mb: Annotated[int, msgspec.Meta(ge=0)] = 0
    needs_charging: bool = False
    max_samples: Annotated[int, msgspec.Meta(ge=0)] = 0


class Telemetry(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    interval_s: PositiveFloat


class Profile(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """A firmware profile (device class), as loaded from `firmware_profiles/data/NAME.toml`."""

    name: str
    title: str
    hardware: Hardware
    runtime: Runtime
    variants: Annotated[list[ModelVariant], msgspec.Meta(min_length=1)]
    max_model_bytes: PositiveInt
    training: Training
    telemetry: Telemetry
    power_source: PowerSource
    sources: list[str] = msgspec.field(default_factory=list)

    @property
    def can_train(self) -> bool:
        return self.training.allowed

    def allows(self, variant: ModelVariant | str) -> bool:
        return ModelVariant(variant) in self.variants
