"""Replicas under fire: two of each service but the gateway on one PostgreSQL, one
replica SIGKILLed and restarted every few seconds while 32 conversations go on.

What a user of the stack must never see, however the kills fall: an acknowledged
message lost or stored twice, a chain that does not verify, a failed turn without
a clean status or whose partial answer is not stored as interrupted, a session
refused as busy longer than the turn lease, a memory job done twice, a task lost.

CHAOS_RUN_S shortens or lengthens the run, CHAOS_SEED repeats one (it is printed),
CHAOS_LOG_LEVEL=info keeps the services' full logs under the test's tmp dir.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import random
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import pytest

from tests.conftest import ACME_KEY
from tests.ports import free_ports
from tests.postgres_database import PostgresUnavailable, postgres_database
from tests.processes import service_env
from tests.redis_server import start_redis, stop_redis
from tests.replicas import REPLICATED, Replica, Replicas, serve_replicas
from tests.waiting import eventually
from threadline import errors
from threadline.client import GatewayClient
from threadline.testing.fake_upstream import FakeUpstream, Script
from threadline.v1 import common_pb2, memory_pb2

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

CONVERSATIONS = 32
RUN_S = float(os.environ.get("CHAOS_RUN_S", "60"))
KILL_EVERY_S = 5.0
TURN_LEASE_TTL_S = 5.0
#: A busy refusal this long after the last executor kill means a lease outlived its TTL.
BUSY_SLACK_S = 2.0
#: Statuses a turn may end with when a replica dies under it.
CLEAN = {"UNAVAILABLE", "ABORTED", "DEADLINE_EXCEEDED"}
TASK_EVERY_S = 1.5
TASK_AGENT = {
    "echo": {
        "description": "Echoes.",
        "runner": "command",
        "argv": ["sh", "-c", "sleep 0.5; echo ok"],
    }
}


@pytest.fixture
def chaos_database() -> Iterator[str]:
    """A database for this test alone, dropped at the end."""
    try:
        with postgres_database() as url:
            yield url
    except PostgresUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)


@dataclass
class Turn:
    session_id: str
    text: str
    started: float
    ended: float = 0.0
    #: What the client saw: deltas joined, then the done's content when it came.
    seen: str = ""
    answer: str | None = None
    finish: str = ""
    status: str = ""


@dataclass
class Record:
    turns: list[Turn] = field(default_factory=list)
    kills: list[tuple[float, Replica]] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)
    task_failures: list[str] = field(default_factory=list)

    def by_session(self) -> dict[str, list[Turn]]:
        out: dict[str, list[Turn]] = collections.defaultdict(list)
        for turn in self.turns:
            out[turn.session_id].append(turn)
        return out


async def _turn(client: GatewayClient, turn: Turn) -> None:
    try:
        async for event in client.converse(turn.session_id, turn.text, timeout=60):
            kind = event.WhichOneof("event")
            if kind == "delta":
                turn.seen += event.delta
            elif kind == "done":
                turn.answer = event.done.content
                turn.finish = common_pb2.FinishReason.Name(event.done.finish_reason)
    except errors.ThreadlineError as exc:
        turn.status = exc.code
        assert "Traceback" not in exc.message and "ipv4:" not in exc.message, exc.message
    turn.ended = time.monotonic()


async def _converse(
    client: GatewayClient, session_id: str, stop: asyncio.Event, record: Record
) -> None:
    n = 0
    while not stop.is_set():
        turn = Turn(session_id, f"{session_id} says {n}", time.monotonic())
        n += 1
        record.turns.append(turn)
        await _turn(client, turn)
        if turn.status:
            # A client backs off a little after a failure, as a real one would.
            await asyncio.sleep(0.2)


async def _submit_tasks(client: GatewayClient, stop: asyncio.Event, record: Record) -> None:
    while not stop.is_set():
        try:
            record.tasks.append((await client.submit_task("work", agent_type="echo")).id)
        except errors.ThreadlineError as exc:
            record.task_failures.append(exc.code)
            assert exc.code in CLEAN, exc
        await asyncio.sleep(TASK_EVERY_S)


async def _kill_and_restart(
    stack: Replicas, stop: asyncio.Event, record: Record, seed: int
) -> None:
    rng = random.Random(seed)
    victims = [r for r in stack.replicas if r[0] in REPLICATED]
    started = time.monotonic()
    tick = 1
    while not stop.is_set():
        # Kills on a fixed schedule, however long a restart takes.
        await asyncio.sleep(max(0.0, started + tick * KILL_EVERY_S - time.monotonic()))
        tick += 1
        if stop.is_set():
            return
        victim = rng.choice(victims)
        record.kills.append((time.monotonic(), victim))
        await stack.kill(victim, signal.SIGKILL)
        await stack.start(victim)
        await stack.wait_healthy(victim)


async def _last_turn(client: GatewayClient, session_id: str, record: Record) -> None:
    async def answered() -> bool:
        turn = Turn(session_id, f"{session_id} says goodbye", time.monotonic())
        await _turn(client, turn)
        if turn.status in ("ABORTED", "UNAVAILABLE"):
            return False
        record.turns.append(turn)
        return True

    await eventually(answered, timeout=TURN_LEASE_TTL_S + 15, interval=0.2)


def _check_session(turns: list[Turn], messages: list[tuple[int, str, bool]]) -> list[str]:
    """What is wrong with one session's stored log, given what its client saw."""
    problems = []
    users = [i for i, (role, _, _) in enumerate(messages) if role == common_pb2.ROLE_USER]
    stored_inputs = collections.Counter(messages[i][1] for i in users)
    for turn in turns:
        count = stored_inputs[turn.text]
        if count > 1:
            problems.append(f"{turn.text!r} stored {count} times")
        acknowledged = turn.answer is not None
        if (acknowledged or turn.seen) and count == 0:
            problems.append(f"{turn.text!r} answered or streamed but not stored")
        if count != 1:
            continue
        at = next(i for i in users if messages[i][1] == turn.text)
        reply = messages[at + 1] if at + 1 < len(messages) else None
        if turn.finish == "FINISH_REASON_STOP":
            if reply is None or reply[:3] != (common_pb2.ROLE_ASSISTANT, turn.answer, False):
                problems.append(f"answer to {turn.text!r} not stored as sent: {reply}")
        elif turn.finish == "FINISH_REASON_INTERRUPTED":
            if reply is None or reply[1:] != (turn.answer, True):
                problems.append(f"interrupted answer to {turn.text!r} not stored: {reply}")
        elif turn.seen and not _holds_what_was_seen(reply, turn.seen):
            problems.append(f"partial answer to {turn.text!r} not stored: {reply}")
    return problems


def _holds_what_was_seen(reply: tuple[int, str, bool] | None, seen: str) -> bool:
    """A turn cut after the client saw `seen`: the replica streaming it died.

    Either it stored the whole answer before it died (the user saw part of it),
    or the next turn stored its last draft: part of what the user saw, marked
    interrupted.
    """
    if reply is None or reply[0] != common_pb2.ROLE_ASSISTANT:
        return False
    _, content, interrupted = reply
    return seen.startswith(content) if interrupted else content.startswith(seen)


def _busy_after_ttl(record: Record) -> list[Turn]:
    executor_kills = [at for at, (name, _) in record.kills if name == "executor"]
    return [
        turn
        for turn in record.turns
        if turn.status == "ABORTED"
        and not any(
            at <= turn.started <= at + TURN_LEASE_TTL_S + BUSY_SLACK_S for at in executor_kills
        )
    ]


def _longest_unavailable(record: Record) -> float:
    """The longest time from a session's first failed turn to its next answered one."""
    longest = 0.0
    for turns in record.by_session().values():
        failed_since: float | None = None
        for turn in turns:
            if turn.finish == "FINISH_REASON_STOP":
                if failed_since is not None:
                    longest = max(longest, turn.ended - failed_since)
                failed_since = None
            elif failed_since is None:
                failed_since = turn.started
    return longest


async def _memory_overlaps(conn: asyncpg.Connection) -> list[str]:
    """Consolidations that covered a range another one covered too (a job done twice)."""
    rows = await conn.fetch(
        "SELECT session_id, from_seq, to_seq FROM memory_history"
        " ORDER BY session_id, from_seq, to_seq"
    )
    problems: list[str] = []
    last: dict[str, int] = {}
    for row in rows:
        previous = last.get(row["session_id"])
        if previous is not None and row["from_seq"] < previous:
            problems.append(f"{row['session_id']}: {row['from_seq']}..{row['to_seq']} overlaps")
        last[row["session_id"]] = row["to_seq"]
    return problems


async def _unfinished_memory_jobs(conn: asyncpg.Connection) -> int:
    return int(
        await conn.fetchval(
            "SELECT count(*) FROM memory_jobs WHERE state = ANY($1::int[])",
            [memory_pb2.JOB_STATE_QUEUED, memory_pb2.JOB_STATE_RUNNING],
        )
    )


def _report(record: Record, tasks: collections.Counter[str], memory_done: int, seed: int) -> None:
    failed = collections.Counter(
        t.status or t.finish for t in record.turns if t.finish != "FINISH_REASON_STOP"
    )
    kills = collections.Counter(name for _, (name, _) in record.kills)
    print(
        f"\nchaos (seed {seed}): {len(record.turns)} turns in {RUN_S:.0f} s,"
        f" {sum(t.finish == 'FINISH_REASON_STOP' for t in record.turns)} completed,"
        f" failed by status {dict(failed)}; kills {dict(kills)};"
        f" longest a session was unavailable {_longest_unavailable(record):.1f} s;"
        f" tasks {dict(tasks)}; memory consolidations {memory_done}"
    )


async def test_replicas_killed_at_random_lose_nothing_acknowledged(
    tmp_path: Path, fake_upstream: FakeUpstream, chaos_database: str
) -> None:
    seed = int(os.environ.get("CHAOS_SEED", str(time.time_ns() % 10_000)))
    fake_upstream.default = Script(tokens=8, token_delay_s=0.02)
    (redis_port,) = free_ports(1)
    redis_dir = tmp_path / "redis"
    redis_dir.mkdir()
    redis, redis_url = await asyncio.to_thread(start_redis, redis_dir, redis_port)
    env = service_env(
        tmp_path,
        fake_upstream.base_url,
        redis_url,
        THREADLINE_SESSION__DATABASE=chaos_database,
        THREADLINE_MEMORY__DATABASE=chaos_database,
        THREADLINE_EXECUTOR__TASKS__DATABASE=chaos_database,
        THREADLINE_EXECUTOR__TURN_LEASE_TTL_S=str(TURN_LEASE_TTL_S),
        THREADLINE_EXECUTOR__TASKS__AGENT_TYPES=json.dumps(TASK_AGENT),
        THREADLINE_EXECUTOR__TASKS__DEFAULT_AGENT_TYPE="echo",
        THREADLINE_MEMORY__CONSOLIDATE_FRACTION="0.02",
        THREADLINE_MEMORY__SCAN_INTERVAL_S="0.5",
        THREADLINE_MEMORY__CLAIM_IDLE_S="2",
        THREADLINE_MEMORY__LEASE_TTL_S="2",
        THREADLINE_GRACE_PERIOD_S="2",
    )
    env["THREADLINE_LOG_LEVEL"] = os.environ.get("CHAOS_LOG_LEVEL", "warning")
    record = Record()
    try:
        async with (
            serve_replicas(env, tmp_path) as stack,
            GatewayClient(env["THREADLINE_ADDRESSES__GATEWAY"], api_key=ACME_KEY) as client,
        ):
            sessions = [(await client.create_session()).id for _ in range(CONVERSATIONS)]
            stop = asyncio.Event()
            load = [asyncio.create_task(_converse(client, s, stop, record)) for s in sessions]
            load.append(asyncio.create_task(_submit_tasks(client, stop, record)))
            chaos = asyncio.create_task(_kill_and_restart(stack, stop, record, seed))
            await asyncio.sleep(RUN_S)  # the run's length: the load goes on meanwhile
            stop.set()
            await chaos
            await asyncio.gather(*load)
            # Every session takes one more turn once the last lease has expired.
            await asyncio.gather(*(_last_turn(client, s, record) for s in sessions))

            details = {s: await client.get_session(s, verify_chain=True) for s in sessions}

            async def tasks_settled() -> collections.Counter[str] | None:
                states = [(await client.get_task(t)).status for t in record.tasks]
                unsettled = {"queued", "running"} & set(states)
                return None if unsettled else collections.Counter(states)

            tasks = await eventually(tasks_settled, timeout=60, interval=0.5)

            conn = await asyncpg.connect(chaos_database)
            try:

                async def memory_settled() -> bool:
                    return await _unfinished_memory_jobs(conn) == 0

                try:
                    await eventually(memory_settled, timeout=60, interval=0.5)
                except TimeoutError:
                    rows = await conn.fetch(
                        "SELECT id, kind, session_id, state FROM memory_jobs"
                        " WHERE state IN (1, 2) LIMIT 10"
                    )
                    print("unfinished memory jobs:", [dict(r) for r in rows])
                    raise
                overlaps = await _memory_overlaps(conn)
                memory_done = int(await conn.fetchval("SELECT count(*) FROM memory_history"))
            finally:
                await conn.close()
    finally:
        stop_redis(redis)

    _report(record, tasks, memory_done, seed)
    problems = [
        problem
        for session_id, detail in details.items()
        for problem in _check_session(
            record.by_session()[session_id],
            [(m.role, m.content, m.interrupted) for m in detail.messages],
        )
    ]
    assert problems == []
    assert all(detail.chain_verified for detail in details.values())
    unclean = [t for t in record.turns if t.status and t.status not in CLEAN]
    assert unclean == []
    assert _busy_after_ttl(record) == []
    assert overlaps == []
    assert set(tasks) <= {"succeeded", "failed"}
    # Kills wait for the last restart to be healthy, so a slow machine fits fewer in;
    # what matters is that the run had several kills in it.
    assert len(record.kills) >= min(4, RUN_S // KILL_EVERY_S - 1)
    assert sum(t.finish == "FINISH_REASON_STOP" for t in record.turns) > 10 * CONVERSATIONS
