"""Domain errors: one root class, one subclass per outcome a caller can act on.

Domain code raises these and never imports grpc; `threadline.status` is the one
place that maps them to gRPC status codes (and back, for clients).
"""

from __future__ import annotations

from collections.abc import Mapping


class ThreadlineError(Exception):
    """Root of every error threadline raises on purpose."""

    #: Name of the matching gRPC status code (grpc.StatusCode member name).
    code = "INTERNAL"

    def __init__(self, message: str, *, details: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        #: Machine-readable facts for the caller (sent as google.rpc.ErrorInfo metadata).
        self.details: dict[str, str] = dict(details or {})


class InvalidArgument(ThreadlineError):
    code = "INVALID_ARGUMENT"


class NotFound(ThreadlineError):
    code = "NOT_FOUND"


class AlreadyExists(ThreadlineError):
    code = "ALREADY_EXISTS"


class Aborted(ThreadlineError):
    """A conflict the caller may retry: session busy, or the head moved."""

    code = "ABORTED"


class HeadMismatch(Aborted):
    def __init__(self, session_id: str, expected: str, current: str) -> None:
        super().__init__(
            f"session {session_id} head moved: expected {expected or '(empty)'}, "
            f"current {current or '(empty)'}",
            details={"session_id": session_id, "current_head": current, "expected_head": expected},
        )
        self.current_head = current


class Retryable(ThreadlineError):
    """An error that may pass if the caller waits: it can say how long (RetryInfo)."""

    def __init__(
        self,
        message: str,
        *,
        retry_after_s: float | None = None,
        details: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, details=details)
        self.retry_after_s = retry_after_s


class ResourceExhausted(Retryable):
    code = "RESOURCE_EXHAUSTED"


class FailedPrecondition(ThreadlineError):
    code = "FAILED_PRECONDITION"


class Unavailable(Retryable):
    code = "UNAVAILABLE"


class Unauthenticated(ThreadlineError):
    code = "UNAUTHENTICATED"


class PermissionDenied(ThreadlineError):
    code = "PERMISSION_DENIED"


class DeadlineExceeded(ThreadlineError):
    code = "DEADLINE_EXCEEDED"


class DataLoss(ThreadlineError):
    code = "DATA_LOSS"


class Cancelled(ThreadlineError):
    code = "CANCELLED"


class Internal(ThreadlineError):
    code = "INTERNAL"


#: Every concrete class by its code, for mapping a received status back.
BY_CODE: dict[str, type[ThreadlineError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        Aborted,
        ResourceExhausted,
        FailedPrecondition,
        Unavailable,
        Unauthenticated,
        PermissionDenied,
        DeadlineExceeded,
        DataLoss,
        Cancelled,
        Internal,
    )
}
