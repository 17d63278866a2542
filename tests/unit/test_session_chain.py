"""The session log's hash chain, and the input rules that keep the log well formed."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.session.chain import (
    GENESIS_HASH,
    canonical_bytes,
    entry_hash,
    rfc3339_micros,
    verify_chain,
)
from services.session.validation import validate_messages
from threadline.errors import DataLoss, InvalidArgument
from threadline.ids import validate_session_id
from threadline.v1 import common_pb2

Message = common_pb2.Message


def _assistant_with_call() -> Message:
    msg = Message(id="msg_1", role=common_pb2.ROLE_ASSISTANT, content='héllo "x"')
    msg.tool_calls.add(id="call_1", name="read_file", arguments_json='{"path": "a.txt"}')
    msg.created_at.FromMicroseconds(1_700_000_000_123_456)
    return msg


def _chain(contents: list[str]) -> list[Message]:
    out: list[Message] = []
    parent = GENESIS_HASH
    for seq, content in enumerate(contents):
        msg = Message(id=f"msg_{seq}", role=common_pb2.ROLE_USER, content=content, seq=seq)
        msg.created_at.FromMicroseconds(1_700_000_000_000_000 + seq)
        msg.parent_hash = parent
        msg.hash = entry_hash(parent, msg)
        parent = msg.hash
        out.append(msg)
    return out


# -- canonical form and hash ---------------------------------------------------


def test_canonical_bytes_are_pinned() -> None:
    # Every stored chain depends on these exact bytes: a change here is a storage-format break.
    expected = (
        '{"content":"héllo \\"x\\"","created_at":"2023-11-14T22:13:20.123456Z","id":"msg_1",'
        '"interrupted":false,"name":"","role":"ROLE_ASSISTANT","tool_call_id":"",'
        '"tool_calls":[{"arguments_json":"{\\"path\\": \\"a.txt\\"}","id":"call_1",'
        '"name":"read_file"}]}'
    ).encode()
    assert canonical_bytes(_assistant_with_call()) == expected
    assert (
        entry_hash(GENESIS_HASH, _assistant_with_call())
        == "96890d4db9fc4f7f748e86826ad8f82d6989336b364b48b9f04cae833eb95c3c"
    )


def test_entry_hash_covers_the_parent_hash() -> None:
    msg = _assistant_with_call()
    parent = "ab" * 32
    expected = hashlib.sha256(parent.encode() + canonical_bytes(msg)).hexdigest()
    assert entry_hash(parent, msg) == expected
    assert entry_hash(parent, msg) != entry_hash(GENESIS_HASH, msg)


def test_derived_metadata_does_not_change_the_hash() -> None:
    msg = _assistant_with_call()
    before = entry_hash("", msg)
    msg.token_count = 99
    msg.seq = 7
    msg.parent_hash = "x"
    msg.hash = "y"
    assert entry_hash("", msg) == before


@pytest.mark.parametrize(
    "mutate",
    [
        lambda m: setattr(m, "content", m.content + " "),
        lambda m: setattr(m, "id", "msg_2"),
        lambda m: setattr(m, "role", common_pb2.ROLE_USER),
        lambda m: setattr(m, "interrupted", True),
        lambda m: setattr(m, "name", "bob"),
        lambda m: setattr(m.tool_calls[0], "arguments_json", "{}"),
        lambda m: m.created_at.FromMicroseconds(m.created_at.ToMicroseconds() + 1),
    ],
)
def test_every_content_field_changes_the_hash(mutate: Callable[[Message], object]) -> None:
    msg = _assistant_with_call()
    before = entry_hash("", msg)
    mutate(msg)
    assert entry_hash("", msg) != before


def test_unset_created_at_hashes_like_the_epoch() -> None:
    unset = Message(id="m", role=common_pb2.ROLE_USER, content="hi")
    epoch = Message(id="m", role=common_pb2.ROLE_USER, content="hi")
    epoch.created_at.FromMicroseconds(0)
    assert canonical_bytes(unset) == canonical_bytes(epoch)


def test_rfc3339_pads_early_years() -> None:
    assert rfc3339_micros(-62_135_596_800 * 1_000_000) == "0001-01-01T00:00:00.000000Z"
    assert rfc3339_micros(0) == "1970-01-01T00:00:00.000000Z"


@settings(max_examples=100, deadline=None)
@given(
    content=st.text(),
    name=st.text(max_size=20),
    args=st.text(max_size=50),
    micros=st.integers(min_value=-62_135_596_800 * 10**6, max_value=253_402_300_799 * 10**6),
)
def test_hash_survives_wire_round_trip(content: str, name: str, args: str, micros: int) -> None:
    msg = Message(id="msg_x", role=common_pb2.ROLE_ASSISTANT, content=content, name=name)
    msg.tool_calls.add(id="c", name="t", arguments_json=args)
    msg.created_at.FromMicroseconds(micros)
    again = Message.FromString(msg.SerializeToString())
    assert entry_hash("p", again) == entry_hash("p", msg)


# -- verify_chain --------------------------------------------------------------


def test_verify_chain_accepts_a_valid_chain_and_an_empty_one() -> None:
    verify_chain(_chain(["a", "b", "c"]))
    verify_chain([])


def test_verify_chain_names_the_tampered_message() -> None:
    chain = _chain(["a", "b", "c", "d"])
    chain[2].content = "tampered"
    with pytest.raises(DataLoss, match="seq 2") as info:
        verify_chain(chain)
    assert info.value.details["seq"] == "2"


def test_verify_chain_catches_a_rehashed_message_by_its_successor() -> None:
    chain = _chain(["a", "b", "c"])
    chain[1].content = "tampered"
    chain[1].hash = entry_hash(chain[1].parent_hash, chain[1])
    with pytest.raises(DataLoss, match="seq 2"):
        verify_chain(chain)


def test_verify_chain_catches_a_missing_message() -> None:
    chain = _chain(["a", "b", "c"])
    with pytest.raises(DataLoss, match="seq 2"):
        verify_chain([chain[0], chain[2]])
    with pytest.raises(DataLoss, match="seq 1"):
        verify_chain(chain[1:])


def test_verify_chain_checks_a_tail_from_a_known_parent() -> None:
    chain = _chain(["a", "b", "c"])
    verify_chain(chain[1:], parent_hash=chain[0].hash)
    with pytest.raises(DataLoss, match="seq 1"):
        verify_chain(chain[1:], parent_hash="0" * 64)


# -- validation ----------------------------------------------------------------


def _user(content: str = "hi") -> Message:
    return Message(role=common_pb2.ROLE_USER, content=content)


def _calls(*ids: str, content: str = "") -> Message:
    msg = Message(role=common_pb2.ROLE_ASSISTANT, content=content)
    for call_id in ids:
        msg.tool_calls.add(id=call_id, name="search", arguments_json="{}")
    return msg


def _result(call_id: str) -> Message:
    return Message(role=common_pb2.ROLE_TOOL, tool_call_id=call_id, content="ok")


def _validate(messages: list[Message], known: frozenset[str] = frozenset()) -> None:
    validate_messages(messages, max_message_chars=100, max_messages=4, known_tool_call_ids=known)


def test_a_valid_turn_passes() -> None:
    _validate([_user(), _calls("c1", "c2"), _result("c2"), _result("c1")])
    _validate(
        [_result("c9"), Message(role=common_pb2.ROLE_ASSISTANT, content="done")], frozenset({"c9"})
    )


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([], "no messages"),
        ([_user()] * 5, "too many messages: 5"),
        ([Message(content="x")], r"messages\[0\]\.role"),
        ([_user(), Message(role=7, content="x")], r"messages\[1\]\.role"),  # type: ignore[arg-type]
        ([_user("x" * 101)], r"messages\[0\]\.content: 101 characters, the limit is 100"),
        ([_user("   ")], r"messages\[0\]\.content: a user message needs content"),
        ([Message(role=common_pb2.ROLE_TOOL, content="x")], r"messages\[0\]\.tool_call_id"),
        ([_user(), _result("nope")], r"messages\[1\]\.tool_call_id: 'nope' does not match"),
        ([_result("c1"), _calls("c1")], r"messages\[0\]\.tool_call_id"),
        ([_calls("c1"), _calls("c1")], r"messages\[1\]\.tool_calls\[0\]\.id: .* already used"),
        ([_calls("")], r"messages\[0\]\.tool_calls\[0\]\.id: required"),
        (
            [Message(role=common_pb2.ROLE_USER, content="x", tool_call_id="c1")],
            r"messages\[0\]\.tool_call_id: only tool messages",
        ),
    ],
)
def test_invalid_batches_name_the_problem(messages: list[Message], match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        _validate(messages)


def test_tool_call_ids_are_unique_across_the_session() -> None:
    with pytest.raises(InvalidArgument, match="already used"):
        _validate([_calls("c1")], frozenset({"c1"}))


def test_arguments_count_against_the_size_limit() -> None:
    msg = _calls("c1")
    msg.tool_calls[0].arguments_json = "x" * 101
    with pytest.raises(InvalidArgument, match=r"arguments_json: 101 characters"):
        _validate([msg])


def test_created_at_out_of_range_is_rejected() -> None:
    msg = _user()
    msg.created_at.seconds = 253_402_300_800
    with pytest.raises(InvalidArgument, match="created_at"):
        _validate([msg])


@pytest.mark.parametrize(
    "session_id",
    ["ses_", "ses_" + "A" * 32, "ses_" + "0" * 31, "ses_" + "0" * 33, "sess_" + "0" * 32],
)
def test_malformed_session_ids_are_rejected(session_id: str) -> None:
    with pytest.raises(InvalidArgument, match="malformed session id"):
        validate_session_id(session_id)


def test_well_formed_session_id_passes() -> None:
    validate_session_id("ses_" + "0123456789abcdef" * 2)


def test_an_empty_answer_is_a_valid_assistant_message() -> None:
    validate_messages(
        [Message(role=common_pb2.ROLE_ASSISTANT, content="")], max_message_chars=10, max_messages=1
    )


def test_missing_session_id_is_named() -> None:
    with pytest.raises(InvalidArgument, match="session_id is required"):
        validate_session_id("")
