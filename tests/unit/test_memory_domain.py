"""Memory's pure rules: turn boundaries, chunks, the retained tail, triggers,
extraction parsing and merging, recall within a budget; what it needs of sessions."""

from __future__ import annotations

import inspect
import json

import pytest

from services.memory import transcript
from services.memory.compaction import refusal, tail_start
from services.memory.extraction import Extraction, items_of, merge_all, parse
from services.memory.recall import recall
from services.memory.sessions import SessionReader, SessionWriter
from services.memory.store import Activity, Item, SessionMemory
from services.memory.triggers import (
    Thresholds,
    compaction_due,
    consolidation_due,
    extraction_due,
)
from threadline.peers import SessionClient
from threadline.v1 import common_pb2, session_pb2

USER, ASSISTANT, TOOL = common_pb2.ROLE_USER, common_pb2.ROLE_ASSISTANT, common_pb2.ROLE_TOOL


def msg(role: int, tokens: int = 10, seq: int = 0, calls: int = 0) -> common_pb2.Message:
    message = common_pb2.Message(role=role, content="x" * 4 * tokens, seq=seq, token_count=tokens)  # type: ignore[arg-type]
    for i in range(calls):
        message.tool_calls.add(id=f"c{i}", name="read_file", arguments_json="{}")
    return message


def log(*roles: int, tokens: int = 10) -> list[common_pb2.Message]:
    return [
        msg(role, tokens, seq, calls=1 if role == ASSISTANT and nxt == TOOL else 0)
        for seq, (role, nxt) in enumerate(zip(roles, (*roles[1:], None), strict=True))
    ]


def test_the_boundary_leaves_out_a_turn_in_progress() -> None:
    assert transcript.turn_boundary(log(USER, ASSISTANT, USER, ASSISTANT)) == 4
    assert transcript.turn_boundary(log(USER, ASSISTANT, USER)) == 2
    # A tool loop still running: its question stays out too.
    assert transcript.turn_boundary(log(USER, ASSISTANT, USER, ASSISTANT, TOOL)) == 2
    assert transcript.turn_boundary(log(USER)) == 0
    assert transcript.turn_boundary([]) == 0


def test_chunks_keep_order_and_budget() -> None:
    messages = log(USER, ASSISTANT, USER, ASSISTANT, USER, ASSISTANT, tokens=30)
    chunks = transcript.chunks(messages, 70)
    assert [len(c) for c in chunks] == [2, 2, 2]
    assert [m.seq for c in chunks for m in c] == list(range(6))
    # A message over the budget goes alone rather than never.
    assert [len(c) for c in transcript.chunks(log(USER, ASSISTANT, tokens=100), 50)] == [1, 1]


def test_the_tail_keeps_the_last_question_even_over_budget() -> None:
    messages = log(USER, ASSISTANT, USER, ASSISTANT, USER, tokens=50)
    assert tail_start(messages, 10) == 4
    assert tail_start(messages, 120) == 3
    assert tail_start(messages, 10_000) == 0


def test_the_tail_never_starts_with_a_tool_result() -> None:
    messages = log(USER, ASSISTANT, USER, ASSISTANT, TOOL, TOOL, ASSISTANT, tokens=10)
    # 25 tokens would start at the second tool result: the call comes along.
    assert tail_start(messages, 25) == 2  # from the last user message
    messages = log(USER, ASSISTANT, TOOL, ASSISTANT, USER, ASSISTANT, TOOL, ASSISTANT)
    start = tail_start(messages, 25)
    assert messages[start].role != TOOL and start <= 4


def test_refusals_name_why() -> None:
    session = session_pb2.Session(id="ses_x", head="h2", message_count=5)
    messages = log(USER, ASSISTANT, USER, ASSISTANT, USER, tokens=50)
    fine = refusal(session, messages, (-1, 0, ""), retained_tokens=10, max_failures=3)
    assert fine == ""
    just_made = refusal(session, messages, (5, 0, ""), retained_tokens=10, max_failures=3)
    assert "just made by compaction" in just_made
    disabled = refusal(session, messages, (-1, 3, "h2"), retained_tokens=10, max_failures=3)
    assert "disabled until the session changes" in disabled
    changed = refusal(session, messages, (-1, 3, "h1"), retained_tokens=10, max_failures=3)
    assert changed == ""
    small = refusal(session, messages[:1], (-1, 0, ""), retained_tokens=10, max_failures=3)
    assert "nothing to compact" in small


THRESHOLDS = Thresholds(consolidate_fraction=0.5, extract_threshold=100, compact_threshold=0.8)


def test_consolidation_and_extraction_count_from_their_own_pointers() -> None:
    messages = log(USER, ASSISTANT, USER, ASSISTANT, tokens=30)  # 120 tokens
    fresh = SessionMemory("", 0)
    assert consolidation_due(THRESHOLDS, fresh, messages, 240)
    assert not consolidation_due(THRESHOLDS, fresh, messages, 241)
    assert not consolidation_due(THRESHOLDS, SessionMemory("", 2), messages, 240)
    assert extraction_due(THRESHOLDS, fresh, messages)
    assert not extraction_due(THRESHOLDS, SessionMemory("", 0, extract_offset=2), messages)
    off = Thresholds(0, 0, 0)
    assert not consolidation_due(off, fresh, messages, 1)
    assert not extraction_due(off, fresh, messages)


def test_compaction_is_due_from_reported_tokens_only() -> None:
    def activity(prompt: int, window: int = 1000) -> Activity:
        return Activity("t", "s", "m", prompt, window, 0)

    assert compaction_due(THRESHOLDS, activity(800))
    assert not compaction_due(THRESHOLDS, activity(799))
    assert not compaction_due(THRESHOLDS, activity(0))
    assert not compaction_due(THRESHOLDS, None)
    assert not compaction_due(Thresholds(0.5, 100, 0), activity(1000))


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("not json", "not JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"decisions": [{"options": []}]}', "decisions.0.chosen"),
        ('{"attempts": [{"action": "ran tests", "succeeded": "maybe"}]}', "succeeded"),
    ],
)
def test_malformed_extractions_name_the_problem(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse(text)


def test_extraction_keys_merge_the_same_fact() -> None:
    first = items_of(
        parse(json.dumps({"discussions": [{"topic": "Budget", "points": ["flights"]}]})), 0, 3
    )
    again = items_of(
        parse(json.dumps({"discussions": [{"topic": " budget", "points": ["hotels"]}]})), 4, 7
    )
    (merged,) = merge_all(first, again)
    assert json.loads(merged.json)["points"] == ["flights", "hotels"]
    assert (merged.from_seq, merged.to_seq, merged.mentions) == (0, 7, 2)
    assert items_of(Extraction(), 0, 1) == []


def test_recall_ranks_by_the_query_and_stays_within_budget() -> None:
    items = [
        Item(
            "decision",
            "train",
            json.dumps({"chosen": "train", "options": [], "rationale": ""}),
            0,
            1,
        ),
        Item(
            "discussion", "hotel", json.dumps({"topic": "hotel", "points": ["near station"]}), 2, 3
        ),
        Item(
            "request", "x", json.dumps({"intent": "book", "target": "museum", "summary": ""}), 4, 5
        ),
    ]
    recalled = recall("Trip to Lyon.", items, "which hotel near the station?", budget_tokens=40)
    assert recalled.items[0].key == "hotel" and len(recalled.items) < 3
    assert transcript.tokens_of_text(recalled.context) <= 40
    everything = recall("Trip to Lyon.", items, "", budget_tokens=1000)
    assert len(everything.items) == 3 and "Trip to Lyon." in everything.context
    assert recall("", [], "", 100).context == ""


def test_the_session_client_is_what_memory_reads_and_writes_sessions_through() -> None:
    writer: type[SessionWriter] = SessionClient  # mypy checks the signatures
    reader: type[SessionReader] = writer
    assert inspect.iscoroutinefunction(reader.get)
    assert inspect.iscoroutinefunction(reader.messages_from)
    assert inspect.iscoroutinefunction(writer.create)
