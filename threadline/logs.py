"""structlog JSON lines on stdout, one place for every service.

Context (rpc method, request id, tenant, session) is bound per RPC by the
server interceptor through structlog's contextvars, so every line logged while
serving a request carries it without passing loggers around. Every line logged
inside a span also carries its OpenTelemetry `trace_id` and `span_id`, the ids
a trace viewer finds the turn by.

Fields are bounded: a request field copied into the context, or any other
string a log call is handed, never writes more than its cap per line, however
large the request that carried it (a caller must not be able to fill the disk).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog
from opentelemetry import trace

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


#: Request ids, tenants, session ids and the like in the log context: a valid one is
#: far shorter, so anything longer is an abuse, kept only as a prefix.
MAX_ID_CHARS = 128
#: Any other string field of a log line (error texts, reasons).
MAX_FIELD_CHARS = 2048
#: Tracebacks: long, but not unbounded when an exception echoes its input.
MAX_TRACEBACK_CHARS = 16_384
_TRACEBACK_FIELDS = frozenset({"exception", "stack"})


def clip(value: str, limit: int = MAX_ID_CHARS) -> str:
    """`value`, or its first `limit` characters marked with the full length."""
    if len(value) <= limit:
        return value
    return f"{value[:limit]}...[truncated, {len(value)} chars]"


def _clip_fields(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key, value in event_dict.items():
        if isinstance(value, str):
            limit = MAX_TRACEBACK_CHARS if key in _TRACEBACK_FIELDS else MAX_FIELD_CHARS
            event_dict[key] = clip(value, limit)
    return event_dict


def _add_trace_ids(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        event_dict["trace_id"] = trace.format_trace_id(context.trace_id)
        event_dict["span_id"] = trace.format_span_id(context.span_id)
    return event_dict


def configure_logging(level: str = "info") -> None:
    """Idempotent: safe to call from every entry point (and from tests)."""
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            _add_trace_ids,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            _clip_fields,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stdout),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str, **bound: Any) -> structlog.typing.FilteringBoundLogger:
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger(logger_name=name, **bound)
    return logger
