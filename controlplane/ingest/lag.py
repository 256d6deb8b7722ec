"""Ingest lag: how long messages waited before the batch holding them committed.

Kept as plain cumulative bucket counts (no metrics library here): `controlplane.metrics` reads a snapshot of every
worker's figures at scrape time. Observed on a sample of each batch (its oldest message and evenly spaced others,
at most `SAMPLE` of them): a lag distribution needs no census, and the hot path stays free of per-message work.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgspec

from agent import protocol as wire

if TYPE_CHECKING:
    from controlplane.ingest.worker import Message

__all__ = ["LAG_BUCKETS", "IngestLag", "LagSnapshot"]

# Seconds; a commit normally follows within the batch wait (20 ms) plus the insert.
LAG_BUCKETS: tuple[float, ...] = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
SAMPLE = 32
# A device lag outside this range (seconds) says the device's clock is wrong: left out, it would swamp the sum.
_PLAUSIBLE = (-300.0, 7 * 86400.0)


class _Stamp(msgspec.Struct):
    ts: float = math.nan


_STAMP = msgspec.json.Decoder(_Stamp)
_TELEMETRY_SUFFIX = "/" + wire.Channel.TELEMETRY.value


@dataclass(frozen=True, slots=True)
class LagSnapshot:
    """Cumulative figures of one histogram: `counts[i]` observations fell in bucket i (not cumulative across
    buckets; the last one is +Inf), `total` seconds in all."""

    counts: tuple[int, ...]
    total: float


class _Histogram:
    def __init__(self) -> None:
        self.counts = [0] * (len(LAG_BUCKETS) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        seconds = max(seconds, 0.0)  # a device clock ahead of ours
        self.counts[bisect.bisect_left(LAG_BUCKETS, seconds)] += 1
        self.total += seconds

    def snapshot(self) -> LagSnapshot:
        return LagSnapshot(tuple(self.counts), self.total)


class IngestLag:
    """Two histograms of one worker: broker receipt → commit (`broker`), and the device's telemetry timestamp →
    commit (`device`: includes the time in the broker's queue and the device's clock error)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._broker = _Histogram()
        self._device = _Histogram()

    def observe(self, batch: Sequence[Message], committed_at: float) -> None:
        """Record a committed batch (`committed_at`: wall-clock seconds)."""
        if not batch:
            return
        step = max(1, len(batch) // SAMPLE)
        sample = batch[::step][:SAMPLE]
        device: list[float] = []
        for msg in sample:
            if msg.topic.endswith(_TELEMETRY_SUFFIX) and len(msg.payload) <= wire.MAX_PAYLOAD_BYTES:
                try:
                    ts = _STAMP.decode(msg.payload).ts
                except (msgspec.DecodeError, RecursionError):
                    continue  # a dead letter: counted elsewhere
                lag = committed_at - ts
                if _PLAUSIBLE[0] <= lag <= _PLAUSIBLE[1]:  # else a clock error, not a lag (and NaN compares false)
                    device.append(lag)
        with self._lock:
            for msg in sample:
                if msg.received_at:
                    self._broker.observe(committed_at - msg.received_at)
            for seconds in device:
                self._device.observe(seconds)

    def snapshot(self) -> tuple[LagSnapshot, LagSnapshot]:
        """(broker, device) figures so far."""
        with self._lock:
            return self._broker.snapshot(), self._device.snapshot()
