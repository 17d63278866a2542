"""An upstream that does not take the connection is a connect timeout (retryable,
after `connect_s`), never mistaken for a silent upstream's first-token timeout."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator

import pytest

from services.llm_proxy.upstream import Upstream, UpstreamFailure
from threadline.config import TimeoutSettings, UpstreamSettings


@contextlib.contextmanager
def full_listener() -> Iterator[int]:
    """A port whose accept queue is full: further connects get no answer (SYN dropped)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(("127.0.0.1", port))
        fillers.append(filler)
    try:
        yield port
    finally:
        for filler in fillers:
            filler.close()
        server.close()


async def test_a_connect_that_gets_no_answer_is_a_connect_timeout() -> None:
    with full_listener() as port:
        settings = UpstreamSettings(
            name="unanswering",
            base_url=f"http://127.0.0.1:{port}/v1",
            model="m",
            timeouts=TimeoutSettings(connect_s=0.3, first_token_s=5),
        )
        upstream = Upstream.create(settings)
        began = time.perf_counter()
        try:
            with pytest.raises(UpstreamFailure) as failed:
                async for _ in upstream.stream({"model": "m", "messages": []}):
                    pass
        finally:
            await upstream.close()
    assert failed.value.reason == "connect_timeout"
    assert failed.value.retryable
    assert failed.value.message == "could not connect to upstream 'unanswering' within 0.3s"
    assert time.perf_counter() - began < 2  # connect_s, not first_token_s
