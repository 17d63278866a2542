"""The session log's hash chain: `hash = sha256(parent_hash || canonical(entry))`.

The canonical form is part of the storage format: every stored hash depends on
it, so changing it (a field, a key name, the timestamp format) invalidates every
existing chain. Add a new chain version instead of editing this one.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Callable, Iterable, Sequence

from threadline.errors import DataLoss
from threadline.ids import new_message_id
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


def seal_messages(
    batch: Sequence[common_pb2.Message],
    *,
    parent_hash: str,
    first_seq: int,
    now_micros: int,
    token_count: Callable[[common_pb2.Message], int],
) -> str:
    """Give each message of a batch its place in the log, in place; return the new head.

    Assigns id (when empty), created_at (when unset), seq, parent_hash, token_count
    and hash, exactly as every backend stores them: the hashes depend only on the
    parent hash and the messages, so they can be computed before the write.
    """
    head = parent_hash
    for seq, msg in enumerate(batch, start=first_seq):
        if not msg.id:
            msg.id = new_message_id()
        # Stored and hashed at microsecond precision; truncate now so the returned
        # message hashes the same as the one read back later.
        created = msg.created_at.ToMicroseconds() if msg.HasField("created_at") else now_micros
        msg.created_at.FromMicroseconds(created)
        msg.seq = seq
        msg.parent_hash = head
        msg.token_count = token_count(msg)
        msg.hash = entry_hash(head, msg)
        head = msg.hash
    return head


def batch_fingerprint(messages: Iterable[common_pb2.Message]) -> str:
    """sha256 hex over the canonical bytes of a batch as the caller sent it.

    Tells an idempotent retry (same request id, same batch) from a request id reused
    for different messages. Canonical JSON never holds a raw newline, so joining
    with one is unambiguous.
    """
    h = hashlib.sha256()
    for msg in messages:
        h.update(canonical_bytes(msg))
        h.update(b"\n")
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
