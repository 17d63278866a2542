"""Incremental Server-Sent Events parser: feed bytes as they arrive, get event data.

Follows the WHATWG event-stream rules that matter for chat streams: lines end in
LF, CR or CRLF (even split across reads); `:` lines are comments (keep-alives);
several `data:` lines join with newlines; a blank line ends an event. At the end
of the stream an unterminated event is still delivered: servers that close
without a final blank line (or without `[DONE]`) lose nothing.
"""

from __future__ import annotations

import codecs


class SseParser:
    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[str]:
        """The data of every event that `chunk` completes, in order."""
        text = self._pending + self._decoder.decode(chunk)
        # A trailing CR may be the first half of a CRLF split across reads.
        hold_cr = text.endswith("\r")
        if hold_cr:
            text = text[:-1]
        lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        self._pending = lines.pop() + ("\r" if hold_cr else "")
        return self._lines(lines)

    def finish(self) -> list[str]:
        """End of stream: whatever event was still open."""
        tail = self._pending + self._decoder.decode(b"", final=True)
        self._pending = ""
        events = self._lines(tail.replace("\r\n", "\n").replace("\r", "\n").split("\n"))
        if self._data:
            events.append("\n".join(self._data))
            self._data = []
        return events

    def _lines(self, lines: list[str]) -> list[str]:
        events: list[str] = []
        for line in lines:
            if not line:
                if self._data:
                    events.append("\n".join(self._data))
                    self._data = []
                continue
            if line.startswith(":"):
                continue
            field, _, value = line.partition(":")
            if field == "data":
                self._data.append(value[1:] if value.startswith(" ") else value)
        return events
