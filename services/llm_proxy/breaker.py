"""Circuit breaker per upstream: stop sending to an upstream that keeps failing.

Closed: requests flow; `failure_threshold` consecutive failures open it.
Open: requests skip this upstream (fallbacks serve) until `cooldown_s` passes.
Half-open: one probe request goes through; success closes the circuit, failure
opens it again for another cooldown.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum


class CircuitState(Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass
class CircuitBreaker:
    failure_threshold: int = 5
    cooldown_s: float = 30.0
    clock: Callable[[], float] = time.monotonic
    state: CircuitState = CircuitState.CLOSED
    failures: int = 0
    opened_at: float = 0.0
    _probing: bool = field(default=False, repr=False)

    def allow(self) -> bool:
        """May a request go to this upstream now? In half-open, only one probe at a time."""
        if self.state is CircuitState.CLOSED:
            return True
        if self.state is CircuitState.OPEN:
            if self.clock() - self.opened_at < self.cooldown_s:
                return False
            self.state = CircuitState.HALF_OPEN
            self._probing = False
        if self._probing:
            return False
        self._probing = True
        return True

    def record_success(self) -> bool:
        """Returns True when this success closed an open circuit."""
        was_open = self.state is not CircuitState.CLOSED
        self.state = CircuitState.CLOSED
        self.failures = 0
        self._probing = False
        return was_open

    def record_failure(self) -> bool:
        """Returns True when this failure opened the circuit: the threshold reached, or
        the half-open probe failed (open again for another cooldown)."""
        self.failures += 1
        if self.state is CircuitState.HALF_OPEN or (
            self.state is CircuitState.CLOSED and self.failures >= self.failure_threshold
        ):
            self.state = CircuitState.OPEN
            self.opened_at = self.clock()
            self._probing = False
            return True
        return False

    def release_probe(self) -> None:
        """A probe that ended without a verdict (e.g. the caller went away)."""
        self._probing = False
