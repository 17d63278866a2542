"""The built-in tools a model may call: read_file, write_file, list_dir, search_text.

`ToolBox.call` is the one entry point the agent loop uses. It never raises for
anything the model did or the filesystem refused: every outcome becomes a
`ToolResult` whose `content` goes back to the model as the `tool` message, so a
bad call costs one round, not the turn. Confinement and permissions live in
`services.executor.turns.workspace`; this module parses arguments, runs the file
work off the event loop, and shapes what the model reads.

A session's tools run in a workspace of the session's tenant, and the turn names
the tenant only when it runs them: such a toolbox is made over `PerTenant`
workspaces, offers its specs as any other, and runs through `for_tenant`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from services.executor.turns.workspace import Entry, TooLarge, ToolDenied, Workspace, format_size
from threadline.logs import get_logger
from threadline.v1 import common_pb2

log = get_logger(__name__)

#: list_dir shows at most this many entries (sorted by name) and says how many more.
MAX_LIST_ENTRIES = 500
#: search_text matches only this many first lines of a file...
SEARCH_MAX_LINES_PER_FILE = 20_000
#: ...and only the first this-many characters of a line: backtracking cost grows with
#: line length, and minified files hold megabyte-long lines.
SEARCH_MAX_LINE_CHARS = 2_000
#: A matched line is shown up to this many characters.
SEARCH_SHOWN_LINE_CHARS = 300
SEARCH_DEFAULT_RESULTS = 50
SEARCH_MAX_RESULTS = 500
#: Files whose first bytes hold a NUL are binary (the heuristic git and grep use).
BINARY_SNIFF_BYTES = 8192


@dataclass(frozen=True)
class ToolResult:
    #: What goes back to the model as the `tool` message.
    content: str
    status: Literal["ok", "error", "denied"] = "ok"
    #: Why, for "error" and "denied" (also inside `content`): the model's own words
    #: may be in it, so it stays in the conversation, out of events and logs.
    reason: str = ""
    #: For "denied": the rule that refused it (`ToolDenied.rule`), what events carry.
    rule: str = ""


@dataclass(frozen=True)
class PerTenant:
    """Tools whose workspace depends on the tenant, who is named when they run."""

    #: The tools over a tenant's workspace.
    tools: Callable[[str], ToolBox]
    #: The file size limit of every such workspace (the descriptions name it).
    max_file_bytes: int


class _BadCall(Exception):
    """The model asked for something malformed; the message tells it what to fix."""


@dataclass(frozen=True)
class _Tool:
    name: str
    description: str
    #: JSON schema of the arguments object; also drives argument validation, so what
    #: the model is told and what is enforced cannot drift apart.
    parameters: dict[str, Any]
    run: Callable[[Mapping[str, Any]], str]
    #: Wall-clock bound for the whole call; None trusts the tool to bound itself.
    timeout_s: float | None = None


class ToolBox:
    """The tools over one workspace, as OpenAI-style function specs and a dispatcher."""

    def __init__(
        self,
        workspace: Workspace | PerTenant,
        *,
        max_output_chars: int = 16_000,
        search_time_budget_s: float = 5.0,
        max_message_chars: int = 32_000,
    ) -> None:
        self._workspace = workspace
        self.max_output_chars = max_output_chars
        self.search_time_budget_s = search_time_budget_s
        #: The longest content (or call arguments) a message of the session log may
        #: hold (`session.max_message_chars`): a tool round stores nothing longer.
        self.max_message_chars = max_message_chars
        limit = format_size(workspace.max_file_bytes)
        tools = (*self._file_tools(limit), *self._browsing_tools(limit))
        self._tools = {tool.name: tool for tool in tools}

    def _file_tools(self, limit: str) -> tuple[_Tool, ...]:
        return (
            _Tool(
                name="read_file",
                description=(
                    "Read a text file from the workspace. Returns its content (UTF-8; "
                    "undecodable bytes shown as U+FFFD). Use offset and limit to page "
                    f"through long files. Files over {limit} are refused."
                ),
                parameters=_object(
                    {
                        "path": _string("File path, relative to the workspace root."),
                        "offset": _integer("Number of lines to skip first (default 0).", 0),
                        "limit": _integer(
                            "Maximum number of lines to return (default: to the end).", 1
                        ),
                    },
                    required=["path"],
                ),
                run=self._read_file,
            ),
            _Tool(
                name="write_file",
                description=(
                    "Create or replace a text file in the workspace with the given content "
                    "(the whole file; parent directories are created). Only allowed where "
                    f"the workspace grants write access. Content over {limit} is refused."
                ),
                parameters=_object(
                    {
                        "path": _string("File path, relative to the workspace root."),
                        "content": _string("The complete new content of the file."),
                    },
                    required=["path", "content"],
                ),
                run=self._write_file,
            ),
        )

    def _browsing_tools(self, limit: str) -> tuple[_Tool, ...]:
        return (
            _Tool(
                name="list_dir",
                description=(
                    "List a directory of the workspace: one entry per line, sorted by name, "
                    "marked dir, file (with its size) or symlink. At most "
                    f"{MAX_LIST_ENTRIES} entries are shown."
                ),
                parameters=_object(
                    {
                        "path": _string(
                            "Directory path, relative to the workspace root (default: the root)."
                        )
                    },
                    required=[],
                ),
                run=self._list_dir,
            ),
            _Tool(
                name="search_text",
                description=(
                    "Search text files for a Python regular expression, line by line, in a "
                    "file or recursively under a directory. Returns matches as "
                    "'path:line: text'. Binary files and files over "
                    f"{limit} are skipped; only the first {SEARCH_MAX_LINE_CHARS} "
                    "characters of each line are searched."
                ),
                parameters=_object(
                    {
                        "pattern": _string(
                            "Python regular expression (re module syntax), e.g. 'def \\\\w+'."
                        ),
                        "path": _string(
                            "File or directory to search, relative to the workspace root "
                            "(default: the whole workspace)."
                        ),
                        "max_results": _integer(
                            f"Stop after this many matches (default {SEARCH_DEFAULT_RESULTS}).",
                            1,
                            SEARCH_MAX_RESULTS,
                        ),
                    },
                    required=["pattern"],
                ),
                run=self._search_text,
                # The budget is checked between lines; this backstop frees the turn when
                # a single pathological match (nested quantifiers) never returns. The
                # thread itself cannot be stopped: Python's re has no timeout.
                timeout_s=self.search_time_budget_s * 2 + 5,
            ),
        )

    @property
    def workspace(self) -> Workspace:
        if isinstance(self._workspace, PerTenant):
            raise RuntimeError("these tools run in a tenant's workspace: use for_tenant()")
        return self._workspace

    def for_tenant(self, tenant: str) -> ToolBox:
        """These tools over `tenant`'s workspace; a toolbox over one workspace is itself."""
        if not isinstance(self._workspace, PerTenant):
            return self
        return self._workspace.tools(tenant)

    @property
    def tool_names(self) -> tuple[str, ...]:
        return tuple(self._tools)

    def specs(self) -> list[common_pb2.ToolSpec]:
        """The tools as the model is offered them (OpenAI `tools`, function type)."""
        return [
            common_pb2.ToolSpec(
                name=tool.name,
                description=tool.description,
                parameters_json=json.dumps(tool.parameters, separators=(",", ":")),
            )
            for tool in self._tools.values()
        ]

    async def call(self, name: str, arguments_json: str) -> ToolResult:
        """Run one tool call; every failure comes back as a result, never as an exception."""
        tool = self._tools.get(name)
        if tool is None:
            known = ", ".join(sorted(self._tools))
            return self._failure("error", f"unknown tool '{name}'; the tools are: {known}")
        try:
            args = _parse_arguments(tool.parameters, arguments_json)
            content = await self._run(tool, args)
        except _BadCall as exc:
            return self._failure("error", f"{name}: {exc}")
        except ToolDenied as exc:
            log.info("tool.denied", tool=name, rule=exc.rule)
            return self._failure("denied", exc.reason, exc.rule)
        except OSError as exc:
            return self._failure("error", f"{name}: {self._describe_os_error(exc)}")
        except Exception as exc:
            # A bug in a tool must not end the turn either; the log keeps the trace.
            log.exception("tool.crashed", tool=name)
            return self._failure("error", f"{name} failed: {type(exc).__name__}: {exc}")
        return ToolResult(self._clip(content))

    async def _run(self, tool: _Tool, args: Mapping[str, Any]) -> str:
        # Off the loop: file work blocks, and a slow disk must not stall other turns.
        work = asyncio.ensure_future(asyncio.to_thread(tool.run, args))
        if tool.timeout_s is None:
            return await work
        # asyncio.wait rather than wait_for: a timeout must not be confused with an
        # OSError(ETIMEDOUT) raised by the file work, which is also a TimeoutError.
        try:
            done, _ = await asyncio.wait({work}, timeout=tool.timeout_s)
        finally:
            if not work.done():
                work.cancel()
        if work not in done:
            raise _BadCall(
                f"did not finish within {tool.timeout_s:g} s and was abandoned; simplify "
                "the pattern (nested quantifiers such as (a+)+ can take exponential time) "
                "or narrow the path"
            )
        return work.result()

    # -- the tools (run in a worker thread) --------------------------------------------

    def _read_file(self, args: Mapping[str, Any]) -> str:
        path: str = args["path"]
        offset: int = args.get("offset", 0)
        limit: int | None = args.get("limit")
        text = self.workspace.read_bytes(path).decode("utf-8", errors="replace")
        if offset == 0 and limit is None:
            # An empty tool message reads like a failure to some models; say it.
            return text if text else f"('{path}' is empty)"
        lines = _split_lines(text)
        if offset and offset >= len(lines):
            raise _BadCall(f"offset {offset} is past the end of '{path}' ({len(lines)} lines)")
        end = len(lines) if limit is None else min(len(lines), offset + limit)
        body = "".join(lines[offset:end])
        if end < len(lines):
            body += f"\n[lines {offset + 1}-{end} of {len(lines)}; pass offset={end} to read on]"
        return body

    def _write_file(self, args: Mapping[str, Any]) -> str:
        path: str = args["path"]
        outcome = self.workspace.write_bytes(path, args["content"].encode("utf-8"))
        verb = "created" if outcome.created else "replaced"
        return f"{verb} '{outcome.shown}' ({format_size(outcome.bytes_written)})"

    def _list_dir(self, args: Mapping[str, Any]) -> str:
        path: str = args.get("path", ".")
        listing = self.workspace.list_dir(path, MAX_LIST_ENTRIES)
        if not listing.total:
            return f"'{listing.shown}' is empty"
        lines = [f"'{listing.shown}': {listing.total} entries"]
        lines.extend(_describe_entry(entry) for entry in listing.entries)
        if listing.total > MAX_LIST_ENTRIES:
            lines.append(f"[... {listing.total - MAX_LIST_ENTRIES} more entries not shown]")
        return "\n".join(lines)

    def _search_text(self, args: Mapping[str, Any]) -> str:
        pattern: str = args["pattern"]
        path: str = args.get("path", ".")
        max_results: int = args.get("max_results", SEARCH_DEFAULT_RESULTS)
        try:
            regex = re.compile(pattern)
        except re.error as exc:
            raise _BadCall(f"invalid regular expression {pattern!r}: {exc}") from None
        deadline = time.monotonic() + self.search_time_budget_s
        matches: list[str] = []
        skipped: Counter[str] = Counter()
        stop: Literal["results", "time"] | None = None
        files = self.workspace.files_under(path)
        with contextlib.closing(files):
            for shown in files:
                if time.monotonic() > deadline:
                    stop = "time"
                    break
                data = self._searchable(shown, skipped)
                if data is None:
                    continue
                stop = _search_file(regex, shown, data, matches, max_results, deadline, skipped)
                if stop:
                    break

        base = self.workspace.display(os.path.normpath(path))
        out = matches or [f"no matches for {pattern!r} under '{base}'"]
        if stop == "results":
            out.append(f"[stopped at {max_results} matches; narrow the pattern or path for more]")
        elif stop == "time":
            out.append(
                f"[search stopped after {self.search_time_budget_s:g} s; results are partial, "
                "narrow the path]"
            )
        if skipped:
            out.append(
                "[files skipped: " + ", ".join(f"{n} {why}" for why, n in skipped.items()) + "]"
            )
        return "\n".join(out)

    def _searchable(self, shown: str, skipped: Counter[str]) -> bytes | None:
        """The file's bytes, or None (counted in `skipped`) when it is not searched."""
        try:
            # Through the workspace, so a symlink out of it (or out of the rules), or a
            # hard link, found by the walk is refused like any named path.
            data = self.workspace.read_bytes(shown)
        except TooLarge:
            skipped[f"over {format_size(self.workspace.max_file_bytes)}"] += 1
            return None
        except (ToolDenied, OSError):
            skipped["not readable"] += 1
            return None
        if b"\0" in data[:BINARY_SNIFF_BYTES]:
            skipped["binary"] += 1
            return None
        return data

    # -- shaping results ----------------------------------------------------------------

    def _failure(
        self, status: Literal["error", "denied"], reason: str, rule: str = ""
    ) -> ToolResult:
        prefix = "denied" if status == "denied" else "error"
        return ToolResult(self._clip(f"{prefix}: {reason}"), status, reason, rule)

    def _clip(self, text: str) -> str:
        if len(text) <= self.max_output_chars:
            return text
        more = len(text) - self.max_output_chars
        return text[: self.max_output_chars] + f"\n[... output truncated: {more} more characters]"

    def _describe_os_error(self, exc: OSError) -> str:
        what = exc.strerror or str(exc)
        if isinstance(exc.filename, str):
            # Workspace-relative, as the model named it: absolute host paths mean
            # nothing to it.
            return f"{what}: '{self.workspace.display(exc.filename)}'"
        return what


def _object(properties: dict[str, dict[str, Any]], *, required: list[str]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": required}


def _string(description: str) -> dict[str, Any]:
    return {"type": "string", "description": description}


def _integer(description: str, minimum: int, maximum: int | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "integer", "description": description, "minimum": minimum}
    if maximum is not None:
        schema["maximum"] = maximum
    return schema


def _parse_arguments(schema: Mapping[str, Any], arguments_json: str) -> dict[str, Any]:
    """The arguments as the schema describes them, or _BadCall naming the field."""
    if not arguments_json.strip():
        # Models send "" for a call without arguments.
        raw: object = {}
    else:
        try:
            raw = json.loads(arguments_json)
        except (ValueError, RecursionError) as exc:
            raise _BadCall(f"the arguments are not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise _BadCall(f"the arguments must be a JSON object, got {_json_type(raw)}")
    properties: Mapping[str, Mapping[str, Any]] = schema["properties"]
    args: dict[str, Any] = {}
    for name, prop in properties.items():
        # null counts as absent: models often spell an unused optional that way.
        value = raw.get(name)
        if value is None:
            if name in schema["required"]:
                raise _BadCall(f"missing required argument '{name}' ({prop['type']})")
            continue
        if prop["type"] == "string" and not isinstance(value, str):
            raise _BadCall(f"argument '{name}' must be a string, got {_json_type(value)}")
        if prop["type"] == "integer":
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if isinstance(value, bool) or not isinstance(value, int):
                raise _BadCall(f"argument '{name}' must be an integer, got {_json_type(value)}")
            if "minimum" in prop and value < prop["minimum"]:
                raise _BadCall(f"argument '{name}' must be at least {prop['minimum']}, got {value}")
            if "maximum" in prop and value > prop["maximum"]:
                raise _BadCall(f"argument '{name}' must be at most {prop['maximum']}, got {value}")
        args[name] = value
    return args


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _split_lines(text: str) -> list[str]:
    """Lines with their newlines, split on "\\n" only: the numbering search_text uses."""
    lines = text.split("\n")
    kept = [line + "\n" for line in lines[:-1]]
    if lines[-1]:
        kept.append(lines[-1])
    return kept


def _search_file(
    regex: re.Pattern[str],
    shown: str,
    data: bytes,
    matches: list[str],
    max_results: int,
    deadline: float,
    skipped: Counter[str],
) -> Literal["results", "time"] | None:
    """Add the file's matching lines to `matches`; why the search must stop, if it must."""
    lines = data.decode("utf-8", errors="replace").split("\n")
    if len(lines) > SEARCH_MAX_LINES_PER_FILE:
        skipped[f"searched only in their first {SEARCH_MAX_LINES_PER_FILE} lines"] += 1
    for lineno, line in enumerate(lines[:SEARCH_MAX_LINES_PER_FILE], start=1):
        if lineno % 256 == 0 and time.monotonic() > deadline:
            return "time"
        if regex.search(line, 0, SEARCH_MAX_LINE_CHARS):
            text = line.rstrip("\r")
            if len(text) > SEARCH_SHOWN_LINE_CHARS:
                text = text[:SEARCH_SHOWN_LINE_CHARS] + "..."
            matches.append(f"{shown}:{lineno}: {text}")
            if len(matches) >= max_results:
                return "results"
    return None


def _describe_entry(entry: Entry) -> str:
    if entry.kind == "dir":
        return f"{entry.name}/ (dir)"
    if entry.kind == "file":
        if entry.size is None:
            # Gone since the scan: still worth listing, just without a size.
            return f"{entry.name} (file)"
        return f"{entry.name} (file, {format_size(entry.size)})"
    return f"{entry.name} ({entry.kind})"
