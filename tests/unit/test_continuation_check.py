"""llm_proxy's check that a continuation continues the cut answer instead of
starting it over (services/llm_proxy/continuation.py)."""

from __future__ import annotations

from services.llm_proxy.continuation import PROBE_CHARS, ContinuationCheck
from threadline.v1 import llm_pb2

PARTIAL = "Lyon sits where the Rhone meets the Saone, in the "


def delta(text: str) -> llm_pb2.ChatChunk:
    return llm_pb2.ChatChunk(delta=text)


def texts(chunks: list[llm_pb2.ChatChunk]) -> str:
    return "".join(c.delta for c in chunks)


def test_a_continuation_is_released_as_soon_as_it_differs_from_the_start() -> None:
    check = ContinuationCheck(PARTIAL)

    assert texts(check.feed(delta("east of France."))) == "east of France."
    assert check.replayed is False
    assert texts(check.feed(delta(" More."))) == " More."  # decided: passes at once


def test_a_replay_is_held_until_it_matches_the_probe_then_released_whole() -> None:
    check = ContinuationCheck(PARTIAL)
    released = []
    for word in PARTIAL.split(" ")[:4]:
        released += check.feed(delta(word + " "))
    assert released == [] and not check.decided  # "Lyon sits where the " < 24 chars
    released += check.feed(delta("Rhone "))

    assert check.replayed is True
    assert texts(released) == "Lyon sits where the Rhone "
    assert len(PARTIAL.lstrip()[:PROBE_CHARS]) == PROBE_CHARS


def test_leading_whitespace_does_not_hide_a_replay() -> None:
    check = ContinuationCheck("  " + PARTIAL)

    check.feed(delta("\n" + PARTIAL[:PROBE_CHARS]))

    assert check.replayed is True


def test_a_stream_that_ends_on_a_start_of_the_partial_answer_is_a_replay() -> None:
    check = ContinuationCheck(PARTIAL)
    assert check.feed(delta("Lyon sits")) == []

    assert texts(check.end()) == "Lyon sits"
    assert check.replayed is True


def test_a_continuation_that_says_nothing_is_not_a_replay() -> None:
    check = ContinuationCheck(PARTIAL)
    attempt = llm_pb2.ChatChunk(attempt=llm_pb2.AttemptInfo(attempt=2, status="started"))

    assert check.feed(attempt) == [attempt]  # attempt information is never held
    assert check.end() == []
    assert check.replayed is False


def test_a_tool_call_decides_a_continuation_and_releases_what_was_held() -> None:
    check = ContinuationCheck(PARTIAL)
    check.feed(delta("Ly"))
    call = llm_pb2.ChatChunk(tool_call_delta=llm_pb2.ToolCallDelta(index=0, name="f"))

    released = check.feed(call)

    assert check.replayed is False
    assert [c.WhichOneof("chunk") for c in released] == ["delta", "tool_call_delta"]


def test_an_empty_partial_answer_never_makes_a_replay() -> None:
    check = ContinuationCheck("   ")

    assert texts(check.feed(delta("Lyon"))) == "Lyon"
    assert check.replayed is False
