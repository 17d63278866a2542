"""The shared session store: Redis, for many session replicas.

Every write that must be all-or-nothing is one Lua script (append, create,
delete): Redis runs a script to completion before anything else, and a client
that dies mid-call either sent the whole script or nothing, so no reader and no
crash ever sees half an append. Hashes are computed in Python before the append
script runs, from expected_head: they are right exactly when the script finds
that head, which is the condition it checks.

Keys, under `prefix` (default "threadline:session:"):

    meta:<id>            hash: tenant, title, model, system_prompt, metadata (JSON),
                         created_at, updated_at (µs), head, message_count,
                         forked_from, compacted_from, first_user_seq (when known)
    log:<id>             list of message JSON; the index is the seq
    calls:<id>           set of the session's tool call ids
    requests:<id>        hash request_id -> result of that append (JSON)
    request_order:<id>   list of those request ids, oldest first (to bound the hash)
    tenant:<tenant>      sorted set of the tenant's session ids by updated_at
    erasure:<id>         hash: a deleted session's tombstone (tenant, reason,
                         deleted_at, completed_at) and owner:<owner> per owner
                         service: "" while pending, then what it removed (JSON)
    erasures_pending:<owner>  sorted set of the ids the owner has to erase, by deleted_at
    erasures_unfinished:<tenant>  set of the tenant's ids some owner has not finished
    erasure_totals:<tenant>  hash: what finished tenant erasures removed, summed
                         (sessions, <owner>:<kind>)
    by_updated           sorted set of every session id by updated_at (retention)
    calibration          hash model -> characters per token

Scores are microseconds since the epoch: below 2**53, so exact as doubles. The
scripts touch several sessions' sorted sets, so this needs one Redis (or a
primary with replicas / Sentinel), not Redis Cluster.

The client may be created with or without `decode_responses`: every reply is
read through `_text`, which accepts bytes and str alike. The store does not own
the client: `close()` stops the store, the caller closes the client.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import re
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import redis.asyncio as aioredis
import redis.exceptions

from services.session import redis_scripts
from services.session.store import (
    ERASURE_OWNERS,
    RECENT_FIRST_BATCH,
    RECENT_MAX_BATCH,
    REQUEST_ID_MEMORY,
    AppendRequest,
    Erasure,
    ErasureDone,
    MessageRules,
    SessionBackend,
    TenantErasureTotals,
    check_erasure_reason,
    check_from_seq,
    hash_not_found,
    message_extras,
    message_from,
    named_tool_call_ids,
    new_fork,
    no_pending_erasure,
    now_micros,
    reused_request_id,
    session_not_found,
)
from services.session.tokens import DEFAULT_ESTIMATOR, TokenEstimator
from threadline.errors import AlreadyExists, DataLoss, HeadMismatch, Unavailable
from threadline.ids import validate_session_id
from threadline.v1 import common_pb2, session_pb2

# Messages per LRANGE when a whole prefix is read (fork).
_READ_CHUNK = 1_000
# Keys per SCAN step and members per script call in the orphan walk.
_SCAN_COUNT = 500
_MEMBER_CHUNK = 200

_SESSION_KEY_KINDS = ("log", "calls", "requests", "request_order")


def _text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _texts(values: Iterable[Any]) -> list[str]:
    """Members of a range reply (typed loosely by redis-py: its overloads cover
    `withscores`)."""
    return [_text(v) for v in values]


def _glob_escape(text: str) -> str:
    return re.sub(r"([\\*?\[\]])", r"\\\1", text)


def _dumps(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _message_json(msg: common_pb2.Message) -> str:
    # Fields at their default are left out: a long log is mostly plain text turns.
    entry: dict[str, Any] = {
        "seq": msg.seq,
        "id": msg.id,
        "role": int(msg.role),
        "content": msg.content,
        "created_at": msg.created_at.ToMicroseconds(),
        "token_count": msg.token_count,
        "parent_hash": msg.parent_hash,
        "hash": msg.hash,
    }
    return _dumps({**entry, **message_extras(msg)})


def _message_from_json(raw: bytes | str) -> common_pb2.Message:
    return message_from(json.loads(raw))


def _meta_fields(session: session_pb2.Session, first_user_seq: int | None) -> dict[str, str]:
    fields = {
        "tenant": session.tenant,
        "title": session.title,
        "model": session.model,
        "system_prompt": session.system_prompt,
        "metadata": _dumps(dict(sorted(session.metadata.items()))),
        "created_at": str(session.created_at.ToMicroseconds()),
        "updated_at": str(session.updated_at.ToMicroseconds()),
        "head": session.head,
        "message_count": str(session.message_count),
        "forked_from": session.forked_from,
        "compacted_from": session.compacted_from,
    }
    if first_user_seq is not None:
        fields["first_user_seq"] = str(first_user_seq)
    return fields


def _session_from_meta(session_id: str, meta: Mapping[str, str]) -> session_pb2.Session:
    session = session_pb2.Session(
        id=session_id,
        tenant=meta["tenant"],
        title=meta["title"],
        model=meta["model"],
        system_prompt=meta["system_prompt"],
        head=meta["head"],
        message_count=int(meta["message_count"]),
        metadata=json.loads(meta["metadata"]),
        forked_from=meta["forked_from"],
        compacted_from=meta["compacted_from"],
    )
    session.created_at.FromMicroseconds(int(meta["created_at"]))
    session.updated_at.FromMicroseconds(int(meta["updated_at"]))
    return session


def _decoded(raw: Mapping[bytes | str, bytes | str]) -> dict[str, str]:
    return {_text(k): _text(v) for k, v in raw.items()}


def _first_user_seq(messages: Sequence[common_pb2.Message]) -> int | None:
    return next((m.seq for m in messages if m.role == common_pb2.ROLE_USER), None)


@dataclass(frozen=True)
class _AppendSnapshot:
    """What an append read of its session before the script runs."""

    head: str
    message_count: int
    #: The session's tool call ids among those the batch names.
    known_tool_call_ids: set[str]
    #: The stored result of an earlier append with the same request id.
    prior: bytes | str | None


class RedisSessionStore(SessionBackend):
    """SessionStore on a shared Redis. Ready on construction; `close()` when done."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        prefix: str = "threadline:session:",
        max_message_chars: int = 32_000,
        max_messages_per_append: int = 64,
        estimator: TokenEstimator = DEFAULT_ESTIMATOR,
    ) -> None:
        super().__init__(MessageRules(max_message_chars, max_messages_per_append, estimator))
        self._redis = client
        self._prefix = prefix
        self._closed = False
        self._append_script = client.register_script(redis_scripts.APPEND)
        self._create_script = client.register_script(redis_scripts.CREATE)
        self._delete_script = client.register_script(redis_scripts.DELETE)
        self._acknowledge_script = client.register_script(redis_scripts.ACKNOWLEDGE_ERASURE)
        self._orphan_key_script = client.register_script(redis_scripts.REMOVE_ORPHAN_KEY)
        self._orphan_members_script = client.register_script(redis_scripts.REMOVE_ORPHAN_MEMBERS)

    async def close(self) -> None:
        self._closed = True

    # -- keys ------------------------------------------------------------------------

    def _key(self, kind: str, session_id: str) -> str:
        return f"{self._prefix}{kind}:{session_id}"

    def _tenant_key(self, tenant: str) -> str:
        return f"{self._prefix}tenant:{tenant}"

    @property
    def _by_updated_key(self) -> str:
        return f"{self._prefix}by_updated"

    @property
    def _calibration_key(self) -> str:
        return f"{self._prefix}calibration"

    def _session_keys(self, session_id: str, tenant: str) -> list[str]:
        """The KEYS of the append, create and delete scripts, in their order."""
        return [
            self._key("meta", session_id),
            *(self._key(kind, session_id) for kind in _SESSION_KEY_KINDS),
            self._tenant_key(tenant),
            self._by_updated_key,
        ]

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        if self._closed:
            raise Unavailable("session store is not open")
        try:
            yield
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            # Unreachable, loading, timed out: the caller may retry later.
            raise Unavailable(f"session store: {exc}") from exc

    # -- reads -------------------------------------------------------------------------

    async def _meta(self, tenant: str, session_id: str) -> dict[str, str]:
        raw = await self._redis.hgetall(self._key("meta", session_id))
        meta = _decoded(raw)
        if meta.get("tenant") != tenant:
            raise session_not_found(session_id)
        return meta

    async def _meta_field(self, tenant: str, session_id: str, field: str) -> str | None:
        """One field of the session's meta (the tenant checked), without the rest."""
        owner, value = await self._redis.hmget(self._key("meta", session_id), ["tenant", field])
        if owner is None or _text(owner) != tenant:
            raise session_not_found(session_id)
        return None if value is None else _text(value)

    async def get(self, tenant: str, session_id: str) -> session_pb2.Session:
        validate_session_id(session_id)
        with self._guard():
            return _session_from_meta(session_id, await self._meta(tenant, session_id))

    async def _list_page(
        self, tenant: str, limit: int, after: tuple[int, str] | None
    ) -> tuple[builtins.list[session_pb2.Session], bool]:
        with self._guard():
            ids = await self._page_ids(tenant, limit + 1, after)
            async with self._redis.pipeline(transaction=False) as pipe:
                for session_id in ids:
                    pipe.hgetall(self._key("meta", session_id))
                metas = await pipe.execute()
        sessions = [
            _session_from_meta(session_id, meta)
            for session_id, meta in zip(ids, map(_decoded, metas), strict=True)
            # Deleted since the ids were read, or (never expected) misfiled.
            if meta.get("tenant") == tenant
        ]
        return sessions[:limit], len(ids) > limit

    async def _page_ids(
        self, tenant: str, count: int, after: tuple[int, str] | None
    ) -> builtins.list[str]:
        """Up to `count` ids by (updated_at, id) descending, strictly after `after`."""
        key = self._tenant_key(tenant)
        if after is None:
            return _texts(await self._redis.zrevrange(key, 0, count - 1))
        updated_at, last_id = after
        # A sorted set orders equal scores by member, in reverse here: the same order
        # as SQLite's (updated_at DESC, id DESC). Members tied with the token's score
        # are filtered out up to and including the last id of the previous page.
        ids: builtins.list[str] = []
        offset = 0
        while len(ids) < count:
            rows = cast(
                builtins.list[tuple[bytes | str, float]],
                await self._redis.zrevrangebyscore(
                    key, updated_at, "-inf", start=offset, num=count, withscores=True
                ),
            )
            if not rows:
                break
            offset += len(rows)
            for member, score in rows:
                session_id = _text(member)
                if int(score) == updated_at and session_id >= last_id:
                    continue
                ids.append(session_id)
        return ids[:count]

    async def messages(
        self, tenant: str, session_id: str, *, from_seq: int = 0
    ) -> builtins.list[common_pb2.Message]:
        check_from_seq(session_id, from_seq)
        with self._guard():
            # MULTI: the meta checked and the log read are one moment's state.
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hget(self._key("meta", session_id), "tenant")
                pipe.lrange(self._key("log", session_id), from_seq, -1)
                owner, raw = await pipe.execute()
        if owner is None or _text(owner) != tenant:
            raise session_not_found(session_id)
        return [_message_from_json(item) for item in raw]

    async def recent(
        self, tenant: str, session_id: str, *, before_seq: int | None = None
    ) -> AsyncIterator[common_pb2.Message]:
        validate_session_id(session_id)
        with self._guard():
            count = int(await self._meta_field(tenant, session_id, "message_count") or 0)
        upper = count if before_seq is None else max(0, min(before_seq, count))
        batch = RECENT_FIRST_BATCH
        key = self._key("log", session_id)
        while upper > 0:
            lower = max(0, upper - batch)
            # Absolute indexes rather than negative ones: appends made while the caller
            # iterates would shift a range counted from the tail. Redis still walks a
            # long list from its nearer end, so reading near the tail stays cheap.
            with self._guard():
                raw = await self._redis.lrange(key, lower, upper - 1)
            if not raw:
                return  # deleted meanwhile
            for item in reversed(raw):
                yield _message_from_json(item)
            upper = lower
            batch = min(batch * 2, RECENT_MAX_BATCH)

    async def first_user_message(self, tenant: str, session_id: str) -> common_pb2.Message | None:
        validate_session_id(session_id)
        with self._guard():
            seq = await self._meta_field(tenant, session_id, "first_user_seq")
            if seq is None:
                return None
            raw = await self._redis.lindex(self._key("log", session_id), int(seq))
        return None if raw is None else _message_from_json(raw)

    # -- writes ------------------------------------------------------------------------

    async def _store_new(
        self, session: session_pb2.Session, batch: Sequence[common_pb2.Message]
    ) -> None:
        with self._guard():
            await self._write_new(session, batch)

    async def _store_import(
        self, session: session_pb2.Session, messages: Sequence[common_pb2.Message]
    ) -> None:
        await self._store_new(session, messages)

    async def _write_new(
        self,
        session: session_pb2.Session,
        messages: Sequence[common_pb2.Message],
        raw_messages: Sequence[str] | None = None,
    ) -> None:
        """Create the session's keys with its messages (already JSON: `raw_messages`)."""
        if raw_messages is None:
            raw_messages = [_message_json(m) for m in messages]
        call_ids = [c.id for m in messages for c in m.tool_calls]
        fields = _meta_fields(session, _first_user_seq(messages))
        flat = [item for pair in fields.items() for item in pair]
        created = await self._create_script(
            keys=self._session_keys(session.id, session.tenant),
            args=[
                session.id,
                session.updated_at.ToMicroseconds(),
                len(flat),
                len(raw_messages),
                *flat,
                *raw_messages,
                *call_ids,
            ],
        )
        if not int(created):
            raise AlreadyExists(
                f"session {session.id} already exists", details={"session_id": session.id}
            )

    async def _store_append(
        self, request: AppendRequest
    ) -> tuple[str, builtins.list[common_pb2.Message]]:
        session_id, batch = request.session_id, request.batch
        with self._guard():
            snapshot = await self._append_snapshot(request)
            if snapshot.prior is not None:
                return await self._prior_result(request, snapshot.prior)
            if snapshot.head != request.expected_head:
                raise HeadMismatch(session_id, request.expected_head, snapshot.head)
            new_head, now = self.rules.seal_append(
                batch,
                head=snapshot.head,
                first_seq=snapshot.message_count,
                known_tool_call_ids=snapshot.known_tool_call_ids,
            )
            reply = await self._run_append_script(request, snapshot.message_count, new_head, now)
            outcome = _text(reply[0])
            if outcome == "ok":
                return new_head, batch
            if outcome == "missing":
                raise session_not_found(session_id)
            if outcome == "retry":
                # The same request id landed between the snapshot and the script.
                return await self._prior_result(request, reply[1])
            if outcome == "moved":
                raise HeadMismatch(session_id, request.expected_head, _text(reply[1]))
            raise DataLoss(
                f"session {session_id}: the log holds {_text(reply[1])} messages, its "
                f"metadata says {snapshot.message_count}",
                details={"session_id": session_id},
            )

    async def _append_snapshot(self, request: AppendRequest) -> _AppendSnapshot:
        """One snapshot (MULTI) of what validating an append needs.

        If the script later finds the head still at expected_head, the log is this
        same log (hash chain, append only), so the tool call ids read here are
        still the session's.
        """
        session_id = request.session_id
        wanted = named_tool_call_ids(request.batch)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hmget(self._key("meta", session_id), ["tenant", "head", "message_count"])
            if request.request_id:
                pipe.hget(self._key("requests", session_id), request.request_id)
            if wanted:
                pipe.smismember(self._key("calls", session_id), wanted)
            replies = iter(await pipe.execute())
        owner, head_raw, count_raw = next(replies)
        if owner is None or _text(owner) != request.tenant:
            raise session_not_found(session_id)
        prior = next(replies) if request.request_id else None
        if prior is not None:
            return _AppendSnapshot("", 0, set(), prior)
        present = next(replies) if wanted else []
        known = {call_id for call_id, there in zip(wanted, present, strict=True) if there}
        return _AppendSnapshot(_text(head_raw), int(_text(count_raw)), known, None)

    async def _run_append_script(
        self, request: AppendRequest, first_seq: int, new_head: str, now: int
    ) -> Any:
        batch = request.batch
        first_user = _first_user_seq(batch)
        record = _dumps(
            {
                "fingerprint": request.fingerprint,
                "head": new_head,
                "first_seq": first_seq,
                "message_count": len(batch),
            }
        )
        return await self._append_script(
            keys=self._session_keys(request.session_id, request.tenant),
            args=[
                request.tenant,
                request.expected_head,
                request.request_id,
                record,
                new_head,
                first_seq + len(batch),
                now,
                "" if first_user is None else first_user,
                request.session_id,
                REQUEST_ID_MEMORY,
                len(batch),
                *(_message_json(m) for m in batch),
                *(c.id for m in batch for c in m.tool_calls),
            ],
        )

    async def _prior_result(
        self, request: AppendRequest, raw_record: bytes | str
    ) -> tuple[str, builtins.list[common_pb2.Message]]:
        session_id = request.session_id
        record = json.loads(raw_record)
        if record["fingerprint"] != request.fingerprint:
            raise reused_request_id(request.request_id)
        first, count = int(record["first_seq"]), int(record["message_count"])
        raw = await self._redis.lrange(self._key("log", session_id), first, first + count - 1)
        if len(raw) != count:
            raise session_not_found(session_id)  # deleted since
        return str(record["head"]), [_message_from_json(item) for item in raw]

    async def fork(self, tenant: str, session_id: str, at_hash: str) -> session_pb2.Session:
        validate_session_id(session_id)
        with self._guard():
            meta = await self._meta(tenant, session_id)
            source = _session_from_meta(session_id, meta)
            raw_prefix: builtins.list[str] = []
            prefix: builtins.list[common_pb2.Message] = []
            if at_hash:
                # The log is append only: a prefix, once read, cannot change under us.
                key = self._key("log", session_id)
                found = False
                for start in range(0, source.message_count, _READ_CHUNK):
                    chunk = await self._redis.lrange(key, start, start + _READ_CHUNK - 1)
                    for item in chunk:
                        msg = _message_from_json(item)
                        raw_prefix.append(_text(item))
                        prefix.append(msg)
                        if msg.hash == at_hash:
                            found = True
                            break
                    if found or not chunk:
                        break
                if not found:
                    raise hash_not_found(session_id, at_hash)
            fork = new_fork(source, at_hash, len(prefix))
            await self._write_new(fork, prefix, raw_prefix)
        return fork

    async def delete(self, tenant: str, session_id: str, *, reason: str = "deleted") -> None:
        validate_session_id(session_id)
        check_erasure_reason(reason)
        keys = [
            *self._session_keys(session_id, tenant),
            self._key("erasure", session_id),
            self._key("erasures_unfinished", tenant),
            *(self._key("erasures_pending", owner) for owner in ERASURE_OWNERS),
        ]
        with self._guard():
            deleted = await self._delete_script(
                keys=keys, args=[tenant, session_id, reason, now_micros(), *ERASURE_OWNERS]
            )
        if not int(deleted):
            raise session_not_found(session_id)

    async def _list_derived(
        self, tenant: str, session_id: str
    ) -> builtins.list[session_pb2.Session]:
        # No index of children: the tenant's sessions are read, which is fine for the
        # sizes retention keeps a tenant to.
        with self._guard():
            ids = _texts(await self._redis.zrange(self._tenant_key(tenant), 0, -1))
            async with self._redis.pipeline(transaction=False) as pipe:
                for child in ids:
                    pipe.hgetall(self._key("meta", child))
                metas = await pipe.execute()
        sessions = [
            _session_from_meta(child, meta)
            for child, meta in zip(ids, map(_decoded, metas), strict=True)
            if meta.get("tenant") == tenant
            and session_id in (meta.get("forked_from"), meta.get("compacted_from"))
        ]
        return sorted(sessions, key=lambda s: (s.created_at.ToMicroseconds(), s.id))

    async def _list_pending_erasures(self, owner: str, limit: int) -> builtins.list[Erasure]:
        if limit == 0:
            return []
        with self._guard():
            ids = _texts(
                await self._redis.zrange(self._key("erasures_pending", owner), 0, limit - 1)
            )
            async with self._redis.pipeline(transaction=False) as pipe:
                for session_id in ids:
                    pipe.hmget(self._key("erasure", session_id), ["tenant", "reason", "deleted_at"])
                rows = await pipe.execute()
        return [
            Erasure(session_id, _text(tenant), _text(reason), int(deleted_at))
            for session_id, (tenant, reason, deleted_at) in zip(ids, rows, strict=True)
            if tenant is not None
        ]

    async def _store_acknowledgement(
        self, owner: str, session_id: str, counts: dict[str, int]
    ) -> ErasureDone | None:
        key = self._key("erasure", session_id)
        with self._guard():
            tenant = await self._redis.hget(key, "tenant")
            if tenant is None:
                raise no_pending_erasure(owner, session_id)
            outcome = _text(
                await self._acknowledge_script(
                    keys=[
                        key,
                        self._key("erasures_pending", owner),
                        self._key("erasures_unfinished", _text(tenant)),
                        self._key("erasure_totals", _text(tenant)),
                    ],
                    args=[owner, _dumps(counts), session_id, now_micros()],
                )
            )
            if outcome == "missing":
                raise no_pending_erasure(owner, session_id)
            if outcome != "done":
                return None
            fields = _decoded(await self._redis.hgetall(key))
        erasure = Erasure(session_id, fields["tenant"], fields["reason"], int(fields["deleted_at"]))
        done = {
            name.removeprefix("owner:"): json.loads(value)
            for name, value in fields.items()
            if name.startswith("owner:")
        }
        return ErasureDone(erasure, done)

    async def _find_erased(self, ids: builtins.list[str]) -> builtins.list[str]:
        if not ids:
            return []
        with self._guard():
            async with self._redis.pipeline(transaction=False) as pipe:
                for session_id in ids:
                    pipe.exists(self._key("erasure", session_id))
                found = await pipe.execute()
        return [session_id for session_id, hit in zip(ids, found, strict=True) if hit]

    async def unfinished_erasures(self, tenant: str) -> int:
        with self._guard():
            return int(await self._redis.scard(self._key("erasures_unfinished", tenant)))

    async def tenant_erasure_totals(self, tenant: str) -> TenantErasureTotals:
        with self._guard():
            fields = _decoded(await self._redis.hgetall(self._key("erasure_totals", tenant)))
        removed: dict[str, dict[str, int]] = {}
        for name, count in fields.items():
            if name != "sessions":
                owner, _, kind = name.partition(":")
                removed.setdefault(owner, {})[kind] = int(count)
        return TenantErasureTotals(int(fields.get("sessions", 0)), removed)

    async def _read_all(
        self, tenant: str, session_id: str
    ) -> tuple[session_pb2.Session, builtins.list[common_pb2.Message]]:
        with self._guard():
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hgetall(self._key("meta", session_id))
                pipe.lrange(self._key("log", session_id), 0, -1)
                raw_meta, raw = await pipe.execute()
        meta = _decoded(raw_meta)
        if meta.get("tenant") != tenant:
            raise session_not_found(session_id)
        return _session_from_meta(session_id, meta), [_message_from_json(item) for item in raw]

    # -- retention ---------------------------------------------------------------------

    async def _expired(self, idle_before_micros: int, limit: int) -> builtins.list[tuple[str, str]]:
        with self._guard():
            while True:
                members = await self._redis.zrangebyscore(
                    self._by_updated_key, "-inf", f"({idle_before_micros}", start=0, num=limit
                )
                ids = _texts(members)
                async with self._redis.pipeline(transaction=False) as pipe:
                    for session_id in ids:
                        pipe.hget(self._key("meta", session_id), "tenant")
                    tenants = await pipe.execute()
                found = [(_text(t), sid) for sid, t in zip(ids, tenants, strict=True) if t]
                missing = [sid for sid, t in zip(ids, tenants, strict=True) if not t]
                # An entry without its session would otherwise come back first on every
                # call and crowd out sessions that did expire.
                if not missing or not await self._remove_orphan_members(
                    self._by_updated_key, missing
                ):
                    return found

    async def _beyond_cap(self, tenant: str, cap: int) -> builtins.list[str]:
        with self._guard():
            members = await self._redis.zrevrange(self._tenant_key(tenant), cap, -1)
        return _texts(reversed(members))

    async def _remove_orphan_members(self, key: str, members: Sequence[str]) -> int:
        removed = 0
        for start in range(0, len(members), _MEMBER_CHUNK):
            chunk = members[start : start + _MEMBER_CHUNK]
            removed += int(
                await self._orphan_members_script(
                    keys=[key, *(self._key("meta", m) for m in chunk)], args=list(chunk)
                )
            )
        return removed

    async def cleanup_orphans(self) -> int:
        removed = 0
        with self._guard():
            async for raw_key in self._redis.scan_iter(
                match=_glob_escape(self._prefix) + "*", count=_SCAN_COUNT
            ):
                key = _text(raw_key)
                kind, _, rest = key[len(self._prefix) :].partition(":")
                if kind in _SESSION_KEY_KINDS:
                    removed += int(
                        await self._orphan_key_script(keys=[self._key("meta", rest), key])
                    )
                elif kind == "tenant" or key == self._by_updated_key:
                    removed += await self._cleanup_sorted_set(key)
        return removed

    async def _cleanup_sorted_set(self, key: str) -> int:
        # In chunks as the scan goes: the set of every session can be large.
        removed = 0
        chunk: builtins.list[str] = []
        async for member, _score in self._redis.zscan_iter(key, count=_SCAN_COUNT):
            chunk.append(_text(member))
            if len(chunk) == _MEMBER_CHUNK:
                removed += await self._cleanup_members(key, chunk)
                chunk = []
        if chunk:
            removed += await self._cleanup_members(key, chunk)
        return removed

    async def _cleanup_members(self, key: str, members: Sequence[str]) -> int:
        async with self._redis.pipeline(transaction=False) as pipe:
            for member in members:
                pipe.exists(self._key("meta", member))
            present = await pipe.execute()
        missing = [m for m, there in zip(members, present, strict=True) if not there]
        return await self._remove_orphan_members(key, missing) if missing else 0

    # -- calibration -------------------------------------------------------------------

    async def calibration(self, model: str) -> float | None:
        with self._guard():
            raw = await self._redis.hget(self._calibration_key, model)
        return None if raw is None else float(_text(raw))

    async def _store_calibration(self, model: str, chars_per_token: float) -> None:
        with self._guard():
            # repr() round-trips a float exactly.
            await self._redis.hset(self._calibration_key, model, repr(chars_per_token))
