"""Stopping a background task that talks to Redis.

`task.cancel(); await task` is not enough with the Redis client threadline uses
(redis-py 8 on Python 3.11): a cancellation that lands while the client closes
a connection is swallowed, the command is retried and the task goes on, so the
`await` never returns (measured: 4 hangs in the first 10 of 2,000 cancels of a
loop of EVAL calls; `tests/unit/test_cancellation.py`). A lease then renews
itself forever, a job's delivery stays claimed, a shutdown hangs.

So every such loop also checks a stop flag of its own between commands, and
`cancel_and_wait` cancels again until the task ends, waiting boundedly: a task
that swallowed every cancel ends at its next check of its flag.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from threadline.logs import get_logger

log = get_logger(__name__)

#: How long to wait for a cancelled task before cancelling it again.
_RECANCEL_S = 0.1


async def cancel_and_wait(task: asyncio.Future[Any], patience_s: float = 2.0) -> bool:
    """Cancel `task` and wait up to `patience_s` for it to end, cancelling it again
    if it carries on; True if it ended. Its result or exception is dropped."""
    deadline = asyncio.get_running_loop().time() + patience_s
    while not task.done():
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            name = task.get_name() if isinstance(task, asyncio.Task) else repr(task)
            log.warning("task.cancel_ignored", task=name, patience_s=patience_s)
            return False
        task.cancel()
        await asyncio.wait([task], timeout=min(_RECANCEL_S, left))
    with contextlib.suppress(asyncio.CancelledError, Exception):
        task.result()
    return True
