"""The executor's built-in tools: what a model gets back, and what stays untouched on disk.

Real temporary directories and real symlinks throughout: confinement bugs live
in how the filesystem resolves paths, which a fake filesystem would not show.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from services.executor.turns.tools import ToolBox, ToolResult
from services.executor.turns.workspace import PermissionRule, ToolDenied, Workspace
from threadline import errors

SECRET = "top secret\n"


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory next to the workspace holding a file the model must never reach."""
    path = tmp_path / "outside"
    path.mkdir()
    (path / "secret.txt").write_text(SECRET)
    return path


@pytest.fixture
def root(tmp_path: Path, outside: Path) -> Path:
    path = tmp_path / "ws"
    path.mkdir()
    (path / "notes.txt").write_text("hello\nworld\n")
    (path / "escape.txt").symlink_to(outside / "secret.txt")
    (path / "escape_dir").symlink_to(outside, target_is_directory=True)
    return path


def toolbox(root: Path, *rules: tuple[str, str], max_file_bytes: int = 1000, **kw: int) -> ToolBox:
    parsed = [PermissionRule(path, "write" if perm == "write" else "read") for path, perm in rules]
    return ToolBox(Workspace(root, parsed, max_file_bytes=max_file_bytes), **kw)


async def call(box: ToolBox, name: str, **args: object) -> ToolResult:
    return await box.call(name, json.dumps(args))


# -- confinement --------------------------------------------------------------------


async def test_dotdot_out_of_the_workspace_is_denied(root: Path) -> None:
    box = toolbox(root, ("", "write"))

    result = await call(box, "read_file", path="../../etc/passwd")

    assert result.status == "denied"
    assert result.reason == "path '../../etc/passwd' leaves the workspace"
    assert result.content == "denied: path '../../etc/passwd' leaves the workspace"


async def test_dotdot_that_stays_inside_is_allowed(root: Path) -> None:
    (root / "docs").mkdir()
    box = toolbox(root, ("", "read"))

    result = await call(box, "read_file", path="docs/../notes.txt")

    assert result == ToolResult("hello\nworld\n")


async def test_absolute_path_outside_is_denied(root: Path) -> None:
    box = toolbox(root, ("", "write"))

    read = await call(box, "read_file", path="/etc/passwd")
    write = await call(box, "write_file", path="/tmp/threadline-escape.txt", content="x")

    assert read.status == "denied"
    assert "'/etc/passwd' is outside the workspace" in read.reason
    assert write.status == "denied"
    assert "threadline-escape.txt" not in os.listdir("/tmp")


async def test_absolute_path_inside_the_root_is_allowed(root: Path) -> None:
    box = toolbox(root, ("", "write"))

    result = await call(box, "read_file", path=str(root / "notes.txt"))

    assert result == ToolResult("hello\nworld\n")


@pytest.mark.parametrize("tool", ["read_file", "write_file"])
async def test_symlink_to_a_file_outside_is_denied(root: Path, outside: Path, tool: str) -> None:
    box = toolbox(root, ("", "write"))

    result = await call(box, tool, path="escape.txt", content="pwned")

    assert result.status == "denied"
    assert result.reason == (
        "'escape.txt' goes through the symlink 'escape.txt', which points outside the workspace"
    )
    assert SECRET not in result.content
    assert (outside / "secret.txt").read_text() == SECRET
    assert (root / "escape.txt").is_symlink()


@pytest.mark.parametrize("tool", ["read_file", "write_file", "list_dir"])
async def test_symlinked_directory_outside_is_denied(root: Path, outside: Path, tool: str) -> None:
    box = toolbox(root, ("", "write"))
    path = "escape_dir" if tool == "list_dir" else "escape_dir/secret.txt"

    result = await call(box, tool, path=path, content="pwned")

    assert result.status == "denied"
    assert "symlink 'escape_dir'" in result.reason
    assert sorted(os.listdir(outside)) == ["secret.txt"]
    assert (outside / "secret.txt").read_text() == SECRET


async def test_writing_a_new_file_through_a_symlinked_directory_creates_nothing_outside(
    root: Path, outside: Path
) -> None:
    (root / "sub").mkdir()
    (root / "sub" / "climb").symlink_to("../../outside")
    box = toolbox(root, ("", "write"))

    result = await call(box, "write_file", path="escape_dir/new/planted.txt", content="x")
    relative = await call(box, "write_file", path="sub/climb/new/planted.txt", content="x")

    assert result.status == "denied"
    assert relative.status == "denied"
    assert relative.reason == (
        "'sub/climb/new/planted.txt' goes through the symlink 'sub/climb', "
        "which points outside the workspace"
    )
    assert sorted(os.listdir(outside)) == ["secret.txt"]


async def test_write_through_a_symlink_inside_the_workspace_is_refused(root: Path) -> None:
    (root / "alias.txt").symlink_to(root / "notes.txt")
    box = toolbox(root, ("", "write"))

    read = await call(box, "read_file", path="alias.txt")
    write = await call(box, "write_file", path="alias.txt", content="changed")

    assert read == ToolResult("hello\nworld\n")
    assert write.status == "denied"
    assert write.reason == "'alias.txt' is a symlink to 'notes.txt'; write to that path instead"
    assert (root / "notes.txt").read_text() == "hello\nworld\n"


async def test_rules_apply_to_where_a_symlink_really_points(root: Path) -> None:
    (root / "public").mkdir()
    (root / "public" / "to_notes").symlink_to(root / "notes.txt")
    (root / "drafts").mkdir()
    (root / "drafts" / "plan.md").write_text("plan\n")
    (root / "public" / "drafts").symlink_to("../drafts")
    box = toolbox(root, ("public", "read"), ("drafts", "write"))

    result = await call(box, "read_file", path="public/to_notes")
    through = await call(box, "read_file", path="public/drafts/plan.md")
    written = await call(box, "write_file", path="public/drafts/next.md", content="next\n")

    assert result.status == "denied"
    assert result.reason.startswith("'public/to_notes' is not accessible here (no rule covers it")
    # The link leads into drafts/, where writing is allowed; the result names the real path.
    assert through == ToolResult("plan\n")
    assert written == ToolResult("created 'drafts/next.md' (5 bytes)")


def test_symlink_loop_is_denied_not_crashed(root: Path) -> None:
    (root / "loop_a").symlink_to(root / "loop_b")
    (root / "loop_b").symlink_to(root / "loop_a")
    workspace = Workspace(root, [PermissionRule("", "write")])

    with pytest.raises(ToolDenied) as denied:
        workspace.read_bytes("loop_a/x")

    assert denied.value.reason == "'loop_a/x' cannot be resolved (a symlink loop?)"


async def test_missing_root_is_created(tmp_path: Path) -> None:
    box = toolbox(tmp_path / "a" / "b", ("", "write"))

    listed = await call(box, "list_dir")

    assert (tmp_path / "a" / "b").is_dir()
    assert listed == ToolResult("'.' is empty")


# -- permission rules ------------------------------------------------------------------


async def test_write_under_a_read_only_rule_is_denied_and_the_file_unchanged(root: Path) -> None:
    box = toolbox(root, ("", "write"), ("notes.txt", "read"))

    result = await call(box, "write_file", path="notes.txt", content="overwritten")

    assert result.status == "denied"
    assert result.reason == "'notes.txt' is read-only here (rule: path 'notes.txt', read)"
    assert (root / "notes.txt").read_text() == "hello\nworld\n"


async def test_write_under_a_write_rule_persists_and_creates_parents(root: Path) -> None:
    box = toolbox(root, ("", "read"), ("out", "write"))

    created = await call(box, "write_file", path="out/deep/er/report.md", content="# Done\n")
    replaced = await call(box, "write_file", path="out/deep/er/report.md", content="# Again\n")

    assert created == ToolResult("created 'out/deep/er/report.md' (7 bytes)")
    assert replaced == ToolResult("replaced 'out/deep/er/report.md' (8 bytes)")
    assert (root / "out/deep/er/report.md").read_text() == "# Again\n"
    # The atomic write leaves no temporary sibling behind.
    assert os.listdir(root / "out/deep/er") == ["report.md"]


async def test_replacing_a_file_keeps_its_mode(root: Path) -> None:
    (root / "run.sh").write_text("echo hi\n")
    (root / "run.sh").chmod(0o750)
    box = toolbox(root, ("", "write"))

    result = await call(box, "write_file", path="run.sh", content="echo bye\n")

    assert result.status == "ok"
    assert (root / "run.sh").stat().st_mode & 0o777 == 0o750


async def test_longest_matching_rule_wins(root: Path) -> None:
    box = toolbox(root, ("", "read"), ("src", "write"), ("src/vendor", "read"))

    in_src = await call(box, "write_file", path="src/app.py", content="x = 1\n")
    in_vendor = await call(box, "write_file", path="src/vendor/lib.py", content="x = 2\n")
    at_root = await call(box, "write_file", path="top.py", content="x = 3\n")

    assert in_src.status == "ok"
    assert in_vendor.status == "denied"
    assert (
        in_vendor.reason == "'src/vendor/lib.py' is read-only here (rule: path 'src/vendor', read)"
    )
    assert at_root.status == "denied"
    assert at_root.reason == "'top.py' is read-only here (rule: path '.', read)"
    assert sorted(p.name for p in (root / "src").iterdir()) == ["app.py"]


async def test_rule_docs_does_not_cover_docs2(root: Path) -> None:
    for name in ("docs", "docs2"):
        (root / name).mkdir()
        (root / name / "a.md").write_text(f"in {name}\n")
    box = toolbox(root, ("docs", "write"))

    docs = await call(box, "read_file", path="docs/a.md")
    docs2_read = await call(box, "read_file", path="docs2/a.md")
    docs2_write = await call(box, "write_file", path="docs2/b.md", content="x")

    assert docs == ToolResult("in docs\n")
    assert docs2_read.status == "denied"
    assert docs2_read.reason == (
        "'docs2/a.md' is not accessible here (no rule covers it; accessible paths: 'docs' write)"
    )
    assert docs2_write.status == "denied"
    assert not (root / "docs2" / "b.md").exists()


@pytest.mark.parametrize("bad", ["/etc", "../up", "a/../../up"])
def test_rules_must_stay_inside_the_workspace(root: Path, bad: str) -> None:
    with pytest.raises(errors.InvalidArgument, match="relative to the workspace root"):
        Workspace(root, [PermissionRule(bad, "read")])


# -- size limits ---------------------------------------------------------------------


async def test_oversized_file_read_is_denied(root: Path) -> None:
    (root / "big.bin").write_bytes(b"x" * 3_200_000)
    box = toolbox(root, ("", "read"), max_file_bytes=1_000_000)

    result = await call(box, "read_file", path="big.bin")

    assert result.status == "denied"
    assert result.reason == "'big.bin' is 3.2 MB; the limit is 1.0 MB"


async def test_oversized_write_is_denied(root: Path) -> None:
    box = toolbox(root, ("", "write"), max_file_bytes=1000)

    result = await call(box, "write_file", path="big.txt", content="y" * 1500)

    assert result.status == "denied"
    assert result.reason == "the content for 'big.txt' is 1.5 KB; the limit is 1.0 KB"
    assert not (root / "big.txt").exists()


async def test_long_output_is_truncated_with_a_marker(root: Path) -> None:
    (root / "long.txt").write_text("a" * 250)
    box = toolbox(root, ("", "read"), max_output_chars=100)

    result = await call(box, "read_file", path="long.txt")

    assert result.content == "a" * 100 + "\n[... output truncated: 150 more characters]"


# -- calls the model gets wrong ------------------------------------------------------------


async def test_unknown_tool_is_an_error_naming_the_tools(root: Path) -> None:
    box = toolbox(root, ("", "write"))

    result = await box.call("rm_rf", "{}")

    assert result.status == "error"
    assert result.content == (
        "error: unknown tool 'rm_rf'; the tools are: list_dir, read_file, search_text, write_file"
    )


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ('{"path": ', "read_file: the arguments are not valid JSON"),
        ('["notes.txt"]', "read_file: the arguments must be a JSON object, got array"),
        ("{}", "read_file: missing required argument 'path' (string)"),
        ('{"path": 7}', "read_file: argument 'path' must be a string, got number"),
        ('{"path": "notes.txt", "offset": "2"}', "argument 'offset' must be an integer"),
        ('{"path": "notes.txt", "offset": true}', "argument 'offset' must be an integer"),
        ('{"path": "notes.txt", "limit": 0}', "argument 'limit' must be at least 1, got 0"),
    ],
)
async def test_malformed_arguments_are_an_error_naming_the_problem(
    root: Path, arguments: str, expected: str
) -> None:
    box = toolbox(root, ("", "write"))

    result = await box.call("read_file", arguments)

    assert result.status == "error"
    assert expected in result.reason
    assert result.content.startswith("error: read_file: ")


async def test_write_file_without_content_names_the_field(root: Path) -> None:
    box = toolbox(root, ("", "write"))

    result = await box.call("write_file", '{"path": "a.txt"}')

    assert result.reason == "write_file: missing required argument 'content' (string)"
    assert not (root / "a.txt").exists()


async def test_invalid_regex_is_an_error(root: Path) -> None:
    box = toolbox(root, ("", "read"))

    result = await call(box, "search_text", pattern="(unclosed")

    assert result.status == "error"
    assert result.reason.startswith("search_text: invalid regular expression '(unclosed': ")
    assert "missing ), unterminated subpattern" in result.reason


async def test_reading_a_directory_is_an_error_result(root: Path) -> None:
    (root / "docs").mkdir()
    box = toolbox(root, ("", "read"))

    result = await call(box, "read_file", path="docs")

    assert result.status == "error"
    assert (
        result.content
        == "error: read_file: is a directory (use list_dir to see what it holds): 'docs'"
    )


async def test_listing_a_file_is_an_error_result(root: Path) -> None:
    box = toolbox(root, ("", "read"))

    result = await call(box, "list_dir", path="notes.txt")

    assert result.status == "error"
    assert result.content == "error: list_dir: Not a directory: 'notes.txt'"


async def test_writing_under_a_file_is_an_error_result(root: Path) -> None:
    box = toolbox(root, ("", "write"))

    result = await call(box, "write_file", path="notes.txt/child.txt", content="x")

    assert result.status == "error"
    assert (root / "notes.txt").read_text() == "hello\nworld\n"


# -- what the tools return ------------------------------------------------------------------


async def test_read_file_pages_by_lines(root: Path) -> None:
    (root / "n.txt").write_text("".join(f"line {i}\n" for i in range(1, 11)))
    box = toolbox(root, ("", "read"))

    middle = await call(box, "read_file", path="n.txt", offset=2, limit=3)
    tail = await call(box, "read_file", path="n.txt", offset=8)
    past = await call(box, "read_file", path="n.txt", offset=10)

    assert middle.content == "line 3\nline 4\nline 5\n\n[lines 3-5 of 10; pass offset=5 to read on]"
    assert tail.content == "line 9\nline 10\n"
    assert past.status == "error"
    assert past.reason == "read_file: offset 10 is past the end of 'n.txt' (10 lines)"


async def test_read_file_replaces_undecodable_bytes(root: Path) -> None:
    (root / "latin1.txt").write_bytes(b"caf\xe9\n")
    box = toolbox(root, ("", "read"))

    result = await call(box, "read_file", path="latin1.txt")

    assert result == ToolResult("caf\ufffd\n")


async def test_list_dir_shows_sorted_entries_with_type_and_size(root: Path) -> None:
    (root / "b_dir").mkdir()
    (root / "a.txt").write_text("12345")
    box = toolbox(root, ("", "read"))

    result = await box.call("list_dir", "")

    assert result == ToolResult(
        "'.': 5 entries\n"
        "a.txt (file, 5 bytes)\n"
        "b_dir/ (dir)\n"
        "escape.txt (symlink)\n"
        "escape_dir (symlink)\n"
        "notes.txt (file, 12 bytes)"
    )


async def test_list_dir_caps_the_entries(root: Path) -> None:
    many = root / "many"
    many.mkdir()
    for i in range(505):
        (many / f"f{i:03}").touch()
    box = toolbox(root, ("", "read"), max_output_chars=100_000)

    result = await call(box, "list_dir", path="many")

    lines = result.content.splitlines()
    assert lines[0] == "'many': 505 entries"
    assert lines[1] == "f000 (file, 0 bytes)"
    assert lines[-2] == "f499 (file, 0 bytes)"
    assert lines[-1] == "[... 5 more entries not shown]"


async def test_search_text_finds_matches_in_nested_files_and_skips_binary(root: Path) -> None:
    (root / "src" / "pkg").mkdir(parents=True)
    (root / "src" / "main.py").write_text("import pkg\n\ndef main():\n    run()\n")
    (root / "src" / "pkg" / "util.py").write_text("def helper():\n    pass\ndef run(): ...\n")
    (root / "src" / "pkg" / "blob.bin").write_bytes(b"\x00\x01def binary():\n")
    box = toolbox(root, ("", "read"))

    result = await call(box, "search_text", pattern=r"^def \w+", path="src")

    assert result == ToolResult(
        "src/main.py:3: def main():\n"
        "src/pkg/util.py:1: def helper():\n"
        "src/pkg/util.py:3: def run(): ...\n"
        "[files skipped: 1 binary]"
    )


async def test_search_text_does_not_follow_symlinks_out(root: Path) -> None:
    box = toolbox(root, ("", "read"))

    result = await call(box, "search_text", pattern="secret")

    assert result.status == "ok"
    assert "top secret" not in result.content
    assert result.content.startswith("no matches for 'secret' under '.'")
    assert "[files skipped: 1 not readable]" in result.content


async def test_search_text_stops_at_max_results(root: Path) -> None:
    (root / "many.txt").write_text("hit\n" * 10)
    box = toolbox(root, ("", "read"))

    result = await call(box, "search_text", pattern="hit", path="many.txt", max_results=2)

    assert result.content == (
        "many.txt:1: hit\nmany.txt:2: hit\n"
        "[stopped at 2 matches; narrow the pattern or path for more]"
    )


async def test_search_text_keeps_to_its_time_budget(root: Path) -> None:
    workspace = Workspace(root, [PermissionRule("", "read")])
    box = ToolBox(workspace, search_time_budget_s=0.0)

    result = await call(box, "search_text", pattern="hello")

    assert result.status == "ok"
    assert "[search stopped after 0 s; results are partial, narrow the path]" in result.content


def test_specs_offer_every_tool_with_a_json_schema(root: Path) -> None:
    box = toolbox(root, ("", "write"))

    specs = {spec.name: spec for spec in box.specs()}

    assert list(specs) == ["read_file", "write_file", "list_dir", "search_text"]
    for spec in specs.values():
        schema = json.loads(spec.parameters_json)
        assert schema["type"] == "object"
        assert set(schema["required"]) <= set(schema["properties"])
        assert spec.description
        assert all(prop["description"] for prop in schema["properties"].values())
    assert json.loads(specs["write_file"].parameters_json)["required"] == ["path", "content"]
    assert "1.0 KB" in specs["read_file"].description
