"""Build the prompt for the next model call from a session's log within a token budget.

Order: system prompt, memory summary, first user message, then the longest
recent suffix of the log that fits. The suffix is cut only where an
OpenAI-compatible server accepts the result: it never starts with a tool
result, and an assistant message with tool calls keeps all of its tool results
(servers reject a tool result without its call, and a call without its results).
What was left out is one contiguous run of the log (`ContextResult.dropped_range`).
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncGenerator
from dataclasses import dataclass

from services.session.store import SessionReader
from services.session.tokens import DEFAULT_ESTIMATOR, TokenEstimator
from threadline.errors import FailedPrecondition, InvalidArgument
from threadline.v1 import common_pb2

SUMMARY_PREFIX = "Summary of earlier conversation:\n"


@dataclass(frozen=True, slots=True)
class ContextResult:
    #: In the order to send them; the synthetic system messages carry no seq or hash.
    messages: list[common_pb2.Message]
    token_estimate: int
    #: Log messages left out (the synthetic system messages are not counted).
    dropped_count: int
    #: The session's head the context was built from.
    head: str

    @property
    def dropped_range(self) -> tuple[int, int]:
        """The seqs [from, until) left out, (0, 0) when none: one contiguous run, by
        construction (between the kept first user message and the kept recent suffix).

        Messages before a kept first user message (a greeting) are left out too; the
        range then starts at 0 and, counting them, spans the first user message.
        """
        if not self.dropped_count:
            return 0, 0
        stored = [m.seq for m in self.messages if m.hash]
        start = stored[-1] + 1 if stored else 0
        if stored and stored[0] > 0:
            start = 0
        else:
            for before, after in itertools.pairwise(stored):
                if after != before + 1:
                    start = before + 1
                    break
        return start, start + self.dropped_count


@dataclass(frozen=True, slots=True)
class _Request:
    """What one build_context call reads, and the budget it fills."""

    store: SessionReader
    tenant: str
    session_id: str
    budget_tokens: int
    reserve_output_tokens: int
    memory_summary: str
    estimator: TokenEstimator

    @property
    def available(self) -> int:
        return self.budget_tokens - self.reserve_output_tokens


def _system_message(content: str, estimator: TokenEstimator) -> common_pb2.Message:
    msg = common_pb2.Message(role=common_pb2.ROLE_SYSTEM, content=content)
    msg.token_count = estimator.estimate(msg)
    return msg


async def build_context(
    store: SessionReader,
    tenant: str,
    session_id: str,
    *,
    budget_tokens: int,
    reserve_output_tokens: int = 0,
    memory_summary: str = "",
    estimator: TokenEstimator = DEFAULT_ESTIMATOR,
    keep_recent_min: int = 0,
) -> ContextResult:
    """Select what of the session fits in budget_tokens - reserve_output_tokens.

    Reads the log newest first through `store.recent()` and stops at the first
    group that no longer fits, so a long session costs only what is returned.
    Raises FailedPrecondition when the system prompt and memory summary alone
    exceed the budget, or when the `keep_recent_min` newest messages do not fit
    (the first user message gives way to them first).
    """
    if keep_recent_min < 0:
        raise InvalidArgument(f"keep_recent_min must be >= 0, got {keep_recent_min}")
    request = _Request(
        store,
        tenant,
        session_id,
        budget_tokens,
        reserve_output_tokens,
        memory_summary,
        estimator,
    )
    result = await _build(request, pin_first_user=True)
    recent_kept = _suffix_length(result)
    if recent_kept >= min(keep_recent_min, result.dropped_count + recent_kept):
        return result
    result = await _build(request, pin_first_user=False)
    recent_kept = _suffix_length(result)
    if recent_kept < min(keep_recent_min, result.dropped_count + recent_kept):
        raise FailedPrecondition(
            f"context budget too small: the {keep_recent_min} most recent messages "
            f"(keep_recent_min) do not fit in {budget_tokens - reserve_output_tokens} tokens; "
            f"{recent_kept} do",
            details={"keep_recent_min": str(keep_recent_min), "fit": str(recent_kept)},
        )
    return result


def _suffix_length(result: ContextResult) -> int:
    """How many of the newest stored messages the context holds, without a gap."""
    stored = [m.seq for m in result.messages if m.hash]
    count = 0
    for seq in reversed(stored):
        if count and seq != stored[len(stored) - count] - 1:
            break
        count += 1
    return count


async def _build(request: _Request, *, pin_first_user: bool) -> ContextResult:
    """System prompt and memory summary, the first user message (when pinned and it
    fits), then the longest recent suffix that fits in what is left."""
    _check_budget(request)
    session = await request.store.get(request.tenant, request.session_id)
    preamble = _preamble(request, session.system_prompt)
    needed = sum(msg.token_count for msg in preamble)
    remaining = request.available - needed
    # Read the log as of session.head: appends racing with this call are not seen.
    total = session.message_count
    pinned = await _first_user_message(request, total, remaining) if pin_first_user else None
    if pinned is not None:
        remaining -= request.estimator.estimate(pinned)
    kept = await _recent_suffix(request, total, remaining, pinned)
    if pinned is not None and all(msg.seq != pinned.seq for msg in kept):
        kept.insert(0, pinned)
    return ContextResult(
        messages=preamble + kept,
        token_estimate=needed + sum(request.estimator.estimate(msg) for msg in kept),
        dropped_count=total - len(kept),
        head=session.head,
    )


def _check_budget(request: _Request) -> None:
    if request.budget_tokens <= 0:
        raise InvalidArgument(f"budget_tokens must be > 0, got {request.budget_tokens}")
    if request.reserve_output_tokens < 0:
        raise InvalidArgument(
            f"reserve_output_tokens must be >= 0, got {request.reserve_output_tokens}"
        )


def _preamble(request: _Request, system_prompt: str) -> list[common_pb2.Message]:
    """The system prompt and memory summary as system messages; FailedPrecondition
    when they alone need more than the budget leaves."""
    preamble: list[common_pb2.Message] = []
    if system_prompt:
        preamble.append(_system_message(system_prompt, request.estimator))
    if request.memory_summary:
        preamble.append(_system_message(SUMMARY_PREFIX + request.memory_summary, request.estimator))
    needed = sum(msg.token_count for msg in preamble)
    available = request.available
    if needed > available:
        raise FailedPrecondition(
            f"context budget too small: {available} tokens available (budget_tokens "
            f"{request.budget_tokens} - reserve_output_tokens {request.reserve_output_tokens}), "
            f"the system prompt and memory summary need {needed}",
            details={
                "budget_tokens": str(request.budget_tokens),
                "available_tokens": str(available),
                "needed_tokens": str(needed),
            },
        )
    return preamble


async def _first_user_message(
    request: _Request, total: int, remaining: int
) -> common_pb2.Message | None:
    """The session's first user message if it is in the log read (seq < total) and fits."""
    first = await request.store.first_user_message(request.tenant, request.session_id)
    if first is None or first.seq >= total or request.estimator.estimate(first) > remaining:
        return None
    return first


async def _recent_suffix(
    request: _Request, total: int, remaining: int, pinned: common_pb2.Message | None
) -> list[common_pb2.Message]:
    """The longest run of the newest messages (seq < total) that fits in `remaining`,
    oldest first, cut only at a legal boundary. `pinned` is already paid for.

    Goes newest first a block at a time: the messages since the last legal cut. A
    tool result opens a block, and it closes at the assistant message that made
    every open call.
    """
    suffix: list[common_pb2.Message] = []  # newest first
    block: list[common_pb2.Message] = []
    block_cost = 0
    open_calls: set[str] = set()
    recent = request.store.recent(request.tenant, request.session_id, before_seq=total)
    try:
        async for msg in recent:
            block.append(msg)
            if pinned is None or msg.seq != pinned.seq:
                block_cost += request.estimator.estimate(msg)
            if block_cost > remaining:
                # Every longer suffix contains this block: nothing older can fit.
                break
            if msg.role == common_pb2.ROLE_TOOL:
                open_calls.add(msg.tool_call_id)
                continue
            open_calls.difference_update(call.id for call in msg.tool_calls)
            if open_calls:
                continue
            suffix.extend(block)
            remaining -= block_cost
            block = []
            block_cost = 0
    finally:
        if isinstance(recent, AsyncGenerator):
            await recent.aclose()
    return suffix[::-1]
