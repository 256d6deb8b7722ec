"""Control-plane settings from the environment: converted and bounded by msgspec, a bad value named with the reason."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from controlplane.cli import app
from controlplane.settings import BrokerAuthMode, Settings


def test_environment_values_are_converted_to_their_types() -> None:
    # Execute
    settings = Settings.from_env({
        "EDGEFLEET_PORT": "9000", "EDGEFLEET_DATA_DIR": "/srv/edgefleet", "EDGEFLEET_BROKER_AUTH": "dynsec",
        "EDGEFLEET_INGEST_BATCH_WAIT_S": "0.5", "EDGEFLEET_INGEST_SHARED": "yes", "EDGEFLEET_RUN_SCHEDULER": "false",
        "RAY_ADDRESS": "http://ray:8265", "EDGEFLEET_UNKNOWN": "ignored",
    })
    # Assert
    assert settings.port == 9000 and settings.data_dir == Path("/srv/edgefleet")
    assert settings.broker_auth is BrokerAuthMode.DYNSEC and settings.ingest_batch_wait_s == 0.5
    assert settings.ingest_shared is True and settings.run_scheduler is False
    assert settings.ray_address == "http://ray:8265"


def test_flags_win_over_the_environment() -> None:
    # Execute
    settings = Settings.from_env({"EDGEFLEET_PORT": "9000", "EDGEFLEET_HOST": "0.0.0.0"}, port=9100, host=None)
    # Assert
    assert settings.port == 9100 and settings.host == "0.0.0.0"


@pytest.mark.parametrize(("variable", "value", "reason"), [
    ("EDGEFLEET_PORT", "http", "Expected `int`, got `str`"),
    ("EDGEFLEET_PORT", "70000", "Expected `int` <= 65535"),
    ("EDGEFLEET_EMBEDDED_BROKER_PORT", "0", "Expected `int` >= 1"),
    ("EDGEFLEET_INGEST_WORKERS", "0", "Expected `int` >= 1"),
    ("EDGEFLEET_INGEST_BATCH_WAIT_S", "nan", "Expected `float`"),
    ("EDGEFLEET_BROKER_AUTH", "ldap", "Invalid enum value 'ldap'"),
    ("EDGEFLEET_RUN_SCHEDULER", "maybe", "Expected `bool`, got `str`"),
])
def test_a_bad_value_is_refused_naming_the_variable(variable: str, value: str, reason: str) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match=f"^{variable}='{value}': ") as caught:
        Settings.from_env({variable: value})
    assert reason in str(caught.value)


def test_serve_with_a_bad_environment_value_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Arrange
    monkeypatch.setenv("EDGEFLEET_PORT", "eighty")
    monkeypatch.setenv("EDGEFLEET_DATA_DIR", str(tmp_path))
    # Execute
    result = CliRunner().invoke(app, ["controlplane", "serve"])
    # Assert
    assert result.exit_code == 2
    assert "error: EDGEFLEET_PORT='eighty': Expected `int`, got `str`" in result.output
    assert "Traceback" not in result.output
