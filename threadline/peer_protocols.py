"""What services read from each other, as Protocols the clients in threadline.peers satisfy.

Domain modules type against Protocols so that they never import grpc. A Protocol
more than one service needs lives here once; each service composes the rest of
what it needs on top (services/executor/turns/peers.py, services/memory/sessions.py).
"""

from __future__ import annotations

from typing import Protocol

from threadline.v1 import session_pb2


class SessionGetter(Protocol):
    """A session's record, optionally with its log (from a seq on) and a chain check."""

    async def get(
        self,
        tenant: str,
        session_id: str,
        *,
        include_messages: bool = ...,
        verify_chain: bool = ...,
        from_seq: int = ...,
    ) -> session_pb2.SessionDetail: ...
