"""Calibrations: a settled ratio is not written again on every turn, and another
replica's calibration is seen once the cached one is older than its TTL."""

from __future__ import annotations

from pathlib import Path

from services.session.calibration import Calibrations
from services.session.sqlite_store import SqliteSessionStore


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_a_ratio_that_barely_moves_is_not_written_but_one_that_moves_is(
    tmp_path: Path,
) -> None:
    async with SqliteSessionStore(tmp_path / "sessions.db") as store:
        calibrations = Calibrations(store, clock=Clock())
        assert await calibrations.measured("m", 4000, 1000) == 4.0
        assert await store.calibration("m") == 4.0
        # 4.004 measured: the smoothed ratio moves by 0.02 %, below min_change.
        nudged = await calibrations.measured("m", 4004, 1000)
        assert 4.0 < nudged < 4.001
        assert await store.calibration("m") == 4.0
        assert await calibrations.ratio("m") == nudged
        # A prompt in another language moves it for real: stored at once.
        moved = await calibrations.measured("m", 3000, 1000)
        assert moved < 3.9
        assert await store.calibration("m") == moved


async def test_another_replicas_calibration_is_seen_after_the_ttl(tmp_path: Path) -> None:
    async with SqliteSessionStore(tmp_path / "sessions.db") as store:
        clock = Clock()
        here = Calibrations(store, ttl_s=10, clock=clock)
        assert await here.ratio("m") is None
        await store.set_calibration("m", 3.5)  # written by another replica
        clock.now = 5
        assert await here.ratio("m") is None
        clock.now = 11
        assert await here.ratio("m") == 3.5
