"""Telemetry / state / ack ingest from MQTT into the database."""

from controlplane.ingest._stats import read_stats
from controlplane.ingest._worker import IngestWorker, Message, process_batch

__all__ = ["IngestWorker", "Message", "process_batch", "read_stats"]
