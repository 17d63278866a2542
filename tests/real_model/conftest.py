"""A real llama.cpp server with the bundled SmolLM2 135M Instruct, shared by the whole session.

Starting it costs a second or two (loading the .gguf), so every
real_model test talks to the same server.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from threadline.local_model import LocalModelServer, local_model_installed

REQUIRE_ENV = "THREADLINE_REQUIRE_REAL_MODEL"


@pytest.fixture(scope="session")
def local_model_required() -> None:
    """Skip when the local-model extra is missing, or fail when the run demands it."""
    if local_model_installed():
        return
    reason = "the local-model extra is not installed: pip install '.[local-model]'"
    # CI sets this so that a broken install fails loudly instead of skipping every test.
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{REQUIRE_ENV}=1 but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def local_model(
    local_model_required: None, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[LocalModelServer]:
    server = LocalModelServer(tmp_path_factory.mktemp("local-model"))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
