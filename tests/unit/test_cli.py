"""The `threadline` command as a user types it (commands that need no running stack)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from threadline.cli import app
from threadline.config import SERVICE_NAMES, hash_api_key, load_settings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No THREADLINE_* from the developer's shell, and no stray ./.threadline."""
    for name in list(os.environ):
        if name.upper().startswith("THREADLINE_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def _said(text: str) -> str:
    """Rich wraps long lines at the terminal width; compare words, not line breaks."""
    return " ".join(text.split())


def test_keys_hash_prints_the_sha256(runner: CliRunner) -> None:
    result = runner.invoke(app, ["keys", "hash", "tl-my-key"])

    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == hash_api_key("tl-my-key")
    assert len(result.stdout.strip()) == 64


def test_keys_new_prints_a_key_and_a_matching_config_entry(runner: CliRunner) -> None:
    result = runner.invoke(app, ["keys", "new", "acme"])

    assert result.exit_code == 0, result.output
    key_line = re.search(r"^key:\s+(\S+)$", result.stdout, re.MULTILINE)
    entry_line = re.search(r"^config:\s+(.+)$", result.stdout, re.MULTILINE)
    assert key_line is not None and entry_line is not None, result.stdout
    key = key_line.group(1)
    assert key.startswith("tl-")
    assert len(key) > 30
    assert hash_api_key(key) in entry_line.group(1)
    assert key not in entry_line.group(1)


def test_keys_new_makes_a_different_key_each_time(runner: CliRunner) -> None:
    first = runner.invoke(app, ["keys", "new", "acme"]).stdout
    second = runner.invoke(app, ["keys", "new", "acme"]).stdout

    assert first != second


def _key_entry_loads(runner: CliRunner, tmp_path: Path, tenant: str) -> None:
    result = runner.invoke(app, ["keys", "new", tenant])
    key = re.findall(r"^key:\s+(\S+)$", result.stdout, re.MULTILINE)[0]
    entry = re.findall(r"^config:\s+(.+)$", result.stdout, re.MULTILINE)[0]
    config = tmp_path / "threadline.yaml"
    config.write_text(f"gateway:\n  api_keys:\n    - {entry}\n")

    (api_key,) = load_settings(environ={}, config_file=config).gateway.api_keys

    assert (api_key.sha256, api_key.tenant) == (hash_api_key(key), tenant)


def test_keys_new_entry_pastes_into_the_config_file(runner: CliRunner, tmp_path: Path) -> None:
    _key_entry_loads(runner, tmp_path, "acme")


@pytest.mark.parametrize("tenant", ["2024", "yes"])
def test_keys_new_entry_loads_for_any_valid_tenant(
    runner: CliRunner, tmp_path: Path, tenant: str
) -> None:
    _key_entry_loads(runner, tmp_path, tenant)


def test_serve_unknown_service_names_the_valid_ones(runner: CliRunner) -> None:
    result = runner.invoke(app, ["serve", "nope"])

    assert result.exit_code == 2
    said = _said(result.stderr)
    assert "unknown service 'nope'" in said
    for name in SERVICE_NAMES:
        assert name in said


def test_serve_with_bad_config_exits_2_naming_the_setting(runner: CliRunner) -> None:
    result = runner.invoke(
        app, ["serve", "session"], env={"THREADLINE_EXECUTOR__MAX_OUTPUT_TOKENS": "0"}
    )

    assert result.exit_code == 2
    assert "executor.max_output_tokens (THREADLINE_EXECUTOR__MAX_OUTPUT_TOKENS)" in _said(
        result.stderr
    )


def test_serve_with_missing_config_file_names_it(runner: CliRunner, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.yaml"

    result = runner.invoke(app, ["serve", "session", "--config", str(missing)])

    assert result.exit_code == 2
    assert str(missing) in result.stderr.replace("\n", "")


def test_bad_value_in_brackets_is_shown_as_typed(runner: CliRunner) -> None:
    result = runner.invoke(
        app,
        ["serve", "llm_proxy"],
        env={
            "THREADLINE_LLM__UPSTREAM__BASE_URL": "[http://models:8000/v1]",
            "THREADLINE_LLM__UPSTREAM__MODEL": "m",
        },
    )

    assert result.exit_code == 2
    assert "'[http://models:8000/v1]'" in _said(result.stderr)


def test_unknown_service_with_markup_characters_exits_2(runner: CliRunner) -> None:
    result = runner.invoke(app, ["serve", "[/x]"])

    assert result.exit_code == 2, repr(result.exception)


def test_chat_without_api_key_explains_how_to_get_one(runner: CliRunner, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()

    result = runner.invoke(
        app, ["chat", "--data-dir", str(empty), "-m", "hi"], env={"THREADLINE_API_KEY": None}
    )

    assert result.exit_code == 2
    said = _said(result.stderr)
    assert "no API key" in said
    assert "--api-key" in said
    assert "THREADLINE_API_KEY" in said
    assert "threadline up" in said
    assert list(empty.iterdir()) == []  # chat does not invent a key


def test_events_tail_without_api_key_explains_too(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(app, ["events", "tail", "--data-dir", str(tmp_path)])

    assert result.exit_code == 2
    assert "no API key" in _said(result.stderr)


def test_no_arguments_shows_help(runner: CliRunner) -> None:
    result = runner.invoke(app, [])

    for command in ("up", "serve", "chat", "events", "keys"):
        assert command in result.output


def test_version_prints_the_release(runner: CliRunner) -> None:
    result = runner.invoke(app, ["--version"])

    assert result.exit_code == 0, result.output
    assert re.fullmatch(r"threadline \d+\.\d+\.\d+\S*\n", result.stdout)


def test_up_needs_the_local_model_only_without_an_upstream(runner: CliRunner) -> None:
    upstream = {
        "THREADLINE_LLM__UPSTREAM__BASE_URL": "http://127.0.0.1:8000/v1",
        "THREADLINE_LLM__UPSTREAM__MODEL": "my-model",
    }
    several = {
        "THREADLINE_LLM__UPSTREAMS": '[{"name": "a", "base_url": "http://a:1/v1", "model": "m"}]'
    }

    assert runner.invoke(app, ["up", "--needs-local-model"]).exit_code == 0
    assert runner.invoke(app, ["up", "--needs-local-model"], env=upstream).exit_code == 1
    assert runner.invoke(app, ["up", "--needs-local-model"], env=several).exit_code == 1


def test_up_with_an_unknown_local_model_names_the_choices(runner: CliRunner) -> None:
    result = runner.invoke(app, ["up", "--local-model", "llama-70b"])

    assert result.exit_code == 2
    said = _said(result.stderr)
    assert "local_model.name (THREADLINE_LOCAL_MODEL__NAME)" in said
    assert "'smollm2-135m' or 'gemma-3-270m'" in said
