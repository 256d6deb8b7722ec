"""Who may join a round right now: the device class (may it train?) and the latest telemetry."""

from __future__ import annotations

import math
import time
from typing import Annotated, Any

import msgspec

from firmware_profiles import Profile

__all__ = ["EligibilityRule", "decide", "invite_count"]


class EligibilityRule(msgspec.Struct, forbid_unknown_fields=True):
    """Conditions a device must meet to be invited; each check names itself when it fails."""

    require_online: bool = True
    # Devices whose profile says they train only while charging must be charging; others need this battery.
    min_battery_percent: Annotated[float, msgspec.Meta(ge=0, le=100)] = 30.0
    allow_metered: bool = False
    max_temperature_c: Annotated[float, msgspec.Meta(gt=0, le=150)] = 75.0
    max_cpu_percent: Annotated[float, msgspec.Meta(gt=0, le=100)] = 80.0  # "idle enough"
    max_telemetry_age_s: Annotated[float, msgspec.Meta(gt=0, le=30 * 86_400)] = 300.0


def decide(profile: Profile, online: bool, telemetry: dict[str, Any] | None, rule: EligibilityRule,
           now: float | None = None) -> tuple[bool, str]:
    """(eligible, reason). The reason is kept in the round's record for both outcomes."""
    if not profile.training.allowed:
        return False, f"profile {profile.name} may not train"
    if rule.require_online and not online:
        return False, "offline"
    if telemetry is None:
        return False, "no telemetry yet"
    now = time.time() if now is None else now
    age = now - float(telemetry.get("ts", 0.0))
    if age > rule.max_telemetry_age_s:
        return False, f"latest telemetry is {age:.0f} s old (max {rule.max_telemetry_age_s:.0f} s)"
    power = telemetry.get("power") or {}
    network = telemetry.get("network") or {}
    system = telemetry.get("system") or {}
    charging, battery = power.get("charging"), power.get("battery_percent")
    if profile.training.needs_charging and charging is not True:
        return False, "not charging (this device class trains only on a charger)"
    if battery is not None and charging is not True and battery < rule.min_battery_percent:
        return False, f"battery {battery:.0f}% < {rule.min_battery_percent:.0f}% and not charging"
    if not rule.allow_metered and network.get("metered") is True:
        return False, "on a metered network"
    temperature = system.get("temperature_c")
    if temperature is not None and temperature > rule.max_temperature_c:
        return False, f"temperature {temperature:.0f} °C > {rule.max_temperature_c:.0f} °C"
    cpu = system.get("cpu_percent")
    if cpu is not None and cpu > rule.max_cpu_percent:
        return False, f"busy: CPU {cpu:.0f}% > {rule.max_cpu_percent:.0f}%"
    return True, "eligible"


def invite_count(min_clients: int, eligible: int, dropout_rate: float, max_clients: int | None = None) -> int:
    """How many eligible devices to invite: every eligible one up to `max_clients`, and at least `min_clients`
    over-selected by the observed dropout rate (so that dropouts still leave `min_clients`)."""
    rate = min(max(dropout_rate, 0.0), 0.9)
    floor = math.ceil(min_clients / (1.0 - rate))
    wanted = eligible if max_clients is None else max(max_clients, floor)
    return min(eligible, wanted)
