"""The incremental SSE parser and relay batching."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from services.llm_proxy.relay import Batches
from services.llm_proxy.sse import SseParser


def feed_all(*chunks: bytes) -> list[str]:
    parser = SseParser()
    events: list[str] = []
    for chunk in chunks:
        events += parser.feed(chunk)
    return events + parser.finish()


def test_events_comments_and_keep_alives() -> None:
    stream = b': keep-alive\n\ndata: {"a": 1}\n\n:ping\n\ndata: [DONE]\n\n'
    assert feed_all(stream) == ['{"a": 1}', "[DONE]"]


def test_multi_line_data_joins_with_newlines() -> None:
    assert feed_all(b"data: one\ndata: two\n\n") == ["one\ntwo"]


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
def test_any_line_ending_even_split_across_reads(newline: bytes) -> None:
    stream = b"data: x" + newline + newline + b"data: y" + newline + newline
    whole = feed_all(stream)
    byte_by_byte = feed_all(*(stream[i : i + 1] for i in range(len(stream))))
    assert whole == byte_by_byte == ["x", "y"]


def test_utf8_split_inside_a_character() -> None:
    encoded = "data: héllo ✓\n\n".encode()
    assert feed_all(encoded[:8], encoded[8:]) == ["héllo ✓"]


def test_unterminated_last_event_is_delivered_at_the_end() -> None:
    assert feed_all(b"data: a\n\ndata: tail") == ["a", "tail"]


def test_other_fields_are_ignored() -> None:
    assert feed_all(b"event: message\nid: 7\nretry: 100\ndata:x\n\n") == ["x"]


async def source(items: list[int], delay: float = 0) -> AsyncIterator[int]:
    for item in items:
        if delay:
            await asyncio.sleep(delay)
        yield item


async def test_batches_relay_everything_in_order() -> None:
    got = [item async for batch in Batches(source(list(range(100)))) for item in batch]
    assert got == list(range(100))


async def test_slow_source_is_relayed_item_by_item() -> None:
    batches = [batch async for batch in Batches(source([1, 2, 3], delay=0.01))]
    assert batches == [[1], [2], [3]]


async def test_failure_arrives_after_what_came_before() -> None:
    async def failing() -> AsyncIterator[int]:
        yield 1
        raise ValueError("cut")

    got: list[int] = []
    with pytest.raises(ValueError, match="cut"):
        async for batch in Batches(failing()):
            got += batch
    assert got == [1]


async def test_leaving_early_stops_the_reader() -> None:
    closed = asyncio.Event()

    async def endless() -> AsyncIterator[int]:
        try:
            while True:
                await asyncio.sleep(0.001)
                yield 1
        finally:
            closed.set()

    async with contextlib.aclosing(aiter(Batches(endless()))) as batches:
        async for _ in batches:
            break
    await asyncio.wait_for(closed.wait(), 1)
