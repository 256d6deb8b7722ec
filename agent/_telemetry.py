"""What the agent measures about its device: system, power and network.

Figures come from the OS (psutil) where it has them. Battery and metered-network state that the OS cannot give
come from a per-device *simulated* source when asked for (the demo does), and every record says which it is.
"""

from __future__ import annotations

import enum
import math
import os
import random
import time
import zlib
from pathlib import Path
from typing import Any

import psutil

from agent.protocol import NetworkStats, PowerStats, SystemStats

__all__ = ["PowerMode", "PowerSensor", "SystemSensor", "finite_or_none"]


class PowerMode(enum.StrEnum):
    AUTO = "auto"  # the OS battery if there is one, else the profile's power source (mains/poe/usb)
    OS = "os"
    SIMULATED = "simulated"


class SystemSensor:
    """CPU, memory, disk and temperature of the device."""

    def __init__(self, data_dir: Path) -> None:
        self._data_dir = data_dir
        self._boot = psutil.boot_time()
        psutil.cpu_percent(interval=None)  # primes the counter: the first call always returns 0.0

    def read(self) -> SystemStats:
        mem = psutil.virtual_memory()
        disk = psutil.disk_usage(str(self._data_dir))
        return SystemStats(
            cpu_percent=psutil.cpu_percent(interval=None),
            mem_used_mb=round((mem.total - mem.available) / 2**20, 1),
            mem_total_mb=round(mem.total / 2**20, 1),
            disk_used_percent=disk.percent,
            temperature_c=finite_or_none(_temperature()),
            load_1m=finite_or_none(os.getloadavg()[0]) if hasattr(os, "getloadavg") else None,
            uptime_s=round(time.time() - self._boot, 1),
        )


def finite_or_none(value: float | None) -> float | None:
    """A reading the wire contract can carry: a broken sensor's NaN or infinity becomes "unknown" (None)."""
    return value if value is not None and math.isfinite(value) else None


def _temperature() -> float | None:
    read = getattr(psutil, "sensors_temperatures", None)
    if read is None:
        return None
    try:
        sensors = read()
    except OSError:
        return None
    # SoC sensors as Raspberry Pi / Jetson / x86 name them, most specific first.
    for name in ("cpu_thermal", "soc_thermal", "coretemp", "k10temp", "acpitz", "thermal_zone0"):
        if sensors.get(name):
            return float(sensors[name][0].current)
    for entries in sensors.values():
        if entries:
            return float(entries[0].current)
    return None


class PowerSensor:
    """Battery / charging and metered-network state.

    In simulated mode the figures follow a per-device random walk (seeded by the device id, so a device
    tells the same story across restarts): the battery drains, charges on a charger, and the link is
    sometimes metered (cellular).
    """

    def __init__(self, device_id: str, mode: PowerMode, power_source: str) -> None:
        self._mode = mode
        self._power_source = power_source
        self._rng = random.Random(zlib.crc32(device_id.encode()))
        self._battery = self._rng.uniform(35.0, 100.0)
        self._charging = self._rng.random() < 0.5
        self._metered = self._rng.random() < 0.25

    def read(self) -> tuple[PowerStats, NetworkStats]:
        counters = psutil.net_io_counters()
        sent = int(counters.bytes_sent) if counters else None
        recv = int(counters.bytes_recv) if counters else None
        if self._mode is PowerMode.SIMULATED:
            return self._simulate(sent, recv)
        battery = _os_battery()
        if battery is not None:
            power = PowerStats(
                source="os",
                power_source="battery",
                battery_percent=finite_or_none(round(float(battery.percent), 1)),
                charging=bool(battery.power_plugged),
            )
        elif self._mode is PowerMode.OS:
            power = PowerStats(source="os", power_source=self._power_source)
        else:
            # No battery: a mains/PoE/USB powered device is always "charging" for eligibility purposes.
            power = PowerStats(source="profile", power_source=self._power_source, charging=True)
        # No portable OS API says whether a link is metered; None means unknown.
        return power, NetworkStats(source="os", bytes_sent=sent, bytes_recv=recv)

    def _simulate(self, sent: int | None, recv: int | None) -> tuple[PowerStats, NetworkStats]:
        if self._rng.random() < 0.05:
            self._charging = not self._charging
        if self._rng.random() < 0.03:
            self._metered = not self._metered
        step = self._rng.uniform(0.5, 2.0)
        self._battery = min(100.0, self._battery + step) if self._charging else max(1.0, self._battery - step)
        if self._battery <= 5.0:
            self._charging = True
        power = PowerStats(
            source="simulated",
            power_source="battery",
            battery_percent=round(self._battery, 1),
            charging=self._charging,
        )
        network = NetworkStats(
            source="simulated",
            metered=self._metered,
            kind="cellular" if self._metered else "wifi",
            bytes_sent=sent,
            bytes_recv=recv,
        )
        return power, network


def _os_battery() -> Any:
    read = getattr(psutil, "sensors_battery", None)
    if read is None:
        return None
    try:
        return read()
    except (OSError, NotImplementedError):
        return None
