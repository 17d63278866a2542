"""A streamed answer on a terminal, and taking it back when the answer restarts.

llm_proxy may discard an answer mid-stream (a rollback: the answer is asked for
again on another model server). On a terminal the text shown so far is erased
(cursor up over the rows it took, clear to the end of the screen) and the new
answer is drawn in its place; on a pipe or file nothing can be erased, so the new
answer starts on a line of its own.
"""

from __future__ import annotations

import shutil
from typing import TextIO


class AnswerDisplay:
    def __init__(self, out: TextIO, *, tty: bool | None = None, columns: int | None = None) -> None:
        self._out = out
        self._tty = out.isatty() if tty is None else tty
        self._columns = columns
        self._shown = ""

    def write(self, text: str) -> None:
        self._out.write(text)
        self._out.flush()
        self._shown += text

    def rollback(self) -> None:
        """Take back everything written since the answer started."""
        if self._tty:
            rows = self._rows(self._shown)
            up = f"\x1b[{rows - 1}A" if rows > 1 else ""
            self._out.write(f"\r{up}\x1b[J")
        elif self._shown:
            self._out.write("\n")
        self._out.flush()
        self._shown = ""

    def end(self) -> None:
        self._out.write("\n")
        self._out.flush()
        self._shown = ""

    def _rows(self, text: str) -> int:
        """Terminal rows `text` takes, written from the start of a row."""
        columns = self._columns or shutil.get_terminal_size().columns
        return sum(max(1, -(-len(line) // columns)) for line in text.split("\n"))
