"""Per-model characters-per-token ratios, read and written through a small cache.

Every turn reads its model's ratio (BuildContext) and reports one measurement
(Calibrate). The ratio is smoothed and settles within a few turns, so a store
read and a store write per turn mostly returned and wrote the same number: the
ratio is kept here for `ttl_s` (another replica's calibration is seen after at
most that long) and written only when it moved by more than `min_change`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from services.session.store import SessionStore
from services.session.tokens import calibrated_ratio

#: A ratio this close (relative) to the stored one is not written again.
MIN_CHANGE = 0.002


@dataclass
class Calibrations:
    store: SessionStore
    ttl_s: float = 10.0
    min_change: float = MIN_CHANGE
    clock: Callable[[], float] = time.monotonic
    #: model -> (the ratio as last known, the ratio as stored, when it was read).
    _known: dict[str, tuple[float | None, float | None, float]] = field(default_factory=dict)

    async def ratio(self, model: str) -> float | None:
        known = self._known.get(model)
        if known is not None and self.clock() - known[2] < self.ttl_s:
            return known[0]
        stored = await self.store.calibration(model)
        self._known[model] = (stored, stored, self.clock())
        return stored

    async def measured(self, model: str, prompt_chars: int, prompt_tokens: int) -> float:
        """The model's ratio after one more measured prompt (stored when it moved)."""
        previous = await self.ratio(model)
        ratio = calibrated_ratio(previous, prompt_chars, prompt_tokens)
        stored, read_at = self._known[model][1:]
        if stored is None or abs(ratio - stored) > self.min_change * stored:
            await self.store.set_calibration(model, ratio)
            stored = ratio
        self._known[model] = (ratio, stored, read_at)
        return ratio
