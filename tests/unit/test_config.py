"""Config loading: typed sections, strict types, and errors naming file + key path."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from ichat.config import GatewayConfig, ManagedWorkerSpec, load_config, structure_managed_worker
from ichat.errors import ConfigError
from ichat.gateway.__main__ import main

# The seed's example, as users will copy it.
SEED_EXAMPLE = """\
server_settings:
  host: 0.0.0.0
  port: 4000
  log_level: info

managed_workers:
  - model_name: qwen-7b-chat
    model_path: /path/to/qwen-7b-chat
    backend: vllm
    gpu_ids: [0]
    port: 8001
    heartbeat_interval: 3
    tensor_parallel_size: 1
    gpu_memory_utilization: 0.9

  - model_name: qwen-14b-chat
    model_path: /path/to/qwen-14b-chat
    backend: vllm
    gpu_ids: [1, 2]
    port: 8002
    heartbeat_interval: 3
    tensor_parallel_size: 2

litellm_settings:
  drop_params: True
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    return path


def config_error(data: Any, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        GatewayConfig.from_dict(data, source="conf/x.yaml", environ=environ or {})
    return str(info.value)


def test_defaults():
    config = GatewayConfig.from_dict({}, environ={})
    assert (config.server_settings.host, config.server_settings.port, config.server_settings.log_level) == (
        "0.0.0.0",
        4000,
        "info",
    )
    routing = config.routing
    assert routing.policy == "cache_aware" and routing.per_model == {} and routing.retries == 2
    assert (routing.timeouts.connect_s, routing.timeouts.first_byte_s, routing.timeouts.total_s) == (5, 600, 3600)
    assert routing.max_body_bytes == 32 * 2**20
    assert (routing.circuit_breaker.failures, routing.circuit_breaker.cooldown_s) == (3, 10)
    assert config.routes == () and config.managed_workers == () and not config.auth.enabled
    assert config.logs.ring_lines == 10000 and config.state_dir is None


def test_seed_example_loads_and_ignores_litellm_settings_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    with caplog.at_level(logging.WARNING):
        config = load_config(write(tmp_path, SEED_EXAMPLE), environ={})

    assert "iChat does not use LiteLLM; litellm_settings ignored" in caplog.text
    first, second = config.managed_workers
    assert first.gpu_ids == (0,) and second.gpu_ids == (1, 2)
    assert first.engine_flags == {"tensor_parallel_size": 1, "gpu_memory_utilization": 0.9}
    assert second.engine_flags == {"tensor_parallel_size": 2}
    assert config.source.endswith("gateway.yaml")


def test_full_config(tmp_path: Path):
    text = """\
routes:
  - {model_name: gpt, api_base: "http://10.0.0.5:8000/v1/", api_key: sk-1}
  - {model_name: gpt, api_base: "http://10.0.0.6:8000/v1", weight: 2}
routing:
  policy: round_robin
  per_model: {gpt: least_inflight}
  timeouts: {connect_s: 1, first_byte_s: 30, total_s: 0}
  max_body_mb: 0.5
  retries: 0
  circuit_breaker: {failures: 5, cooldown_s: 2.5}
auth:
  api_keys: [k1]
  api_keys_env: GW_KEYS
  worker_token_env: GW_WORKER
  admin_key: admin
state_dir: /var/lib/ichat
logs: {ring_lines: 50}
"""
    config = load_config(write(tmp_path, text), environ={"GW_KEYS": " k2, k3 ,", "GW_WORKER": "wt"})
    assert [r.api_base for r in config.routes] == ["http://10.0.0.5:8000/v1", "http://10.0.0.6:8000/v1"]
    assert config.routes[0].api_key == "sk-1" and config.routes[1].weight == 2.0
    assert config.routing.per_model == {"gpt": "least_inflight"} and config.routing.timeouts.total_s == 0
    assert config.routing.max_body_bytes == 2**19
    assert config.auth.api_keys == ("k1", "k2", "k3") and config.auth.enabled
    assert config.auth.worker_token == "wt" and config.auth.admin_key == "admin"
    assert config.state_dir == "/var/lib/ichat" and config.logs.ring_lines == 50


def test_unknown_key_names_the_file_and_the_key_path(tmp_path: Path):
    path = write(tmp_path, "routing:\n  timeouts:\n    conect_s: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    message = str(info.value)
    assert str(path) in message and "routing.timeouts.conect_s" in message
    assert "unknown key" in message and "connect_s" in message  # what was expected


@pytest.mark.parametrize(
    ("data", "fragments"),
    [
        ({"server_settings": {"port": "80"}}, ["server_settings.port", "expected an integer", "'80'"]),
        ({"server_settings": {"port": 70000}}, ["server_settings.port", "TCP port"]),
        ({"server_settings": {"log_level": "loud"}}, ["server_settings.log_level", "one of"]),
        ({"routing": {"retries": True}}, ["routing.retries", "expected an integer"]),
        ({"routing": {"retries": -1}}, ["routing.retries", ">= 0"]),
        ({"routing": {"timeouts": {"connect_s": "fast"}}}, ["routing.timeouts.connect_s", "a number"]),
        ({"routing": {"max_body_mb": 0}}, ["routing.max_body_mb", "> 0"]),
        ({"routing": 5}, ["routing:", "expected a mapping"]),
        ({"routing": {"policy": "fastest"}}, ["routing.policy", "'fastest'", "least_inflight, round_robin"]),
        ({"routing": {"per_model": {"m": "nope"}}}, ["routing.per_model.m", "least_inflight, round_robin"]),
        ({"routes": [{"model_name": "m", "api_base": "http://h/v1"}, {"api_base": "http://h/v1"}]}, ["routes[1].model_name", "missing"]),
        ({"routes": [{"model_name": "m", "api_base": "10.0.0.5:8000"}]}, ["routes[0].api_base", "http(s) URL"]),
        ({"routes": {"model_name": "m"}}, ["routes:", "expected a list"]),
        ({"auth": {"api_keys": "sk-abc"}}, ["auth.api_keys", "expected a list"]),
        ({"auth": {"api_keys": [""]}}, ["auth.api_keys", "not empty"]),
        ({"auth": {"api_keys_env": "ICHAT_KEYS"}}, ["auth.api_keys_env", "ICHAT_KEYS", "not set"]),
        ({"managed_workers": [{"model_name": "m", "model_path": "/p"}]}, ["managed_workers[0].port", "missing"]),
        ({"managed_workers": [{"model_name": "m", "model_path": "/p", "port": 1, "log_streaming": "no"}]}, ["managed_workers[0].log_streaming", "true or false"]),
        ({"managed_workers": [{"model_name": "m", "model_path": "/p", "port": 1, "max_model_len": None}]}, ["managed_workers[0].max_model_len", "expected a string, number"]),
        ({"managed_workers": [{"model_name": "m", "model_path": "/p", "port": 1, "tensor-parallel-size": 2}]}, ["snake_case"]),
        ({"managed_workers": [{"model_name": "m", "model_path": "/p", "port": 1, "served_model_name": "x"}]}, ["managed_workers[0].served_model_name", "set by iChat"]),
        ({"managed_workers": [{"model_name": "m", "model_path": "/p", "port": 1, "gpu_ids": [0, "1"]}]}, ["managed_workers[0].gpu_ids[1]", "expected an integer"]),
        ({"managed_workers": [{"model_name": "m", "model_path": "/p", "port": 1, "backend_args": {"x": {}}}]}, ["managed_workers[0].backend_args.x", "expected a string"]),
        ({"bogus": 1}, ["bogus: unknown key", "server_settings"]),
        ([1, 2], ["top level"]),
    ],
)
def test_wrong_values_name_the_key_and_what_was_expected(data: Any, fragments: list[str]):
    message = config_error(data)
    assert message.startswith("conf/x.yaml: ")
    for fragment in fragments:
        assert fragment in message


def test_empty_sections_mean_defaults():
    config = GatewayConfig.from_dict({"routes": None, "routing": None}, environ={})
    assert config.routes == () and config.routing.retries == 2


def test_invalid_yaml_and_missing_file_are_config_errors(tmp_path: Path):
    with pytest.raises(ConfigError, match="gateway.yaml: not valid YAML"):
        load_config(write(tmp_path, "routing: [unclosed\n"))
    with pytest.raises(ConfigError, match="nope.yaml: cannot read"):
        load_config(tmp_path / "nope.yaml")


def test_worker_argv_from_a_managed_worker_entry():
    spec = structure_managed_worker(
        {
            "model_name": "smollm2",
            "model_path": "/models/smollm2",
            "port": 8001,
            "log_streaming": False,
            "tensor_parallel_size": 2,
            "enforce_eager": True,
            "trust_remote_code": False,
            "allowed_origins": ["a", "b"],
            "gpu_memory_utilization": 0.9,
            "backend_args": {"attention_backend": "torch_native"},
            "extra_args": ["--raw", "x_y"],
        }
    )
    assert spec.to_worker_argv() == [
        "--model", "/models/smollm2", "--served-model-name", "smollm2", "--backend", "vllm",
        "--host", "127.0.0.1", "--port", "8001", "--heartbeat-interval", "3.0",
        "--no-log-streaming",
        "--tensor-parallel-size", "2", "--enforce-eager", "--allowed-origins", "a", "b",
        "--gpu-memory-utilization", "0.9",
        "--attention-backend", "torch_native",
        "--raw", "x_y",
    ]  # fmt: skip


def test_structure_managed_worker_names_its_location_and_accepts_explicit_engine_flags():
    with pytest.raises(ConfigError, match=r"^admin request: port: expected a TCP port"):
        structure_managed_worker({"model_name": "m", "model_path": "/p", "port": -1}, where="admin request")
    spec = structure_managed_worker({"model_name": "m", "model_path": "/p", "port": 1, "engine_flags": {"dtype": "half"}})
    assert isinstance(spec, ManagedWorkerSpec) and spec.engine_flags == {"dtype": "half"}


def test_main_reports_a_bad_config_in_one_line_with_exit_code_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    path = write(tmp_path, "server_settings:\n  prot: 1\n")
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "server_settings.prot" in err and "Traceback" not in err
