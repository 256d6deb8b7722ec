"""EdgeFleet device agent: runs TFLite models and reports telemetry over MQTT."""

__version__ = "0.1.0"
