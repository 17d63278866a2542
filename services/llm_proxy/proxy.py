"""The proxy's domain: routes, attempts, retries, failover and honest endings.

Before the first delta a failure is retried on the same upstream (backoff,
Retry-After, budget) or failed over to the route's next target; a silent
upstream is never waited on twice. After the first delta, what a cut stream
becomes is the route's `on_cut`: continued on a prefill-capable fallback when no
tool-call delta was sent (a continuation that starts over is rolled back and
taken as the whole answer), restarted on the next target after a rollback chunk
that tells the caller to discard what it received, or ended with finish_reason
INTERRUPTED, the partial text and its usage. A cut answer is never presented as
complete, and a fallback's refusal never masks the original failure.

Every attempt that got capacity settles its TPM reservation with what it used
once it has ended, however it ended (`limits.UpstreamLimiter.settle`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from services.llm_proxy import metrics
from services.llm_proxy.answer import Answer, estimate_prompt_tokens, relayed
from services.llm_proxy.breaker import CircuitState
from services.llm_proxy.continuation import (
    ContinuationCheck,
    continuation_request,
    continuation_targets,
)
from services.llm_proxy.limits import RateLimited, UpstreamLimiter
from services.llm_proxy.openai_wire import (
    FINISH_REASONS,
    request_body,
)
from services.llm_proxy.overhead import OVERHEAD, RequestClock
from services.llm_proxy.relay import Batches
from services.llm_proxy.retry import RetryPolicy
from services.llm_proxy.router import ResolvedRoute, Router, Target
from services.llm_proxy.upstream import UpstreamFailure
from threadline import errors
from threadline.events import EventPublisher
from threadline.logs import get_logger
from threadline.v1 import common_pb2, llm_pb2

log = get_logger(__name__)

#: Failures that say the upstream is unhealthy (they count towards its circuit).
_HEALTH_FAILURES = ("connect", "reset", "transport", "first_token", "idle", "total", "malformed")


def _counts_against_health(failure: UpstreamFailure) -> bool:
    return failure.reason.startswith(_HEALTH_FAILURES) or (
        failure.status is not None and (failure.status >= 500 or failure.status in (408, 429))
    )


def _callers_fault(failure: UpstreamFailure) -> bool:
    """A refusal another upstream would repeat: the request itself is the problem."""
    return failure.reason in ("context_length_exceeded", "content_filter") or (
        failure.status in (400, 413, 422)
    )


def _unsupported(request: llm_pb2.ChatRequest, target: Target) -> str:
    capabilities = target.upstream.settings.capabilities
    if request.tools and not capabilities.tools:
        return "unsupported_tools"
    if (
        request.response_format == llm_pb2.RESPONSE_FORMAT_JSON_OBJECT
        and not capabilities.json_mode
    ):
        return "unsupported_json_mode"
    return ""


def _failure_error(failure: UpstreamFailure) -> errors.ThreadlineError:
    details = {"reason": failure.reason}
    if failure.status is not None:
        details["upstream_status"] = str(failure.status)
    if failure.reason in ("context_length_exceeded", "content_filter"):
        return errors.FailedPrecondition(f"{failure.reason}: {failure.message}", details=details)
    if failure.status in (400, 422):
        return errors.InvalidArgument(
            f"upstream rejected the request: {failure.message}", details=details
        )
    if failure.status is not None and 400 <= failure.status < 500:
        return errors.FailedPrecondition(
            f"upstream refused the request: {failure.message}", details=details
        )
    return errors.Unavailable(f"upstream unavailable: {failure.message}", details=details)


@dataclass(frozen=True)
class _FailOver:
    """A target gave up on the request: the route's next target is tried."""

    #: As reported in `llm.failover` and the failover metric.
    reason: str
    failure: UpstreamFailure | RateLimited


@dataclass
class _RouteRun:
    """One request on its way through a route's targets."""

    route: ResolvedRoute
    #: Routes this request has already been through: a context fallback is taken once.
    followed: tuple[str, ...]
    #: Attempts so far, over every target and route the request has been through.
    attempt: int
    #: When the route was entered (loop time): no retry starts past the retry budget.
    started: float
    #: The whole request's clock (its time in the proxy itself, its age).
    clock: RequestClock
    #: What the caller is told when no target answers.
    last: UpstreamFailure | RateLimited | None = None

    def child(self, route: ResolvedRoute, followed: tuple[str, ...]) -> _RouteRun:
        """The same request entering another route (a context fallback, a restart)."""
        loop_time = asyncio.get_running_loop().time()
        return _RouteRun(route, followed, self.attempt, loop_time, self.clock)


@dataclass
class _Cut:
    """A stream cut after output, on its way to an ending (see `on_cut`)."""

    request: llm_pb2.ChatRequest
    #: What the caller holds now: the cut answer (with any continuation of it).
    answer: Answer
    #: Where it was cut, and why.
    target: Target
    failure: UpstreamFailure
    #: Rollback chunks sent to the caller while ending it.
    rollbacks: int = 0
    #: A done chunk has been sent.
    answered: bool = False

    @property
    def error(self) -> str:
        return f"{self.failure.reason}: {self.failure.message}"


class ChatProxy:
    def __init__(
        self,
        router: Router,
        retry: RetryPolicy,
        events: EventPublisher,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.router = router
        self.retry = retry
        self.events = events
        self._sleep = sleep
        #: TPM settlements under way: they never delay the answer.
        self._settling: set[asyncio.Task[None]] = set()

    def models(self) -> list[llm_pb2.ModelInfo]:
        return self.router.models()

    async def stream(self, request: llm_pb2.ChatRequest) -> AsyncIterator[llm_pb2.ChatChunk]:
        if not request.messages:
            raise errors.InvalidArgument("messages is empty: send at least one message")
        route = self.router.resolve(request.model)
        clock = RequestClock()
        run = _RouteRun(route, (), 0, asyncio.get_running_loop().time(), clock)
        try:
            async for chunk in self._serve(request, run):
                if chunk.HasField("done"):
                    chunk.done.proxy_overhead_ms = round(clock.overhead_s() * 1000, 3)
                with clock.waiting():
                    yield chunk
        finally:
            OVERHEAD.observe(clock.overhead_s())

    async def settled(self, timeout_s: float = 5.0) -> None:
        """Wait (boundedly) for the TPM settlements under way: at shutdown, before the
        Redis client closes."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while self._settling:
                    await asyncio.gather(*self._settling, return_exceptions=True)

    async def _serve(
        self, request: llm_pb2.ChatRequest, run: _RouteRun
    ) -> AsyncIterator[llm_pb2.ChatChunk]:
        """The route's targets in order, failing over, until one of them answers.

        Raises what the last failure means to the caller when none does.
        """
        route = run.route
        for index, target in enumerate(route.targets):
            skipped = self._skipped(request, target)
            if skipped is not None:
                run.last = run.last or skipped
                continue
            failover: _FailOver | None = None
            async for step in self._attempts_on(request, run, index):
                if isinstance(step, _FailOver):
                    failover = step
                else:
                    yield step
            if failover is None:
                return  # answered
            run.last = failover.failure
            self._announce_failover(run, index, failover.reason)
        raise self._exhausted(run)

    async def _attempts_on(
        self, request: llm_pb2.ChatRequest, run: _RouteRun, index: int
    ) -> AsyncIterator[llm_pb2.ChatChunk | _FailOver]:
        """Attempts on one target, retried with backoff while a retry can help.

        Ends answered (a done chunk, however the answer ended: whole, continued,
        interrupted or from the context fallback) or with a `_FailOver` last; raises
        when the request itself is refused.
        """
        target = run.route.targets[index]
        tries = 0
        while True:
            run.attempt += 1
            tries += 1
            answer = Answer()
            async for chunk in self._attempt(request, target, run, answer):
                yield chunk
            failure = answer.failure
            if failure is None:
                self._record_success(target)
                yield self._done(request, answer, target, run)
                return
            if isinstance(failure, RateLimited):
                self._record_rate_limited(target, failure, run.attempt)
                yield _FailOver("rate_limited", failure)
                return
            if answer.produced_output:
                self._record_failure(target, failure, "interrupted")
                cut = _Cut(request, answer, target, failure)
                async for chunk in self._finish_cut_answer(run, index, cut):
                    yield chunk
                return
            yield self._attempt_failed(target, failure, run.attempt)
            if failure.reason == "context_length_exceeded":
                async for chunk in self._context_fallback(request, run, target, failure):
                    yield chunk
                return
            if _callers_fault(failure):
                raise _failure_error(failure)
            delay = self._retry_delay(run, target, failure, tries)
            if delay is None:
                yield _FailOver(failure.reason, failure)
                return
            with run.clock.waiting():
                await self._sleep(delay)

    def _skipped(self, request: llm_pb2.ChatRequest, target: Target) -> UpstreamFailure | None:
        """Why `target` is not tried for this request, or None when it may be."""
        unsupported = _unsupported(request, target)
        if not unsupported and target.upstream.breaker.allow():
            return None
        reason = unsupported or "circuit_open"
        self._emit("llm.target_skipped", target, reason=reason)
        return UpstreamFailure(reason, f"{target.upstream.name} skipped: {reason}", retryable=False)

    def _retry_delay(
        self, run: _RouteRun, target: Target, failure: UpstreamFailure, tries: int
    ) -> float | None:
        """The wait before trying `target` again, or None to fail over now."""
        if not failure.retryable:
            return None  # a silent or stalled upstream is not waited on again
        if target.upstream.breaker.state is not CircuitState.CLOSED:
            return None  # its circuit just opened: fallbacks serve from now on
        elapsed = asyncio.get_running_loop().time() - run.started
        delay = self.retry.delay(tries, failure.retry_after_s, self.retry.budget_s - elapsed)
        if delay is None:
            return None
        metrics.RETRIES.labels(target.upstream.name, target.model, failure.reason).inc()
        self._emit(
            "llm.retry",
            target,
            attempt=run.attempt,
            reason=failure.reason,
            delay_s=round(delay, 3),
        )
        return delay

    async def _context_fallback(
        self,
        request: llm_pb2.ChatRequest,
        run: _RouteRun,
        target: Target,
        failure: UpstreamFailure,
    ) -> AsyncIterator[llm_pb2.ChatChunk]:
        """A prompt too long for this route goes to its context fallback route, once."""
        fallback = run.route.context_fallback
        if not fallback or fallback in run.followed:
            raise _failure_error(failure)
        self._emit(
            "llm.failover", target, attempt=run.attempt, reason=failure.reason, to_route=fallback
        )
        child = run.child(self.router.route(fallback), (*run.followed, run.route.name))
        async for chunk in self._serve(request, child):
            yield chunk

    def _announce_failover(self, run: _RouteRun, index: int, reason: str) -> None:
        """The route moves on from target `index` to the next one, if there is one."""
        if index + 1 >= len(run.route.targets):
            return
        target, following = run.route.targets[index], run.route.targets[index + 1]
        metrics.FAILOVERS.labels(target.upstream.name, following.upstream.name, reason).inc()
        self._emit(
            "llm.failover",
            target,
            attempt=run.attempt,
            reason=reason,
            to_upstream=following.upstream.name,
            to_model=following.model,
        )

    def _exhausted(self, run: _RouteRun) -> errors.ThreadlineError:
        """No target answered: the last failure as the caller's status."""
        last, route = run.last, run.route.name
        if isinstance(last, UpstreamFailure) and last.status == 429:
            return errors.ResourceExhausted(
                f"every upstream of {route!r} is rate limiting: {last.message}",
                retry_after_s=last.retry_after_s or self.retry.max_delay_s,
                details={"reason": last.reason, "attempts": str(run.attempt)},
            )
        if isinstance(last, RateLimited):
            return errors.ResourceExhausted(
                f"every upstream of {route!r} is at its {last.limit} limit",
                retry_after_s=last.retry_after_s,
                details={"limit": last.limit, "upstream": last.upstream},
            )
        message = last.message if last is not None else "no upstream"
        return errors.Unavailable(
            f"no upstream of {route!r} answered after {run.attempt} attempt(s): {message}",
            details={
                "reason": last.reason if last is not None else "",
                "attempts": str(run.attempt),
            },
        )

    async def _attempt(
        self,
        request: llm_pb2.ChatRequest,
        target: Target,
        run: _RouteRun,
        answer: Answer,
        *,
        prefill: bool = False,
    ) -> AsyncIterator[llm_pb2.ChatChunk]:
        """One attempt, relayed; how it failed, if it did, is left in `answer.failure`."""
        try:
            async for chunk in self._send(request, target, run, answer, prefill=prefill):
                yield chunk
        except (asyncio.CancelledError, GeneratorExit):
            # The caller left mid-attempt: no verdict on the upstream, and a
            # half-open circuit must not stay reserved for this probe.
            target.upstream.breaker.release_probe()
            raise
        except (UpstreamFailure, RateLimited) as failure:
            answer.failure = failure

    async def _send(
        self,
        request: llm_pb2.ChatRequest,
        target: Target,
        run: _RouteRun,
        answer: Answer,
        *,
        prefill: bool,
    ) -> AsyncIterator[llm_pb2.ChatChunk]:
        """Send the request to `target` and relay its answer; raises how it failed."""
        upstream = target.upstream
        settings = upstream.settings
        body = request_body(
            request, target.model, stream=True, system_role=settings.capabilities.system_role
        )
        if prefill:
            # vLLM's names; servers that continue a trailing assistant message by default
            # ignore them, strict ones refuse (and the original failure is reported).
            body["continue_final_message"] = True
            body["add_generation_prompt"] = False
        if settings.capabilities.usage_per_chunk:
            body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
        yield llm_pb2.ChatChunk(
            attempt=llm_pb2.AttemptInfo(
                attempt=run.attempt, upstream=upstream.name, model=target.model, status="started"
            )
        )
        tokens = estimate_prompt_tokens(request) + (request.max_tokens or 512)
        async with upstream.limiter.slot(tokens):
            try:
                async with asyncio.timeout(settings.timeouts.total_s) as total:
                    async for batch in Batches(upstream.client.stream(body), run.clock):
                        first = answer.deltas == 0
                        for chunk in relayed(answer, batch):
                            yield chunk
                        if first and answer.deltas:
                            metrics.TTFT.labels(upstream.name, target.model).observe(
                                time.perf_counter() - answer.started
                            )
            except TimeoutError:
                if not total.expired():
                    raise  # not the answer's total time: someone else's timeout
                raise UpstreamFailure(
                    "total_timeout",
                    f"answer took longer than {settings.timeouts.total_s:g}s",
                    retryable=False,
                ) from None
            except UpstreamFailure as failure:
                answer.failure = failure  # known to the settlement below
                raise
            finally:
                # However the attempt ended (answered, cut, its caller gone): the
                # bucket is charged what it used, not the estimate taken above.
                self._settle(upstream.limiter, upstream.limiter.reserved(tokens), request, answer)

    def _settle(
        self,
        limiter: UpstreamLimiter,
        reserved: int,
        request: llm_pb2.ChatRequest,
        answer: Answer,
    ) -> None:
        if not limiter.tpm:
            return
        # In the background: the answer is never held up by the bucket, and a
        # cancelled request (its caller gone) still settles.
        task = asyncio.get_running_loop().create_task(
            self._settle_now(limiter, reserved, answer.used(request))
        )
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def _settle_now(self, limiter: UpstreamLimiter, reserved: int, used: int) -> None:
        try:
            await limiter.settle(reserved, used)
        except Exception as exc:  # Redis away: the bucket keeps the estimate
            log.warning(
                "llm.tpm_settle_failed", upstream=limiter.upstream, used=used, error=str(exc)
            )

    async def _finish_cut_answer(
        self, run: _RouteRun, index: int, cut: _Cut
    ) -> AsyncIterator[llm_pb2.ChatChunk]:
        """What the route's `on_cut` makes of a stream cut after output: continued on a
        prefill-capable fallback, restarted on the next target after a rollback, or
        ended INTERRUPTED with the partial answer."""
        self._emit(
            "llm.stream_interrupted",
            cut.target,
            attempt=run.attempt,
            reason=cut.failure.reason,
            deltas_sent=cut.answer.deltas,
        )
        on_cut = run.route.on_cut
        # Tool-call deltas already sent cannot be continued as text.
        if on_cut in ("continue", "continue_then_restart") and not cut.answer.tool_calls:
            async for chunk in self._continue(run, index, cut):
                yield chunk
        if not cut.answered and on_cut in ("restart", "continue_then_restart"):
            async for chunk in self._restart(run, index, cut):
                yield chunk
        if not cut.answered:
            yield self._interrupted(cut.request, cut.answer, cut.target, run.attempt, cut)

    async def _continue(
        self, run: _RouteRun, index: int, cut: _Cut
    ) -> AsyncIterator[llm_pb2.ChatChunk]:
        """Continue the cut answer on the prefill-capable targets after it, in order.

        A continuation that starts over is rolled back and taken as the whole answer;
        one that fails before the caller saw any of it (refused) leaves the cut
        answer as it was for the next target. `cut` says how it ended.
        """
        partial = "".join(cut.answer.text)
        continuation = continuation_request(cut.request, partial)
        for target in continuation_targets(run.route, index):
            run.attempt += 1
            self._announce_continuation(cut, target, run.attempt)
            rest, check = Answer(), ContinuationCheck(partial)
            async for chunk in self._checked(continuation, target, run, rest, check, cut):
                yield chunk
            if rest.failure is None:
                self._record_success(target)
                replayed = bool(check.replayed)
                whole = rest.replaying(cut.answer) if replayed else cut.answer.continued_by(rest)
                yield self._done(continuation, whole, target, run, rollbacks=cut.rollbacks)
                cut.answered = True
                return
            seen = check.decided and rest.produced_output
            self._continuation_failed(target, rest.failure, run.attempt, seen=seen)
            if not seen:
                continue  # a refusal never masks the original failure: on to the next
            if check.replayed:
                cut.answer = rest.replaying(cut.answer)
            else:
                cut.answer.text.extend(rest.text)
                cut.answer.deltas += rest.deltas
            cut.target = target
            if isinstance(rest.failure, UpstreamFailure):
                cut.failure = rest.failure
            return

    async def _checked(
        self,
        continuation: llm_pb2.ChatRequest,
        target: Target,
        run: _RouteRun,
        rest: Answer,
        check: ContinuationCheck,
        cut: _Cut,
    ) -> AsyncIterator[llm_pb2.ChatChunk]:
        """A continuation attempt relayed through its check: a replay is preceded by a
        rollback; text still held when the attempt fails is never sent."""
        rolled_back = False
        stream = self._attempt(continuation, target, run, rest, prefill=True)
        async for chunk in stream:
            released = check.feed(chunk)
            if check.replayed and not rolled_back:
                rolled_back = True
                yield self._rollback("replayed_continuation", cut, target)
            for out in released:
                yield out
        if rest.failure is None:
            released = check.end()
            if check.replayed and not rolled_back:
                yield self._rollback("replayed_continuation", cut, target)
            for out in released:
                yield out

    async def _restart(
        self, run: _RouteRun, index: int, cut: _Cut
    ) -> AsyncIterator[llm_pb2.ChatChunk]:
        """Ask the targets after the cut one for the whole answer again.

        The caller is sent a rollback just before the new answer's first output (or
        its end), so when no target answers nothing was rolled back and the cut
        answer stands.
        """
        following = run.route.targets[index + 1 :]
        if not following:
            return
        self._emit(
            "llm.failover",
            cut.target,
            attempt=run.attempt,
            reason=cut.failure.reason,
            to_upstream=following[0].upstream.name,
            to_model=following[0].model,
            restart=True,
        )
        inner = run.child(dataclasses.replace(run.route, targets=following), run.followed)
        answering, rolled_back = following[0], False
        try:
            async for chunk in self._serve(cut.request, inner):
                if chunk.HasField("attempt"):
                    answering = self._target_named(following, chunk.attempt) or answering
                elif not rolled_back:
                    rolled_back = True
                    yield self._rollback("restart", cut, answering)
                if chunk.HasField("done"):
                    self._carry(chunk.done, cut)
                yield chunk
        except errors.ThreadlineError as exc:
            if rolled_back:
                raise
            log.info("llm.restart_failed", route=run.route.name, error=exc.message)
            return
        finally:
            run.attempt = inner.attempt
        cut.answered = True

    @staticmethod
    def _target_named(targets: tuple[Target, ...], attempt: llm_pb2.AttemptInfo) -> Target | None:
        for target in targets:
            if (target.upstream.name, target.model) == (attempt.upstream, attempt.model):
                return target
        return None

    def _carry(self, done: llm_pb2.ChatDone, cut: _Cut) -> None:
        """The restarted answer's result also bills the answer it replaced."""
        spent = self._usage(cut.request, cut.answer)
        usage = done.usage
        usage.prompt_tokens += spent.prompt_tokens
        usage.completion_tokens += spent.completion_tokens
        usage.cached_tokens += spent.cached_tokens
        usage.total_tokens += spent.total_tokens
        done.usage_estimated = done.usage_estimated or cut.answer.usage is None
        done.rollbacks += cut.rollbacks

    def _rollback(self, reason: str, cut: _Cut, target: Target) -> llm_pb2.ChatChunk:
        cut.rollbacks += 1
        self._emit(
            "llm.rollback",
            cut.target,
            reason=reason,
            to_upstream=target.upstream.name,
            to_model=target.model,
            discarded_deltas=cut.answer.deltas,
        )
        return llm_pb2.ChatChunk(
            rollback=llm_pb2.Rollback(
                reason=reason, error=cut.error, upstream=target.upstream.name, model=target.model
            )
        )

    def _announce_continuation(self, cut: _Cut, target: Target, attempt: int) -> None:
        self._emit(
            "llm.failover",
            cut.target,
            attempt=attempt,
            reason=cut.failure.reason,
            to_upstream=target.upstream.name,
            to_model=target.model,
            continuation=True,
        )

    def _continuation_failed(
        self,
        target: Target,
        failure: UpstreamFailure | RateLimited | None,
        attempt: int,
        *,
        seen: bool,
    ) -> None:
        """Account for a failed continuation; one the caller saw nothing of is refused."""
        if isinstance(failure, UpstreamFailure):
            self._record_failure(target, failure, "failed")
        else:
            target.upstream.breaker.release_probe()
        if seen or failure is None:
            return
        if isinstance(failure, RateLimited):
            reason, status = "rate_limited", None
        else:
            reason, status = failure.reason, failure.status
        self._emit(
            "llm.continuation_refused", target, attempt=attempt, reason=reason, status=status
        )

    def _emit(self, type_: str, target: Target, **attributes: Any) -> None:
        # `reason` classifies a failure; its message stays out of events: an upstream's
        # error may quote the request, the user's text.
        self.events.emit(type_, upstream=target.upstream.name, model=target.model, **attributes)

    def _record_success(self, target: Target) -> None:
        if target.upstream.breaker.record_success():
            metrics.CIRCUIT_OPEN.labels(target.upstream.name).set(0)
            self._emit("llm.circuit_closed", target)

    def _record_rate_limited(self, target: Target, limited: RateLimited, attempt: int) -> None:
        target.upstream.breaker.release_probe()
        metrics.RATE_LIMITED.labels(target.upstream.name, limited.limit).inc()
        self._emit(
            "llm.rate_limited",
            target,
            attempt=attempt,
            limit=limited.limit,
            retry_after_s=round(limited.retry_after_s, 3),
        )

    def _record_failure(self, target: Target, failure: UpstreamFailure, outcome: str) -> None:
        upstream = target.upstream
        metrics.ATTEMPTS.labels(upstream.name, target.model, outcome).inc()
        if _counts_against_health(failure):
            probing = upstream.breaker.state is CircuitState.HALF_OPEN
            if upstream.breaker.record_failure():
                metrics.CIRCUIT_OPEN.labels(upstream.name).set(1)
                self._emit(
                    "llm.circuit_opened",
                    target,
                    reason=failure.reason,
                    failures=upstream.breaker.failures,
                    # The half-open probe failed: open again for another cooldown.
                    reopened=probing,
                )
        else:
            upstream.breaker.release_probe()

    def _attempt_failed(
        self, target: Target, failure: UpstreamFailure, attempt: int
    ) -> llm_pb2.ChatChunk:
        self._record_failure(target, failure, "failed")
        self._emit(
            "llm.attempt_failed",
            target,
            attempt=attempt,
            reason=failure.reason,
            status=failure.status,
        )
        return llm_pb2.ChatChunk(
            attempt=llm_pb2.AttemptInfo(
                attempt=attempt,
                upstream=target.upstream.name,
                model=target.model,
                status="failed",
                reason=failure.reason,
            )
        )

    def _usage(self, request: llm_pb2.ChatRequest, answer: Answer) -> common_pb2.Usage:
        if answer.usage is not None:
            prompt = answer.usage.prompt_tokens
            completion = answer.usage.completion_tokens + answer.carried_completion
            cached = answer.usage.cached_tokens
        else:
            # No usage chunk (stream cut, or a server that ignores include_usage): estimate
            # from the text so the spend is still accounted, approximately.
            prompt, cached = estimate_prompt_tokens(request), 0
            completion = answer.estimated_completion()
        return common_pb2.Usage(
            prompt_tokens=prompt,
            completion_tokens=completion,
            cached_tokens=cached,
            total_tokens=prompt + completion,
        )

    def _done(
        self,
        request: llm_pb2.ChatRequest,
        answer: Answer,
        target: Target,
        run: _RouteRun,
        *,
        rollbacks: int = 0,
    ) -> llm_pb2.ChatChunk:
        reason = FINISH_REASONS.get(answer.finish_reason, common_pb2.FINISH_REASON_STOP)
        if answer.tool_calls and reason == common_pb2.FINISH_REASON_STOP:
            reason = common_pb2.FINISH_REASON_TOOL_CALLS
        usage = self._usage(request, answer)
        name = target.upstream.name
        metrics.ATTEMPTS.labels(name, target.model, "ok").inc()
        metrics.TOKENS.labels(name, target.model, "prompt").inc(usage.prompt_tokens)
        metrics.TOKENS.labels(name, target.model, "completion").inc(usage.completion_tokens)
        log.info(
            "llm.answered",
            upstream=name,
            model=target.model,
            attempt=run.attempt,
            # The whole request's time, every attempt and continuation included.
            seconds=round(run.clock.elapsed_s(), 3),
            answer_seconds=round(time.perf_counter() - answer.started, 3),
        )
        return llm_pb2.ChatChunk(
            done=llm_pb2.ChatDone(
                finish_reason=reason,
                usage=usage,
                model=target.model,
                upstream=name,
                content="".join(answer.text),
                tool_calls=[answer.tool_calls[i] for i in sorted(answer.tool_calls)],
                attempts=run.attempt,
                usage_estimated=answer.usage is None,
                rollbacks=rollbacks,
            )
        )

    def _interrupted(
        self,
        request: llm_pb2.ChatRequest,
        answer: Answer,
        target: Target,
        attempt: int,
        cut: _Cut,
    ) -> llm_pb2.ChatChunk:
        usage = self._usage(request, answer)
        name = target.upstream.name
        metrics.TOKENS.labels(name, target.model, "prompt").inc(usage.prompt_tokens)
        metrics.TOKENS.labels(name, target.model, "completion").inc(usage.completion_tokens)
        return llm_pb2.ChatChunk(
            done=llm_pb2.ChatDone(
                finish_reason=common_pb2.FINISH_REASON_INTERRUPTED,
                usage=usage,
                model=target.model,
                upstream=target.upstream.name,
                content="".join(answer.text),
                tool_calls=[answer.tool_calls[i] for i in sorted(answer.tool_calls)],
                attempts=attempt,
                usage_estimated=answer.usage is None,
                error=cut.error,
                rollbacks=cut.rollbacks,
            )
        )
