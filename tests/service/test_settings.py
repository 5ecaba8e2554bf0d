"""Settings: env vars and CLI flags share names, flags win, validation is clear. No model."""

from __future__ import annotations

import importlib
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.__main__ import build_parser, load_settings, main
from service.settings import Settings, default_api_workers


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    import os

    for key in list(os.environ):
        if key.startswith("LLAVE_"):
            monkeypatch.delenv(key)


def test_defaults_follow_the_design(monkeypatch):
    s = load_settings(["--model", "m"])
    assert s.model == "m" and s.model_name == "m"
    assert s.data_dir == Path("./data")
    assert (s.device, s.dtype) == ("auto", "auto")
    assert s.api_key is None and s.cors_origins == [] and s.image_url_allow_hosts == []
    assert not hasattr(s, "fault_injection")  # faults are injected by tests/service/faults.py only


def test_env_vars_are_read_and_flags_override_them(monkeypatch):
    monkeypatch.setenv("LLAVE_MODEL", "from-env")
    monkeypatch.setenv("LLAVE_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("LLAVE_MAX_QUEUE", "300")
    monkeypatch.setenv("LLAVE_DATA_DIR", "/srv/llave")
    s = load_settings([])
    assert (s.model, s.max_batch_size, s.max_queue, s.data_dir) == ("from-env", 7, 300, Path("/srv/llave"))
    s = load_settings(["--model", "from-flag", "--max-batch-size", "3", "--data-dir", "/d"])
    assert (s.model, s.max_batch_size, s.max_queue, s.data_dir) == ("from-flag", 3, 300, Path("/d"))


def test_every_setting_has_a_flag_with_the_env_var_name():
    flags = {a.dest: a.option_strings for a in build_parser()._actions if a.dest != "help"}
    for name in Settings.model_fields:
        assert flags[name][0] == "--" + name.replace("_", "-")
    contract = [
        "--model", "--host", "--port", "--device", "--dtype", "--max-batch-size",
        "--max-batch-tokens", "--max-wait-ms", "--max-queue", "--data-dir",
    ]  # fmt: skip
    all_flags = {f for option_strings in flags.values() for f in option_strings}
    assert set(contract) <= all_flags


def test_each_flag_parses_like_its_env_var(monkeypatch):
    samples = {
        "port": ("9000", 9000),
        "max_wait_ms": ("2.5", 2.5),
        "request_timeout_s": ("3", 3.0),
        "image_url_allow_private": ("true", True),
        "dtype": ("bfloat16", "bfloat16"),
        "max_input_tokens": ("1024", 1024),
    }
    for name, (text, value) in samples.items():
        monkeypatch.setenv("LLAVE_" + name.upper(), text)
        assert getattr(load_settings(["--model", "m"]), name) == value, name
        monkeypatch.delenv("LLAVE_" + name.upper())
        flag = "--" + name.replace("_", "-")
        argv = ["--model", "m", flag] if isinstance(value, bool) else ["--model", "m", flag, text]
        assert getattr(load_settings(argv), name) == value, name


def test_lists_are_comma_separated(monkeypatch):
    monkeypatch.setenv("LLAVE_CORS_ORIGINS", "https://a.example, https://b.example")
    s = load_settings(["--model", "m", "--image-url-allow-hosts", "Images.Example.com,*.cdn.example."])
    assert s.cors_origins == ["https://a.example", "https://b.example"]
    assert s.image_url_allow_hosts == ["images.example.com", "*.cdn.example"]


def test_api_key_is_secret_and_empty_means_none(monkeypatch):
    monkeypatch.setenv("LLAVE_API_KEY", "s3cret")
    s = load_settings(["--model", "m"])
    assert s.api_key is not None and s.api_key.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(s)
    monkeypatch.setenv("LLAVE_API_KEY", "")
    assert load_settings(["--model", "m"]).api_key is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_batch_size": 0},
        {"max_queue": 4, "max_inputs_per_request": 5},
        {"port": 70000},
        {"dtype": "float64"},
        {"fault_injection": "fail-batch:X"},
        {"api_workers": 0},
        {"store_read_url": "postgresql://replica/db"},  # a replica without a primary
        {"engine_restarts": -1},
        {"unknown_setting": 1},
    ],
)
def test_invalid_settings_are_refused(kwargs):
    with pytest.raises(ValidationError):
        Settings(model="m", **kwargs)


@pytest.mark.parametrize(
    ("cores", "workers"), [(1, 1), (2, 2), (7, 2), (8, 2), (12, 3), (16, 4), (64, 8), (256, 8)]
)
def test_api_workers_default_to_a_quarter_of_the_cores(cores, workers):
    assert default_api_workers(cores) == workers


def test_the_engine_configuration_carries_the_inference_settings():
    s = Settings(model="m", max_batch_size=7, max_queue=9, max_inputs_per_request=9, engine_restarts=0)
    config = s.engine_config()
    assert (config.model, config.max_batch_size, config.max_queue, config.engine_restarts) == ("m", 7, 9, 0)
    assert (config.max_image_pixels, config.max_images_per_input) == (
        s.max_image_pixels,
        s.max_images_per_input,
    )
    assert s.engine_config("pkg.mod:load").embedder_factory == "pkg.mod:load"


def test_cli_errors_exit_2_with_the_flag_named(capsys):
    with pytest.raises(SystemExit) as exc:
        load_settings(["--model", "m", "--max-queue", "2", "--max-inputs-per-request", "4"])
    assert exc.value.code == 2
    assert "max_queue" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        load_settings([])  # --model is required
    assert "--model" in capsys.readouterr().err


def test_console_script_entry_point_and_help():
    # The console script named in pyproject.toml resolves to this main().
    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    module, _, name = pyproject["project"]["scripts"]["llave-serve"].partition(":")
    assert getattr(importlib.import_module(module), name) is main
    out = subprocess.run(
        [sys.executable, "-m", "service", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "--max-batch-size" in out and "LLAVE_MAX_BATCH_SIZE" in out


def test_limits_report_what_is_enforced():
    limits = Settings(model="m", max_body_bytes=123, max_inputs_per_request=4, max_queue=8).limits()
    assert limits["max_body_bytes"] == 123 and limits["max_inputs_per_request"] == 4
    assert limits["max_queue"] == 8 and limits["image_urls"] is False


def test_gil_switch_interval_defaults_to_short_on_cuda_only():
    from service.inference.engine import gil_switch_interval_s

    ms = load_settings(["--model", "m"]).engine_config().gil_switch_interval_ms
    assert gil_switch_interval_s(ms, "cpu") is None  # Python's own
    assert gil_switch_interval_s(ms, "cuda:0") == pytest.approx(0.0001)
    ms = (
        load_settings(["--model", "m", "--gil-switch-interval-ms", "0.5"])
        .engine_config()
        .gil_switch_interval_ms
    )
    assert gil_switch_interval_s(ms, "cpu") == gil_switch_interval_s(ms, "cuda") == pytest.approx(0.0005)
    with pytest.raises(SystemExit):
        load_settings(["--model", "m", "--gil-switch-interval-ms", "0"])


@pytest.mark.parametrize(
    ("workers", "queue", "per_request", "share", "warned"),
    [
        (1, 1024, 128, 1024, False),
        (8, 1024, 128, 128, False),
        (8, 512, 100, 100, True),  # 512 / 8 = 64 would refuse a 100-input request forever
        (2, 64, 64, 64, True),
        (3, 10, 2, 4, False),  # ceil(10 / 3)
    ],
)
def test_a_front_end_admits_at_least_one_request_of_the_advertised_size(
    workers, queue, per_request, share, warned
):
    s = Settings(model="m", api_workers=workers, max_queue=queue, max_inputs_per_request=per_request)
    assert s.front_end_queue_share == share
    assert any("share of max_queue" in line for line in s.adjustments) == warned


def test_buffered_bodies_hold_at_least_one_body_of_the_largest_size():
    s = Settings(model="m", max_body_bytes=512 * 1024 * 1024)
    assert s.max_buffered_body_bytes == 512 * 1024 * 1024
    assert any("max_buffered_body_bytes raised" in line for line in s.adjustments)
    with pytest.raises(ValidationError, match="max_buffered_body_bytes"):
        Settings(model="m", max_body_bytes=1000, max_buffered_body_bytes=999)
