"""What memory's jobs need of the session service, as Protocols.

`threadline.peers.SessionClient` satisfies both; domain modules type against
these so that they never import grpc, and tests can hand them a fake.
"""

from __future__ import annotations

from typing import Protocol

from threadline.peer_protocols import SessionGetter
from threadline.v1 import common_pb2, session_pb2


class SessionReader(SessionGetter, Protocol):
    """Reads: a session (optionally with its log) and the log from a seq on."""

    async def messages_from(
        self, tenant: str, session_id: str, from_seq: int
    ) -> list[common_pb2.Message]: ...


class SessionWriter(SessionReader, Protocol):
    """Reads, and the new session compaction moves a conversation to."""

    async def create(self, request: session_pb2.SessionsCreateRequest) -> session_pb2.Session: ...
