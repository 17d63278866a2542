"""Identifier formats shared by every service (and checked at the edge)."""

from __future__ import annotations

import re
import uuid

from threadline.errors import InvalidArgument

_SESSION_ID = re.compile(r"ses_[0-9a-f]{32}")
_MEMORY_JOB_ID = re.compile(r"job_[0-9a-f]{32}")
_TASK_ID = re.compile(r"task_[0-9a-f]{32}")


def new_session_id() -> str:
    return "ses_" + uuid.uuid4().hex


def new_message_id() -> str:
    return "msg_" + uuid.uuid4().hex


def validate_session_id(session_id: str) -> None:
    """Session ids are `ses_` followed by 32 lowercase hex characters."""
    if not session_id:
        raise InvalidArgument("session_id is required")
    if _SESSION_ID.fullmatch(session_id) is None:
        shown = session_id if len(session_id) <= 80 else session_id[:80] + "..."
        raise InvalidArgument(
            f"malformed session id {shown!r}: expected 'ses_' followed by 32 lowercase hex "
            "characters"
        )


def _validate_shaped(field: str, value: str, shape: re.Pattern[str], prefix: str) -> None:
    # The value is not echoed: a malformed id can be any size, and a valid one is short.
    if not value:
        raise InvalidArgument(f"{field} is required")
    if shape.fullmatch(value) is None:
        raise InvalidArgument(
            f"malformed {field.replace('_', ' ')} ({len(value)} characters): {field} must be "
            f"{prefix!r} followed by 32 lowercase hex characters"
        )


def validate_memory_job_id(job_id: str) -> None:
    """Memory job ids are `job_` followed by 32 lowercase hex characters."""
    _validate_shaped("job_id", job_id, _MEMORY_JOB_ID, "job_")


def validate_task_id(task_id: str) -> None:
    """Executor task ids are `task_` followed by 32 lowercase hex characters."""
    _validate_shaped("task_id", task_id, _TASK_ID, "task_")
