"""Memory's part of the session erasure cascade (threadline/erasure_owner.py).

For each deleted session the session service reports, the store removes the
summary, its history, extracted items, activity and job records in one
transaction and remembers the session as erased, so a job still running for it
writes nothing afterwards. Queued deliveries of its jobs (job ids only) find no
record and are acknowledged and dropped by the workers.
"""

from __future__ import annotations

from services.memory.store import MemoryStore
from threadline.erasure_owner import ErasureFollower, ErasureSource
from threadline.v1 import session_pb2

OWNER = "memory"


def memory_erasures(store: MemoryStore, sessions: ErasureSource, poll_s: float) -> ErasureFollower:
    async def erase(erasure: session_pb2.Erasure) -> dict[str, int]:
        return await store.erase(erasure.tenant, erasure.session_id)

    return ErasureFollower(OWNER, sessions, erase, interval_s=poll_s)
