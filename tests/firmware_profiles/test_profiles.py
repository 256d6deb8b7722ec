"""The shipped firmware profiles and the loader's error reporting."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from firmware_profiles import (
    ModelVariant,
    PowerSource,
    Profile,
    ProfileError,
    ProfileNotFound,
    RuntimeName,
    get_profile,
    load_profile,
    load_profiles,
    profile_dir,
)

REQUIRED_NAMES = {
    "raspberry-pi-4",
    "raspberry-pi-5",
    "jetson-orin-nano",
    "coral-dev-board",
    "x86-gateway",
    "esp32-s3",
}
SHIPPED_NAMES = sorted(p.stem for p in profile_dir().glob("*.toml"))

VALID_TOML = """\
name = "{name}"
title = "Test device"
variants = ["fp32", "full-int8"]
max_model_bytes = 1_000_000
power_source = "mains"
sources = ["https://example.com/spec"]

[hardware]
soc = "Test SoC"
cpu_arch = "aarch64"
cpu = "4x Cortex-A53 @ 1.5 GHz"
cpu_cores = 4
ram_mb = 1024
storage_mb = 8192

[hardware.accelerator]
name = "Test NPU"
delegate = "edgetpu"
tops = 4.0

[runtime]
name = "ai-edge-litert"
version = "2.3.0"
os_image = "Test OS"

[training]
allowed = true
ram_budget_mb = 128
max_samples = 100

[telemetry]
interval_s = 10.0
"""


def _replace(old: str, new: str) -> Callable[[str], str]:
    def edit(text: str) -> str:
        assert old in text, f"test setup: {old!r} not in the valid profile"
        return text.replace(old, new, 1)

    return edit


@pytest.fixture(name="profiles")
def fx_profiles() -> dict[str, Profile]:
    return load_profiles()


@pytest.fixture(name="write_profile")
def fx_write_profile(tmp_path: Path) -> Callable[[str, str], Path]:
    """Write `text` as `tmp_path/NAME.toml` and return the path."""

    def write(name: str, text: str) -> Path:
        path = tmp_path / f"{name}.toml"
        path.write_text(text, encoding="utf-8")
        return path

    return write


# --- The shipped profiles -------------------------------------------------------------------------


def test_all_shipped_profiles_load(profiles: dict[str, Profile]) -> None:
    # Prepare / Execute: the fixture loads every file in the package's data directory.

    # Assert
    assert sorted(profiles) == SHIPPED_NAMES
    assert all(name == profile.name for name, profile in profiles.items())


def test_required_device_classes_are_shipped(profiles: dict[str, Profile]) -> None:
    # Prepare / Execute: the fixture loads the shipped profiles.

    # Assert
    assert REQUIRED_NAMES <= set(profiles)


@pytest.mark.parametrize("name", SHIPPED_NAMES)
def test_shipped_profile_is_consistent(name: str) -> None:
    # Prepare / Execute
    profile = get_profile(name)

    # Assert
    assert profile.sources, "every profile cites its vendor spec"
    assert all(url.startswith("https://") for url in profile.sources)
    assert len(set(profile.variants)) == len(profile.variants)
    if profile.can_train:
        assert 0 < profile.training.ram_budget_mb < profile.hardware.ram_mb
        assert profile.training.max_samples > 0
    if profile.runtime.name is RuntimeName.TFLITE_MICRO:
        assert profile.runtime.python_agent is False
        assert profile.variants == [ModelVariant.FULL_INT8]


@pytest.mark.parametrize("name", ["coral-dev-board", "esp32-s3"])
def test_int8_only_devices_allow_only_full_int8(name: str) -> None:
    # Prepare / Execute
    profile = get_profile(name)

    # Assert
    assert profile.variants == [ModelVariant.FULL_INT8]
    assert profile.allows("full-int8")
    for variant in (ModelVariant.FP32, ModelVariant.FP16, ModelVariant.DYNAMIC_INT8):
        assert not profile.allows(variant)


def test_no_tflite_runtime_2_14_profile_allows_dynamic_int8(profiles: dict[str, Profile]) -> None:
    # tflite-runtime 2.14 cannot load PT2E dynamic-range int8 models and silently answers wrong on
    # ai-edge-quantizer dynamic-range models, so no profile on it may be offered that variant.

    # Prepare
    on_2_14 = [
        p
        for p in profiles.values()
        if p.runtime.name is RuntimeName.TFLITE_RUNTIME and p.runtime.version.startswith("2.14")
    ]

    # Execute
    offending = [p.name for p in on_2_14 if p.allows(ModelVariant.DYNAMIC_INT8)]

    # Assert
    assert {"raspberry-pi-4", "coral-dev-board"} <= {p.name for p in on_2_14}
    assert offending == []


def test_esp32_has_no_python_agent_and_cannot_train() -> None:
    # Prepare / Execute
    profile = get_profile("esp32-s3")

    # Assert
    assert profile.runtime.name is RuntimeName.TFLITE_MICRO
    assert profile.runtime.python_agent is False
    assert not profile.can_train
    assert profile.power_source is PowerSource.BATTERY
    assert profile.max_model_bytes <= 2 * 1024 * 1024


def test_coral_uses_the_edgetpu_delegate_and_cannot_train() -> None:
    # Prepare / Execute
    profile = get_profile("coral-dev-board")

    # Assert
    assert profile.hardware.accelerator is not None
    assert profile.hardware.accelerator.delegate == "edgetpu"
    assert profile.hardware.accelerator.tops == 4.0
    assert not profile.can_train


def test_jetson_uses_the_gpu_delegate_and_may_train_on_mains() -> None:
    # Prepare / Execute
    profile = get_profile("jetson-orin-nano")

    # Assert
    assert profile.hardware.accelerator is not None
    assert profile.hardware.accelerator.delegate == "gpu"
    assert profile.hardware.accelerator.tops is not None
    assert profile.can_train
    assert profile.power_source is PowerSource.MAINS
    assert not profile.training.needs_charging


def test_pi_zero_2w_trains_only_while_charging() -> None:
    # Prepare / Execute
    profile = get_profile("raspberry-pi-zero-2w")

    # Assert
    assert profile.can_train
    assert profile.training.needs_charging
    assert profile.power_source is PowerSource.BATTERY


# --- Loading a file -------------------------------------------------------------------------------


def test_valid_file_loads(write_profile: Callable[[str, str], Path]) -> None:
    # Prepare
    path = write_profile("test-device", VALID_TOML.format(name="test-device"))

    # Execute
    profile = load_profile(path)

    # Assert
    assert profile.name == "test-device"
    assert profile.hardware.cpu_cores == 4
    assert profile.variants == [ModelVariant.FP32, ModelVariant.FULL_INT8]
    assert profile.runtime.python_agent is True
    assert not profile.training.needs_charging


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        pytest.param(_replace("cpu_cores = 4", 'cpu_cores = "four"'), "hardware.cpu_cores", id="wrong-type"),
        pytest.param(_replace("cpu_cores = 4", "cpu_cores = 0"), "hardware.cpu_cores", id="not-positive"),
        pytest.param(_replace('soc = "Test SoC"\n', ""), "hardware.soc", id="missing-nested-field"),
        pytest.param(_replace('title = "Test device"\n', ""), "title", id="missing-top-level-field"),
        pytest.param(_replace("[telemetry]\ninterval_s = 10.0\n", ""), "telemetry", id="missing-table"),
        pytest.param(
            _replace("cpu_cores = 4", 'cpu_cores = 4\ngpu = "Mali"'), "hardware.gpu", id="unknown-field"
        ),
        pytest.param(
            _replace("power_source", 'colour = "red"\npower_source'), "colour", id="unknown-top-level"
        ),
        pytest.param(_replace('"fp32", "full-int8"', '"fp32", "int4"'), "variants", id="invalid-variant"),
        pytest.param(_replace('["fp32", "full-int8"]', "[]"), "variants", id="no-variants"),
        pytest.param(
            _replace('name = "ai-edge-litert"', 'name = "onnxruntime"'), "runtime.name", id="bad-runtime"
        ),
        pytest.param(
            _replace('power_source = "mains"', 'power_source = "solar"'), "power_source", id="bad-power"
        ),
        pytest.param(
            _replace("interval_s = 10.0", "interval_s = 0"), "telemetry.interval_s", id="zero-interval"
        ),
        pytest.param(
            _replace('delegate = "edgetpu"\n', ""), "hardware.accelerator.delegate", id="missing-deep-field"
        ),
    ],
)
def test_invalid_file_names_file_and_field(
    write_profile: Callable[[str, str], Path], edit: Callable[[str], str], field: str
) -> None:
    # Prepare
    path = write_profile("broken", edit(VALID_TOML.format(name="broken")))

    # Execute
    with pytest.raises(ProfileError) as caught:
        load_profile(path)

    # Assert
    message = str(caught.value)
    assert str(path) in message
    assert f"'{field}" in message
    assert caught.value.path == path
    assert caught.value.field is not None
    assert caught.value.field.startswith(field)


def test_invalid_variant_error_shows_the_bad_value(write_profile: Callable[[str, str], Path]) -> None:
    # Prepare
    path = write_profile("broken", VALID_TOML.format(name="broken").replace('"full-int8"', '"int4"'))

    # Execute
    with pytest.raises(ProfileError) as caught:
        load_profile(path)

    # Assert
    assert caught.value.field == "variants[1]"
    assert "int4" in str(caught.value)


def test_name_must_match_file_stem(write_profile: Callable[[str, str], Path]) -> None:
    # Prepare
    path = write_profile("file-stem", VALID_TOML.format(name="other-name"))

    # Execute
    with pytest.raises(ProfileError) as caught:
        load_profile(path)

    # Assert
    message = str(caught.value)
    assert str(path) in message
    assert "'name'" in message
    assert "other-name" in message
    assert "file-stem" in message
    assert caught.value.field == "name"


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b'name = "unterminated\n', id="unterminated-string"),
        pytest.param(b"[hardware\ncpu_cores = 4\n", id="bad-table-header"),
        pytest.param(b"\xff\xfe not utf-8", id="not-utf8"),
    ],
)
def test_bad_toml_names_the_file(tmp_path: Path, content: bytes) -> None:
    # Prepare
    path = tmp_path / "bad.toml"
    path.write_bytes(content)

    # Execute
    with pytest.raises(ProfileError) as caught:
        load_profile(path)

    # Assert
    assert str(path) in str(caught.value)
    assert "TOML" in str(caught.value)
    assert caught.value.path == path
    assert caught.value.field is None


def test_missing_file_raises_profile_error(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "absent.toml"

    # Execute
    with pytest.raises(ProfileError) as caught:
        load_profile(path)

    # Assert
    assert str(path) in str(caught.value)


def test_load_profiles_reports_the_broken_file(write_profile: Callable[[str, str], Path]) -> None:
    # Prepare
    write_profile("good", VALID_TOML.format(name="good"))
    broken = write_profile("broken", VALID_TOML.format(name="broken").replace("ram_mb = 1024", "ram_mb = -1"))

    # Execute
    with pytest.raises(ProfileError) as caught:
        load_profiles(broken.parent)

    # Assert
    assert str(broken) in str(caught.value)
    assert caught.value.field == "hardware.ram_mb"


def test_load_profiles_from_a_directory(write_profile: Callable[[str, str], Path]) -> None:
    # Prepare
    directory = write_profile("one", VALID_TOML.format(name="one")).parent
    write_profile("two", VALID_TOML.format(name="two"))

    # Execute
    profiles = load_profiles(directory)

    # Assert
    assert sorted(profiles) == ["one", "two"]


# --- Looking up by name ---------------------------------------------------------------------------


def test_get_profile_by_name() -> None:
    # Prepare / Execute
    profile = get_profile("raspberry-pi-5")

    # Assert
    assert profile.name == "raspberry-pi-5"
    assert profile.hardware.cpu_cores == 4


@pytest.mark.parametrize("name", ["no-such-device", "", "../data/raspberry-pi-4", "data/raspberry-pi-4", "x" * 300])
def test_get_profile_unknown_name_lists_known_names(name: str) -> None:
    # Prepare / Execute
    with pytest.raises(ProfileNotFound) as caught:
        get_profile(name)

    # Assert
    message = str(caught.value)
    assert f"'{name}'" in message
    for known in REQUIRED_NAMES:
        assert known in message
    assert isinstance(caught.value, ProfileError)


def test_get_profile_in_an_empty_directory(tmp_path: Path) -> None:
    # Prepare / Execute
    with pytest.raises(ProfileNotFound) as caught:
        get_profile("raspberry-pi-4", tmp_path)

    # Assert
    assert "known: none" in str(caught.value)


def test_runtime_that_cannot_run_a_variant_is_refused(tmp_path: Path) -> None:
    # Prepare: a Pi 4 profile (tflite-runtime 2.14) that claims dynamic-int8
    source = (profile_dir() / "raspberry-pi-4.toml").read_text()
    bad = tmp_path / "raspberry-pi-4.toml"
    bad.write_text(source.replace('variants = ["fp32", "fp16", "full-int8"]',
                                  'variants = ["fp32", "dynamic-int8"]'))
    # Execute
    with pytest.raises(ProfileError) as caught:
        load_profile(bad)
    # Assert
    assert str(bad) in str(caught.value)
    assert caught.value.field == "variants"
    assert "wrong answers" in str(caught.value)
