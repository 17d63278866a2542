"""When the LLM proxy tries again, and how upstream failures are classified."""

from __future__ import annotations

import random
import statistics
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from services.llm_proxy.retry import RetryPolicy
from services.llm_proxy.upstream import classify_status, parse_retry_after
from threadline.config import RetrySettings

POLICY = RetryPolicy(max_attempts=5, base_delay_s=0.2, max_delay_s=1.0, budget_s=30.0)


@pytest.mark.parametrize(
    ("attempt", "ceiling"), [(1, 0.2), (2, 0.4), (3, 0.8), (4, 1.0), (10, 1.0)]
)
def test_backoff_is_full_jitter_under_the_capped_exponential(attempt: int, ceiling: float) -> None:
    rng = random.Random(1234)

    delays = [POLICY.backoff(attempt, rng) for _ in range(2000)]

    assert all(0 <= d <= ceiling for d in delays)
    # Full jitter spreads over the whole range, not just near the ceiling.
    assert min(delays) < 0.05 * ceiling
    assert max(delays) > 0.95 * ceiling
    assert statistics.mean(delays) == pytest.approx(ceiling / 2, rel=0.1)


def test_backoff_is_reproducible_with_a_seed() -> None:
    first = [POLICY.backoff(3, random.Random(7)) for _ in range(3)]
    second = [POLICY.backoff(3, random.Random(7)) for _ in range(3)]

    assert first == second


def test_backoff_without_rng_stays_in_bounds() -> None:
    assert all(0 <= POLICY.backoff(2) <= 0.4 for _ in range(200))


def test_delay_uses_backoff_when_no_retry_after() -> None:
    delays = [POLICY.delay(2, None, remaining_s=30.0) for _ in range(200)]

    assert all(d is not None and 0 <= d <= 0.4 for d in delays)


def test_retry_after_is_honoured_as_given() -> None:
    # Longer than the backoff cap: the upstream knows when it has capacity again.
    assert POLICY.delay(1, 3.0, remaining_s=30.0) == 3.0
    assert POLICY.delay(1, 0.0, remaining_s=30.0) == 0.0


def test_no_delay_once_attempts_are_exhausted() -> None:
    assert POLICY.delay(5, None, remaining_s=30.0) is None
    assert POLICY.delay(6, 0.5, remaining_s=30.0) is None
    assert RetryPolicy(max_attempts=1).delay(1, None, remaining_s=30.0) is None


def test_no_delay_when_retry_after_does_not_fit_the_budget() -> None:
    assert POLICY.delay(1, 10.0, remaining_s=10.0) is None
    assert POLICY.delay(1, 12.0, remaining_s=10.0) is None
    assert POLICY.delay(1, 9.5, remaining_s=10.0) == 9.5


def test_no_delay_when_backoff_does_not_fit_the_budget() -> None:
    assert POLICY.delay(1, None, remaining_s=0.0) is None
    assert POLICY.delay(1, None, remaining_s=-1.0) is None


def test_policy_from_settings() -> None:
    settings = RetrySettings(max_attempts=4, base_delay_s=0.1, max_delay_s=2.0, budget_s=9.0)

    assert RetryPolicy.from_settings(settings) == RetryPolicy(4, 0.1, 2.0, 9.0)


@pytest.mark.parametrize(("header", "seconds"), [("120", 120.0), ("0", 0.0), (" 7 ", 7.0)])
def test_retry_after_in_seconds(header: str, seconds: float) -> None:
    assert parse_retry_after(header) == seconds


def test_retry_after_as_http_date() -> None:
    now = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
    header = format_datetime(now + timedelta(seconds=45), usegmt=True)

    assert header.endswith("GMT")
    assert parse_retry_after(header, now=now.timestamp()) == pytest.approx(45.0)


def test_retry_after_date_in_the_past_means_now() -> None:
    now = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
    header = format_datetime(now - timedelta(minutes=5), usegmt=True)

    assert parse_retry_after(header, now=now.timestamp()) == 0.0


@pytest.mark.parametrize("header", [None, "", "soon", "-5", "1.5s", "Thursday next week"])
def test_retry_after_garbage_is_ignored(header: str | None) -> None:
    assert parse_retry_after(header) is None


def test_retry_after_non_ascii_digit_is_ignored() -> None:
    assert parse_retry_after("\u00b2") is None


@pytest.mark.parametrize("status", [408, 425, 429, 500, 502, 503, 504])
def test_overload_and_server_errors_are_retryable(status: int) -> None:
    failure = classify_status(status, b'{"error": {"message": "busy"}}', None)

    assert failure.retryable
    assert failure.status == status
    assert failure.reason == f"http_{status}"
    assert "busy" in failure.message


def test_429_carries_retry_after() -> None:
    failure = classify_status(429, b"{}", "3")

    assert failure.retryable
    assert failure.retry_after_s == 3.0


def test_503_with_html_body_is_still_retryable() -> None:
    failure = classify_status(503, b"<html>Service Unavailable</html>", None)

    assert failure.retryable
    assert "Service Unavailable" in failure.message


@pytest.mark.parametrize(
    "body",
    [
        b'{"error": {"code": "context_length_exceeded", "message": "too long"}}',
        b'{"error": {"message": "This model\'s maximum context length is 4096 tokens"}}',
        b'{"error": "the request exceeds the available context length"}',
    ],
)
def test_context_length_is_not_retryable(body: bytes) -> None:
    failure = classify_status(400, body, None)

    assert failure.reason == "context_length_exceeded"
    assert not failure.retryable
    assert failure.status == 400


@pytest.mark.parametrize(
    "body",
    [
        b'{"error": {"code": "content_filter", "message": "blocked"}}',
        b'{"error": {"type": "content_policy_violation", "message": "no"}}',
    ],
)
def test_content_filter_is_not_retryable(body: bytes) -> None:
    failure = classify_status(400, body, None)

    assert failure.reason == "content_filter"
    assert not failure.retryable


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_other_client_errors_are_not_retryable(status: int) -> None:
    failure = classify_status(status, b'{"error": {"message": "model not found"}}', None)

    assert not failure.retryable
    assert failure.reason == f"http_{status}"
    assert f"upstream answered {status}: model not found" == failure.message


def test_retry_after_on_a_client_error_does_not_make_it_retryable() -> None:
    failure = classify_status(400, b"{}", "1")

    assert not failure.retryable
