"""EdgeFleet control plane: Litestar API, SQLModel persistence, MQTT ingest, schedules."""
