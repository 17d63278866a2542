"""When to try again: full-jitter exponential backoff inside a total time budget."""

from __future__ import annotations

import random
from dataclasses import dataclass

from threadline.config import RetrySettings


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 3
    base_delay_s: float = 0.2
    max_delay_s: float = 5.0
    budget_s: float = 30.0

    @classmethod
    def from_settings(cls, settings: RetrySettings) -> RetryPolicy:
        return cls(
            max_attempts=settings.max_attempts,
            base_delay_s=settings.base_delay_s,
            max_delay_s=settings.max_delay_s,
            budget_s=settings.budget_s,
        )

    def backoff(self, attempt: int, rng: random.Random | None = None) -> float:
        """Delay before attempt `attempt + 1` (attempt counts from 1).

        Full jitter (uniform in [0, min(cap, base * 2^(attempt-1))]) spreads
        retries of many clients so a recovering upstream is not hit in waves.
        """
        ceiling = min(self.max_delay_s, self.base_delay_s * 2 ** (attempt - 1))
        return (rng or random).uniform(0, ceiling)

    def delay(self, attempt: int, retry_after_s: float | None, remaining_s: float) -> float | None:
        """The wait before the next attempt, or None when no attempt is left.

        A Retry-After from the upstream is honoured as given (it knows when it
        will have capacity); when it does not fit the remaining budget we stop
        instead of retrying early.
        """
        if attempt >= self.max_attempts:
            return None
        wait = retry_after_s if retry_after_s is not None else self.backoff(attempt)
        if wait >= remaining_s:
            return None
        return wait
