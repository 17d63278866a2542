"""Bounds on the strings the public API accepts, checked before anything is called.

A field past its bound costs the caller a short INVALID_ARGUMENT that names the
field and its limit, and the value is never echoed (it may be megabytes). Rules
that belong to the service keeping the data are checked there instead: a
session's title and metadata (session), a turn's options (executor), a task's
prompt and agent type (executor), a message's content (session).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from threadline.errors import InvalidArgument

#: Route aliases and model names are configuration: short.
MAX_MODEL_CHARS = 128
MAX_AGENT_TYPE_CHARS = 64
#: The task workspace's own rule is a plain directory name of at most 128 characters.
MAX_WORKSPACE_CHARS = 128
MAX_STATUS_CHARS = 32
#: Page tokens the session service hands out are well under 100 characters.
MAX_PAGE_TOKEN_CHARS = 256
MAX_EVENT_PATTERNS = 32
#: Tenant names come from configuration (gateway.api_keys): short.
MAX_TENANT_CHARS = 128
MAX_EVENT_PATTERN_CHARS = 128

#: Message hashes of the session chain: sha256, hex.
_HASH = re.compile(r"[0-9a-f]{64}")


def check_length(field: str, value: str, limit: int) -> None:
    if len(value) > limit:
        raise InvalidArgument(f"{field} is {len(value)} characters; the limit is {limit}")


def check_at_hash(at_hash: str) -> None:
    """Empty (the session's start) or a message hash."""
    if at_hash and _HASH.fullmatch(at_hash) is None:
        raise InvalidArgument(
            f"malformed at_hash ({len(at_hash)} characters): expected a message's hash, "
            "64 lowercase hex characters, or empty"
        )


def check_event_patterns(patterns: Sequence[str]) -> None:
    if len(patterns) > MAX_EVENT_PATTERNS:
        raise InvalidArgument(
            f"types has {len(patterns)} patterns; the limit is {MAX_EVENT_PATTERNS}"
        )
    for i, pattern in enumerate(patterns):
        check_length(f"types[{i}]", pattern, MAX_EVENT_PATTERN_CHARS)
