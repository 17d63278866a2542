"""A service that cannot start says why in one JSON line and exits 1, no traceback."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
from pathlib import Path

import pytest

from tests.processes import threadline_environ

pytestmark = pytest.mark.slow


async def serve_session(**settings: str) -> tuple[int, list[str]]:
    """`threadline serve session` with `settings`; its exit code and stdout lines."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "threadline.cli",
        "serve",
        "session",
        env=threadline_environ(THREADLINE_LOG_LEVEL="warning", **settings),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode().splitlines()


def failure(lines: list[str]) -> dict[str, str]:
    records = [json.loads(line) for line in lines]
    failed = [r for r in records if r["event"] == "startup.failed"]
    assert len(failed) == 1, lines
    assert not any("Traceback" in line for line in lines)
    reported: dict[str, str] = failed[0]
    return reported


async def test_a_port_in_use_is_named_with_the_setting_that_moves_it(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        code, lines = await serve_session(
            THREADLINE_DATA_DIR=str(tmp_path), THREADLINE_ADDRESSES__SESSION=address
        )

    assert code == 1
    reported = failure(lines)
    assert reported["problem"] == "address_in_use"
    assert reported["address"] == address
    assert "THREADLINE_ADDRESSES__SESSION" in reported["setting"]


async def test_a_metrics_port_in_use_is_named_too(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, lines = await serve_session(
            THREADLINE_DATA_DIR=str(tmp_path),
            THREADLINE_ADDRESSES__SESSION="127.0.0.1:0",
            THREADLINE_METRICS_PORT=str(port),
        )

    assert code == 1
    reported = failure(lines)
    assert (reported["problem"], reported["listener"]) == ("address_in_use", "metrics")
    assert "THREADLINE_METRICS_PORT" in reported["setting"]


async def test_a_data_dir_that_cannot_be_written_is_named(tmp_path: Path) -> None:
    # A path below a regular file: not a directory, whoever runs the test (root too).
    (tmp_path / "a-file").write_text("")
    data_dir = tmp_path / "a-file" / "data"

    code, lines = await serve_session(
        THREADLINE_DATA_DIR=str(data_dir), THREADLINE_ADDRESSES__SESSION="127.0.0.1:0"
    )

    assert code == 1
    reported = failure(lines)
    assert reported["problem"] == "data_dir_not_writable"
    assert reported["path"] == str(data_dir)
    assert "THREADLINE_DATA_DIR" in reported["setting"]


async def test_a_misspelt_variable_is_a_warning_naming_it(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    code, lines = await serve_session(
        THREADLINE_DATA_DIR=str(tmp_path / "a-file" / "data"), THREADLINE_GRACE_PERIOD="5"
    )

    warnings = [json.loads(line) for line in lines if "config.unknown_variable" in line]
    assert [w["variable"] for w in warnings] == ["THREADLINE_GRACE_PERIOD"]
    assert code == 1
