"""Recall: the summary plus the most relevant extracted items, within a token budget.

Items are ranked by how many words they share with the query (the user's new
input), then by how often they were found, then by how recent they are. The
summary comes first; items follow while they fit.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

from services.memory import transcript
from services.memory.store import Item

_WORD = re.compile(r"\w{3,}")
_SUMMARY_HEADING = "Summary of the conversation so far:\n"
_ITEMS_HEADING = "Known from earlier in the conversation:"


def _words(text: str) -> set[str]:
    return {w.casefold() for w in _WORD.findall(text)}


def describe(item: Item) -> str:
    """One line for the prompt."""
    data = json.loads(item.json)
    if item.kind == "decision":
        options = ", ".join(data.get("options", []))
        why = f" because {data['rationale']}" if data.get("rationale") else ""
        among = f" (options: {options})" if options else ""
        return f"Decision: {data['chosen']}{among}{why}"
    if item.kind == "discussion":
        return f"Discussed {data['topic']}: " + "; ".join(data.get("points", []))
    if item.kind == "attempt":
        outcome = "worked" if data.get("succeeded") else "failed"
        return f"Tried {data['action']}: {outcome}" + (
            f" ({data['result']})" if data.get("result") else ""
        )
    target = f" {data['target']}" if data.get("target") else ""
    return f"Request: {data['intent']}{target}" + (
        f": {data['summary']}" if data.get("summary") else ""
    )


@dataclass(frozen=True)
class Recalled:
    summary: str
    items: list[Item]
    context: str


def recall(summary: str, items: Sequence[Item], query: str, budget_tokens: int) -> Recalled:
    query_words = _words(query)

    def rank(pair: tuple[int, Item]) -> tuple[int, int, int]:
        position, item = pair
        overlap = len(query_words & _words(describe(item))) if query_words else 0
        # Stored newest first: a lower position is more recent.
        return (-overlap, -item.mentions, position)

    used = 0
    if summary:
        used = transcript.tokens_of_text(_SUMMARY_HEADING + summary)
        if used > budget_tokens:
            # The summary alone is over budget: keep its end, the most recent part.
            keep = max(budget_tokens - transcript.tokens_of_text(_SUMMARY_HEADING), 0)
            summary = summary[len(summary) - keep * transcript.CHARS_PER_TOKEN :] if keep else ""
            used = transcript.tokens_of_text(_SUMMARY_HEADING + summary) if summary else 0
    chosen: list[Item] = []
    lines: list[str] = []
    for _, item in sorted(enumerate(items), key=rank):
        text = "\n- " + describe(item)
        cost = transcript.tokens_of_text(text) + (
            0 if lines else transcript.tokens_of_text(_ITEMS_HEADING + "\n\n")
        )
        if used + cost > budget_tokens:
            continue
        used += cost
        chosen.append(item)
        lines.append(text)
    parts = []
    if summary:
        parts.append(_SUMMARY_HEADING + summary)
    if lines:
        parts.append(_ITEMS_HEADING + "".join(lines))
    return Recalled(summary, chosen, "\n\n".join(parts))
