"""A process that appends to one session in a loop until it is killed.

Run by tests/e2e/test_session_crash.py, which kills it with SIGKILL at random
moments and restarts it on the same store:

    python -m tests.e2e.session_writer sqlite PATH SESSION_ID START
    python -m tests.e2e.session_writer redis URL PREFIX SESSION_ID START
    python -m tests.e2e.session_writer postgresql URL SESSION_ID START

Append n (from START on) is `batch(n)` with request id `req-<n>`. Each append
is acknowledged on stdout only after `append` returned, one line per stored
message: `ack <n> <seq> <hash>`, written with a single write call (below the
pipe's atomic write size, so a kill never leaves half a line of an ack). The
test restarts the writer at the append after the last one acknowledged: if the
killed writer had stored that append without acknowledging it, the request id
makes the retry return the stored result instead of appending it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import redis.asyncio as aioredis

from services.session.postgres_store import PostgresSessionStore
from services.session.redis_store import RedisSessionStore
from services.session.sqlite_store import SqliteSessionStore
from services.session.store import SessionStore
from threadline.v1 import common_pb2

TENANT = "crash"


def batch(n: int) -> list[common_pb2.Message]:
    """1 to 3 messages, so that a kill can fall between the rows of one append."""
    return [
        common_pb2.Message(
            role=common_pb2.ROLE_USER if part == 0 else common_pb2.ROLE_ASSISTANT,
            content=f"append {n} part {part} " + "x" * (n % 50),
        )
        for part in range(n % 3 + 1)
    ]


@contextlib.asynccontextmanager
async def open_store(argv: list[str]) -> AsyncIterator[tuple[SessionStore, list[str]]]:
    """The store named by the arguments, and the arguments left over."""
    if argv[0] == "sqlite":
        async with SqliteSessionStore(Path(argv[1])) as sqlite:
            yield sqlite, argv[2:]
    elif argv[0] == "redis":
        client = aioredis.from_url(argv[1])
        try:
            yield RedisSessionStore(client, prefix=argv[2]), argv[3:]
        finally:
            await client.aclose()
    elif argv[0] == "postgresql":
        async with PostgresSessionStore(argv[1]) as postgres:
            yield postgres, argv[2:]
    else:
        raise SystemExit(f"unknown backend {argv[0]!r}")


async def main(argv: list[str]) -> None:
    async with open_store(argv) as (store, rest):
        session_id, start = rest[0], int(rest[1])
        print("ready", flush=True)
        n = start
        while True:
            head = (await store.get(TENANT, session_id)).head
            _, stored = await store.append(
                TENANT, session_id, head, batch(n), request_id=f"req-{n}"
            )
            sys.stdout.write("".join(f"ack {n} {m.seq} {m.hash}\n" for m in stored))
            sys.stdout.flush()
            n += 1


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
