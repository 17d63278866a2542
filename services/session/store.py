"""The session store interface that every backend (SQLite, Redis) implements.

A session is an append-only, hash-chained log of messages owned by one tenant.
Every method takes the tenant: another tenant's session is NotFound, with the
same message as a missing one, so ids never leak across tenants.

Below the interface: `SessionBackend`, the half of a store every backend shares
(argument checks, message validation, sealing: a backend subclasses it and
stores), and the rules and formats every backend shares (paging, the export
format, limits), kept here once so that the backends behave alike and the
conformance suite can hold them to it.
"""

from __future__ import annotations

import abc
import base64
import binascii
import builtins
import json
import math
import time
from collections.abc import AsyncIterator, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from google.protobuf import json_format

from services.session.chain import GENESIS_HASH, batch_fingerprint, seal_messages, verify_chain
from services.session.tokens import DEFAULT_ESTIMATOR, TokenEstimator
from services.session.validation import validate_messages, validate_session_fields
from threadline.errors import DataLoss, InvalidArgument, NotFound
from threadline.ids import new_session_id, validate_session_id
from threadline.v1 import common_pb2, session_pb2

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500

#: Appends remembered per session for idempotent retries (a backend may keep more).
REQUEST_ID_MEMORY = 1_000
MAX_REQUEST_ID_CHARS = 200

# recent() starts small because a context usually needs only the last few
# messages, and grows so a long walk back costs few round trips to the backend.
RECENT_FIRST_BATCH = 32
RECENT_MAX_BATCH = 1024

# token_count is an int32 in the proto.
_INT32_MAX = 2**31 - 1


class SessionReader(Protocol):
    """The reads context building needs; every SessionStore is one."""

    async def get(self, tenant: str, session_id: str) -> session_pb2.Session:
        """The session; NotFound if it is missing or belongs to another tenant."""
        ...

    def recent(
        self, tenant: str, session_id: str, *, before_seq: int | None = None
    ) -> AsyncIterator[common_pb2.Message]:
        """Messages newest first, read lazily in batches.

        Only messages with seq < before_seq when given, else those present when
        iteration starts: a caller that read the session first passes its
        message_count to see exactly the log that matches its head.
        """
        ...

    async def first_user_message(self, tenant: str, session_id: str) -> common_pb2.Message | None:
        """The session's earliest user message, or None if it has none."""
        ...


class SessionStore(SessionReader, Protocol):
    async def create(
        self,
        *,
        tenant: str,
        model: str,
        system_prompt: str,
        title: str,
        metadata: Mapping[str, str],
        forked_from: str = "",
        compacted_from: str = "",
        messages: Sequence[common_pb2.Message] = (),
    ) -> session_pb2.Session:
        """Create a session (`ses_` + 32 hex id, created_at = updated_at).

        `messages` is its initial log (compaction: a summary and the retained
        tail), validated like an append and hashed from the genesis hash; on an
        error nothing is stored. `forked_from`/`compacted_from` record lineage.
        """
        ...

    async def list(
        self, tenant: str, *, page_size: int, page_token: str
    ) -> tuple[builtins.list[session_pb2.Session], str]:
        """One page of the tenant's sessions, most recently updated first.

        page_size 0 means 50, larger than 500 means 500. Returns the sessions and
        the opaque token of the next page ("" after the last page).
        """
        ...

    async def messages(
        self, tenant: str, session_id: str, *, from_seq: int = 0
    ) -> builtins.list[common_pb2.Message]:
        """Messages with seq >= from_seq, in seq order (the first message has seq 0)."""
        ...

    async def append(
        self,
        tenant: str,
        session_id: str,
        expected_head: str,
        messages: Sequence[common_pb2.Message],
        *,
        request_id: str = "",
    ) -> tuple[str, builtins.list[common_pb2.Message]]:
        """Append atomically if the head still equals expected_head.

        Raises HeadMismatch (with the current head) when it moved, InvalidArgument
        when a message breaks the input rules; either way nothing is stored.
        Assigns id (when empty), created_at (when unset), seq, parent_hash, hash
        and token_count. Returns the new head and the messages as stored.

        With a request_id the append is idempotent: the store remembers the
        result of at least the session's last REQUEST_ID_MEMORY appends, and a
        retry with the same id and the same batch returns that first result and
        appends nothing, even when the head has moved since (the id is checked
        before the head). The same id with a different batch is InvalidArgument.
        """
        ...

    async def fork(self, tenant: str, session_id: str, at_hash: str) -> session_pb2.Session:
        """A new session on the prefix of this one up to and including `at_hash`.

        Same tenant, model, system prompt, title and metadata; forked_from is the
        source. The messages are copied exactly (ids, content, created_at), so
        their hashes are identical and the fork's head is at_hash. "" forks an
        empty session; a hash not in the log is NotFound.
        """
        ...

    async def delete(self, tenant: str, session_id: str, *, reason: str = "deleted") -> None:
        """Remove the session with its messages, tool call index and request ids, and
        record its erasure (a tombstone, and one pending entry per erasure owner) in
        the same transaction: the deletion and the work it leaves to the owners are
        stored together or not at all.

        Calibration is per model and stays. NotFound if the session is absent.
        """
        ...

    async def derived(self, tenant: str, session_id: str) -> builtins.list[session_pb2.Session]:
        """The tenant's sessions forked or compacted from this one (direct children)."""
        ...

    async def pending_erasures(self, owner: str, limit: int) -> builtins.list[Erasure]:
        """Up to `limit` erasures `owner` has not acknowledged, oldest first."""
        ...

    async def acknowledge_erasure(
        self, owner: str, session_id: str, removed: Mapping[str, int]
    ) -> ErasureDone | None:
        """Record that `owner` erased what it kept of the session; idempotent.

        Returns the finished erasure (what every owner removed) when this was the
        last owner's first acknowledgement, else None. NotFound if no erasure of
        the session awaits `owner`.
        """
        ...

    async def unfinished_erasures(self, tenant: str) -> int:
        """How many of the tenant's erasures some owner has not acknowledged yet."""
        ...

    async def tenant_erasure_totals(self, tenant: str) -> TenantErasureTotals:
        """What the finished erasures of the tenant's sessions deleted by tenant
        erasures (reason `tenant_erased`, earlier ones included) removed, summed."""
        ...

    async def erased_among(self, session_ids: Sequence[str]) -> builtins.list[str]:
        """The ids among these that have a tombstone (any tenant), in the order given."""
        ...

    async def export(self, tenant: str, session_id: str) -> builtins.list[str]:
        """The session as JSON lines: `{"session": ...}`, then `{"message": ...}` each.

        Both in the proto JSON mapping with proto field names; messages carry
        seq, parent_hash and hash.
        """
        ...

    async def import_session(self, tenant: str, lines: Sequence[str]) -> session_pb2.Session:
        """Re-create an exported session under `tenant`, with a new id.

        Timestamps, hashes and lineage are kept, so export(import(export(x))) ==
        export(x) except for the id and the tenant. The chain is verified first: a
        malformed line, a broken chain or a field past its limit is InvalidArgument
        naming the line (and seq). Nothing is stored on error.
        """
        ...

    async def expired(self, idle_before_micros: int, limit: int) -> builtins.list[tuple[str, str]]:
        """Up to `limit` (tenant, session_id) updated before idle_before, oldest first."""
        ...

    async def beyond_cap(self, tenant: str, cap: int) -> builtins.list[str]:
        """The tenant's sessions other than its `cap` most recently updated, oldest first."""
        ...

    async def cleanup_orphans(self) -> int:
        """Remove messages, index rows and keys whose session no longer exists.

        Returns how many rows or keys went.
        """
        ...

    async def calibration(self, model: str) -> float | None:
        """The stored characters-per-token ratio of a model, None if never calibrated."""
        ...

    async def set_calibration(self, model: str, chars_per_token: float) -> None:
        """Store a model's characters-per-token ratio (positive and finite)."""
        ...

    async def close(self) -> None:
        """Release the backend; safe to call more than once."""
        ...


# -- erasures -------------------------------------------------------------------------

#: The services that keep something of a session and erase it when it is deleted.
ERASURE_OWNERS = ("memory", "executor")

#: Why a session was deleted, as erasures and events name it.
ERASURE_REASONS = ("deleted", "idle", "tenant_cap", "tenant_erased")


@dataclass(frozen=True)
class Erasure:
    """A deleted session, as the owners of what derives from it see it."""

    session_id: str
    tenant: str
    reason: str
    deleted_at: int  # microseconds


@dataclass(frozen=True)
class ErasureDone:
    """An erasure every owner has acknowledged: what each removed, by kind."""

    erasure: Erasure
    removed: dict[str, dict[str, int]]


@dataclass(frozen=True)
class TenantErasureTotals:
    """How many sessions tenant erasures erased, and what every owner removed of them."""

    sessions: int
    removed: dict[str, dict[str, int]]


def sum_erasures(
    acknowledgements: Iterable[tuple[str, str, Mapping[str, int]]],
) -> TenantErasureTotals:
    """Totals of (session_id, owner, removed) acknowledgements of finished erasures."""
    sessions: set[str] = set()
    removed: dict[str, dict[str, int]] = {}
    for session_id, owner, counts in acknowledgements:
        sessions.add(session_id)
        kinds = removed.setdefault(owner, {})
        for kind, count in counts.items():
            kinds[kind] = kinds.get(kind, 0) + int(count)
    return TenantErasureTotals(len(sessions), removed)


def check_erasure_owner(owner: str) -> None:
    if owner not in ERASURE_OWNERS:
        raise InvalidArgument(
            f"owner {owner[:40]!r} is not an erasure owner; expected one of "
            f"{', '.join(ERASURE_OWNERS)}"
        )


def check_erasure_reason(reason: str) -> None:
    if reason not in ERASURE_REASONS:
        raise InvalidArgument(f"unknown erasure reason {reason[:40]!r}")


def check_removed_counts(removed: Mapping[str, int]) -> dict[str, int]:
    """An acknowledgement's counts, checked: a few short names, none negative."""
    if len(removed) > 16:
        raise InvalidArgument(f"removed: {len(removed)} kinds, the limit is 16")
    for kind, count in removed.items():
        if not kind or len(kind) > 40:
            raise InvalidArgument("removed: a kind must be 1 to 40 characters")
        if count < 0:
            raise InvalidArgument(f"removed[{kind!r}] must be >= 0, got {count}")
    return dict(removed)


#: Ids one erased_among call may ask about.
MAX_ERASED_QUERY = 1_000


def check_erased_query(session_ids: Sequence[str]) -> builtins.list[str]:
    if len(session_ids) > MAX_ERASED_QUERY:
        raise InvalidArgument(
            f"session_ids: {len(session_ids)} ids, the limit is {MAX_ERASED_QUERY}"
        )
    for session_id in session_ids:
        validate_session_id(session_id)
    return list(dict.fromkeys(session_ids))


def no_pending_erasure(owner: str, session_id: str) -> NotFound:
    return NotFound(
        f"no erasure of session {session_id} awaits owner {owner}",
        details={"session_id": session_id},
    )


# -- what every backend shares ---------------------------------------------------------


@dataclass(frozen=True)
class MessageRules:
    """The limits a batch is held to and how its tokens are counted."""

    max_message_chars: int = 32_000
    max_messages_per_append: int = 64
    estimator: TokenEstimator = DEFAULT_ESTIMATOR

    def token_count(self, msg: common_pb2.Message) -> int:
        return min(self.estimator.estimate(msg), _INT32_MAX)

    def validate(
        self,
        batch: Sequence[common_pb2.Message],
        known_tool_call_ids: Collection[str] = frozenset(),
    ) -> None:
        validate_messages(
            batch,
            max_message_chars=self.max_message_chars,
            max_messages=self.max_messages_per_append,
            known_tool_call_ids=known_tool_call_ids,
        )

    def seal(
        self, batch: Sequence[common_pb2.Message], *, parent_hash: str, first_seq: int, now: int
    ) -> str:
        """Place the batch in the log after `parent_hash` (in place); the new head."""
        return seal_messages(
            batch,
            parent_hash=parent_hash,
            first_seq=first_seq,
            now_micros=now,
            token_count=self.token_count,
        )

    def seal_append(
        self,
        batch: Sequence[common_pb2.Message],
        *,
        head: str,
        first_seq: int,
        known_tool_call_ids: Collection[str],
    ) -> tuple[str, int]:
        """Validate an append's batch and seal it onto the session's head.

        Returns the new head and the time of the append (the session's updated_at).
        """
        self.validate(batch, known_tool_call_ids)
        now = now_micros()
        return self.seal(batch, parent_hash=head, first_seq=first_seq, now=now), now


@dataclass(frozen=True)
class AppendRequest:
    """An append past the checks every backend shares, for the backend to store."""

    tenant: str
    session_id: str
    expected_head: str
    #: The caller's messages, copied: the backend seals these in place.
    batch: builtins.list[common_pb2.Message]
    request_id: str
    #: batch_fingerprint of the batch as sent, when there is a request id.
    fingerprint: str


class SessionBackend(abc.ABC):
    """The part of a SessionStore every backend shares; a backend subclasses it.

    Here: the argument checks, validation and sealing of `create`, `append` and
    `import_session`, the paging, export format and limit checks of `list`,
    `export`, `expired`, `beyond_cap` and `set_calibration`, and the argument
    checks of `derived` and the erasure calls. The subclass
    implements the abstract methods (storage only) and the rest of SessionStore.
    """

    def __init__(self, rules: MessageRules) -> None:
        self.rules = rules

    async def create(
        self,
        *,
        tenant: str,
        model: str,
        system_prompt: str,
        title: str,
        metadata: Mapping[str, str],
        forked_from: str = "",
        compacted_from: str = "",
        messages: Sequence[common_pb2.Message] = (),
    ) -> session_pb2.Session:
        check_new_session(tenant, forked_from, compacted_from)
        batch = copy_messages(messages)
        if batch:
            # A new session knows no tool calls but those of its own batch.
            self.rules.validate(batch)
        now = now_micros()
        session = session_pb2.Session(
            id=new_session_id(),
            tenant=tenant,
            title=title,
            model=model,
            system_prompt=system_prompt,
            metadata=metadata,
            forked_from=forked_from,
            compacted_from=compacted_from,
            message_count=len(batch),
            head=self.rules.seal(batch, parent_hash=GENESIS_HASH, first_seq=0, now=now),
        )
        session.created_at.FromMicroseconds(now)
        session.updated_at.FromMicroseconds(now)
        await self._store_new(session, batch)
        return session

    async def append(
        self,
        tenant: str,
        session_id: str,
        expected_head: str,
        messages: Sequence[common_pb2.Message],
        *,
        request_id: str = "",
    ) -> tuple[str, builtins.list[common_pb2.Message]]:
        validate_session_id(session_id)
        check_request_id(request_id)
        batch = copy_messages(messages)
        fingerprint = batch_fingerprint(batch) if request_id else ""
        return await self._store_append(
            AppendRequest(tenant, session_id, expected_head, batch, request_id, fingerprint)
        )

    async def import_session(self, tenant: str, lines: Sequence[str]) -> session_pb2.Session:
        check_new_session(tenant, "", "")
        session, messages = parse_export(lines, max_message_chars=self.rules.max_message_chars)
        # The id is minted here, never taken from the file: keeping it would tell the
        # importer whether another tenant holds that id, and could bring back the id
        # of a deleted session (with whatever other services still key by it).
        session.id = new_session_id()
        session.tenant = tenant
        await self._store_import(session, messages)
        return session

    async def list(
        self, tenant: str, *, page_size: int, page_token: str
    ) -> tuple[builtins.list[session_pb2.Session], str]:
        limit = page_size_or_default(page_size)
        after = decode_page_token(page_token) if page_token else None
        sessions, more = await self._list_page(tenant, limit, after)
        if not more or not sessions:
            return sessions, ""
        last = sessions[-1]
        return sessions, encode_page_token(last.updated_at.ToMicroseconds(), last.id)

    async def export(self, tenant: str, session_id: str) -> builtins.list[str]:
        validate_session_id(session_id)
        return export_lines(*await self._read_all(tenant, session_id))

    async def expired(self, idle_before_micros: int, limit: int) -> builtins.list[tuple[str, str]]:
        check_listing_limit("limit", limit)
        if limit == 0:
            return []
        return await self._expired(idle_before_micros, limit)

    async def beyond_cap(self, tenant: str, cap: int) -> builtins.list[str]:
        check_listing_limit("cap", cap)
        return await self._beyond_cap(tenant, cap)

    async def set_calibration(self, model: str, chars_per_token: float) -> None:
        check_calibration(model, chars_per_token)
        await self._store_calibration(model, chars_per_token)

    async def derived(self, tenant: str, session_id: str) -> builtins.list[session_pb2.Session]:
        validate_session_id(session_id)
        return await self._list_derived(tenant, session_id)

    async def pending_erasures(self, owner: str, limit: int) -> builtins.list[Erasure]:
        check_erasure_owner(owner)
        check_listing_limit("limit", limit)
        return await self._list_pending_erasures(owner, limit)

    async def acknowledge_erasure(
        self, owner: str, session_id: str, removed: Mapping[str, int]
    ) -> ErasureDone | None:
        check_erasure_owner(owner)
        validate_session_id(session_id)
        counts = check_removed_counts(removed)
        return await self._store_acknowledgement(owner, session_id, counts)

    async def erased_among(self, session_ids: Sequence[str]) -> builtins.list[str]:
        return await self._find_erased(check_erased_query(session_ids))

    @abc.abstractmethod
    async def _store_new(
        self, session: session_pb2.Session, batch: Sequence[common_pb2.Message]
    ) -> None:
        """Store a session made by create, with its sealed initial messages."""

    @abc.abstractmethod
    async def _store_append(
        self, request: AppendRequest
    ) -> tuple[str, builtins.list[common_pb2.Message]]:
        """SessionStore.append from the tenant check on, atomically (use rules.seal_append)."""

    @abc.abstractmethod
    async def _store_import(
        self, session: session_pb2.Session, messages: Sequence[common_pb2.Message]
    ) -> None:
        """Store an imported session as it is; AlreadyExists if its id is taken."""

    @abc.abstractmethod
    async def _list_page(
        self, tenant: str, limit: int, after: tuple[int, str] | None
    ) -> tuple[builtins.list[session_pb2.Session], bool]:
        """Up to `limit` of the tenant's sessions by (updated_at, id) descending,
        strictly after `after`; and whether more follow."""

    @abc.abstractmethod
    async def _read_all(
        self, tenant: str, session_id: str
    ) -> tuple[session_pb2.Session, builtins.list[common_pb2.Message]]:
        """The session and its whole log, read at one moment (for export)."""

    @abc.abstractmethod
    async def _expired(self, idle_before_micros: int, limit: int) -> builtins.list[tuple[str, str]]:
        """SessionStore.expired, for limit > 0."""

    @abc.abstractmethod
    async def _beyond_cap(self, tenant: str, cap: int) -> builtins.list[str]:
        """SessionStore.beyond_cap."""

    @abc.abstractmethod
    async def _list_derived(
        self, tenant: str, session_id: str
    ) -> builtins.list[session_pb2.Session]:
        """SessionStore.derived, the id checked."""

    @abc.abstractmethod
    async def _list_pending_erasures(self, owner: str, limit: int) -> builtins.list[Erasure]:
        """SessionStore.pending_erasures, owner and limit checked."""

    @abc.abstractmethod
    async def _store_acknowledgement(
        self, owner: str, session_id: str, counts: dict[str, int]
    ) -> ErasureDone | None:
        """SessionStore.acknowledge_erasure, its arguments checked."""

    @abc.abstractmethod
    async def _find_erased(self, session_ids: builtins.list[str]) -> builtins.list[str]:
        """SessionStore.erased_among over checked, distinct ids."""

    @abc.abstractmethod
    async def _store_calibration(self, model: str, chars_per_token: float) -> None:
        """Store a checked calibration."""


def new_fork(source: session_pb2.Session, at_hash: str, message_count: int) -> session_pb2.Session:
    """The session a fork of `source` makes: its first `message_count` messages, up to at_hash."""
    now = now_micros()
    fork = session_pb2.Session(
        id=new_session_id(),
        tenant=source.tenant,
        title=source.title,
        model=source.model,
        system_prompt=source.system_prompt,
        metadata=source.metadata,
        head=at_hash,
        message_count=message_count,
        forked_from=source.id,
    )
    fork.created_at.FromMicroseconds(now)
    fork.updated_at.FromMicroseconds(now)
    return fork


def named_tool_call_ids(batch: Sequence[common_pb2.Message]) -> builtins.list[str]:
    """The tool call ids a batch mentions (results it answers, calls it makes), sorted:
    the only ones of the session's that validating it needs."""
    return sorted(
        {msg.tool_call_id for msg in batch if msg.tool_call_id}
        | {call.id for msg in batch for call in msg.tool_calls if call.id}
    )


def check_from_seq(session_id: str, from_seq: int) -> None:
    validate_session_id(session_id)
    if from_seq < 0:
        raise InvalidArgument(f"from_seq must be >= 0, got {from_seq}")


# -- rules every backend shares ------------------------------------------------------


def page_size_or_default(page_size: int) -> int:
    """Apply the List paging rules shared by every backend."""
    if page_size < 0:
        raise InvalidArgument(f"page_size must be >= 0, got {page_size}")
    if page_size == 0:
        return DEFAULT_PAGE_SIZE
    return min(page_size, MAX_PAGE_SIZE)


def encode_page_token(updated_at: int, session_id: str) -> str:
    """The position after the last session of a page: (updated_at, id), keyset paging."""
    raw = json.dumps([updated_at, session_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def decode_page_token(token: str) -> tuple[int, str]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        value = json.loads(raw)
    except (binascii.Error, ValueError) as exc:
        raise InvalidArgument("malformed page token") from exc
    if (
        isinstance(value, list)
        and len(value) == 2
        and type(value[0]) is int
        and isinstance(value[1], str)
    ):
        return value[0], value[1]
    raise InvalidArgument("malformed page token")


def now_micros() -> int:
    return time.time_ns() // 1000


def session_not_found(session_id: str) -> NotFound:
    # One message for "missing" and "another tenant's": no existence leak.
    return NotFound(f"session {session_id} not found", details={"session_id": session_id})


def hash_not_found(session_id: str, at_hash: str) -> NotFound:
    shown = at_hash if len(at_hash) <= 80 else at_hash[:80] + "..."
    return NotFound(
        f"no message with hash {shown!r} in session {session_id}",
        details={"session_id": session_id, "at_hash": shown},
    )


def check_new_session(tenant: str, forked_from: str, compacted_from: str) -> None:
    if not tenant:
        raise InvalidArgument("tenant is required")
    check_lineage(forked_from, compacted_from)


def check_lineage(forked_from: str, compacted_from: str) -> None:
    for name, value in (("forked_from", forked_from), ("compacted_from", compacted_from)):
        if value:
            try:
                validate_session_id(value)
            except InvalidArgument as exc:
                raise InvalidArgument(f"{name}: {exc.message}") from None


def check_request_id(request_id: str) -> None:
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidArgument(
            f"request_id: {len(request_id)} characters, the limit is {MAX_REQUEST_ID_CHARS}"
        )


def reused_request_id(request_id: str) -> InvalidArgument:
    return InvalidArgument(
        f"request_id {request_id!r} was used for a different batch of messages",
        details={"request_id": request_id},
    )


def check_listing_limit(name: str, value: int) -> None:
    if value < 0:
        raise InvalidArgument(f"{name} must be >= 0, got {value}")


def check_calibration(model: str, chars_per_token: float) -> None:
    if not model:
        raise InvalidArgument("model is required")
    if not (math.isfinite(chars_per_token) and chars_per_token > 0):
        raise InvalidArgument(f"chars_per_token must be positive and finite, got {chars_per_token}")


def message_extras(msg: common_pb2.Message) -> dict[str, Any]:
    """The optional parts of a message as JSON-ready fields; those at their default are
    left out (a long log is mostly plain text turns). The inverse is `message_from`."""
    extras: dict[str, Any] = {}
    if msg.tool_calls:
        extras["tool_calls"] = [[c.id, c.name, c.arguments_json] for c in msg.tool_calls]
    if msg.tool_call_id:
        extras["tool_call_id"] = msg.tool_call_id
    if msg.name:
        extras["name"] = msg.name
    if msg.interrupted:
        extras["interrupted"] = True
    return extras


def message_from(fields: Mapping[str, Any]) -> common_pb2.Message:
    """A stored message from its fields: id, role, content, token_count, seq,
    parent_hash, hash, created_at (microseconds) and the `message_extras`."""
    msg = common_pb2.Message(
        id=fields["id"],
        role=fields["role"],
        content=fields["content"],
        tool_call_id=fields.get("tool_call_id", ""),
        name=fields.get("name", ""),
        interrupted=fields.get("interrupted", False),
        token_count=fields["token_count"],
        seq=fields["seq"],
        parent_hash=fields["parent_hash"],
        hash=fields["hash"],
    )
    for call_id, name, arguments_json in fields.get("tool_calls", ()):
        msg.tool_calls.add(id=call_id, name=name, arguments_json=arguments_json)
    msg.created_at.FromMicroseconds(fields["created_at"])
    return msg


def copy_messages(messages: Sequence[common_pb2.Message]) -> builtins.list[common_pb2.Message]:
    """Copies: a store fills in ids, seq and hashes without touching the caller's."""
    out: builtins.list[common_pb2.Message] = []
    for msg in messages:
        copy = common_pb2.Message()
        copy.CopyFrom(msg)
        out.append(copy)
    return out


# -- export format -------------------------------------------------------------------


def _json_line(key: str, value: session_pb2.Session | common_pb2.Message) -> str:
    body = json_format.MessageToDict(value, preserving_proto_field_name=True)
    return json.dumps({key: body}, separators=(",", ":"), ensure_ascii=False)


def export_lines(
    session: session_pb2.Session, messages: Sequence[common_pb2.Message]
) -> builtins.list[str]:
    """The export format: a session line, then one line per message in seq order."""
    return [_json_line("session", session), *(_json_line("message", m) for m in messages)]


def _parse_lines(
    lines: Sequence[str],
) -> Iterator[tuple[int, session_pb2.Session | common_pb2.Message]]:
    first = True
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue  # a trailing newline split into lines leaves an empty one
        where = f"import line {number}"
        key = "session" if first else "message"
        try:
            value = json.loads(line)
        except ValueError as exc:
            raise InvalidArgument(
                f"{where}: not valid JSON ({exc})", details={"line": str(number)}
            ) from None
        if not (isinstance(value, dict) and value.keys() == {key} and isinstance(value[key], dict)):
            raise InvalidArgument(
                f'{where}: expected an object {{"{key}": {{...}}}}', details={"line": str(number)}
            )
        target: session_pb2.Session | common_pb2.Message = (
            session_pb2.Session() if first else common_pb2.Message()
        )
        try:
            json_format.ParseDict(value[key], target)
        except (json_format.ParseError, ValueError, TypeError) as exc:
            raise InvalidArgument(f"{where}: {exc}", details={"line": str(number)}) from None
        first = False
        yield number, target


def _check_imported_fields(session: session_pb2.Session, max_message_chars: int) -> None:
    # An import must not store what CreateSession would refuse.
    try:
        validate_session_fields(title=session.title, model=session.model, metadata=session.metadata)
    except InvalidArgument as exc:
        raise InvalidArgument(f"import line 1: {exc.message}") from None
    if len(session.system_prompt) > max_message_chars:
        raise InvalidArgument(
            f"import line 1: system_prompt is {len(session.system_prompt)} characters; "
            f"the limit is {max_message_chars}"
        )


def parse_export(
    lines: Sequence[str], *, max_message_chars: int
) -> tuple[session_pb2.Session, builtins.list[common_pb2.Message]]:
    """Parse and check an export: well-formed lines, an intact chain, valid messages.

    Raises InvalidArgument naming the line (and, for the chain, the seq) of the
    first problem. The session keeps the exported tenant; the caller replaces it.
    """
    session: session_pb2.Session | None = None
    messages: builtins.list[common_pb2.Message] = []
    line_of: builtins.list[int] = []
    for number, value in _parse_lines(lines):
        if isinstance(value, session_pb2.Session):
            session = value
        elif isinstance(value, common_pb2.Message):
            messages.append(value)
            line_of.append(number)
    if session is None:
        raise InvalidArgument("import: no lines; expected a session line, then its messages")
    validate_session_id(session.id)
    check_lineage(session.forked_from, session.compacted_from)
    _check_imported_fields(session, max_message_chars)

    position = -1

    def tracked() -> Iterator[common_pb2.Message]:
        nonlocal position
        for position, msg in enumerate(messages):  # noqa: B007 - read in the except
            yield msg

    try:
        verify_chain(tracked())
    except DataLoss as exc:
        line = line_of[position]
        raise InvalidArgument(
            f"import line {line}: {exc.message}", details={**exc.details, "line": str(line)}
        ) from None
    head = messages[-1].hash if messages else GENESIS_HASH
    if session.head != head:
        raise InvalidArgument(
            f"import line 1: head {session.head!r} is not the last message's hash {head!r}"
        )
    if session.message_count != len(messages):
        raise InvalidArgument(
            f"import line 1: message_count {session.message_count} but "
            f"{len(messages)} message lines follow"
        )
    if messages:
        try:
            validate_messages(
                messages, max_message_chars=max_message_chars, max_messages=len(messages)
            )
        except InvalidArgument as exc:
            raise InvalidArgument(f"import: {exc.message}", details=exc.details) from None
    return session, messages
