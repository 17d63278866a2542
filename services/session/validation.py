"""Input rules for the session log, checked before anything is written.

The rules keep the log replayable against any OpenAI-compatible server: every
tool result answers a tool call made earlier in the same session, so context
building can keep a call and its results together.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

from threadline.errors import InvalidArgument
from threadline.v1 import common_pb2

_ROLES = frozenset(
    {
        common_pb2.ROLE_SYSTEM,
        common_pb2.ROLE_USER,
        common_pb2.ROLE_ASSISTANT,
        common_pb2.ROLE_TOOL,
    }
)

# The range google.protobuf.Timestamp allows: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z.
_MIN_SECONDS = -62_135_596_800
_MAX_SECONDS = 253_402_300_799


#: What a session carries beside its messages. Every list shows them, so they stay small.
MAX_TITLE_CHARS = 256
MAX_MODEL_CHARS = 128
MAX_METADATA_ENTRIES = 32
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 1024


def _check_length(field: str, value: str, limit: int) -> None:
    # Never echoes the value: it may be megabytes.
    if len(value) > limit:
        raise InvalidArgument(f"{field} is {len(value)} characters; the limit is {limit}")


def validate_session_fields(*, title: str, model: str, metadata: Mapping[str, str]) -> None:
    """Raise InvalidArgument naming the first field past its limit (and the limit)."""
    _check_length("title", title, MAX_TITLE_CHARS)
    _check_length("model", model, MAX_MODEL_CHARS)
    if len(metadata) > MAX_METADATA_ENTRIES:
        raise InvalidArgument(
            f"metadata has {len(metadata)} entries; the limit is {MAX_METADATA_ENTRIES}"
        )
    for key, value in metadata.items():
        _check_length("metadata key", key, MAX_METADATA_KEY_CHARS)
        _check_length(f"metadata[{key!r}]", value, MAX_METADATA_VALUE_CHARS)


def _excerpt(value: str, limit: int = 80) -> str:
    # Error messages echo client input; keep them bounded.
    return repr(value if len(value) <= limit else value[:limit] + "...")


def validate_messages(
    messages: Sequence[common_pb2.Message],
    *,
    max_message_chars: int,
    max_messages: int,
    known_tool_call_ids: Collection[str] = frozenset(),
) -> None:
    """Raise InvalidArgument naming the first problem (message index and field).

    `known_tool_call_ids` holds the ids of tool calls made by the session's
    earlier assistant messages; calls made earlier in this batch count too.
    """
    if not messages:
        raise InvalidArgument("no messages to append")
    if len(messages) > max_messages:
        raise InvalidArgument(
            f"too many messages: {len(messages)} in one append, the limit is {max_messages}"
        )
    known = set(known_tool_call_ids)
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if msg.role not in _ROLES:
            raise InvalidArgument(
                f"{where}.role: must be system, user, assistant or tool, got {msg.role}"
            )
        if len(msg.content) > max_message_chars:
            raise InvalidArgument(
                f"{where}.content: {len(msg.content)} characters, the limit is {max_message_chars}"
            )
        if msg.HasField("created_at"):
            ts = msg.created_at
            if not (_MIN_SECONDS <= ts.seconds <= _MAX_SECONDS and 0 <= ts.nanos < 10**9):
                raise InvalidArgument(f"{where}.created_at: out of the valid timestamp range")
        if msg.tool_calls and msg.role != common_pb2.ROLE_ASSISTANT:
            raise InvalidArgument(f"{where}.tool_calls: only assistant messages make tool calls")
        if msg.tool_call_id and msg.role != common_pb2.ROLE_TOOL:
            raise InvalidArgument(f"{where}.tool_call_id: only tool messages answer tool calls")

        if msg.role == common_pb2.ROLE_USER:
            if not msg.content.strip():
                raise InvalidArgument(f"{where}.content: a user message needs content")
        elif msg.role == common_pb2.ROLE_SYSTEM:
            if not msg.content.strip():
                raise InvalidArgument(f"{where}.content: a system message needs content")
        elif msg.role == common_pb2.ROLE_ASSISTANT:
            # An empty answer is still an answer: models do end a turn with no text, and
            # storing it keeps user/assistant turns alternating.
            for j, call in enumerate(msg.tool_calls):
                call_where = f"{where}.tool_calls[{j}]"
                if not call.id:
                    raise InvalidArgument(f"{call_where}.id: required")
                if not call.name:
                    raise InvalidArgument(f"{call_where}.name: required")
                if len(call.arguments_json) > max_message_chars:
                    raise InvalidArgument(
                        f"{call_where}.arguments_json: {len(call.arguments_json)} characters, "
                        f"the limit is {max_message_chars}"
                    )
                # A reused id would make a later tool result ambiguous.
                if call.id in known:
                    raise InvalidArgument(
                        f"{call_where}.id: tool call id {_excerpt(call.id)} is already used "
                        "in this session"
                    )
                known.add(call.id)
        else:  # ROLE_TOOL
            if not msg.tool_call_id:
                raise InvalidArgument(f"{where}.tool_call_id: required for a tool message")
            if msg.tool_call_id not in known:
                raise InvalidArgument(
                    f"{where}.tool_call_id: {_excerpt(msg.tool_call_id)} does not match a tool "
                    "call of an earlier assistant message"
                )
