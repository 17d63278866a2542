"""When each memory job is due. A threshold of 0 disables its trigger."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from services.memory import transcript
from services.memory.store import Activity, SessionMemory
from threadline.v1 import common_pb2


@dataclass(frozen=True)
class Thresholds:
    #: Fraction of the context window of unconsolidated tokens.
    consolidate_fraction: float
    #: Tokens since the extract pointer.
    extract_threshold: int
    #: Fraction of the context window of the last reported prompt.
    compact_threshold: float


def unconsolidated_tokens(memory: SessionMemory, messages: Sequence[common_pb2.Message]) -> int:
    span = [m for m in messages if m.seq >= memory.offset]
    return transcript.total_tokens(span[: transcript.turn_boundary(span)])


def unextracted_tokens(memory: SessionMemory, messages: Sequence[common_pb2.Message]) -> int:
    span = [m for m in messages if m.seq >= memory.extract_offset]
    return transcript.total_tokens(span[: transcript.turn_boundary(span)])


def consolidation_due(
    thresholds: Thresholds,
    memory: SessionMemory,
    messages: Sequence[common_pb2.Message],
    context_window: int,
) -> bool:
    if thresholds.consolidate_fraction <= 0 or context_window <= 0:
        return False
    limit = thresholds.consolidate_fraction * context_window
    return unconsolidated_tokens(memory, messages) >= limit


def extraction_due(
    thresholds: Thresholds, memory: SessionMemory, messages: Sequence[common_pb2.Message]
) -> bool:
    if thresholds.extract_threshold <= 0:
        return False
    return unextracted_tokens(memory, messages) >= thresholds.extract_threshold


def compaction_due(thresholds: Thresholds, activity: Activity | None) -> bool:
    """Pre-run: the prompt the model server counted for the last turn passed the threshold."""
    if thresholds.compact_threshold <= 0 or activity is None or activity.context_window <= 0:
        return False
    return activity.prompt_tokens >= thresholds.compact_threshold * activity.context_window
