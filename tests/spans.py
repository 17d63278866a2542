"""Finished spans of this test process, in memory (the SDK's InMemorySpanExporter).

The tracer provider is process-wide and set once (threadline.telemetry.tracing), so
the recorder is added to it once and records only while a test holds the `spans`
fixture: other tests' spans are not kept.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import pytest
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from threadline.config import TracingSettings
from threadline.telemetry import tracing


class _Recorder(SpanProcessor):
    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self._export = SimpleSpanProcessor(self.exporter)
        self.recording = False

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        return None

    def on_end(self, span: ReadableSpan) -> None:
        if self.recording:
            self._export.on_end(span)


_recorder: _Recorder | None = None


def _installed() -> _Recorder:
    global _recorder
    if _recorder is None:
        _recorder = _Recorder()
        tracing.install(TracingSettings(), "threadline-tests")
        tracing.add_processor(_recorder)
    return _recorder


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    recorder = _installed()
    recorder.exporter.clear()
    recorder.recording = True
    yield recorder.exporter
    recorder.recording = False
    recorder.exporter.clear()


def named(finished: Sequence[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [span for span in finished if span.name == name]
