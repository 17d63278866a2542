"""The one mapping between domain errors and gRPC statuses, in both directions.

Servers: `abort_with(context, error)` ends an RPC with the error's code, its
message and rich details (google.rpc.ErrorInfo, RetryInfo) via grpcio-status.
Clients: `from_rpc_error(error)` turns a received status back into the typed
domain error, details included, so a caller in another service can `except
HeadMismatch` exactly as if the call had been local.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import grpc
import grpc.aio
import redis.exceptions
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from threadline import errors

_DOMAIN = "threadline.dev"


def _all_error_classes() -> dict[str, type[errors.ThreadlineError]]:
    found: dict[str, type[errors.ThreadlineError]] = {}
    pending: list[type[errors.ThreadlineError]] = [errors.ThreadlineError]
    while pending:
        cls = pending.pop()
        found[cls.__name__] = cls
        pending.extend(cls.__subclasses__())
    return found


#: An error's text travels twice in the response headers (grpc-message, and the rich
#: status in grpc-status-details-bin); past gRPC's 8 KiB header limit the caller
#: would get RESOURCE_EXHAUSTED instead. Messages that echo a caller's input are
#: bounded where they are built; this holds for every message, in UTF-8 bytes
#: (grpc-message percent-encodes each non-ASCII byte as three).
MAX_MESSAGE_BYTES = 1024
MAX_DETAIL_BYTES = 256


def _clip_utf8(text: str, limit: int) -> str:
    encoded = text.encode("utf-8")
    if len(encoded) <= limit:
        return text
    kept = encoded[:limit].decode("utf-8", errors="ignore")
    return f"{kept}...[truncated, {len(text)} chars]"


def to_status(error: errors.ThreadlineError) -> grpc.Status:
    code = grpc.StatusCode[error.code]
    metadata = {
        _clip_utf8(key, MAX_DETAIL_BYTES): _clip_utf8(value, MAX_DETAIL_BYTES)
        for key, value in error.details.items()
    }
    info = error_details_pb2.ErrorInfo(
        reason=type(error).__name__, domain=_DOMAIN, metadata=metadata
    )
    details = [_pack(info)]
    if isinstance(error, errors.Retryable) and error.retry_after_s is not None:
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(int(error.retry_after_s * 1000))
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    message = _clip_utf8(error.message, MAX_MESSAGE_BYTES)
    status = status_pb2.Status(code=code.value[0], message=message, details=details)
    converted = rpc_status.to_status(status)
    return _Status(code, converted.details, (*converted.trailing_metadata, _NO_RETRY))


#: Callers' channels repeat some calls on UNAVAILABLE (threadline/channels.py), for
#: a replica that died or could not be reached. An error a threadline server
#: returns is an answer, not a lost call: it tells gRPC not to repeat it (a
#: negative pushback), and the caller decides from its RetryInfo.
_NO_RETRY = ("grpc-retry-pushback-ms", "-1")


@dataclass(frozen=True)
class _Status(grpc.Status):
    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...]


#: What a caller is told to wait when a shared store was unreachable for the whole
#: retry window of its client (threadline.redis_client).
_STORE_RETRY_AFTER_S = 1.0


def domain_error(exc: Exception) -> errors.ThreadlineError | None:
    """The domain error an infrastructure failure means to a caller, if it is one.

    Redis unreachable after its client's retries is an outage to wait out, not a
    bug: UNAVAILABLE with RetryInfo, and no address in the message.
    """
    if isinstance(exc, errors.ThreadlineError):
        return exc
    if isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
        return errors.Unavailable(
            "a shared store (Redis) is unreachable; retry shortly",
            retry_after_s=_STORE_RETRY_AFTER_S,
            details={"reason": "redis_unavailable"},
        )
    return None


def _pack(message: error_details_pb2.ErrorInfo | error_details_pb2.RetryInfo) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


async def abort_with(
    context: grpc.aio.ServicerContext[object, object], error: errors.ThreadlineError
) -> None:
    status = to_status(error)
    await context.abort(status.code, status.details, status.trailing_metadata)


def from_rpc_error(error: grpc.aio.AioRpcError) -> errors.ThreadlineError:
    """The typed domain error for a failed call (INTERNAL for unknown codes)."""
    code = error.code()
    message = error.details() or code.name
    reason = ""
    metadata: dict[str, str] = {}
    retry_after: float | None = None
    # gRPC's own texts (a replica down, a connection refused) name peer addresses, and
    # so can a peer's (a store it could not reach): callers, the gateway's outside
    # callers last of all, must not see them.
    message = _ADDRESS.sub("<address>", message)
    status = _rich_status(error)
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason, metadata = info.reason, dict(info.metadata)
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                detail.Unpack(retry)
                retry_after = retry.retry_delay.ToMilliseconds() / 1000
    classes = _all_error_classes()
    cls = classes.get(reason)
    if cls is errors.HeadMismatch:
        return errors.HeadMismatch(
            metadata.get("session_id", ""),
            metadata.get("expected_head", ""),
            metadata.get("current_head", ""),
        )
    if cls is None or cls.code != code.name:
        cls = errors.BY_CODE.get(code.name, errors.Internal)
    if issubclass(cls, errors.Retryable):
        return cls(message, retry_after_s=retry_after, details=metadata)
    return cls(message, details=metadata)


#: Peer addresses in error texts: target URIs, IPv4, bracketed IPv6, and host:port
#: (a host name with a numeric port, as Redis and socket errors print it).
_ADDRESS = re.compile(
    r"\b(?:ipv4|ipv6|unix|dns):[^\s,;]+|\b\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?"
    # A colon inside the brackets: "messages[0]" is an index, not an address.
    r"|\[[0-9A-Fa-f.]*:[0-9A-Fa-f:.]*\](?::\d+)?"
    r"|\b[A-Za-z][A-Za-z0-9.-]*:\d{2,5}\b(?![.:]?\w)"
)


def _rich_status(error: grpc.aio.AioRpcError) -> status_pb2.Status | None:
    trailing = error.trailing_metadata() or ()
    for key, value in trailing:
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            status = status_pb2.Status()
            status.ParseFromString(value)
            return status
    return None
