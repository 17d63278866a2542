"""A workspace: the one directory the model's tools may touch, and how.

Every file operation goes through descriptors (`confined.ConfinedDir`): a path
is never checked as a string and then opened by name, so a directory swapped for
a symlink halfway through cannot lead outside. Symlinks that stay inside still
work; permission rules are matched on the real, root-relative path parts (links
resolved), so an in-workspace symlink cannot lend a read-only file write access,
and rule `docs` never covers `docs2`. A file with more than one name (a hard
link) is never read: its other name may be outside.

Refusals raise `ToolDenied` with a reason worded for the model: it goes back
as the tool result, and a model can only correct itself if it is told what
was wrong.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath, PurePosixPath
from typing import Literal

from services.executor.turns.confined import ConfinedDir, Escape, Located, Opened, SymlinkLoop
from threadline import errors

Permission = Literal["read", "write"]
Parts = tuple[str, ...]


class ToolDenied(Exception):
    """A tool call the workspace refuses; `reason` is meant for the model to read.

    Not a ThreadlineError: it never leaves the executor, it becomes a tool result.
    `rule` names the rule that refused it ("leaves_workspace", "read_only", ...):
    events and logs carry that, never the reason, which quotes the path the model
    chose and so may hold the user's text."""

    def __init__(self, reason: str, rule: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.rule = rule


class TooLarge(ToolDenied):
    """A file over max_file_bytes (search_text skips these rather than failing)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, "too_large")


@dataclass(frozen=True)
class PermissionRule:
    """What the tools may do under `path` ("write" implies read)."""

    #: Relative to the workspace root; "" or "." is the whole workspace.
    path: str
    permission: Permission


@dataclass(frozen=True)
class WriteOutcome:
    #: Where the file is, relative to the root ("a/b.txt").
    shown: str
    bytes_written: int
    created: bool


@dataclass(frozen=True)
class Entry:
    name: str
    kind: Literal["dir", "file", "symlink", "other"]
    #: For files; None when it could not be read (gone since the scan).
    size: int | None = None


@dataclass(frozen=True)
class Listing:
    #: The directory, relative to the root ("." for the root).
    shown: str
    #: Entries in the directory, of which `entries` are the first by name.
    total: int
    entries: list[Entry]


def format_size(n: int) -> str:
    """Decimal units, one decimal place: what a model (or a person) reads at a glance."""
    if n < 1000:
        return f"{n} bytes"
    if n < 1_000_000:
        return f"{n / 1e3:.1f} KB"
    if n < 1_000_000_000:
        return f"{n / 1e6:.1f} MB"
    return f"{n / 1e9:.1f} GB"


class Workspace:
    """A directory the tools are confined to, with allow rules per sub-path."""

    def __init__(
        self,
        root: Path,
        rules: Sequence[PermissionRule],
        *,
        max_file_bytes: int = 1_000_000,
    ) -> None:
        if max_file_bytes <= 0:
            raise errors.InvalidArgument(f"max_file_bytes must be positive, got {max_file_bytes}")
        root.mkdir(parents=True, exist_ok=True)
        #: Canonical (symlink-free) root: every containment check compares against it.
        self.root = root.resolve(strict=True)
        # The root as configured, which may itself sit behind a symlink (e.g. /tmp on
        # macOS): absolute paths the model copies from it must still count as inside.
        self._given_root = Path(os.path.normpath(root.absolute()))
        self._dir = ConfinedDir(self.root, (PurePosixPath(self._given_root),))
        self.max_file_bytes = max_file_bytes
        self.rules = tuple(rules)
        # Keyed by parts so "docs", "docs/" and "./docs" are one rule; for two rules on
        # the same path the later one wins, as with any layered config.
        by_parts: dict[tuple[str, ...], PermissionRule] = {}
        for rule in self.rules:
            by_parts[_rule_parts(rule)] = rule
        self._rules = sorted(by_parts.items(), key=lambda item: len(item[0]), reverse=True)

    def display(self, path: str | os.PathLike[str]) -> str:
        """A path as the model should see it: relative to the root, "." for the root."""
        p = PurePath(path)
        if not p.is_absolute():
            return p.as_posix()
        for base in (self.root, self._given_root):
            try:
                rel = p.relative_to(base)
            except ValueError:
                continue
            return rel.as_posix() if rel.parts else "."
        # Never hand out absolute locations outside the workspace.
        return p.name

    def check_size(self, path: str, size: int) -> None:
        if size > self.max_file_bytes:
            raise TooLarge(
                f"'{path}' is {format_size(size)}; the limit is {format_size(self.max_file_bytes)}"
            )

    # -- file access -----------------------------------------------------------------

    def read_bytes(self, path: str) -> bytes:
        """The whole file, if readable here and within the size limit."""
        parts = self._lexical_parts(path)
        # O_NONBLOCK: opening a FIFO must not hang the tool.
        opened = self._open(path, parts, os.O_RDONLY | os.O_NONBLOCK)
        try:
            self._check_rules(path, opened.parts, "read")
            info = os.fstat(opened.fd)
            if stat.S_ISDIR(info.st_mode):
                raise IsADirectoryError(
                    errno.EISDIR, "is a directory (use list_dir to see what it holds)", path
                )
            if not stat.S_ISREG(info.st_mode):
                raise OSError(errno.EINVAL, "not a regular file", path)
            if info.st_nlink > 1:
                # Its other names can be anywhere on this filesystem; no name here is
                # proof that the content belongs to the workspace.
                raise ToolDenied(
                    f"'{path}' is a hard link (the file has {info.st_nlink} names); "
                    "the tools read only files with a single name",
                    "hard_link",
                )
            self.check_size(path, info.st_size)
            data = _read_at_most(opened.fd, self.max_file_bytes + 1)
        finally:
            os.close(opened.fd)
        # The file may have grown between fstat and read.
        self.check_size(path, len(data))
        return data

    def write_bytes(self, path: str, data: bytes) -> WriteOutcome:
        """Replace (or create) the file atomically: readers see the old or the new file."""
        if len(data) > self.max_file_bytes:
            raise ToolDenied(
                f"the content for '{path}' is {format_size(len(data))}; "
                f"the limit is {format_size(self.max_file_bytes)}",
                "too_large",
            )
        parts = self._lexical_parts(path)
        if not parts:
            raise IsADirectoryError(errno.EISDIR, "is the workspace directory", ".")
        # Rules first, on where the file would land, before any directory is made.
        located = self._locate(path, parts)
        if located.ends_in_link:
            # Writing through a link would change a file under another name (and
            # another rule); the model should name the real file.
            raise ToolDenied(
                f"'{path}' is a symlink to '{_shown(located.parts)}'; write to that path instead",
                "write_through_symlink",
            )
        self._check_rules(path, located.parts, "write")
        parent = self._open(path, parts[:-1], os.O_RDONLY | os.O_DIRECTORY, mkdirs=True)
        try:
            # Again on the directory actually opened: a link swapped in since the check
            # may have moved the target (never outside: the open saw to that).
            real = (*parent.parts, parts[-1])
            self._check_rules(path, real, "write")
            created = self._replace_in(parent.fd, parts[-1], path, data)
        finally:
            os.close(parent.fd)
        return WriteOutcome(_shown(real), len(data), created)

    def list_dir(self, path: str, limit: int) -> Listing:
        """The directory's entries, sorted by name, the first `limit` described."""
        parts = self._lexical_parts(path)
        opened = self._open(path, parts, os.O_RDONLY | os.O_DIRECTORY)
        try:
            self._check_rules(path, opened.parts, "read")
            # Through the descriptor: each entry's type and size are read relative to
            # the directory that was opened, whatever its path names by now.
            with os.scandir(opened.fd) as scan:
                found = sorted(scan, key=lambda entry: entry.name)
            entries = [_entry(found_entry) for found_entry in found[:limit]]
        finally:
            os.close(opened.fd)
        return Listing(_shown(opened.parts), len(found), entries)

    def files_under(self, path: str) -> Generator[str, None, None]:
        """Files at or under `path` as root-relative paths: each directory's files by
        name, then its subdirectories. Directory symlinks are not entered: what they
        point to is searched under its own path if it is in the workspace."""
        parts = self._lexical_parts(path)
        opened = self._open(path, parts, os.O_RDONLY | os.O_NONBLOCK)
        try:
            self._check_rules(path, opened.parts, "read")
            is_dir = stat.S_ISDIR(os.fstat(opened.fd).st_mode)
        finally:
            os.close(opened.fd)
        if not is_dir:
            yield _shown(opened.parts)
            return
        pending = [opened.parts]
        while pending:
            files, subdirs = self._scan(pending.pop())
            yield from files
            pending.extend(reversed(subdirs))

    # -- internals -------------------------------------------------------------------

    def _scan(self, parts: Parts) -> tuple[list[str], list[Parts]]:
        """One directory of `files_under`: its files, and its subdirectories to visit."""
        try:
            opened = self._dir.open(parts, os.O_RDONLY | os.O_DIRECTORY)
        except (OSError, Escape, SymlinkLoop):
            return [], []  # gone, or swapped for something else, since it was listed
        try:
            with os.scandir(opened.fd) as scan:
                found = sorted(scan, key=lambda entry: entry.name)
            files: list[str] = []
            subdirs: list[Parts] = []
            for entry in found:
                if entry.is_dir(follow_symlinks=False):
                    subdirs.append((*opened.parts, entry.name))
                elif not (entry.is_symlink() and _points_to_dir(entry)):
                    files.append(_shown((*opened.parts, entry.name)))
        finally:
            os.close(opened.fd)
        return files, subdirs

    def _replace_in(self, dir_fd: int, name: str, path: str, data: bytes) -> bool:
        try:
            existing: os.stat_result | None = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            existing = None
        if existing is not None:
            if stat.S_ISLNK(existing.st_mode):
                raise ToolDenied(
                    f"'{path}' is a symlink; write to the file it points to instead",
                    "write_through_symlink",
                )
            if stat.S_ISDIR(existing.st_mode):
                raise IsADirectoryError(errno.EISDIR, "is a directory", path)
        # A hidden, unguessable sibling: same filesystem, so os.replace is atomic. The
        # old file is never opened, so a hard-linked name is replaced, not written
        # through: the file's other names keep their content.
        tmp = f".{name}.{secrets.token_hex(8)}.tmp"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(tmp, flags, 0o666, dir_fd=dir_fd)
        try:
            try:
                if existing is not None:
                    os.fchmod(fd, stat.S_IMODE(existing.st_mode))
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                # Without fsync a crash right after the rename can leave an empty file.
                os.fsync(fd)
            finally:
                os.close(fd)
            # Replaces the directory entry itself: a symlink planted at the target
            # since the check above is overwritten, never followed.
            os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
            raise
        return existing is None

    def _open(self, path: str, parts: Parts, flags: int, *, mkdirs: bool = False) -> Opened:
        try:
            return self._dir.open(parts, flags, mkdirs=mkdirs)
        except (Escape, SymlinkLoop, OSError) as exc:
            raise _refusal(path, parts, exc) from None

    def _locate(self, path: str, parts: Parts) -> Located:
        try:
            return self._dir.locate(parts)
        except (Escape, SymlinkLoop, OSError) as exc:
            raise _refusal(path, parts, exc) from None

    def _lexical_parts(self, path: str) -> Parts:
        """Root-relative parts with `.` and `..` folded, refusing anything that leaves.

        Folding `..` before the filesystem sees it means `link/../x` names `<root>/x`,
        whatever `link` points to: stricter than POSIX, never looser.
        """
        if "\x00" in path:
            raise ToolDenied(f"path {path!r} contains a NUL character", "nul_in_path")
        if path in ("", "."):
            return ()
        normalized = os.path.normpath(path)
        if os.path.isabs(normalized):
            for base in (self.root, self._given_root):
                try:
                    return PurePath(normalized).relative_to(base).parts
                except ValueError:
                    continue
            raise ToolDenied(
                f"'{path}' is outside the workspace; use a path relative to the "
                f"workspace root ({self.root})",
                "outside_workspace",
            )
        if normalized == os.pardir or normalized.startswith(os.pardir + os.sep):
            raise ToolDenied(f"path '{path}' leaves the workspace", "leaves_workspace")
        return PurePath(normalized).parts

    def _rule_for(self, parts: Parts) -> PermissionRule | None:
        # Longest prefix first, compared part by part: rule "docs" covers
        # "docs/a.md" but not "docs2/a.md".
        for rule_parts, rule in self._rules:
            if parts[: len(rule_parts)] == rule_parts:
                return rule
        return None

    def _check_rules(self, path: str, parts: Parts, need: Permission) -> None:
        rule = self._rule_for(parts)
        if rule is None:
            raise ToolDenied(
                f"'{path}' is not accessible here (no rule covers it; {self._describe_rules()})",
                "no_rule",
            )
        if need == "write" and rule.permission != "write":
            raise ToolDenied(
                f"'{path}' is read-only here (rule: path '{rule.path or '.'}', {rule.permission})",
                "read_only",
            )

    def _describe_rules(self) -> str:
        if not self.rules:
            return "no paths are accessible in this workspace"
        shown = [f"'{r.path or '.'}' {r.permission}" for r in self.rules[:10]]
        more = f" and {len(self.rules) - 10} more" if len(self.rules) > 10 else ""
        return "accessible paths: " + ", ".join(shown) + more


def _refusal(path: str, parts: Parts, exc: Escape | SymlinkLoop | OSError) -> Exception:
    """Escapes and loops as ToolDenied; OS errors naming the path as the model did."""
    if isinstance(exc, Escape):
        return ToolDenied(
            f"'{path}' goes through the symlink '{_shown(exc.link)}', "
            "which points outside the workspace",
            "symlink_outside",
        )
    if isinstance(exc, SymlinkLoop):
        return ToolDenied(f"'{path}' cannot be resolved (a symlink loop?)", "symlink_loop")
    # The error's own filename is a bare component or a host path.
    return OSError(exc.errno, exc.strerror, _shown(parts))


def _shown(parts: Sequence[str]) -> str:
    return "/".join(parts) or "."


def _read_at_most(fd: int, limit: int) -> bytes:
    chunks: list[bytes] = []
    remaining = limit
    while remaining > 0:
        chunk = os.read(fd, min(remaining, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _entry(entry: os.DirEntry[str]) -> Entry:
    if entry.is_symlink():
        return Entry(entry.name, "symlink")
    if entry.is_dir(follow_symlinks=False):
        return Entry(entry.name, "dir")
    if entry.is_file(follow_symlinks=False):
        try:
            return Entry(entry.name, "file", entry.stat(follow_symlinks=False).st_size)
        except OSError:
            return Entry(entry.name, "file")  # gone since the scan
    return Entry(entry.name, "other")


def _points_to_dir(entry: os.DirEntry[str]) -> bool:
    # Only to classify the entry (a directory link is not searched); nothing is opened.
    try:
        return entry.is_dir(follow_symlinks=True)
    except OSError:
        return False


def _rule_parts(rule: PermissionRule) -> Parts:
    normalized = os.path.normpath(rule.path) if rule.path else os.curdir
    if (
        os.path.isabs(normalized)
        or normalized == os.pardir
        or normalized.startswith(os.pardir + os.sep)
    ):
        # A rule is configuration: a bad one should stop startup, not quietly grant
        # (or deny) something else.
        raise errors.InvalidArgument(
            f"permission rule path {rule.path!r} must be relative to the workspace root "
            "and stay inside it"
        )
    if rule.permission not in ("read", "write"):
        raise errors.InvalidArgument(
            f"permission rule for {rule.path!r}: permission must be 'read' or 'write', "
            f"got {rule.permission!r}"
        )
    return PurePath(normalized).parts
