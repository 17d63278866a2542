"""Background tasks: the record a task leaves behind, and what a runner promises.

A task is submitted by another service ("review this repository"), waits in the
pool's queue, runs on one runner (`local`: the agent loop; `command`: an
external CLI agent) and ends in one terminal status. The record is what the
store keeps, so a task outlives the executor process that ran it.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, Protocol

TaskStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
TASK_STATUSES: frozenset[str] = frozenset({"queued", "running", "succeeded", "failed", "cancelled"})
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})


#: How many tasks one list returns when the caller names no limit, and at most.
LIST_LIMIT_DEFAULT = 50
LIST_LIMIT_MAX = 500
_TASK_ID = re.compile(r"task_[0-9a-f]{32}")


def new_task_id() -> str:
    return "task_" + uuid.uuid4().hex


def is_task_id(value: str) -> bool:
    """Shaped like an id new_task_id makes (checked before it reaches a store)."""
    return _TASK_ID.fullmatch(value) is not None


@dataclass
class TaskRecord:
    id: str
    tenant: str
    prompt: str
    agent_type: str
    runner: str
    workspace: str
    status: TaskStatus = "queued"
    #: Why it failed or was cancelled; while queued, the classifier's reasons.
    reason: str = ""
    model: str = ""
    tokens_in: int = 0
    tokens_out: int = 0
    cost: float = 0.0
    #: 0 = unlimited.
    budget_tokens: int = 0
    exit_code: int | None = None
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    #: The executor replica that queued or runs it ("" for records from before replicas).
    owner: str = ""
    #: When a replica that does not run it asked its owner to cancel it.
    cancel_requested_at: float | None = None

    @property
    def duration_s(self) -> float | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return max(0.0, self.finished_at - self.started_at)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskRecord:
        """The inverse of to_dict; unknown keys (from a newer build) are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class RunOutcome:
    status: Literal["succeeded", "failed"]
    reason: str = ""
    model: str = ""
    tokens_in: int = 0
    tokens_out: int = 0
    exit_code: int | None = None
    #: What ended it, as the name of a rule ("exit_code", "budget", ...): what events
    #: carry. `reason` may quote the model or the command's output; it stays with the
    #: task's record.
    cause: str = ""


#: Appends one stream-json object to the task's output log.
LogWriter = Callable[[dict[str, Any]], Awaitable[None]]


class Runner(Protocol):
    name: str

    async def run(self, task: TaskRecord, log: LogWriter) -> RunOutcome:
        """Run the task to an outcome.

        Cancellation arrives as asyncio.CancelledError: the runner cleans up (kills
        its processes) and re-raises it.
        """
        ...
