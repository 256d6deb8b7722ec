"""Telemetry / state / ack ingest from MQTT into the database."""

from controlplane.ingest.stats import read_stats
from controlplane.ingest.worker import IngestWorker, Message, process_batch

__all__ = ["IngestWorker", "Message", "process_batch", "read_stats"]
