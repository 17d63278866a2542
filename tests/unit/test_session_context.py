"""Context building: what of a session fits a token budget, cut at legal boundaries."""

from __future__ import annotations

import asyncio
import builtins
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.session.chain import GENESIS_HASH, entry_hash
from services.session.context import SUMMARY_PREFIX, ContextResult, build_context
from services.session.store import SessionReader, page_size_or_default
from services.session.tokens import (
    TokenEstimator,
    calibrated_estimator,
    calibrated_ratio,
    estimate_tokens,
)
from services.session.validation import validate_messages
from threadline.errors import FailedPrecondition, HeadMismatch, InvalidArgument, NotFound
from threadline.v1 import common_pb2, session_pb2

Message = common_pb2.Message
TENANT = "acme"
# One token per character and no overhead keeps the budget arithmetic readable.
EXACT = TokenEstimator(chars_per_token=1.0, per_message_overhead=0)


class MemorySessionStore:
    """The SessionStore protocol over dicts: fast enough for property tests."""

    def __init__(self) -> None:
        self.sessions: dict[str, session_pb2.Session] = {}
        self.logs: dict[str, builtins.list[Message]] = {}
        self.yielded = 0
        self.recent_closed = 0

    def _session(self, tenant: str, session_id: str) -> session_pb2.Session:
        session = self.sessions.get(session_id)
        if session is None or session.tenant != tenant:
            raise NotFound(f"session {session_id} not found")
        return session

    async def create(
        self,
        *,
        tenant: str,
        model: str,
        system_prompt: str,
        title: str,
        metadata: Mapping[str, str],
    ) -> session_pb2.Session:
        session = session_pb2.Session(
            id="ses_" + uuid.uuid4().hex,
            tenant=tenant,
            model=model,
            system_prompt=system_prompt,
            title=title,
            metadata=metadata,
        )
        session.created_at.GetCurrentTime()
        session.updated_at.CopyFrom(session.created_at)
        self.sessions[session.id] = session
        self.logs[session.id] = []
        return session

    async def get(self, tenant: str, session_id: str) -> session_pb2.Session:
        out = session_pb2.Session()
        out.CopyFrom(self._session(tenant, session_id))
        return out

    async def list(
        self, tenant: str, *, page_size: int, page_token: str
    ) -> tuple[builtins.list[session_pb2.Session], str]:
        start = int(page_token or 0)
        limit = page_size_or_default(page_size)
        mine = [s for s in self.sessions.values() if s.tenant == tenant]
        mine.sort(key=lambda s: (s.updated_at.ToMicroseconds(), s.id), reverse=True)
        end = start + limit
        return mine[start:end], str(end) if end < len(mine) else ""

    async def messages(
        self, tenant: str, session_id: str, *, from_seq: int = 0
    ) -> builtins.list[Message]:
        self._session(tenant, session_id)
        return self.logs[session_id][from_seq:]

    async def append(
        self,
        tenant: str,
        session_id: str,
        expected_head: str,
        messages: Sequence[Message],
    ) -> tuple[str, builtins.list[Message]]:
        session = self._session(tenant, session_id)
        if session.head != expected_head:
            raise HeadMismatch(session_id, expected_head, session.head)
        log = self.logs[session_id]
        known = {call.id for m in log for call in m.tool_calls}
        validate_messages(
            messages, max_message_chars=32_000, max_messages=1_000, known_tool_call_ids=known
        )
        head = session.head
        stored: builtins.list[Message] = []
        for msg in messages:
            copy = Message()
            copy.CopyFrom(msg)
            copy.id = copy.id or "msg_" + uuid.uuid4().hex
            copy.seq = len(log) + len(stored)
            copy.parent_hash = head
            copy.token_count = estimate_tokens(copy)
            copy.hash = head = entry_hash(head, copy)
            stored.append(copy)
        log.extend(stored)
        session.head = head
        session.message_count = len(log)
        return head, stored

    async def recent(
        self, tenant: str, session_id: str, *, before_seq: int | None = None
    ) -> AsyncIterator[Message]:
        log = self.logs[self._session(tenant, session_id).id]
        end = len(log) if before_seq is None else min(before_seq, len(log))
        try:
            for msg in reversed(log[:end]):
                self.yielded += 1
                yield msg
        finally:
            self.recent_closed += 1

    async def first_user_message(self, tenant: str, session_id: str) -> Message | None:
        self._session(tenant, session_id)
        return next((m for m in self.logs[session_id] if m.role == common_pb2.ROLE_USER), None)

    async def close(self) -> None:
        pass


def _user(n: int, tag: str = "u") -> Message:
    return Message(role=common_pb2.ROLE_USER, content=(tag * n)[:n])


def _assistant(n: int, *call_ids: str) -> Message:
    msg = Message(role=common_pb2.ROLE_ASSISTANT, content="a" * n)
    for call_id in call_ids:
        # Name "f" and no arguments: each call costs one token under EXACT.
        msg.tool_calls.add(id=call_id, name="f")
    return msg


def _tool(call_id: str, n: int) -> Message:
    return Message(role=common_pb2.ROLE_TOOL, tool_call_id=call_id, content="t" * n)


async def _seed(
    messages: Sequence[Message], system_prompt: str = ""
) -> tuple[MemorySessionStore, str]:
    store = MemorySessionStore()
    session = await store.create(
        tenant=TENANT, model="m", system_prompt=system_prompt, title="", metadata={}
    )
    if messages:
        await store.append(TENANT, session.id, GENESIS_HASH, messages)
    return store, session.id


async def _build(
    store: MemorySessionStore,
    session_id: str,
    budget: int,
    *,
    reserve: int = 0,
    summary: str = "",
) -> ContextResult:
    protocol: SessionReader = store  # the fake must satisfy the protocol
    return await build_context(
        protocol,
        TENANT,
        session_id,
        budget_tokens=budget,
        reserve_output_tokens=reserve,
        memory_summary=summary,
        estimator=EXACT,
    )


def _log_seqs(result: ContextResult) -> list[int]:
    return [m.seq for m in result.messages if m.hash]


# -- token estimates -------------------------------------------------------------


def test_default_estimate_is_four_chars_per_token_plus_overhead() -> None:
    assert estimate_tokens(Message(content="12345678")) == 2 + 4
    assert estimate_tokens(Message(content="123456789")) == 3 + 4  # rounds up
    assert estimate_tokens(Message()) == 4
    msg = Message(role=common_pb2.ROLE_ASSISTANT)
    msg.tool_calls.add(id="ignored", name="abcd", arguments_json='{"k":1}')
    assert estimate_tokens(msg) == 3 + 4


def test_estimator_ratio_is_configurable() -> None:
    assert TokenEstimator(chars_per_token=2.5).estimate(Message(content="x" * 10)) == 4 + 4
    assert EXACT.estimate_text("hello") == 5
    with pytest.raises(ValueError, match="chars_per_token"):
        TokenEstimator(chars_per_token=0)


def test_a_first_calibration_is_taken_as_measured() -> None:
    assert calibrated_ratio(None, prompt_chars=300, prompt_tokens=100) == 3.0


def test_later_calibrations_count_for_a_fifth() -> None:
    # One odd prompt must not swing every estimate.
    assert calibrated_ratio(4.0, prompt_chars=200, prompt_tokens=100) == pytest.approx(3.6)


def test_a_calibration_stays_between_half_and_sixteen_chars_per_token() -> None:
    assert calibrated_ratio(None, prompt_chars=1, prompt_tokens=100) == 0.5
    assert calibrated_ratio(None, prompt_chars=10_000, prompt_tokens=10) == 16.0
    assert calibrated_ratio(16.0, prompt_chars=10_000, prompt_tokens=10) == 16.0


def test_a_calibrated_model_gets_an_estimator_of_its_own() -> None:
    default = TokenEstimator(per_message_overhead=0)
    assert calibrated_estimator(None, default) is default
    assert calibrated_estimator(2.0, default) == TokenEstimator(chars_per_token=2.0)


# -- build_context -----------------------------------------------------------------


async def test_everything_fits() -> None:
    log = [_user(10), _assistant(20), _user(5), _assistant(7)]
    store, sid = await _seed(log, system_prompt="S" * 6)
    result = await _build(store, sid, budget=1000)
    assert [m.role for m in result.messages] == [
        common_pb2.ROLE_SYSTEM,
        common_pb2.ROLE_USER,
        common_pb2.ROLE_ASSISTANT,
        common_pb2.ROLE_USER,
        common_pb2.ROLE_ASSISTANT,
    ]
    assert result.messages[0].content == "S" * 6
    assert _log_seqs(result) == [0, 1, 2, 3]
    assert result.token_estimate == 6 + 10 + 20 + 5 + 7
    assert result.dropped_count == 0
    assert result.dropped_range == (0, 0)
    assert result.head == (await store.get(TENANT, sid)).head


async def test_tight_budget_keeps_system_first_user_and_latest() -> None:
    log = [_user(10), _assistant(10), _user(10), _assistant(10), _user(10), _assistant(10)]
    store, sid = await _seed(log, system_prompt="S" * 5)
    result = await _build(store, sid, budget=5 + 10 + 20 + 9)
    assert result.messages[0].role == common_pb2.ROLE_SYSTEM
    assert _log_seqs(result) == [0, 4, 5]
    assert result.token_estimate == 35
    assert result.dropped_count == 3
    assert result.dropped_range == (1, 4)


async def test_reserve_and_summary_take_from_the_budget() -> None:
    log = [_user(10), _assistant(10), _user(10), _assistant(10)]
    store, sid = await _seed(log, system_prompt="S" * 5)
    summary = "they agreed on X"
    summary_cost = len(SUMMARY_PREFIX + summary)
    result = await _build(
        store, sid, budget=100 + 5 + summary_cost + 20, reserve=100, summary=summary
    )
    assert [m.content for m in result.messages[:2]] == ["S" * 5, SUMMARY_PREFIX + summary]
    assert result.messages[1].role == common_pb2.ROLE_SYSTEM
    assert _log_seqs(result) == [0, 3]
    assert result.dropped_count == 2


async def test_first_user_message_is_not_duplicated() -> None:
    log = [_user(10), _assistant(10), _user(10)]
    store, sid = await _seed(log)
    # Exactly the whole log: the first user message, already paid for, joins the suffix.
    result = await _build(store, sid, budget=30)
    assert _log_seqs(result) == [0, 1, 2]
    assert result.token_estimate == 30


async def test_first_user_message_too_large_is_skipped() -> None:
    log = [_user(100), _assistant(5), _user(5)]
    store, sid = await _seed(log)
    result = await _build(store, sid, budget=20)
    assert _log_seqs(result) == [1, 2]
    assert result.dropped_count == 1
    assert result.dropped_range == (0, 1)


async def test_messages_before_the_first_user_message_count_too() -> None:
    greeting = _assistant(3)
    log = [greeting, _user(4), _assistant(5)]
    store, sid = await _seed(log)
    assert _log_seqs(await _build(store, sid, budget=12)) == [0, 1, 2]
    assert _log_seqs(await _build(store, sid, budget=11)) == [1, 2]


async def test_the_dropped_range_around_a_kept_first_user_message_counts_from_0() -> None:
    log = [_assistant(3), _user(4), _assistant(5), _user(2), _assistant(2)]
    store, sid = await _seed(log)
    result = await _build(store, sid, budget=4 + 2 + 2)
    assert _log_seqs(result) == [1, 3, 4]
    # The greeting (0) and the answer (2) went: reported as [0, 2).
    assert result.dropped_range == (0, 2)


async def test_a_tool_group_is_all_or_nothing() -> None:
    log = [
        _user(10),
        _assistant(0, "c1", "c2"),  # costs 2: one per call
        _tool("c1", 10),
        _tool("c2", 10),
        _assistant(10),
    ]
    store, sid = await _seed(log)
    # Room for the final answer and one tool result, but not the whole group.
    result = await _build(store, sid, budget=10 + 10 + 15)
    assert _log_seqs(result) == [0, 4]
    assert all(m.role != common_pb2.ROLE_TOOL for m in result.messages)
    # Room for the whole group brings it in whole.
    result = await _build(store, sid, budget=10 + 10 + 22)
    assert _log_seqs(result) == [0, 1, 2, 3, 4]


async def test_never_starts_with_a_tool_result() -> None:
    log = [_user(5), _assistant(0, "c1"), _tool("c1", 3)]
    store, sid = await _seed(log)
    result = await _build(store, sid, budget=5 + 3)
    assert _log_seqs(result) == [0]
    assert result.dropped_count == 2


async def test_interleaved_results_keep_the_whole_span() -> None:
    log = [_user(5), _assistant(0, "c1", "c2"), _tool("c1", 1), _user(1, "v"), _tool("c2", 1)]
    store, sid = await _seed(log)
    assert _log_seqs(await _build(store, sid, budget=5 + 4)) == [0]
    assert _log_seqs(await _build(store, sid, budget=5 + 5)) == [0, 1, 2, 3, 4]


async def test_unanswered_calls_at_the_end_are_their_own_group() -> None:
    log = [_user(5), _assistant(2), _user(3), _assistant(0, "c1")]
    store, sid = await _seed(log)
    assert _log_seqs(await _build(store, sid, budget=5 + 3 + 1)) == [0, 2, 3]


async def test_empty_session() -> None:
    store, sid = await _seed([], system_prompt="S")
    result = await _build(store, sid, budget=1)
    assert [m.content for m in result.messages] == ["S"]
    assert result.dropped_count == 0 and result.token_estimate == 1


async def test_system_prompt_that_cannot_fit_is_a_failed_precondition() -> None:
    store, sid = await _seed([_user(1)], system_prompt="S" * 50)
    with pytest.raises(FailedPrecondition, match=r"40 tokens available .* need 50") as info:
        await _build(store, sid, budget=100, reserve=60, summary="")
    assert "budget_tokens 100" in info.value.message
    assert info.value.details["needed_tokens"] == "50"


async def test_bad_budgets_are_invalid() -> None:
    store, sid = await _seed([])
    with pytest.raises(InvalidArgument, match="budget_tokens"):
        await _build(store, sid, budget=0)
    with pytest.raises(InvalidArgument, match="reserve_output_tokens"):
        await _build(store, sid, budget=10, reserve=-1)


async def test_other_tenant_is_not_found() -> None:
    store, sid = await _seed([_user(1)])
    with pytest.raises(NotFound):
        await build_context(store, "other", sid, budget_tokens=100)


async def test_reads_only_what_it_returns_from_a_long_session() -> None:
    log = [_user(1)] + [_assistant(10) if i % 2 else _user(10) for i in range(20_000)]
    store, sid = await _seed([])
    head = GENESIS_HASH
    for start in range(0, len(log), 1_000):
        head, _ = await store.append(TENANT, sid, head, log[start : start + 1_000])
    result = await _build(store, sid, budget=1 + 10 * 50 + 5)
    assert len(result.messages) == 51
    assert result.dropped_count == len(log) - 51
    assert store.yielded == 51  # the 50 that fit and the one that did not
    assert store.recent_closed == 1


# -- property: random conversations with tool calls ----------------------------------


@st.composite
def conversations(draw: st.DrawFn) -> list[Message]:
    log: list[Message] = []
    if draw(st.booleans()):
        log.append(_assistant(draw(st.integers(1, 10))))
    calls = 0
    for _ in range(draw(st.integers(0, 6))):
        log.append(_user(draw(st.integers(1, 30))))
        for _ in range(draw(st.integers(0, 2))):
            ids = [f"c{calls + j}" for j in range(draw(st.integers(1, 3)))]
            calls += len(ids)
            log.append(_assistant(draw(st.integers(0, 10)), *ids))
            answered = draw(st.permutations(ids))[: draw(st.integers(0, len(ids)))]
            for call_id in answered:
                log.append(_tool(call_id, draw(st.integers(1, 30))))
                if draw(st.integers(0, 9)) == 0:
                    log.append(_user(draw(st.integers(1, 5)), "v"))
        if draw(st.booleans()):
            log.append(_assistant(draw(st.integers(1, 30))))
    return log


def _legal_starts(log: list[Message]) -> list[int]:
    made_at = {call.id: i for i, m in enumerate(log) for call in m.tool_calls}
    return [
        start
        for start in range(len(log) + 1)
        if (start == len(log) or log[start].role != common_pb2.ROLE_TOOL)
        and not any(
            m.role == common_pb2.ROLE_TOOL and made_at[m.tool_call_id] < start for m in log[start:]
        )
    ]


@settings(max_examples=100, deadline=None)
@given(
    log=conversations(),
    system_len=st.integers(0, 20),
    summary=st.text(alphabet="m", max_size=20),
    budget=st.integers(1, 300),
    reserve=st.integers(0, 40),
)
def test_context_is_the_longest_legal_suffix_that_fits(
    log: list[Message], system_len: int, summary: str, budget: int, reserve: int
) -> None:
    async def build() -> tuple[ContextResult | None, list[Message]]:
        store, sid = await _seed(log, system_prompt="S" * system_len)
        stored = await store.messages(TENANT, sid)
        try:
            return await _build(store, sid, budget, reserve=reserve, summary=summary), stored
        except FailedPrecondition:
            return None, stored

    result, stored = asyncio.run(build())
    available = budget - reserve
    preamble = system_len + (len(SUMMARY_PREFIX + summary) if summary else 0)
    if result is None:
        assert preamble > available
        return
    assert result.token_estimate <= available
    assert result.token_estimate == sum(EXACT.estimate(m) for m in result.messages)

    # The reference: pin the first user message if it fits, then the smallest legal
    # start whose suffix fits in what is left.
    remaining = available - preamble
    cost = [EXACT.estimate(m) for m in stored]
    first_user = next((i for i, m in enumerate(stored) if m.role == common_pb2.ROLE_USER), None)
    pinned = first_user if first_user is not None and cost[first_user] <= remaining else None
    if pinned is not None:
        remaining -= cost[pinned]
    start = min(
        s
        for s in _legal_starts(stored)
        if sum(c for i, c in enumerate(cost[s:], s) if i != pinned) <= remaining
    )
    expected = ([pinned] if pinned is not None and pinned < start else []) + list(
        range(start, len(stored))
    )
    seqs = _log_seqs(result)
    assert seqs == expected
    assert result.dropped_count == len(stored) - len(seqs)
    dropped = [i for i in range(len(stored)) if i not in seqs]
    if not dropped:
        assert result.dropped_range == (0, 0)
    elif pinned is not None and 0 < pinned < start:
        # What came before the pinned first user message went too: counted from 0.
        assert result.dropped_range == (0, len(dropped))
    else:
        assert result.dropped_range == (dropped[0], dropped[-1] + 1)
        assert dropped == list(range(dropped[0], dropped[-1] + 1))

    kept = [stored[i] for i in seqs]
    suffix = kept[1:] if pinned is not None and pinned < start else kept
    assert not suffix or suffix[0].role != common_pb2.ROLE_TOOL
    kept_calls = {call.id for m in kept for call in m.tool_calls}
    for m in stored:
        if m.role == common_pb2.ROLE_TOOL:
            # A result is kept exactly when the call it answers is kept.
            assert (m.seq in seqs) == (m.tool_call_id in kept_calls)


async def test_keep_recent_min_wins_over_the_first_user_message() -> None:
    texts = ["first " + "q" * 80] + [f"m{i} " + "x" * 36 for i in range(6)]
    messages = [
        Message(role=common_pb2.ROLE_USER if i % 2 == 0 else common_pb2.ROLE_ASSISTANT, content=t)
        for i, t in enumerate(texts)
    ]
    store, session_id = await _seed(messages)
    # Room for about three recent messages; pinning the long first user message
    # would leave room for fewer.
    result = await build_context(store, TENANT, session_id, budget_tokens=45, keep_recent_min=3)
    assert [m.content[:2] for m in result.messages] == ["m3", "m4", "m5"]


async def test_keep_recent_min_that_cannot_fit_is_refused() -> None:
    messages = [
        Message(
            role=common_pb2.ROLE_USER if i % 2 == 0 else common_pb2.ROLE_ASSISTANT,
            content=f"m{i} " + "x" * 36,
        )
        for i in range(6)
    ]
    store, session_id = await _seed(messages)
    with pytest.raises(FailedPrecondition, match="keep_recent_min"):
        await build_context(store, TENANT, session_id, budget_tokens=20, keep_recent_min=4)
