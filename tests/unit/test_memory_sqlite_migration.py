"""The memory file's migration to one active job per kind and session, on a file
written before it: duplicates two replicas raced into must not stop the start."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path
from typing import TypeAlias

from services.memory.sqlite_schema import MIGRATIONS
from services.memory.store import SqliteMemoryStore
from threadline.v1 import memory_pb2

QUEUED, RUNNING = memory_pb2.JOB_STATE_QUEUED, memory_pb2.JOB_STATE_RUNNING
SUCCEEDED, FAILED = memory_pb2.JOB_STATE_SUCCEEDED, memory_pb2.JOB_STATE_FAILED
State: TypeAlias = memory_pb2.JobState.ValueType


def _version_2_file(path: Path, jobs: list[memory_pb2.Job]) -> None:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        for migration in MIGRATIONS[:2]:
            for statement in migration:
                conn.execute(statement)
        conn.executemany(
            "INSERT INTO jobs VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                (j.id, j.kind, j.tenant, j.session_id, j.state, j.head, j.SerializeToString())
                for j in jobs
            ],
        )
        conn.execute("PRAGMA user_version = 2")
        conn.commit()


async def test_duplicate_active_jobs_fail_but_the_oldest_at_migration(tmp_path: Path) -> None:
    def job(n: int, state: State, kind: str = "consolidate") -> memory_pb2.Job:
        return memory_pb2.Job(
            id=f"job_{n}",
            kind=kind,
            tenant="acme",
            session_id="ses_1",
            state=state,
            trigger="t",
        )

    jobs = [
        job(1, SUCCEEDED),
        job(2, QUEUED),
        job(3, RUNNING),
        job(4, QUEUED),
        job(5, QUEUED, "extract"),
    ]
    path = tmp_path / "memory.db"
    _version_2_file(path, jobs)

    store = SqliteMemoryStore(path)
    await store.open()
    try:
        unfinished = await store.unfinished_jobs()
        superseded = [await store.job(f"job_{n}") for n in (3, 4)]
        kept = await store.job("job_2")
        finished = await store.job("job_1")
    finally:
        await store.close()

    assert unfinished == [("job_2", "consolidate"), ("job_5", "extract")]
    assert kept == jobs[1] and finished == jobs[0]
    for record in superseded:
        assert record is not None and record.state == FAILED and record.trigger == "t"
        assert "superseded" in record.error
