"""What a turn is checked for before anything of it is stored.

The user's message is appended before the model is asked, and the log is
append-only: a turn refused after that append leaves the message behind with
no answer, and every retry adds another. So whatever a turn can be refused for
up front is checked first: its options' ranges (`check_options`), its model
against what llm_proxy serves (`ModelCatalog`), the session's owner (by the
turn itself, with the session read).

Turns beyond what the executor runs at once wait their turn in a bounded
first-come-first-served queue (`TurnQueue`); a turn that finds the queue full
is refused RESOURCE_EXHAUSTED with a retry delay before it touches anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Collection
from typing import Protocol

from threadline import errors
from threadline.events import EventPublisher
from threadline.logs import get_logger
from threadline.v1 import executor_pb2, llm_pb2

log = get_logger(__name__)

#: The range OpenAI-compatible servers accept.
MAX_TEMPERATURE = 2.0
#: Names of the default route: llm_proxy resolves them without a lookup.
_DEFAULT_MODELS = frozenset({"", "default"})
#: How many known names a refusal lists.
_LISTED = 20


def check_input(request: executor_pb2.RunTurnRequest) -> None:
    if not request.tenant:
        raise errors.InvalidArgument("tenant is required")
    if not request.input.strip():
        raise errors.InvalidArgument("input is empty: send the user's message")


def check_options(options: executor_pb2.TurnOptions, *, context_budget_tokens: int) -> None:
    """The options' ranges. max_tokens is reserved out of the context budget, so it
    must leave room for a prompt (session's BuildContext refuses it otherwise)."""
    if not 0 <= options.max_tokens < context_budget_tokens:
        raise errors.InvalidArgument(
            f"options.max_tokens must be between 0 (the default) and "
            f"{context_budget_tokens - 1} (below the context budget), got {options.max_tokens}"
        )
    if options.HasField("temperature"):
        temperature = options.temperature
        # NaN compares false both ways: refused with the out-of-range values.
        if not (math.isfinite(temperature) and 0.0 <= temperature <= MAX_TEMPERATURE):
            raise errors.InvalidArgument(
                f"options.temperature must be between 0 and {MAX_TEMPERATURE:g}, "
                f"got {temperature:g}"
            )


class ModelLister(Protocol):
    async def list_models(self, *, timeout: float | None = ...) -> llm_pb2.ListModelsResponse: ...


class ModelCatalog:
    """The models and route aliases llm_proxy serves, as its ListModels tells.

    Asked at most every `ttl_s`, and again (at most every `recheck_s`) before a
    model is refused: llm_proxy may have been restarted with new routes. When
    llm_proxy cannot be asked, no model is refused here: the model call decides,
    as it always has.
    """

    def __init__(
        self,
        llm: ModelLister,
        *,
        ttl_s: float = 30.0,
        recheck_s: float = 1.0,
        timeout_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._llm = llm
        self._ttl_s = ttl_s
        self._recheck_s = recheck_s
        self._timeout_s = timeout_s
        self._clock = clock
        self._known: frozenset[str] | None = None
        self._fetched_at = -math.inf

    async def check(self, model: str, *, field: str) -> None:
        """InvalidArgument naming `field` when llm_proxy would refuse `model`."""
        if model in _DEFAULT_MODELS:
            return
        known = await self._models(max_age_s=self._ttl_s)
        if known is not None and model not in known:
            known = await self._models(max_age_s=self._recheck_s)
        if known is None or model in known:
            return
        raise errors.InvalidArgument(
            f"{field}: unknown model {_shown(model)}; known models and routes are "
            f"{_listing(known)}",
            details={"field": field},
        )

    async def _models(self, *, max_age_s: float) -> Collection[str] | None:
        if self._known is not None and self._clock() - self._fetched_at <= max_age_s:
            return self._known
        try:
            listed = await self._llm.list_models(timeout=self._timeout_s)
        except errors.ThreadlineError as exc:
            log.warning("turn.models_unknown", error=exc.message)
            return None
        self._known = frozenset(m.id for m in listed.models)
        self._fetched_at = self._clock()
        return self._known


def _shown(model: str) -> str:
    # The name is the caller's: quoted when short, never echoed whole when long.
    return repr(model) if len(model) <= 64 else f"{model[:32]!r}... ({len(model)} characters)"


def _listing(known: Collection[str]) -> str:
    names = sorted(known)
    shown = ", ".join(names[:_LISTED])
    return shown + (f" and {len(names) - _LISTED} more" if len(names) > _LISTED else "")


class TurnQueue:
    """Turns running at once on this executor, and those waiting to start, in order.

    A finished turn hands its place straight to the longest-waiting one, so a turn
    that arrives later never overtakes a waiting one. The queue is bounded: a turn
    that finds it full is refused at once with a retry delay of about how long a
    place takes to free (the recent turn duration over the turns running).
    """

    def __init__(
        self, max_running: int, max_queued: int, events: EventPublisher | None = None
    ) -> None:
        self.max_running = max_running
        self.max_queued = max_queued
        self._events = events
        self.running = 0
        self._waiting: deque[asyncio.Future[None]] = deque()
        #: Moving average of how long a turn holds its place (seconds).
        self._turn_s = 1.0

    @property
    def queued(self) -> int:
        return len(self._waiting)

    @contextlib.asynccontextmanager
    async def place(self, tenant: str, session_id: str) -> AsyncIterator[float]:
        """A running place for the turn of the block; yields the seconds waited for it."""
        started = time.perf_counter()
        if self.running < self.max_running and not self._waiting:
            self.running += 1
        else:
            self._refuse_when_full()
            if self._events is not None:
                self._events.emit(
                    "turn.queued",
                    tenant=tenant,
                    session_id=session_id,
                    position=len(self._waiting) + 1,
                    running=self.running,
                )
            await self._wait()
        held_from = time.perf_counter()
        try:
            yield held_from - started
        finally:
            self._turn_s += (time.perf_counter() - held_from - self._turn_s) / 16
            self._release()

    def _refuse_when_full(self) -> None:
        if len(self._waiting) >= self.max_queued:
            retry_after = min(max(self._turn_s * self.max_queued / self.max_running, 1.0), 30.0)
            raise errors.ResourceExhausted(
                f"the executor is running {self.running} turns and {len(self._waiting)} "
                "more are waiting to start (executor.max_running_turns, "
                "executor.max_queued_turns); retry the turn later",
                retry_after_s=retry_after,
                details={"limit": "turn_queue"},
            )

    async def _wait(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiting.append(waiter)
        try:
            await waiter  # the place is handed over already counted (see `_release`)
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release()  # handed a place just as the caller left: pass it on
            else:
                self._waiting.remove(waiter)
            raise

    def _release(self) -> None:
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.running -= 1
