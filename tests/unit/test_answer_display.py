"""`threadline chat` redraws an answer that llm_proxy rolled back."""

from __future__ import annotations

import io

from threadline.answer_display import AnswerDisplay


def test_on_a_terminal_the_rolled_back_text_is_erased_and_the_new_answer_replaces_it() -> None:
    out = io.StringIO()
    answer = AnswerDisplay(out, tty=True, columns=10)
    answer.write("Lyon sits where")  # 15 characters: two rows of 10 columns
    answer.rollback()
    answer.write("Lyon is on the Rhone.")
    answer.end()

    # Back to the start of the first row, clear to the end of the screen, redraw.
    assert out.getvalue() == "Lyon sits where\r\x1b[1A\x1b[JLyon is on the Rhone.\n"


def test_rows_follow_line_breaks_and_wrapping() -> None:
    out = io.StringIO()
    answer = AnswerDisplay(out, tty=True, columns=10)
    answer.write("one\n" + "x" * 25)  # 1 row, then 3 rows
    answer.rollback()

    assert out.getvalue().endswith("\r\x1b[3A\x1b[J")


def test_on_a_pipe_nothing_is_erased_and_the_new_answer_starts_on_its_own_line() -> None:
    out = io.StringIO()
    answer = AnswerDisplay(out)  # StringIO is not a terminal
    answer.write("Lyon sits where")
    answer.rollback()
    answer.write("Lyon is on the Rhone.")
    answer.end()

    assert out.getvalue() == "Lyon sits where\nLyon is on the Rhone.\n"
    assert "\x1b" not in out.getvalue()
