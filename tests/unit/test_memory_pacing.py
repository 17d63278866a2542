"""Background jobs rest after each step, in proportion, while turns run.

Time is a fake clock that moves only when a test says so (a step's work) or a
rest is taken: nothing here waits.
"""

from __future__ import annotations

import asyncio

import pytest

from services.memory.pacing import Pacer, TurnActivity, work_timeout


class FakeClock:
    """A monotonic clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def recording(
    duty_cycle: float, busy: bool = True, max_rest_s: float = 10.0
) -> tuple[Pacer, FakeClock, list[float]]:
    """A pacer on a fake clock whose rests are recorded, and pass on that clock."""
    clock = FakeClock()
    rests: list[float] = []

    async def rest(seconds: float) -> None:
        rests.append(seconds)
        clock.advance(seconds)

    pacer = Pacer(duty_cycle, max_rest_s, busy=lambda: busy, sleep=rest, clock=clock)
    return pacer, clock, rests


async def test_half_duty_rests_as_long_as_the_step_took() -> None:
    pacer, clock, rests = recording(0.5)
    paced = pacer.begin()
    clock.advance(0.05)  # the step's work

    await paced.rest()

    assert rests == [pytest.approx(0.05)]


async def test_a_tenth_duty_rests_nine_times_as_long() -> None:
    pacer, clock, rests = recording(0.1)
    paced = pacer.begin()
    clock.advance(0.05)

    await paced.rest()

    assert rests == [pytest.approx(0.45)]


async def test_each_rest_counts_only_the_work_since_the_last_one() -> None:
    pacer, clock, rests = recording(0.5)
    paced = pacer.begin()
    clock.advance(0.08)
    await paced.rest()  # the rest itself (0.08 s on the clock) is not work
    clock.advance(0.02)

    await paced.rest()

    assert rests == [pytest.approx(0.08), pytest.approx(0.02)]


async def test_one_rest_is_never_longer_than_the_cap() -> None:
    pacer, clock, rests = recording(0.1, max_rest_s=0.2)
    paced = pacer.begin()
    clock.advance(0.05)

    await paced.rest()

    assert rests == [0.2]


async def test_full_duty_never_rests() -> None:
    pacer, clock, rests = recording(1.0)
    paced = pacer.begin()
    clock.advance(0.01)

    await paced.rest()

    assert rests == []


async def test_without_turns_running_a_job_never_rests() -> None:
    pacer, clock, rests = recording(0.1, busy=False)
    paced = pacer.begin()
    clock.advance(0.02)

    await paced.rest()

    assert rests == []


async def test_work_done_while_no_turn_ran_is_not_rested_for_later() -> None:
    busy = False
    clock = FakeClock()
    rests: list[float] = []

    async def rest(seconds: float) -> None:
        rests.append(seconds)

    paced = Pacer(0.5, busy=lambda: busy, sleep=rest, clock=clock).begin()
    clock.advance(0.5)
    await paced.rest()  # quiet: no rest, but the step is behind us
    busy = True
    clock.advance(0.1)

    await paced.rest()

    assert rests == [pytest.approx(0.1)]


def test_turns_count_as_running_for_a_while_after_the_last_one() -> None:
    clock = FakeClock()
    turns = TurnActivity(quiet_after_s=5.0, clock=clock)
    assert not turns.busy()

    turns.seen()
    assert turns.busy()

    clock.advance(4.9)
    assert turns.busy()

    clock.advance(0.2)
    assert not turns.busy()


async def test_rests_do_not_count_towards_the_job_timeout() -> None:
    pacer, clock, rests = recording(0.25)
    paced = pacer.begin()

    async with work_timeout(60.0) as timeout:
        deadline = timeout.when()
        assert deadline is not None
        clock.advance(1.0)
        await paced.rest()

        assert rests == [pytest.approx(3.0)]
        assert timeout.when() == pytest.approx(deadline + 3.0)


async def test_work_past_the_timeout_still_times_out() -> None:
    pacer, _, rests = recording(0.25)
    paced = pacer.begin()

    with pytest.raises(TimeoutError):
        async with work_timeout(0.0):  # already due
            await paced.rest()  # no work since the job began: pushed back by 0 s
            await asyncio.Event().wait()  # hung work

    assert rests == [0.0]
