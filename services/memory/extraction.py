"""Extraction: structured facts from the messages since the extract pointer.

The model answers in JSON (json_object) with decisions, discussions, attempts
and requests. The answer is validated; a malformed one is asked for once more
with the problem named, then the job fails and the pointer stays. Items are
stored with their source range; an item found again merges into the stored one.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, ValidationError

from services.memory import transcript
from services.memory.consolidation import JobResult, Summariser
from services.memory.pacing import Pacer
from services.memory.sessions import SessionReader
from services.memory.store import Item, MemoryStore
from threadline import errors
from threadline.v1 import common_pb2, llm_pb2

EXTRACTION_INSTRUCTIONS = """\
You extract structured facts from a conversation. Answer with one JSON object and \
nothing else, with these keys (each a list, empty when nothing fits):
"decisions": [{"options": [string], "chosen": string, "rationale": string}],
"discussions": [{"topic": string, "points": [string]}],
"attempts": [{"action": string, "result": string, "succeeded": boolean}],
"requests": [{"intent": string, "target": string, "summary": string}]"""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True)


class Decision(_Strict):
    options: list[str] = []
    chosen: str
    rationale: str = ""


class Discussion(_Strict):
    topic: str
    points: list[str] = []


class Attempt(_Strict):
    action: str
    result: str = ""
    succeeded: bool


class Request(_Strict):
    intent: str
    target: str = ""
    summary: str = ""


class Extraction(_Strict):
    decisions: list[Decision] = []
    discussions: list[Discussion] = []
    attempts: list[Attempt] = []
    requests: list[Request] = []


def parse(text: str) -> Extraction:
    """The model's answer as an Extraction; ValueError naming what is wrong."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    try:
        return Extraction.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5]
        )
        raise ValueError(problems) from None


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().casefold()


def items_of(extraction: Extraction, from_seq: int, to_seq: int) -> list[Item]:
    """One Item per fact, keyed so that the same fact found again has the same key."""
    found: list[tuple[str, str, BaseModel]] = []
    found += [("decision", _norm(d.chosen), d) for d in extraction.decisions]
    found += [("discussion", _norm(d.topic), d) for d in extraction.discussions]
    found += [("attempt", _norm(a.action), a) for a in extraction.attempts]
    found += [("request", _norm(f"{r.intent}|{r.target}"), r) for r in extraction.requests]
    return [
        Item(kind, key, value.model_dump_json(), from_seq, to_seq)
        for kind, key, value in found
        if key.strip("|")
    ]


def merge(old: Item, new: Item) -> Item:
    """The stored item updated by the same fact found again: newest wording, widest
    range, one more mention; a discussion keeps every point made."""
    data = json.loads(new.json)
    if new.kind == "discussion":
        points = json.loads(old.json).get("points", [])
        for point in data.get("points", []):
            if point not in points:
                points.append(point)
        data["points"] = points
    return Item(
        new.kind,
        new.key,
        json.dumps(data, ensure_ascii=False),
        min(old.from_seq, new.from_seq),
        max(old.to_seq, new.to_seq),
        old.mentions + 1,
    )


def merge_all(stored: Sequence[Item], found: Sequence[Item]) -> list[Item]:
    by_key = {(i.kind, i.key): i for i in stored}
    changed: dict[tuple[str, str], Item] = {}
    for item in found:
        key = (item.kind, item.key)
        previous = changed.get(key) or by_key.get(key)
        changed[key] = merge(previous, item) if previous else item
    return list(changed.values())


@dataclass
class Extractor:
    store: MemoryStore
    sessions: SessionReader
    llm: Summariser
    model: str
    max_output_tokens: int
    window_tokens: int
    #: Rests between chunks while turns run (see pacing).
    pacer: Pacer = field(default_factory=Pacer)

    async def pending(self, tenant: str, session_id: str) -> list[common_pb2.Message]:
        memory = await self.store.get(tenant, session_id)
        messages = await self.sessions.messages_from(tenant, session_id, memory.extract_offset)
        return messages[: transcript.turn_boundary(messages)]

    async def run(self, tenant: str, session_id: str, model: str, result: JobResult) -> None:
        paced = self.pacer.begin()
        span = await self.pending(tenant, session_id)
        if not span:
            result.offset = (await self.store.get(tenant, session_id)).extract_offset
            result.skipped = "nothing new to extract from"
            return
        budget = max(
            self.window_tokens
            - self.max_output_tokens
            - transcript.tokens_of_text(EXTRACTION_INSTRUCTIONS)
            - 64,
            self.window_tokens // 4,
        )
        for chunk in transcript.chunks(span, budget):
            extraction = await self._extract(
                tenant, session_id, chunk, budget * transcript.CHARS_PER_TOKEN, model, result
            )
            found = items_of(extraction, chunk[0].seq, chunk[-1].seq)
            merged = merge_all(await self.store.items(tenant, session_id), found)
            result.offset = chunk[-1].seq + 1
            await self.store.save_items(tenant, session_id, merged, next_pointer=result.offset)
            result.items += len(found)
            await paced.rest()

    async def _extract(
        self,
        tenant: str,
        session_id: str,
        chunk: Sequence[common_pb2.Message],
        max_chars: int,
        model: str,
        result: JobResult,
    ) -> Extraction:
        messages = [
            common_pb2.Message(role=common_pb2.ROLE_SYSTEM, content=EXTRACTION_INSTRUCTIONS),
            common_pb2.Message(
                role=common_pb2.ROLE_USER,
                content="Conversation:\n" + transcript.render(chunk, max_chars),
            ),
        ]
        problem = ""
        for attempt in range(2):
            request = llm_pb2.ChatRequest(
                model=model or self.model,
                messages=messages,
                max_tokens=self.max_output_tokens,
                response_format=llm_pb2.RESPONSE_FORMAT_JSON_OBJECT,
                tenant=tenant,
                session_id=session_id,
            )
            response = await self.llm.chat(request)
            result.add_usage(response.done.usage)
            text = response.message.content
            try:
                if response.done.finish_reason == common_pb2.FINISH_REASON_INTERRUPTED:
                    raise ValueError(f"the answer was cut: {response.done.error}")
                return parse(text)
            except ValueError as exc:
                problem = str(exc)
            if attempt == 0:
                messages.append(common_pb2.Message(role=common_pb2.ROLE_ASSISTANT, content=text))
                messages.append(
                    common_pb2.Message(
                        role=common_pb2.ROLE_USER,
                        content=f"That answer is not valid ({problem}). Answer again with "
                        "the JSON object only, exactly as described.",
                    )
                )
        raise errors.Unavailable(f"the model's extraction was malformed twice: {problem}")
