"""Eligibility of a device for a round, from its profile and latest telemetry."""

from __future__ import annotations

import pytest

from controlplane.rounds.eligibility import EligibilityRule, decide, invite_count
from firmware_profiles import get_profile

NOW = 1_800_000_000.0


def telemetry(**overrides: object) -> dict[str, object]:
    record: dict[str, object] = {
        "ts": NOW - 5,
        "power": {"source": "simulated", "power_source": "battery", "battery_percent": 80.0, "charging": False},
        "network": {"source": "simulated", "metered": False},
        "system": {"cpu_percent": 10.0, "temperature_c": 50.0},
    }
    for key, value in overrides.items():
        section, _, field = key.partition("__")
        record[section] = {**record[section], field: value} if field else value  # type: ignore[dict-item]
    return record


@pytest.mark.parametrize(
    ("profile", "online", "record", "eligible", "reason"),
    [
        ("raspberry-pi-5", True, telemetry(), True, "eligible"),
        ("coral-dev-board", True, telemetry(), False, "may not train"),
        ("raspberry-pi-5", False, telemetry(), False, "offline"),
        ("raspberry-pi-5", True, None, False, "no telemetry"),
        ("raspberry-pi-5", True, telemetry(ts=NOW - 3600), False, "old"),
        ("raspberry-pi-zero-2w", True, telemetry(), False, "not charging"),
        ("raspberry-pi-zero-2w", True, telemetry(power__charging=True), True, "eligible"),
        ("raspberry-pi-5", True, telemetry(power__battery_percent=12.0), False, "battery 12%"),
        ("raspberry-pi-5", True, telemetry(power__battery_percent=12.0, power__charging=True), True, "eligible"),
        ("raspberry-pi-5", True, telemetry(network__metered=True), False, "metered"),
        ("raspberry-pi-5", True, telemetry(system__temperature_c=90.0), False, "temperature 90"),
        ("raspberry-pi-5", True, telemetry(system__cpu_percent=97.0), False, "busy"),
    ],
)
def test_decide(profile: str, online: bool, record: dict[str, object] | None, eligible: bool, reason: str) -> None:
    # Execute
    ok, why = decide(get_profile(profile), online, record, EligibilityRule(), now=NOW)
    # Assert
    assert ok is eligible
    assert reason in why


def test_metered_can_be_allowed() -> None:
    ok, _ = decide(get_profile("raspberry-pi-5"), True, telemetry(network__metered=True),
                   EligibilityRule(allow_metered=True), now=NOW)
    assert ok


def test_invite_count_over_selects_by_dropout() -> None:
    assert invite_count(3, eligible=10, dropout_rate=0.0) == 10  # no cap: every eligible device
    assert invite_count(3, eligible=10, dropout_rate=0.0, max_clients=3) == 3
    assert invite_count(3, eligible=10, dropout_rate=0.25, max_clients=3) == 4  # over-selected past the cap
    assert invite_count(3, eligible=10, dropout_rate=0.5, max_clients=3) == 6
    assert invite_count(3, eligible=4, dropout_rate=0.5, max_clients=3) == 4
    assert invite_count(3, eligible=10, dropout_rate=0.5, max_clients=8) == 8
