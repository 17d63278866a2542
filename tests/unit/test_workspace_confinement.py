"""The workspace against a concurrent writer: what an attacker who can rename and
link inside the workspace (a command-runner task sharing it, say) gets out of it.

Real directories, real symlinks, a real second process swapping them: the bugs
live in the window between a check and an open, which only a real race shows.
Every test runs twice, through openat2 and through the component-by-component
walk used where the kernel has no openat2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.executor.turns import confined
from services.executor.turns.tools import ToolBox, ToolResult
from services.executor.turns.workspace import PermissionRule, Workspace

CANARY = "CANARY: this file is outside the workspace\n"
SWAP_SECONDS = 3.0

# Swaps <ws>/ra between the real directory and a symlink to the outside directory
# as fast as it can, for a given time; prints how many times the symlink was there.
# A write whose mkdir re-created `ra` while the symlink was gone is put aside, so
# the swap goes on.
SWAPPER = """
import os, shutil, sys, time
ws, outside, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
real, parked = os.path.join(ws, "ra"), os.path.join(ws, "ra.parked")
swaps, end = 0, time.monotonic() + seconds
while time.monotonic() < end:
    try:
        os.rename(real, parked)
    except OSError:
        continue
    try:
        os.symlink(outside, real)
        swaps += 1
        os.unlink(real)
    except OSError:
        pass
    while True:
        try:
            os.rename(parked, real)
            break
        except OSError:
            shutil.rmtree(real, ignore_errors=True)
print(swaps)
"""


@pytest.fixture(params=["openat2", "walk"])
def resolution(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "walk":
        monkeypatch.setattr(confined, "_OPENAT2", None)
    elif confined._OPENAT2 is None:
        pytest.skip("this kernel offers no openat2")
    return str(request.param)


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """Laid out like the workspace's `ra`, so a followed link finds what it looks for."""
    path = tmp_path / "outside"
    (path / "b").mkdir(parents=True)
    (path / "secret.txt").write_text(CANARY)
    return path


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "ws"
    (path / "ra" / "b").mkdir(parents=True)
    (path / "ra" / "secret.txt").write_text("inside\n")
    return path


def toolbox(root: Path) -> ToolBox:
    return ToolBox(Workspace(root, [PermissionRule("", "write")]))


async def call(box: ToolBox, name: str, **args: object) -> ToolResult:
    return await box.call(name, json.dumps(args))


def snapshot(directory: Path) -> dict[str, tuple[str, int, str]]:
    """Every entry under `directory`: type, mtime (ns) and, for files, content."""
    out = {".": ("dir", directory.stat().st_mtime_ns, "")}
    for path in sorted(directory.rglob("*")):
        info = path.lstat()
        content = path.read_text() if path.is_file() else ""
        out[str(path.relative_to(directory))] = (
            "dir" if path.is_dir() else "file",
            info.st_mtime_ns,
            content,
        )
    return out


@pytest.fixture
def swapper(root: Path, outside: Path) -> Iterator[subprocess.Popen[str]]:
    process = subprocess.Popen(
        [sys.executable, "-c", SWAPPER, str(root), str(outside), str(SWAP_SECONDS)],
        stdout=subprocess.PIPE,
        text=True,
    )
    yield process
    if process.poll() is None:
        process.kill()
    process.wait()


async def test_reads_and_deep_writes_stay_inside_while_a_directory_becomes_a_symlink(
    resolution: str, root: Path, outside: Path, swapper: subprocess.Popen[str]
) -> None:
    box = toolbox(root)
    before = snapshot(outside)
    leaked: list[str] = []
    reads_ok = writes_ok = attempts = 0

    while swapper.poll() is None:
        attempts += 1
        read = await call(box, "read_file", path="ra/secret.txt")
        if "CANARY" in read.content:
            leaked.append(read.content)
        reads_ok += read == ToolResult("inside\n")
        write = await call(box, "write_file", path="ra/b/w.txt", content=f"write {attempts}\n")
        writes_ok += write.status == "ok"

    stdout, _ = swapper.communicate()
    assert swapper.returncode == 0
    assert int(stdout) > 100, "the swap hardly ran: the race was not exercised"
    assert leaked == []
    # Nothing written, created or touched outside: contents and mtimes as they were.
    assert snapshot(outside) == before
    # Between swaps the workspace works as usual.
    assert reads_ok > 0 and writes_ok > 0


async def test_a_hard_link_to_an_outside_file_is_not_read(
    resolution: str, root: Path, outside: Path
) -> None:
    os.link(outside / "secret.txt", root / "linked.txt")
    box = toolbox(root)

    read = await call(box, "read_file", path="linked.txt")
    search = await call(box, "search_text", pattern="outside the workspace")

    assert read.status == "denied"
    assert read.reason == (
        "'linked.txt' is a hard link (the file has 2 names); "
        "the tools read only files with a single name"
    )
    assert "CANARY" not in read.content and "CANARY" not in search.content
    assert search.content.startswith("no matches")
    assert "[files skipped: 1 not readable]" in search.content
    # A write replaces the name (the old file is never opened): the other name keeps
    # its content.
    write = await call(box, "write_file", path="linked.txt", content="new\n")
    assert write == ToolResult("replaced 'linked.txt' (4 bytes)")
    assert (outside / "secret.txt").read_text() == CANARY
    assert await call(box, "read_file", path="linked.txt") == ToolResult("new\n")
