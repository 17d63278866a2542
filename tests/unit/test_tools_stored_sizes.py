"""What a tool round stores when a call or a result is longer than a session message may be."""

from __future__ import annotations

import json

import pytest

from services.executor.turns.tool_round import fit_arguments, fit_text


def test_the_longest_argument_gives_way_and_the_others_stay() -> None:
    arguments = json.dumps({"path": "notes/big.txt", "content": "é" * 5000})

    stored = fit_arguments(arguments, 1000)

    assert len(stored) <= 1000
    assert json.loads(stored) == {
        "path": "notes/big.txt",
        "content": "[5000 characters, not stored]",
    }


def test_arguments_that_are_not_json_become_a_stub() -> None:
    stored = fit_arguments('{"path": "a.txt", "content": "' + "x" * 5000, 1000)

    assert json.loads(stored) == {"not_stored": "arguments of 5030 characters"}


@pytest.mark.parametrize("length", [101, 150, 999, 100_000])
def test_a_cut_text_never_passes_the_limit_and_says_how_much_went(length: int) -> None:
    text = "y" * length

    stored = fit_text(text, 100)

    assert len(stored) <= 100
    kept = stored.index("\n")
    assert stored.endswith(
        f"[... cut: {length - kept} characters left out; the conversation keeps 100 per message]"
    )
