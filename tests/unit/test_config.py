"""load_settings: defaults, environment over YAML, and errors that name what to fix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from threadline.config import (
    ConfigError,
    Settings,
    hash_api_key,
    load_settings,
    unknown_variables,
)
from threadline.store_urls import PostgresUrl

DIGEST = hash_api_key("secret-key")


def _error(
    environ: dict[str, str] | None = None,
    config_file: Path | None = None,
) -> str:
    with pytest.raises(ConfigError) as caught:
        load_settings(environ=environ or {}, config_file=config_file)
    return str(caught.value)


def _yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "threadline.yaml"
    path.write_text(text)
    return path


def test_defaults_without_environment_or_file() -> None:
    settings = load_settings(environ={})

    assert settings.data_dir == Path(".threadline")
    assert settings.redis_url is None
    assert settings.log_level == "info"
    assert settings.llm.upstream is None
    assert settings.llm.retry.max_attempts == 3
    assert settings.gateway.api_keys == ()
    assert settings.executor.max_output_tokens == 512
    assert settings.addresses.gateway == "127.0.0.1:50051"
    assert settings.bind_address("memory") == "127.0.0.1:50055"


def test_unrelated_environment_variables_are_ignored() -> None:
    settings = load_settings(environ={"HOME": "/root", "PATH": "/bin", "REDIS_URL": "nonsense"})

    assert settings == load_settings(environ={})


def test_nested_settings_from_environment() -> None:
    settings = load_settings(
        environ={
            "THREADLINE_LLM__UPSTREAM__BASE_URL": "http://models.internal:8000/v1/",
            "THREADLINE_LLM__UPSTREAM__MODEL": "llama3",
            "THREADLINE_LLM__UPSTREAM__TIMEOUTS__FIRST_TOKEN_S": "7.5",
            "THREADLINE_LLM__RETRY__MAX_ATTEMPTS": "5",
            "THREADLINE_EXECUTOR__MAX_OUTPUT_TOKENS": "1024",
            "THREADLINE_REDIS_URL": "redis://cache:6379/2",
        }
    )

    upstream = settings.llm.upstream
    assert upstream is not None
    assert upstream.base_url == "http://models.internal:8000/v1"  # trailing slash dropped
    assert upstream.model == "llama3"
    assert upstream.timeouts.first_token_s == 7.5
    assert upstream.timeouts.connect_s == 5.0  # untouched siblings keep their defaults
    assert settings.llm.retry.max_attempts == 5
    assert settings.llm.retry.base_delay_s == 0.2
    assert settings.executor.max_output_tokens == 1024
    assert settings.redis_url == "redis://cache:6379/2"


def test_api_keys_from_json_in_environment() -> None:
    keys = [
        {"sha256": DIGEST, "tenant": "acme"},
        {"sha256": hash_api_key("ops-key").upper(), "tenant": "ops", "admin": True},
    ]

    settings = load_settings(environ={"THREADLINE_GATEWAY__API_KEYS": json.dumps(keys)})

    acme, ops = settings.gateway.api_keys
    assert (acme.sha256, acme.tenant, acme.admin) == (DIGEST, "acme", False)
    # Digests are compared as lowercase hex, whatever case the config used.
    assert (ops.sha256, ops.tenant, ops.admin) == (hash_api_key("ops-key"), "ops", True)


def test_yaml_file_is_read(tmp_path: Path) -> None:
    path = _yaml(
        tmp_path,
        f"""
data_dir: {tmp_path / "data"}
log_level: debug
llm:
  upstream:
    base_url: http://gpu-box:8080/v1
    model: gemma
    capabilities:
      system_role: false
gateway:
  api_keys:
    - sha256: {DIGEST}
      tenant: acme
""",
    )

    settings = load_settings(environ={}, config_file=path)

    assert settings.data_dir == tmp_path / "data"
    assert settings.log_level == "debug"
    assert settings.llm.upstream is not None
    assert settings.llm.upstream.model == "gemma"
    assert settings.llm.upstream.capabilities.system_role is False
    assert [k.tenant for k in settings.gateway.api_keys] == ["acme"]


def test_environment_overrides_yaml_field_by_field(tmp_path: Path) -> None:
    path = _yaml(
        tmp_path,
        """
log_level: debug
llm:
  upstream:
    base_url: http://gpu-box:8080/v1
    model: gemma
  retry:
    max_attempts: 4
""",
    )

    settings = load_settings(
        environ={"THREADLINE_LLM__UPSTREAM__MODEL": "llama3", "THREADLINE_LOG_LEVEL": "error"},
        config_file=path,
    )

    assert settings.log_level == "error"
    assert settings.llm.upstream is not None
    assert settings.llm.upstream.model == "llama3"
    # The rest of the YAML section survives an override of one of its fields.
    assert settings.llm.upstream.base_url == "http://gpu-box:8080/v1"
    assert settings.llm.retry.max_attempts == 4


def test_overrides_win_over_environment_and_yaml(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "redis_url: redis://from-yaml:6379/0\n")

    settings = load_settings(
        environ={"THREADLINE_REDIS_URL": "redis://from-env:6379/0"},
        config_file=path,
        overrides={"redis_url": "redis://from-flag:6379/0"},
    )

    assert settings.redis_url == "redis://from-flag:6379/0"


def test_threadline_config_variable_points_at_the_file(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "executor:\n  context_budget_tokens: 2048\n")

    settings = load_settings(environ={"THREADLINE_CONFIG": str(path)})

    assert settings.executor.context_budget_tokens == 2048


def test_empty_yaml_file_means_defaults(tmp_path: Path) -> None:
    assert load_settings(environ={}, config_file=_yaml(tmp_path, "")) == load_settings(environ={})


@pytest.mark.parametrize(
    ("variable", "value", "setting"),
    [
        ("THREADLINE_EXECUTOR__MAX_OUTPUT_TOKENS", "0", "executor.max_output_tokens"),
        ("THREADLINE_EXECUTOR__MAX_OUTPUT_TOKENS", "lots", "executor.max_output_tokens"),
        ("THREADLINE_LLM__RETRY__MAX_ATTEMPTS", "21", "llm.retry.max_attempts"),
        ("THREADLINE_LOG_LEVEL", "verbose", "log_level"),
        ("THREADLINE_GRACE_PERIOD_S", "-1", "grace_period_s"),
        ("THREADLINE_EVENTS__BUFFER_SIZE", "0", "events.buffer_size"),
    ],
)
def test_invalid_value_names_setting_and_variable(variable: str, value: str, setting: str) -> None:
    message = _error({variable: value})

    assert f"{setting} ({variable})" in message


def test_every_invalid_setting_is_reported_at_once() -> None:
    message = _error(
        {"THREADLINE_EXECUTOR__MAX_OUTPUT_TOKENS": "0", "THREADLINE_LOG_LEVEL": "loud"}
    )

    assert "executor.max_output_tokens (THREADLINE_EXECUTOR__MAX_OUTPUT_TOKENS)" in message
    assert "log_level (THREADLINE_LOG_LEVEL)" in message


def test_upstream_without_model_is_reported() -> None:
    message = _error({"THREADLINE_LLM__UPSTREAM__BASE_URL": "http://models:8000/v1"})

    # An upstream must say which model it serves; the message points at the section.
    assert "llm.upstream" in message
    assert "THREADLINE_LLM__UPSTREAM" in message
    assert "model" in message.split("llm.upstream", 1)[1]


def test_upstream_base_url_must_be_http() -> None:
    message = _error(
        {
            "THREADLINE_LLM__UPSTREAM__BASE_URL": "models:8000",
            "THREADLINE_LLM__UPSTREAM__MODEL": "m",
        }
    )

    assert "llm.upstream.base_url (THREADLINE_LLM__UPSTREAM__BASE_URL)" in message
    assert "'models:8000'" in message


@pytest.mark.parametrize(
    "url", ["redis://127.0.0.1:6379/0", "rediss://cache.example:6380/1", "unix:///run/redis.sock"]
)
def test_redis_url_schemes_accepted(url: str) -> None:
    assert load_settings(environ={"THREADLINE_REDIS_URL": url}).redis_url == url


def test_empty_redis_url_means_in_process_events() -> None:
    assert load_settings(environ={"THREADLINE_REDIS_URL": ""}).redis_url is None


@pytest.mark.parametrize("url", ["http://127.0.0.1:6379", "127.0.0.1:6379", "localhost"])
def test_bad_redis_url_is_rejected(url: str) -> None:
    message = _error({"THREADLINE_REDIS_URL": url})

    assert "redis_url (THREADLINE_REDIS_URL)" in message
    assert repr(url) in message


@pytest.mark.parametrize(
    "address",
    [
        "10.0.0.5:7000",
        "gateway.internal:50051",
        "[::1]:50051",
        "dns:///gateway.threadline.svc:50051",
        "ipv4:10.0.0.5:50051,10.0.0.6:50051",
    ],
)
def test_good_address_accepted(address: str) -> None:
    settings = load_settings(environ={"THREADLINE_ADDRESSES__GATEWAY": address})

    assert settings.addresses.gateway == address
    assert settings.addresses.port_of("gateway") == int(address.rpartition(":")[2])


@pytest.mark.parametrize(
    "address",
    ["gateway", "gateway:", ":50051", "host:http", "host:65536", "dns:///gw", "ipv4:a:1,b"],
)
def test_bad_address_is_rejected(address: str) -> None:
    message = _error({"THREADLINE_ADDRESSES__GATEWAY": address})

    assert "addresses.gateway (THREADLINE_ADDRESSES__GATEWAY)" in message
    assert "host:port" in message


def test_bind_address_uses_listen_host_and_own_port() -> None:
    settings = load_settings(
        environ={
            "THREADLINE_LISTEN_HOST": "0.0.0.0",
            "THREADLINE_ADDRESSES__SESSION": "session.svc:6000",
        }
    )

    assert settings.bind_address("session") == "0.0.0.0:6000"


@pytest.mark.parametrize(
    "digest",
    [
        "abc",  # too short
        DIGEST + "0",  # too long
        "g" * 64,  # not hex
        "secret-key",  # the key itself instead of its digest
    ],
)
def test_api_key_sha256_must_be_a_hex_digest(tmp_path: Path, digest: str) -> None:
    path = _yaml(tmp_path, f"gateway:\n  api_keys:\n    - sha256: {digest}\n      tenant: acme\n")

    message = _error(config_file=path)

    assert "gateway.api_keys.0.sha256" in message
    assert "SHA-256" in message


@pytest.mark.parametrize("tenant", ["", "ac me", "acme/prod", "t" * 65])
def test_api_key_tenant_must_be_a_simple_name(tmp_path: Path, tenant: str) -> None:
    path = _yaml(
        tmp_path, f"gateway:\n  api_keys:\n    - sha256: {DIGEST}\n      tenant: '{tenant}'\n"
    )

    assert "gateway.api_keys.0.tenant" in _error(config_file=path)


def test_bad_api_key_from_environment_names_the_real_variable() -> None:
    keys = json.dumps([{"sha256": "abc", "tenant": "acme"}])

    message = _error({"THREADLINE_GATEWAY__API_KEYS": keys})

    assert "gateway.api_keys.0.sha256" in message
    assert "THREADLINE_GATEWAY__API_KEYS__SHA256" not in message
    assert "(THREADLINE_GATEWAY__API_KEYS)" in message


def test_malformed_json_in_environment_names_the_variable() -> None:
    message = _error({"THREADLINE_GATEWAY__API_KEYS": '[{"sha256": "abc", tenant: acme}]'})

    assert "THREADLINE_GATEWAY__API_KEYS" in message


def test_malformed_json_in_environment_is_a_config_error() -> None:
    message = _error({"THREADLINE_GATEWAY__API_KEYS": "[not json"})

    assert "THREADLINE_GATEWAY__API_KEYS must hold valid JSON" in message


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"

    message = _error(config_file=path)

    assert str(path) in message


def test_missing_file_from_threadline_config_is_named(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"

    assert str(path) in _error({"THREADLINE_CONFIG": str(path)})


def test_unreadable_config_file_is_named(tmp_path: Path) -> None:
    # A directory cannot be read as a file, whoever runs the tests (root ignores chmod).
    message = _error(config_file=tmp_path)

    assert str(tmp_path) in message


def test_invalid_yaml_is_named(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "llm:\n  upstream: [unclosed\n")

    message = _error(config_file=path)

    assert str(path) in message


def test_yaml_must_be_a_mapping(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "- redis_url: redis://x:1/0\n")

    message = _error(config_file=path)

    assert str(path) in message
    assert "mapping" in message


def test_unknown_key_in_yaml_is_rejected(tmp_path: Path) -> None:
    # A typo must fail loudly rather than silently fall back to the default.
    path = _yaml(tmp_path, "llm:\n  retry:\n    max_attemps: 5\n")

    message = _error(config_file=path)

    assert "llm.retry.max_attemps" in message
    assert "not permitted" in message


def test_unknown_top_level_key_in_yaml_is_rejected(tmp_path: Path) -> None:
    assert "redis (" in _error(config_file=_yaml(tmp_path, "redis: redis://x:1/0\n"))


def test_sqlite_paths_default_under_data_dir(tmp_path: Path) -> None:
    settings = load_settings(environ={"THREADLINE_DATA_DIR": str(tmp_path)})

    assert settings.sqlite_path("session") == tmp_path / "sessions.db"
    assert settings.sqlite_path("memory") == tmp_path / "memory.db"


def test_sqlite_paths_can_be_configured(tmp_path: Path) -> None:
    settings = load_settings(
        environ={
            "THREADLINE_DATA_DIR": str(tmp_path / "data"),
            "THREADLINE_SESSION__DATABASE": str(tmp_path / "s.db"),
            "THREADLINE_MEMORY__DATABASE": str(tmp_path / "m.db"),
        }
    )

    assert settings.sqlite_path("session") == tmp_path / "s.db"
    assert settings.sqlite_path("memory") == tmp_path / "m.db"


def test_memory_database_refuses_redis_at_load() -> None:
    # Memory has no Redis backend: a Redis URL must not become a file path.
    message = _error({"THREADLINE_MEMORY__DATABASE": "redis://redis:6379/0"})

    assert "memory.database (THREADLINE_MEMORY__DATABASE): " in message
    assert "no redis backend, only sqlite" in message
    # Sessions and tasks do have a Redis backend.
    shared = load_settings(
        environ={
            "THREADLINE_SESSION__DATABASE": "redis://redis:6379/0",
            "THREADLINE_EXECUTOR__TASKS__DATABASE": "rediss://redis:6380/1",
        }
    )
    assert shared.session.database == "redis://redis:6379/0"
    assert shared.executor.tasks.database == "rediss://redis:6380/1"
    # Memory does have a PostgreSQL backend.
    pg = "postgresql://threadline@db:5432/threadline"
    assert load_settings(environ={"THREADLINE_MEMORY__DATABASE": pg}).memory.database == pg


def test_settings_are_frozen() -> None:
    settings: Settings = load_settings(environ={})

    with pytest.raises(ValueError, match="frozen"):
        settings.log_level = "debug"


def test_cli_exits_2_naming_the_bad_setting(tmp_path: Path) -> None:
    environ = {
        "PATH": os.environ.get("PATH", ""),
        "THREADLINE_DATA_DIR": str(tmp_path),
        "THREADLINE_EXECUTOR__MAX_OUTPUT_TOKENS": "0",
    }

    result = subprocess.run(
        [sys.executable, "-m", "threadline.cli", "serve", "session"],
        env=environ,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert result.returncode == 2, result.stderr
    assert "executor.max_output_tokens (THREADLINE_EXECUTOR__MAX_OUTPUT_TOKENS)" in result.stderr
    assert "Traceback" not in result.stderr


def test_compaction_thresholds_are_fractions_of_the_window() -> None:
    settings = load_settings(
        environ={
            "THREADLINE_EXECUTOR__COMPACT_REQUEST_THRESHOLD": "0.8",
            "THREADLINE_MEMORY__COMPACT_THRESHOLD": "0",
        }
    )
    assert settings.executor.compact_request_threshold == 0.8
    assert settings.memory.compact_threshold == 0
    with pytest.raises(ConfigError, match=r"memory.compact_threshold"):
        load_settings(environ={"THREADLINE_MEMORY__COMPACT_THRESHOLD": "1.5"})


# -- the upstream's API key -------------------------------------------------------

KEYED_UPSTREAM = {
    "THREADLINE_LLM__UPSTREAM__BASE_URL": "http://vllm:8000/v1",
    "THREADLINE_LLM__UPSTREAM__MODEL": "llama3",
    "THREADLINE_LLM__UPSTREAM__API_KEY_ENV": "VLLM_API_KEY",
}


def test_upstream_api_key_is_read_from_the_variable_api_key_env_names() -> None:
    settings = load_settings(environ={**KEYED_UPSTREAM, "VLLM_API_KEY": "sk-upstream-key"})

    upstream = settings.llm.upstream
    assert upstream is not None and upstream.api_key is not None
    assert upstream.api_key.get_secret_value() == "sk-upstream-key"
    assert upstream.api_key_env == "VLLM_API_KEY"
    # The key never shows: not in the settings' repr, not in a dump of them.
    assert "sk-upstream-key" not in repr(settings)
    assert "sk-upstream-key" not in settings.model_dump_json()


def test_each_upstream_reads_its_own_key_variable(tmp_path: Path) -> None:
    path = _yaml(
        tmp_path,
        "llm:\n  upstreams:\n"
        "    - {name: a, base_url: 'http://a:8000/v1', model: m, api_key_env: KEY_A}\n"
        "    - {name: b, base_url: 'http://b:8000/v1', model: m}\n",
    )

    a, b = load_settings(environ={"KEY_A": "sk-a", "KEY_B": "sk-b"}, config_file=path).llm.upstreams

    assert a.api_key is not None and a.api_key.get_secret_value() == "sk-a"
    assert b.api_key is None


def test_missing_key_variable_still_loads() -> None:
    """Every service loads the same settings; only llm_proxy needs the key, and checks it."""
    upstream = load_settings(environ=KEYED_UPSTREAM).llm.upstream

    assert upstream is not None and upstream.api_key is None


def test_an_empty_key_variable_is_an_empty_key() -> None:
    upstream = load_settings(environ={**KEYED_UPSTREAM, "VLLM_API_KEY": ""}).llm.upstream

    assert upstream is not None and upstream.api_key is not None
    assert upstream.api_key.get_secret_value() == ""


def test_the_key_itself_is_not_a_setting() -> None:
    message = _error({**KEYED_UPSTREAM, "THREADLINE_LLM__UPSTREAM__API_KEY": "sk-pasted-key"})

    assert "llm.upstream.api_key (THREADLINE_LLM__UPSTREAM__API_KEY)" in message
    assert "api_key_env" in message
    assert "sk-pasted-key" not in message


def test_replicas_on_one_machine_each_listen_on_their_own_port() -> None:
    replicas = {"THREADLINE_ADDRESSES__SESSION": "ipv4:127.0.0.1:6001,127.0.0.1:6002"}

    second = load_settings(environ={**replicas, "THREADLINE_LISTEN_PORT": "6002"})
    assert second.bind_address("session") == "127.0.0.1:6002"
    with pytest.raises(ConfigError, match="listen_port"):
        load_settings(environ=replicas).bind_address("session")


def test_a_huge_address_is_refused_without_being_echoed_whole() -> None:
    message = _error({"THREADLINE_ADDRESSES__SESSION": "ipv4:" + "x" * 100_000})

    assert "addresses.session" in message
    assert len(message) < 2_000


def test_each_postgresql_store_opens_at_most_the_pool_size() -> None:
    settings = load_settings(
        environ={
            "THREADLINE_SESSION__DATABASE": "postgresql://app@db:5432/threadline",
            "THREADLINE_POSTGRES_POOL_SIZE": "3",
        }
    )

    url = settings.store_url("session")
    assert isinstance(url, PostgresUrl) and url.pool_size == 3


def test_an_empty_environ_is_not_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("THREADLINE_LOG_LEVEL", "debug")
    monkeypatch.setenv("THREADLINE_METRICS_PORT", "9999")

    settings = load_settings(environ={})

    assert (settings.log_level, settings.metrics_port) == ("info", 0)


def test_misspelt_top_level_variables_are_reported_and_settings_are_not() -> None:
    environ = {
        "THREADLINE_LOGLEVEL": "debug",
        "threadline_metrcs_port": "9090",
        "THREADLINE_LOG_LEVEL": "debug",
        "THREADLINE_LLM__UPSTREAM__BASE_URL": "http://127.0.0.1:9/v1",
        "THREADLINE_LLM__UPSTREAM__MODEL": "m",
        "THREADLINE_LLM__UPSTREAM__API_KEY_ENV": "THREADLINE_UPSTREAM_KEY",
        "THREADLINE_UPSTREAM_KEY": "sk-1",
        "THREADLINE_CONFIG": "",
        "THREADLINE_TRACING__OTLP_ENDPOINT": "http://collector:4317",
        "HOME": "/root",
    }

    settings = load_settings(environ=environ)

    assert unknown_variables(settings, environ) == ["THREADLINE_LOGLEVEL", "threadline_metrcs_port"]
