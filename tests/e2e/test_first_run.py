"""`threadline up` as a newcomer runs it: the chat command it prints works as printed."""

from __future__ import annotations

import asyncio
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import FAKE_MODEL
from tests.ports import free_ports
from tests.processes import threadline_environ
from threadline.config import SERVICE_NAMES
from threadline.testing.fake_upstream import FakeUpstream, Script

pytestmark = pytest.mark.slow

# The console script pip installed beside this interpreter, as the README runs it.
THREADLINE = Path(sys.executable).parent / "threadline"


async def _read_chat_hint(proc: asyncio.subprocess.Process) -> tuple[str, list[str]]:
    assert proc.stderr is not None
    said: list[str] = []
    async with asyncio.timeout(60):
        while line := (await proc.stderr.readline()).decode():
            said.append(line)
            if line.startswith("chat with:"):
                return line.removeprefix("chat with:").strip(), said
    raise AssertionError(f"`threadline up` printed no chat hint:\n{''.join(said)}")


async def test_the_printed_chat_command_works_from_another_directory(
    tmp_path: Path, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.default = Script(text="Paris is the capital of France.")
    ports = free_ports(len(SERVICE_NAMES))
    config = tmp_path / "threadline.yaml"
    # No API keys: `up` makes a dev key, and the printed command must find it.
    config.write_text(
        yaml.safe_dump(
            {
                "data_dir": "data",
                "log_level": "warning",
                "addresses": {
                    n: f"127.0.0.1:{p}" for n, p in zip(SERVICE_NAMES, ports, strict=True)
                },
                "llm": {"upstream": {"base_url": fake_upstream.base_url, "model": FAKE_MODEL}},
            }
        )
    )
    up = await asyncio.create_subprocess_exec(
        str(THREADLINE),
        "up",
        "--config",
        str(config),
        cwd=tmp_path,
        env=threadline_environ(),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    try:
        hint, said = await _read_chat_hint(up)
        chat = await asyncio.create_subprocess_exec(
            *shlex.split(hint),
            "-m",
            "What is the capital of France?",
            cwd=elsewhere,
            env=threadline_environ(),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(chat.communicate(), 60)
    finally:
        up.terminate()
        await asyncio.wait_for(up.wait(), 30)

    assert chat.returncode == 0, err.decode()
    assert out.decode().strip() == "Paris is the capital of France."
    assert f"127.0.0.1:{ports[0]}" in hint
    assert str(tmp_path / "data") in hint
    assert not any("local model" in line for line in said)


def test_version_names_the_installed_release() -> None:
    result = subprocess.run(
        [str(THREADLINE), "--version"], capture_output=True, text=True, check=True, timeout=30
    )
    assert result.stdout.startswith("threadline ")
    assert result.stdout.split()[1][0].isdigit()
