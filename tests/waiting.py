"""Waiting for a condition instead of sleeping a guessed time."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import TypeVar, overload

T = TypeVar("T")


@overload
async def eventually(
    probe: Callable[[], Awaitable[T | None]], *, timeout: float = ..., interval: float = ...
) -> T: ...


@overload
async def eventually(
    probe: Callable[[], T | None], *, timeout: float = ..., interval: float = ...
) -> T: ...


async def eventually(
    probe: Callable[[], object], *, timeout: float = 5.0, interval: float = 0.02
) -> object:
    """Poll `probe` (plain or async) until it returns something truthy, and return that.

    For state that changes without a signal to wait on (a probe returns None until
    the thing it looks for is there); raises TimeoutError after `timeout` seconds.
    """
    async with asyncio.timeout(timeout):
        while True:
            result = probe()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return result
            await asyncio.sleep(interval)
