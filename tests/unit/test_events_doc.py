"""docs/events.md documents every event type and attribute the code publishes.

The code is read, not run: every `emit("<type>", ..., name=...)` call (and the
`_emit` helpers that add `upstream` and `model`) names its type and attributes,
so an attribute added to an event without a line in docs/events.md fails here.
Calls whose type is computed (the memory job events, whose types come from a
table in services/memory/jobs.py) are not seen.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

from threadline.v1.events_pb2 import LifecycleEvent

ROOT = Path(__file__).parents[2]
DOC = ROOT / "docs" / "events.md"
#: Arguments of emit() that are event fields, not attributes.
ENVELOPE = {"tenant", "session_id"}


def _emit_calls(tree: ast.AST) -> list[tuple[str, ast.Call]]:
    return [
        (node.func.attr, node)
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args
    ]


def _keywords(call: ast.Call) -> set[str]:
    return {k.arg for k in call.keywords if k.arg is not None} - ENVELOPE


def _helpers(tree: ast.AST) -> dict[str, set[str]]:
    """Methods that pass their first parameter on as emit()'s type, adding attributes
    of their own (llm_proxy's `_emit` adds upstream and model): name -> those attributes."""
    helpers = {}
    for func in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)):
        params = [a.arg for a in func.args.args if a.arg != "self"]
        for name, call in _emit_calls(func):
            first = call.args[0]
            if name == "emit" and isinstance(first, ast.Name) and params[:1] == [first.id]:
                helpers[func.name] = _keywords(call)
    return helpers


def published() -> dict[str, set[str]]:
    """Event type -> attribute names, from every emit call with a literal type under
    threadline/ and services/ (directly or through a helper of the same module)."""
    found: dict[str, set[str]] = defaultdict(set)
    for path in [*ROOT.glob("threadline/**/*.py"), *ROOT.glob("services/**/*.py")]:
        source = path.read_text()
        if "emit(" not in source:
            continue
        tree = ast.parse(source, str(path))
        helpers = _helpers(tree)
        for name, call in _emit_calls(tree):
            if name != "emit" and name not in helpers:
                continue
            for type_ in _literal_types(call.args[0]):
                found[type_] |= _keywords(call) | helpers.get(name, set())
    return found


def _literal_types(node: ast.expr) -> list[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    # `"turn.interrupted" if interrupted else "turn.completed"`
    if isinstance(node, ast.IfExp):
        return _literal_types(node.body) + _literal_types(node.orelse)
    return []


def documented() -> dict[str, set[str]]:
    """Event type -> the attribute names its row of the Types table names (in backticks),
    with the rows it refers to ("as above", "as completed", "as for consolidation")."""
    rows: list[tuple[list[str], str]] = []
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`") or cells[1] == "service":
            continue
        types = re.findall(r"`([a-z_.]+)`", cells[0])
        # `memory.extraction.started` / `.done` / `.failed`
        full = [t if not t.startswith(".") else types[0].rsplit(".", 1)[0] + t for t in types]
        rows.append((full, cells[2]))
    fields: dict[str, set[str]] = {}
    for index, (types, text) in enumerate(rows):
        names = set(re.findall(r"`([a-z_]+)`", text))
        if "as above" in text and index > 0:
            names |= fields[rows[index - 1][0][0]]
        for referred in re.findall(r"as (?:for )?([a-z]+)", text):
            names |= {f for t, fs in fields.items() if referred in t for f in fs}
        for type_ in types:
            # A type may have a row per shape (turn.interrupted: cut, or cancelled).
            fields[type_] = fields.get(type_, set()) | names
    return fields


def test_every_published_attribute_is_documented() -> None:
    docs = documented()
    missing = {
        type_: sorted(names - docs.get(type_, set()))
        for type_, names in published().items()
        if type_ not in docs or names - docs[type_]
    }
    assert missing == {}, f"add these to docs/events.md: {missing}"


def test_the_envelope_fields_are_documented() -> None:
    intro = DOC.read_text().split("## Types")[0]
    for field in LifecycleEvent.DESCRIPTOR.fields_by_name:
        assert f"`{field}`" in intro, field
