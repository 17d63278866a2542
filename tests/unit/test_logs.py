"""Log lines: the trace they were written in."""

from __future__ import annotations

import io
import json

import structlog
from opentelemetry.trace import format_span_id, format_trace_id

from threadline.config import TracingSettings
from threadline.logs import configure_logging, get_logger
from threadline.telemetry import tracing


def test_a_line_logged_inside_a_span_names_its_trace_and_one_outside_none() -> None:
    provider = tracing.install(TracingSettings(), "threadline-tests")
    assert provider is not None
    tracer = provider.get_tracer("test")
    out = io.StringIO()
    saved = structlog.get_config()
    configure_logging("info")
    # The configured chain, writing to a buffer instead of stdout.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=out))
    try:
        log = get_logger("test")
        with tracer.start_as_current_span("turn") as span:
            log.info("inside")
        log.info("outside")
    finally:
        structlog.configure(**saved)

    inside, outside = (json.loads(line) for line in out.getvalue().splitlines())
    context = span.get_span_context()
    assert inside["trace_id"] == format_trace_id(context.trace_id)
    assert inside["span_id"] == format_span_id(context.span_id)
    assert "trace_id" not in outside
