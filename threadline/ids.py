"""Identifier formats shared by every service (and checked at the edge)."""

from __future__ import annotations

import re
import uuid

from threadline.errors import InvalidArgument

_SESSION_ID = re.compile(r"ses_[0-9a-f]{32}")


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
