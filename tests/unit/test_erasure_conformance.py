"""Erasures and lineage, on every SessionStore backend (the fixtures of
test_store_conformance: SQLite, Redis with bytes and str replies, PostgreSQL).

A delete leaves a tombstone and one pending erasure per owner service; owners
acknowledge once each, and the last acknowledgement hands back what every owner
removed, exactly once.
"""

from __future__ import annotations

import asyncio

import pytest

from services.session.store import ERASURE_OWNERS, SessionStore
from tests.unit import test_store_conformance as conformance
from tests.unit.test_store_conformance import TENANT, _session, _user
from threadline.errors import InvalidArgument, NotFound

# The backends of the store conformance suite, as fixtures of this module too.
backend_kind = conformance.backend_kind
backend = conformance.backend
store = conformance.store


async def test_a_delete_leaves_an_erasure_for_every_owner(store: SessionStore) -> None:
    kept = await _session(store)
    gone = await _session(store)
    await store.append(TENANT, gone.id, "", [_user("canary phrase")])

    await store.delete(TENANT, gone.id)

    for owner in ERASURE_OWNERS:
        [erasure] = await store.pending_erasures(owner, 10)
        assert (erasure.session_id, erasure.tenant, erasure.reason) == (gone.id, TENANT, "deleted")
        assert erasure.deleted_at > 0
    assert await store.unfinished_erasures(TENANT) == 1
    assert await store.unfinished_erasures("other") == 0
    # The tombstone is not a session: every read answers as for an unknown id.
    with pytest.raises(NotFound) as missing:
        await store.get(TENANT, gone.id)
    assert missing.value.message == f"session {gone.id} not found"
    assert [s.id for s in (await store.list(TENANT, page_size=10, page_token=""))[0]] == [kept.id]


async def test_the_last_owners_acknowledgement_finishes_the_erasure_once(
    store: SessionStore,
) -> None:
    gone = await _session(store)
    await store.delete(TENANT, gone.id, reason="idle")

    assert await store.acknowledge_erasure("memory", gone.id, {"summaries": 1, "items": 3}) is None
    assert await store.pending_erasures("memory", 10) == []
    assert [e.session_id for e in await store.pending_erasures("executor", 10)] == [gone.id]
    # A repeated acknowledgement (a replica that crashed before it heard the answer).
    assert await store.acknowledge_erasure("memory", gone.id, {"summaries": 9}) is None

    done = await store.acknowledge_erasure("executor", gone.id, {"workspaces": 1})

    assert done is not None
    assert done.erasure.session_id == gone.id and done.erasure.reason == "idle"
    assert done.removed == {
        "memory": {"summaries": 1, "items": 3},
        "executor": {"workspaces": 1},
    }
    assert await store.acknowledge_erasure("executor", gone.id, {"workspaces": 0}) is None
    assert await store.pending_erasures("executor", 10) == []
    assert await store.unfinished_erasures(TENANT) == 0


async def test_pending_erasures_come_oldest_first_and_bounded(store: SessionStore) -> None:
    sessions = [await _session(store) for _ in range(3)]
    for session in sessions:
        await store.delete(TENANT, session.id)

    first_two = await store.pending_erasures("memory", 2)

    assert [e.session_id for e in first_two] == [s.id for s in sessions[:2]]
    assert await store.pending_erasures("memory", 0) == []


async def test_erasure_arguments_are_checked(store: SessionStore) -> None:
    session = await _session(store)
    with pytest.raises(NotFound):
        await store.acknowledge_erasure("memory", session.id, {})  # not deleted
    with pytest.raises(NotFound):
        await store.delete(TENANT, "ses_" + "0" * 32)
    await store.delete(TENANT, session.id)
    with pytest.raises(InvalidArgument, match="not an erasure owner"):
        await store.pending_erasures("billing", 10)
    with pytest.raises(InvalidArgument, match="not an erasure owner"):
        await store.acknowledge_erasure("billing", session.id, {})
    with pytest.raises(InvalidArgument, match=r"removed\['items'\] must be >= 0"):
        await store.acknowledge_erasure("memory", session.id, {"items": -1})
    with pytest.raises(InvalidArgument, match="unknown erasure reason"):
        await store.delete(TENANT, (await _session(store)).id, reason="because")
    # Nothing of the refused calls counted.
    assert len(await store.pending_erasures("memory", 10)) == 1


async def test_derived_lists_forks_and_compactions_of_the_tenant(store: SessionStore) -> None:
    source = await _session(store)
    head, _ = await store.append(TENANT, source.id, "", [_user("q")])
    fork = await store.fork(TENANT, source.id, head)
    compacted = await store.create(
        tenant=TENANT,
        model="m",
        system_prompt="",
        title="",
        metadata={},
        compacted_from=source.id,
        messages=[_user("summary")],
    )
    grandchild = await store.fork(TENANT, fork.id, "")
    await _session(store)  # unrelated

    children = await store.derived(TENANT, source.id)

    assert sorted(s.id for s in children) == sorted([fork.id, compacted.id])
    assert [s.id for s in await store.derived(TENANT, fork.id)] == [grandchild.id]
    assert await store.derived("other", source.id) == []


async def test_erased_among_names_the_tombstoned_ids_of_any_tenant(store: SessionStore) -> None:
    live = await _session(store)
    gone = await _session(store)
    theirs = await _session(store, tenant="other")
    await store.delete(TENANT, gone.id)
    await store.delete("other", theirs.id)
    never = "ses_" + "1" * 32

    erased = await store.erased_among([never, theirs.id, live.id, gone.id, gone.id])

    assert erased == [theirs.id, gone.id]
    assert await store.erased_among([]) == []
    with pytest.raises(InvalidArgument, match="the limit is 1000"):
        await store.erased_among([never] * 1001)
    with pytest.raises(InvalidArgument):
        await store.erased_among(["not-an-id"])


async def test_owners_acknowledging_at_once_finish_each_erasure_exactly_once(
    store: SessionStore,
) -> None:
    sessions = [await _session(store) for _ in range(10)]
    for session in sessions:
        await store.delete(TENANT, session.id)

    results = await asyncio.gather(
        *(
            store.acknowledge_erasure(owner, session.id, {"n": 1})
            for session in sessions
            for owner in (*ERASURE_OWNERS, *ERASURE_OWNERS)  # each owner twice, at once
        )
    )

    finished = [done.erasure.session_id for done in results if done is not None]
    assert sorted(finished) == sorted(s.id for s in sessions)
    assert await store.unfinished_erasures(TENANT) == 0


async def test_a_tenant_erasure_totals_what_its_finished_erasures_removed(
    store: SessionStore,
) -> None:
    first, second, pending, deleted = [await _session(store) for _ in range(4)]
    other = await _session(store, "other")
    for session in (first, second, pending):
        await store.delete(TENANT, session.id, reason="tenant_erased")
    await store.delete(TENANT, deleted.id)  # not by a tenant erasure: not counted
    await store.delete("other", other.id, reason="tenant_erased")
    for session, items in ((first, 2), (second, 3), (deleted, 7), (other, 5)):
        await store.acknowledge_erasure("memory", session.id, {"items": items, "summaries": 1})
        await store.acknowledge_erasure("executor", session.id, {"workspaces": 1})
    # A repeated acknowledgement counts once; an unfinished erasure not at all.
    await store.acknowledge_erasure("executor", first.id, {"workspaces": 1})
    await store.acknowledge_erasure("memory", pending.id, {"items": 11})

    totals = await store.tenant_erasure_totals(TENANT)

    assert totals.sessions == 2
    assert totals.removed == {
        "memory": {"items": 5, "summaries": 2},
        "executor": {"workspaces": 2},
    }
    assert (await store.tenant_erasure_totals("nobody")).sessions == 0
