"""Build the prompt for the next model call from a session's log within a token budget.

Order: system prompt, memory summary, first user message, then the longest
recent suffix of the log that fits. The suffix is cut only where an
OpenAI-compatible server accepts the result: it never starts with a tool
result, and an assistant message with tool calls keeps all of its tool results
(servers reject a tool result without its call, and a call without its results).
"""

from __future__ import annotations

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
    result = await _build(
        store,
        tenant,
        session_id,
        budget_tokens,
        reserve_output_tokens,
        memory_summary,
        estimator,
        pin_first_user=True,
    )
    recent_kept = _suffix_length(result)
    if recent_kept >= min(keep_recent_min, result.dropped_count + recent_kept):
        return result
    result = await _build(
        store,
        tenant,
        session_id,
        budget_tokens,
        reserve_output_tokens,
        memory_summary,
        estimator,
        pin_first_user=False,
    )
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


async def _build(
    store: SessionReader,
    tenant: str,
    session_id: str,
    budget_tokens: int,
    reserve_output_tokens: int,
    memory_summary: str,
    estimator: TokenEstimator,
    *,
    pin_first_user: bool,
) -> ContextResult:
    if budget_tokens <= 0:
        raise InvalidArgument(f"budget_tokens must be > 0, got {budget_tokens}")
    if reserve_output_tokens < 0:
        raise InvalidArgument(f"reserve_output_tokens must be >= 0, got {reserve_output_tokens}")

    session = await store.get(tenant, session_id)
    available = budget_tokens - reserve_output_tokens

    preamble: list[common_pb2.Message] = []
    if session.system_prompt:
        preamble.append(_system_message(session.system_prompt, estimator))
    if memory_summary:
        preamble.append(_system_message(SUMMARY_PREFIX + memory_summary, estimator))
    needed = sum(msg.token_count for msg in preamble)
    if needed > available:
        raise FailedPrecondition(
            f"context budget too small: {available} tokens available (budget_tokens "
            f"{budget_tokens} - reserve_output_tokens {reserve_output_tokens}), the system "
            f"prompt and memory summary need {needed}",
            details={
                "budget_tokens": str(budget_tokens),
                "available_tokens": str(available),
                "needed_tokens": str(needed),
            },
        )
    remaining = available - needed

    # Read the log as of session.head: appends racing with this call are not seen.
    total = session.message_count
    pinned = await store.first_user_message(tenant, session_id) if pin_first_user else None
    if pinned is not None and (pinned.seq >= total or estimator.estimate(pinned) > remaining):
        pinned = None
    if pinned is not None:
        remaining -= estimator.estimate(pinned)
    pinned_in_suffix = False

    suffix: list[common_pb2.Message] = []  # newest first
    # Messages since the last legal cut, newest first: a tool result opens the
    # block, and it closes at the assistant message that made every open call.
    block: list[common_pb2.Message] = []
    block_cost = 0
    open_calls: set[str] = set()
    recent = store.recent(tenant, session_id, before_seq=total)
    try:
        async for msg in recent:
            block.append(msg)
            # The pinned first user message was paid for when it was pinned.
            if pinned is None or msg.seq != pinned.seq:
                block_cost += estimator.estimate(msg)
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
            if pinned is not None and any(m.seq == pinned.seq for m in block):
                pinned_in_suffix = True
            block = []
            block_cost = 0
    finally:
        if isinstance(recent, AsyncGenerator):
            await recent.aclose()

    kept = suffix[::-1]
    if pinned is not None and not pinned_in_suffix:
        kept.insert(0, pinned)
    return ContextResult(
        messages=preamble + kept,
        token_estimate=needed + sum(estimator.estimate(msg) for msg in kept),
        dropped_count=total - len(kept),
        head=session.head,
    )
