"""The session log's hash chain: `hash = sha256(parent_hash || canonical(entry))`.

The canonical form is part of the storage format: every stored hash depends on
it, so changing it (a field, a key name, the timestamp format) invalidates every
existing chain. Add a new chain version instead of editing this one.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Iterable

from threadline.errors import DataLoss
from threadline.v1 import common_pb2

#: Parent hash of a session's first message, and the head of an empty session.
GENESIS_HASH = ""

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def rfc3339_micros(micros: int) -> str:
    """Format microseconds since the Unix epoch as `YYYY-MM-DDTHH:MM:SS.ffffffZ`."""
    t = _EPOCH + dt.timedelta(microseconds=micros)
    # Formatted by hand: strftime("%Y") does not zero-pad years before 1000 on glibc.
    return (
        f"{t.year:04d}-{t.month:02d}-{t.day:02d}T"
        f"{t.hour:02d}:{t.minute:02d}:{t.second:02d}.{t.microsecond:06d}Z"
    )


def _role_name(role: common_pb2.Role.ValueType) -> str:
    try:
        return common_pb2.Role.Name(role)
    except ValueError:
        # proto3 enums are open: an unknown number still needs a stable encoding.
        return str(role)


def canonical_bytes(msg: common_pb2.Message) -> bytes:
    """The bytes a message's hash covers: its content-bearing fields as canonical JSON.

    token_count, seq, parent_hash and hash are derived metadata and excluded, so
    re-estimating tokens never breaks a chain. An unset created_at encodes as the
    epoch, the same as a zero Timestamp, so presence never changes a hash.
    """
    entry = {
        "id": msg.id,
        "role": _role_name(msg.role),
        "content": msg.content,
        "tool_calls": [
            {"id": tc.id, "name": tc.name, "arguments_json": tc.arguments_json}
            for tc in msg.tool_calls
        ],
        "tool_call_id": msg.tool_call_id,
        "name": msg.name,
        "created_at": rfc3339_micros(msg.created_at.ToMicroseconds()),
        "interrupted": msg.interrupted,
    }
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode(
        "utf-8"
    )


def entry_hash(parent_hash: str, msg: common_pb2.Message) -> str:
    """sha256 hex of the parent hash (UTF-8) followed by the message's canonical bytes."""
    h = hashlib.sha256(parent_hash.encode("utf-8"))
    h.update(canonical_bytes(msg))
    return h.hexdigest()


def verify_chain(
    messages: Iterable[common_pb2.Message], *, parent_hash: str = GENESIS_HASH
) -> None:
    """Raise DataLoss naming the first message whose position or hash does not check out.

    `parent_hash` is the hash of the message before the first one given: the
    default verifies a log from its start; pass a known hash to verify a tail.
    """
    expected_parent = parent_hash
    expected_seq: int | None = 0 if parent_hash == GENESIS_HASH else None
    for msg in messages:
        problem = ""
        if expected_seq is not None and msg.seq != expected_seq:
            problem = f"expected seq {expected_seq}"
        elif msg.parent_hash != expected_parent:
            problem = f"parent_hash {msg.parent_hash!r} does not match previous hash"
        elif entry_hash(msg.parent_hash, msg) != msg.hash:
            problem = "hash does not match its content"
        if problem:
            raise DataLoss(
                f"session log is corrupt at seq {msg.seq}: {problem}",
                details={"seq": str(msg.seq)},
            )
        expected_parent = msg.hash
        expected_seq = msg.seq + 1
