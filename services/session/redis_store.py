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
from typing import Any, cast

import redis.asyncio as aioredis
import redis.exceptions

from services.session.chain import GENESIS_HASH, batch_fingerprint, seal_messages
from services.session.store import (
    REQUEST_ID_MEMORY,
    check_calibration,
    check_listing_limit,
    check_new_session,
    check_request_id,
    copy_messages,
    decode_page_token,
    encode_page_token,
    export_lines,
    hash_not_found,
    now_micros,
    page_size_or_default,
    parse_export,
    reused_request_id,
    session_not_found,
)
from services.session.tokens import DEFAULT_ESTIMATOR, TokenEstimator
from services.session.validation import validate_messages
from threadline.errors import (
    AlreadyExists,
    DataLoss,
    HeadMismatch,
    InvalidArgument,
    Unavailable,
)
from threadline.ids import new_session_id, validate_session_id
from threadline.v1 import common_pb2, session_pb2

# Lua's unpack() is bounded by the C stack (LUAI_MAXCSTACK, 8000): variadic
# commands get their arguments in chunks below it.
_PUSH_IN_CHUNKS = """
local function push_chunks(command, key, first, last)
  local i = first
  while i <= last do
    local j = math.min(i + 999, last)
    redis.call(command, key, unpack(ARGV, i, j))
    i = j + 1
  end
end
"""

# KEYS: meta, log, calls, requests, request_order, tenant zset, by_updated zset
# ARGV: tenant, expected_head, request_id, result JSON, new head, new message_count,
#       updated_at, first_user_seq or "", session_id, request memory, message count n,
#       n message JSONs, then the batch's tool call ids.
_APPEND = (
    _PUSH_IN_CHUNKS
    + """
if redis.call('HGET', KEYS[1], 'tenant') ~= ARGV[1] then
  return {'missing'}
end
-- The request id before the head: a retry whose first attempt landed gets that
-- result back, although that very append moved the head.
if ARGV[3] ~= '' then
  local prior = redis.call('HGET', KEYS[4], ARGV[3])
  if prior then
    return {'retry', prior}
  end
end
local head = redis.call('HGET', KEYS[1], 'head')
if head ~= ARGV[2] then
  return {'moved', head}
end
local n = tonumber(ARGV[11])
local length = redis.call('LLEN', KEYS[2])
if length ~= tonumber(ARGV[6]) - n then
  -- The log and its meta disagree (a key lost to eviction?): appending would
  -- bury the damage under valid-looking entries.
  return {'corrupt', tostring(length)}
end
push_chunks('RPUSH', KEYS[2], 12, 11 + n)
push_chunks('SADD', KEYS[3], 12 + n, #ARGV)
redis.call('HSET', KEYS[1], 'head', ARGV[5], 'message_count', ARGV[6], 'updated_at', ARGV[7])
if ARGV[8] ~= '' then
  redis.call('HSETNX', KEYS[1], 'first_user_seq', ARGV[8])
end
redis.call('ZADD', KEYS[6], ARGV[7], ARGV[9])
redis.call('ZADD', KEYS[7], ARGV[7], ARGV[9])
if ARGV[3] ~= '' then
  redis.call('HSET', KEYS[4], ARGV[3], ARGV[4])
  redis.call('RPUSH', KEYS[5], ARGV[3])
  local memory = tonumber(ARGV[10])
  while redis.call('LLEN', KEYS[5]) > memory do
    redis.call('HDEL', KEYS[4], redis.call('LPOP', KEYS[5]))
  end
end
return {'ok'}
"""
)

# KEYS: meta, log, calls, requests, request_order, tenant zset, by_updated zset
# ARGV: session_id, updated_at, f (field names and values, counted together), n
#       (messages), the f field names and values, n message JSONs, then tool call ids.
_CREATE = (
    _PUSH_IN_CHUNKS
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
-- Leftovers of an earlier session with this id (an import) must not leak in.
redis.call('UNLINK', KEYS[2], KEYS[3], KEYS[4], KEYS[5])
local f = tonumber(ARGV[3])
local n = tonumber(ARGV[4])
redis.call('HSET', KEYS[1], unpack(ARGV, 5, 4 + f))
push_chunks('RPUSH', KEYS[2], 5 + f, 4 + f + n)
push_chunks('SADD', KEYS[3], 5 + f + n, #ARGV)
redis.call('ZADD', KEYS[6], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[7], ARGV[2], ARGV[1])
return 1
"""
)

# KEYS: meta, log, calls, requests, request_order, tenant zset, by_updated zset
# ARGV: tenant, session_id
_DELETE = """
if redis.call('HGET', KEYS[1], 'tenant') ~= ARGV[1] then
  return 0
end
-- UNLINK frees a long log in the background instead of blocking Redis.
redis.call('UNLINK', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5])
redis.call('ZREM', KEYS[6], ARGV[2])
redis.call('ZREM', KEYS[7], ARGV[2])
return 1
"""

# KEYS: meta of the session the key belongs to, the key. Re-checked here, atomically:
# an import may have re-created the session since the scan saw the key.
_REMOVE_ORPHAN_KEY = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
return redis.call('UNLINK', KEYS[2])
"""

# KEYS: a sorted set, then the meta key of each member; ARGV: the members.
_REMOVE_ORPHAN_MEMBERS = """
local removed = 0
for i = 1, #ARGV do
  if redis.call('EXISTS', KEYS[i + 1]) == 0 then
    removed = removed + redis.call('ZREM', KEYS[1], ARGV[i])
  end
end
return removed
"""

_RECENT_FIRST_BATCH = 32
_RECENT_MAX_BATCH = 1024
# Messages per LRANGE when a whole prefix is read (fork).
_READ_CHUNK = 1_000
# Keys per SCAN step and members per script call in the orphan walk.
_SCAN_COUNT = 500
_MEMBER_CHUNK = 200

_INT32_MAX = 2**31 - 1

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
    if msg.tool_calls:
        entry["tool_calls"] = [[c.id, c.name, c.arguments_json] for c in msg.tool_calls]
    if msg.tool_call_id:
        entry["tool_call_id"] = msg.tool_call_id
    if msg.name:
        entry["name"] = msg.name
    if msg.interrupted:
        entry["interrupted"] = True
    return _dumps(entry)


def _message_from_json(raw: bytes | str) -> common_pb2.Message:
    entry = json.loads(raw)
    msg = common_pb2.Message(
        id=entry["id"],
        role=entry["role"],
        content=entry["content"],
        tool_call_id=entry.get("tool_call_id", ""),
        name=entry.get("name", ""),
        interrupted=entry.get("interrupted", False),
        token_count=entry["token_count"],
        seq=entry["seq"],
        parent_hash=entry["parent_hash"],
        hash=entry["hash"],
    )
    for call_id, name, arguments_json in entry.get("tool_calls", ()):
        msg.tool_calls.add(id=call_id, name=name, arguments_json=arguments_json)
    msg.created_at.FromMicroseconds(entry["created_at"])
    return msg


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


class RedisSessionStore:
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
        self.max_message_chars = max_message_chars
        self.max_messages_per_append = max_messages_per_append
        self._redis = client
        self._prefix = prefix
        self._estimator = estimator
        self._closed = False
        self._append_script = client.register_script(_APPEND)
        self._create_script = client.register_script(_CREATE)
        self._delete_script = client.register_script(_DELETE)
        self._orphan_key_script = client.register_script(_REMOVE_ORPHAN_KEY)
        self._orphan_members_script = client.register_script(_REMOVE_ORPHAN_MEMBERS)

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

    async def list(
        self, tenant: str, *, page_size: int, page_token: str
    ) -> tuple[builtins.list[session_pb2.Session], str]:
        limit = page_size_or_default(page_size)
        after = decode_page_token(page_token) if page_token else None
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
        if len(ids) <= limit:
            return sessions, ""
        sessions = sessions[:limit]
        if not sessions:
            return [], ""
        last = sessions[-1]
        return sessions, encode_page_token(last.updated_at.ToMicroseconds(), last.id)

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
        validate_session_id(session_id)
        if from_seq < 0:
            raise InvalidArgument(f"from_seq must be >= 0, got {from_seq}")
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
        batch = _RECENT_FIRST_BATCH
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
            batch = min(batch * 2, _RECENT_MAX_BATCH)

    async def first_user_message(self, tenant: str, session_id: str) -> common_pb2.Message | None:
        validate_session_id(session_id)
        with self._guard():
            seq = await self._meta_field(tenant, session_id, "first_user_seq")
            if seq is None:
                return None
            raw = await self._redis.lindex(self._key("log", session_id), int(seq))
        return None if raw is None else _message_from_json(raw)

    # -- writes ------------------------------------------------------------------------

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
            validate_messages(
                batch,
                max_message_chars=self.max_message_chars,
                max_messages=self.max_messages_per_append,
            )
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
            head=seal_messages(
                batch,
                parent_hash=GENESIS_HASH,
                first_seq=0,
                now_micros=now,
                token_count=self._token_count,
            ),
        )
        session.created_at.FromMicroseconds(now)
        session.updated_at.FromMicroseconds(now)
        with self._guard():
            await self._write_new(
                session,
                [_message_json(m) for m in batch],
                [c.id for m in batch for c in m.tool_calls],
                _first_user_seq(batch),
            )
        return session

    async def _write_new(
        self,
        session: session_pb2.Session,
        raw_messages: Sequence[str],
        call_ids: Sequence[str],
        first_user_seq: int | None,
    ) -> None:
        fields = _meta_fields(session, first_user_seq)
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
        wanted = sorted(
            {m.tool_call_id for m in batch if m.tool_call_id}
            | {c.id for m in batch for c in m.tool_calls if c.id}
        )
        with self._guard():
            # One snapshot (MULTI) of what validation needs. If the script later finds
            # the head still at expected_head, the log is this same log (hash chain,
            # append only), so the tool call ids read here are still the session's.
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hmget(self._key("meta", session_id), ["tenant", "head", "message_count"])
                if request_id:
                    pipe.hget(self._key("requests", session_id), request_id)
                if wanted:
                    pipe.smismember(self._key("calls", session_id), wanted)
                replies = iter(await pipe.execute())
            owner, head_raw, count_raw = next(replies)
            if owner is None or _text(owner) != tenant:
                raise session_not_found(session_id)
            prior = next(replies) if request_id else None
            if prior is not None:
                return await self._prior_result(session_id, request_id, fingerprint, prior)
            head = _text(head_raw)
            if head != expected_head:
                raise HeadMismatch(session_id, expected_head, head)
            present = next(replies) if wanted else []
            known = {call_id for call_id, there in zip(wanted, present, strict=True) if there}
            validate_messages(
                batch,
                max_message_chars=self.max_message_chars,
                max_messages=self.max_messages_per_append,
                known_tool_call_ids=known,
            )
            now = now_micros()
            first_seq = int(_text(count_raw))
            new_head = seal_messages(
                batch,
                parent_hash=head,
                first_seq=first_seq,
                now_micros=now,
                token_count=self._token_count,
            )
            first_user = _first_user_seq(batch)
            record = _dumps(
                {
                    "fingerprint": fingerprint,
                    "head": new_head,
                    "first_seq": first_seq,
                    "message_count": len(batch),
                }
            )
            reply = await self._append_script(
                keys=self._session_keys(session_id, tenant),
                args=[
                    tenant,
                    expected_head,
                    request_id,
                    record,
                    new_head,
                    first_seq + len(batch),
                    now,
                    "" if first_user is None else first_user,
                    session_id,
                    REQUEST_ID_MEMORY,
                    len(batch),
                    *(_message_json(m) for m in batch),
                    *(c.id for m in batch for c in m.tool_calls),
                ],
            )
            outcome = _text(reply[0])
            if outcome == "ok":
                return new_head, batch
            if outcome == "missing":
                raise session_not_found(session_id)
            if outcome == "retry":
                # The same request id landed between the snapshot and the script.
                return await self._prior_result(session_id, request_id, fingerprint, reply[1])
            if outcome == "moved":
                raise HeadMismatch(session_id, expected_head, _text(reply[1]))
            raise DataLoss(
                f"session {session_id}: the log holds {_text(reply[1])} messages, its "
                f"metadata says {first_seq}",
                details={"session_id": session_id},
            )

    async def _prior_result(
        self, session_id: str, request_id: str, fingerprint: str, raw_record: bytes | str
    ) -> tuple[str, builtins.list[common_pb2.Message]]:
        record = json.loads(raw_record)
        if record["fingerprint"] != fingerprint:
            raise reused_request_id(request_id)
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
            now = now_micros()
            fork = session_pb2.Session(
                id=new_session_id(),
                tenant=tenant,
                title=source.title,
                model=source.model,
                system_prompt=source.system_prompt,
                metadata=source.metadata,
                head=at_hash,
                message_count=len(prefix),
                forked_from=session_id,
            )
            fork.created_at.FromMicroseconds(now)
            fork.updated_at.FromMicroseconds(now)
            await self._write_new(
                fork,
                raw_prefix,
                [c.id for m in prefix for c in m.tool_calls],
                _first_user_seq(prefix),
            )
        return fork

    async def delete(self, tenant: str, session_id: str) -> None:
        validate_session_id(session_id)
        with self._guard():
            deleted = await self._delete_script(
                keys=self._session_keys(session_id, tenant), args=[tenant, session_id]
            )
        if not int(deleted):
            raise session_not_found(session_id)

    async def export(self, tenant: str, session_id: str) -> builtins.list[str]:
        validate_session_id(session_id)
        with self._guard():
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hgetall(self._key("meta", session_id))
                pipe.lrange(self._key("log", session_id), 0, -1)
                raw_meta, raw = await pipe.execute()
        meta = _decoded(raw_meta)
        if meta.get("tenant") != tenant:
            raise session_not_found(session_id)
        messages = [_message_from_json(item) for item in raw]
        return export_lines(_session_from_meta(session_id, meta), messages)

    async def import_session(self, tenant: str, lines: Sequence[str]) -> session_pb2.Session:
        check_new_session(tenant, "", "")
        session, messages = parse_export(lines, max_message_chars=self.max_message_chars)
        session.tenant = tenant
        with self._guard():
            await self._write_new(
                session,
                [_message_json(m) for m in messages],
                [c.id for m in messages for c in m.tool_calls],
                _first_user_seq(messages),
            )
        return session

    # -- retention ---------------------------------------------------------------------

    async def expired(self, idle_before_micros: int, limit: int) -> builtins.list[tuple[str, str]]:
        check_listing_limit("limit", limit)
        if limit == 0:
            return []
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

    async def beyond_cap(self, tenant: str, cap: int) -> builtins.list[str]:
        check_listing_limit("cap", cap)
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

    async def set_calibration(self, model: str, chars_per_token: float) -> None:
        check_calibration(model, chars_per_token)
        with self._guard():
            # repr() round-trips a float exactly.
            await self._redis.hset(self._calibration_key, model, repr(chars_per_token))

    def _token_count(self, msg: common_pb2.Message) -> int:
        return min(self._estimator.estimate(msg), _INT32_MAX)
